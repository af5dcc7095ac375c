"""QuantizeBiasPass: INT32 biases on the accumulator grid, for runtimes that fuse them (ONNX Runtime CPU).

Optional last lowering stage. ONNX Runtime's CPU provider fuses Q/DQ -> Gemm <- DQ(INT32 bias) into one
QGemm, the bias added inside the integer kernel; a float bias stays a separate Add over the whole output
(16% of a ViT-B encoder's time). TensorRT takes no INT32 DequantizeLinear and fuses float biases itself,
so only the CPU target lists this pass (`targets/cpu.py`).

Rules:
1. An `IntLinear` searched at 8-bit weights and 8-bit activations, with a bias, gets
   q_b = round(b / (s_x s_w)) in INT32 with scale s_x s_w (per output channel when s_w is).
2. The rounding moves each bias by at most half an accumulator step, s_x s_w / 2: about 1/65000 of
   the product of the input and weight ranges at 8 x 8 bits (below float noise of the sum it joins).
   Coarser grids keep their float bias: at 2 x 2 bits half an accumulator step is a visible error.
3. A bias that would overflow INT32 stays float (the layer keeps MatMul + Add).
"""

from __future__ import annotations

import torch

from qsamc.ir.graph import IR
from qsamc.lowered.layers import IntLinear, SymmetricActQuantizer
from qsamc.ir.pass_manager import Pass, PassResult

_INT32_MAX = 2**31 - 1


@torch.no_grad()
def quantize_bias(layer: torch.nn.Module) -> bool:
    """Apply rules 1-3 to one layer in place; True when it changed."""
    if not (isinstance(layer, IntLinear) and isinstance(layer.act, SymmetricActQuantizer)
            and layer.act.bits == 8 and layer.deployment.weight_bits == 8 and layer.weight.dtype == torch.int8
            and layer.bias is not None and layer.bias_scale is None):
        return False
    scale = (layer.act.scale * layer.weight_scale.double()).expand(layer.bias.shape)
    q = torch.round(layer.bias.double() / scale)
    if q.abs().max() > _INT32_MAX:
        return False
    layer.bias = q.to(torch.int32)
    layer.bias_scale = scale.float().contiguous()
    return True


class QuantizeBiasPass(Pass):
    def call(self, ir: IR) -> PassResult:
        modified = False
        for name in ir.quantizable():
            modified |= quantize_bias(ir.module_of(name))
        return PassResult(ir, modified)
