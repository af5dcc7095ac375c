"""LowerActivationOffsetsPass: LSQ+ asymmetric activation quantizers -> zero-point-0 quantizers + bias.

Third export stage. TensorRT takes only zero-point 0, but LSQ+ learned a continuous offset beta:
x_hat = round(clamp((x - beta)/s, 0, 2^b - 1)) s + beta. With c = 2^(b-1) and m = beta + c s,

    x_hat = round(clamp((x - m)/s, -c, c - 1)) s + m  =  DQ(Q(x - m)) + m

on the signed b-bit grid with zero-point 0 (a b-bit grid rides in INT8 unchanged: clip to [-c, c-1],
same step). Shifting the argument of round by the integer c is exact because c is even for b >= 2 and
torch/ONNX round half to even.

Rules:
1. Each `IntLinear` / `IntConv2d` whose input quantizer is an `LsqActQuantizer` gets a
   `SymmetricActQuantizer(s, shift=m, b)`: it subtracts m, then quantizes symmetrically.
2. The restoring + m is folded into the layer's bias: b' = b + m * W_hat 1 (the sum of each output
   channel's dequantized weights).
3. A zero-padded conv pads x_hat with 0, which is -m in the shifted domain, so its border outputs see
   fewer + m terms: the bias becomes the exact per-position map b + m * conv(pad0(ones), W_hat) over the
   conv's input size (the subnet's token grid), and the conv keeps its zero padding (which is the
   quantized zero, so DQ -> Conv still fuses).
4. Layers with float activations or an already symmetric quantizer are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qsamc.ir.graph import IR
from qsamc.lowered.layers import IntConv2d, IntLinear, SymmetricActQuantizer
from qsamc.ir.pass_manager import Pass, PassResult
from qsamc.supernet.quant import LsqActQuantizer, _MIN_SCALE


@torch.no_grad()
def lower_activation_offset(layer: IntLinear | IntConv2d, input_hw: tuple[int, int] | None = None) -> bool:
    """Apply rules 1-4 to one layer in place; `input_hw` is needed for zero-padded convs only."""
    act = layer.act
    if not isinstance(act, LsqActQuantizer):
        return False
    scale = float(act.scale.clamp_min(_MIN_SCALE))
    shift = float(act.grid_offset()) + 2 ** (act.bits - 1) * scale
    weight = layer.dequantized_weight().double()
    if isinstance(layer, IntLinear):
        correction = shift * weight.sum(0)
    elif any(layer.padding):
        if input_hw is None:
            raise ValueError("a zero-padded conv needs its input size to fold an activation offset")
        ones = torch.ones(1, weight.shape[1] * layer.groups, *input_hw, dtype=weight.dtype, device=weight.device)
        correction = shift * F.conv2d(ones, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)[0]
    else:
        correction = shift * weight.sum((1, 2, 3))
    bias = correction if layer.bias is None else correction + (
        layer.bias.double() if correction.dim() == layer.bias.dim() else layer.bias.double()[:, None, None])
    layer.bias = bias.float()
    layer.act = SymmetricActQuantizer(scale, shift, act.bits)
    return True


class LowerActivationOffsetsPass(Pass):
    def call(self, ir: IR) -> PassResult:
        modified = False
        for name in ir.quantizable():
            input_hw = ir.graph.nodes[name].get("input_hw")  # conv nodes' static geometry
            modified |= lower_activation_offset(ir.module_of(name), None if input_hw is None else tuple(input_hw))
        return PassResult(ir, modified)
