"""The pass contract and the pass manager.

Every pass over the IR honours one contract: `pass_(ir) -> PassResult(ir, modified)`. Analysis,
training-time and lowering passes all live in `qsamc.passes`, one per file. The manager runs a list of
passes in order and, when `verify` is on (tests, and `QSAMC_VERIFY_IR=1`), runs the IR verifier after
each one, so a pass that breaks the IR is caught where it did so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from qsamc.ir.graph import IR, verify_ir


@dataclass(frozen=True)
class PassResult:
    ir: IR
    modified: bool


class Pass:
    """Base class. Subclasses implement `call`; `in_place` passes must return the IR they were given."""

    in_place: bool = True

    def call(self, ir: IR) -> PassResult:
        raise NotImplementedError

    def __call__(self, ir: IR) -> PassResult:
        result = self.call(ir)
        if not isinstance(result, PassResult):
            raise TypeError(f"{type(self).__name__}.call must return a PassResult, not {type(result).__name__}")
        if self.in_place and result.ir is not ir:
            raise RuntimeError(f"{type(self).__name__} is declared in place but returned a new IR")
        return result

    def __repr__(self) -> str:
        return type(self).__name__


class PassManager(Pass):
    """Runs passes in order; verifies the IR between them when asked (or when QSAMC_VERIFY_IR=1)."""

    def __init__(self, passes: Sequence[Pass], verify: bool | None = None) -> None:
        self.passes = list(passes)
        self.verify = verify if verify is not None else os.environ.get("QSAMC_VERIFY_IR") == "1"
        self.in_place = all(p.in_place for p in self.passes)

    def call(self, ir: IR) -> PassResult:
        modified = False
        for pass_ in self.passes:
            result = pass_(ir)
            ir, modified = result.ir, modified or result.modified
            if self.verify:
                verify_ir(ir, after=repr(pass_))
        return PassResult(ir, modified)
