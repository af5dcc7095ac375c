"""The analysis pipeline: supernet -> traced IR -> structure and precision annotations -> BitOPs.

Training (`qsamc.training.runs.build_model`), search, export and the `space` / `bitops` / `ir` commands
all start here, so this module depends on nothing above the IR and its passes.
"""

from __future__ import annotations

import torch

from qsamc.ir.graph import IR, trace
from qsamc.ir.pass_manager import PassManager
from qsamc.passes import AnnotatePrecisionPass, AnnotateStructurePass, BitopsReport, CountBitopsPass
from qsamc.passes.count_bitops import FloatMacs
from qsamc.supernet.space import SearchSpace, Subnet
from qsamc.supernet.encoder import Supernet


def build_ir(supernet: Supernet, subnet: Subnet | None = None, verify: bool | None = None) -> IR:
    """Trace a supernet at its maximum subnet and annotate it (structure; precision of `subnet`)."""
    space = supernet.space
    chosen, training = supernet.subnet, supernet.training
    supernet.configure(space.uniform_bits(space.max_subnet(), 32, 32))
    supernet.eval()  # trace the inference path, not the training-time recomputing autograd functions
    try:
        ir = trace(supernet, space.model)
    finally:
        supernet.configure(chosen)
        supernet.train(training)
    passes = [AnnotateStructurePass(space), AnnotatePrecisionPass(space, subnet)]
    return PassManager(passes, verify=verify)(ir).ir


def analysis_ir(space: SearchSpace, subnet: Subnet | None = None) -> IR:
    """The annotated IR of a model without its weights: the supernet is built on the meta device."""
    with torch.device("meta"):
        supernet = Supernet.build(space.model, space=space)
    return build_ir(supernet, subnet)


def count_bitops(space: SearchSpace, subnet: Subnet, float_macs: FloatMacs = "fp32") -> tuple[IR, BitopsReport]:
    """MACs and BitOPs of `subnet` with per-part and per-layer breakdowns."""
    ir = analysis_ir(space, subnet)
    PassManager([CountBitopsPass(space, subnet, float_macs)])(ir)
    return ir, ir.cost
