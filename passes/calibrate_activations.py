"""CalibrateActivationsPass: LSQ+ activation initialisation from the min/max of calibration batches.

Rules:
1. The supernet runs each calibration batch at full precision (all bits 32) on the subnet given (by
   default the maximum), and every activation quantizer of every bit-width observes its layer's input.
2. Each observed quantizer is then initialised: s = (max - min) / (2^b - 1), beta = min.
3. Layers that the subnet does not run (dropped blocks) keep their lazy initialisation from the first
   batch that reaches them.
4. Attention quantizers (`AttentionQuantizers`, where the space quantizes attention) observe scale * q,
   k, v and the softmax output of the same float passes and are initialised the same way.
"""

from __future__ import annotations

from typing import Iterable

import torch

from qsamc.ir.graph import IR
from qsamc.ir.pass_manager import Pass, PassResult
from qsamc.supernet.space import Subnet


class CalibrateActivationsPass(Pass):
    def __init__(self, model: torch.nn.Module, batches: Iterable[torch.Tensor], subnet: Subnet | None = None) -> None:
        """`model` maps the calibration batches to outputs and contains the IR's supernet."""
        self.model, self.batches, self.subnet = model, batches, subnet

    def call(self, ir: IR) -> PassResult:
        supernet, space = ir.root, ir.root.space
        previous = supernet.subnet
        full = space.uniform_bits(self.subnet or space.max_subnet(), 32, 32)
        supernet.configure(space.uniform_attention(full, 32))  # float attention: its quantizers observe
        banks = {name: ir.module_of(name).act_quantizer for name in ir.quantizable()}

        def observe(bank):
            def hook(_module, inputs):
                for bits in bank.bit_choices:
                    if bits in bank:
                        bank[bits].observe(inputs[0])
            return hook

        handles = [ir.module_of(n).register_forward_pre_hook(observe(b)) for n, b in banks.items()]
        attention = {name: module.attention_quantizers for name, _a, module in ir.modules("attention")
                     if getattr(module, "attention_quantizers", None) is not None}
        seen: set[str] = set()
        try:
            for quantizers in attention.values():
                quantizers.observing = True
            with torch.no_grad():
                for batch in self.batches:
                    self.model(batch)
            for name, bank in banks.items():
                for bits in bank.bit_choices:
                    if bits in bank and torch.isfinite(bank[bits].observed_max):
                        bank[bits].initialize()
                        seen.add(name)
            for name, quantizers in attention.items():
                for operands in quantizers.sets.values():
                    for quantizer in operands.values():
                        if torch.isfinite(quantizer.observed_max):
                            quantizer.initialize()
                            seen.add(name)
        finally:
            for handle in handles:
                handle.remove()
            for quantizers in attention.values():
                quantizers.observing = False
            supernet.configure(previous)
        return PassResult(ir, modified=bool(seen))
