"""InsertQuantizersPass: one LSQ+ quantizer bank for the weight and one for the input of each quantized layer.

Rules:
1. Every `quantizable` IR node gets a weight `QuantizerBank` over the space's weight bits and an
   activation bank over its activation bits (one parameter set per bit-width, as QFA).
2. Weight scales are initialised at once from the full pre-trained weight, layer-wise by default (the
   paper) or per output channel with `per_channel=True`: LSQ+ mean/std init (`weight_init="lsq+"`, the
   paper) or the MSE-optimal clipping of each bit-width's grid (`"mse"`, as post-training quantizers do).
3. Activation quantizers are initialised later from data (`CalibrateActivationsPass`); their zero point is
   `zero_point` (`qsamc.supernet.quant`: integer, 0 exactly on the grid, or LSQ+'s continuous offset).
4. Where the space quantizes attention (`attention_bits`, beyond the paper), every `attention` node's
   module gets `AttentionQuantizers`: zero-point-0 LSQ quantizers on scale * q, k, v and the softmax
   output per attention bit-width below 32, initialised from data too.
5. A node whose layer already has banks is left alone, so the pass is idempotent.
"""

from __future__ import annotations

from qsamc.ir.graph import IR
from qsamc.ir.pass_manager import Pass, PassResult
from qsamc.supernet.quant import AttentionQuantizers, QuantizerBank, WeightInit, ZeroPoint
from qsamc.supernet.space import SearchSpace


class InsertQuantizersPass(Pass):
    def __init__(self, space: SearchSpace, per_channel: bool = False, weight_init: WeightInit = "lsq+",
                 zero_point: ZeroPoint = "integer") -> None:
        self.space, self.per_channel, self.weight_init, self.zero_point = space, per_channel, weight_init, zero_point

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
            acts = QuantizerBank("act", self.space.act_bits, zero_point=self.zero_point)
            layer.act_quantizer = acts.to(layer.weight.device)
            modified = True
        if self.space.quantized_attention:
            for _name, _a, attention in ir.modules("attention"):
                if attention.attention_quantizers is None:
                    device = attention.qkv.weight.device
                    attention.attention_quantizers = AttentionQuantizers(self.space.attention_bits).to(device)
                    modified = True
        return PassResult(ir, modified)
