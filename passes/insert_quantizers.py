"""InsertQuantizersPass: one LSQ+ quantizer bank for the weight and one for the input of each quantized layer.

Rules:
1. Every `quantizable` IR node gets a weight `QuantizerBank` over the space's weight bits and an
   activation bank over its activation bits (one parameter set per bit-width, as QFA).
2. Weight scales are initialised at once from the full pre-trained weight, layer-wise by default (the
   paper) or per output channel with `per_channel=True`: LSQ+ mean/std init (`weight_init="lsq+"`, the
   paper) or the MSE-optimal clipping of each bit-width's grid (`"mse"`, as post-training quantizers do).
3. Activation quantizers are initialised later from data (`CalibrateActivationsPass`).
4. A node whose layer already has banks is left alone, so the pass is idempotent.
"""

from __future__ import annotations

from qsamc.ir.graph import IR
from qsamc.ir.pass_manager import Pass, PassResult
from qsamc.supernet.quant import QuantizerBank, WeightInit
from qsamc.supernet.space import SearchSpace


class InsertQuantizersPass(Pass):
    def __init__(self, space: SearchSpace, per_channel: bool = False, weight_init: WeightInit = "lsq+") -> None:
        self.space, self.per_channel, self.weight_init = space, per_channel, weight_init

    def call(self, ir: IR) -> PassResult:
        modified = False
        for name in ir.quantizable():
            layer = ir.module_of(name)
            if layer.weight_quantizer is not None:
                continue
            channels = layer.weight.shape[0] if self.per_channel else None
            weights = QuantizerBank("weight", self.space.weight_bits, channels).to(layer.weight.device)
            for bits in self.space.weight_bits:
                if bits in weights:
                    weights[bits].initialize(layer.weight, self.weight_init)
            layer.weight_quantizer = weights
            layer.act_quantizer = QuantizerBank("act", self.space.act_bits).to(layer.weight.device)
            modified = True
        return PassResult(ir, modified)
