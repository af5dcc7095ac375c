"""Integer layers: what the lowering passes turn each quantized layer of a static subnet into.

`FoldWeightQuantizersPass` replaces every `QuantLinear` / `QuantConv2d` by an `IntLinear` / `IntConv2d`
holding integer weights plus scales in the container the target deploys (INT8, INT4 or float);
`LowerActivationOffsetsPass` then replaces each LSQ+ activation quantizer by a `SymmetricActQuantizer`
(zero-point 0). The modules compute in PyTorch exactly what their ONNX form computes, and they emit that
form themselves: each Q/DQ is an autograd function whose `symbolic` writes QuantizeLinear /
DequantizeLinear, so the TorchScript exporter places Q/DQ where TensorRT recommends (on the inputs of
weighted ops, never on their outputs) for a whole encoder or any part of it (`qsamc.export.emit`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qsamc.formats import Deployment
from qsamc.supernet.quant import weight_range

# INT8 saturation bounds: a grid that spans them needs no Clip in front of QuantizeLinear.
_INT8 = weight_range(8)


def _int8_zero(g, shape: tuple[int, ...] = ()):
    return g.op("Constant", value_t=torch.zeros(shape, dtype=torch.int8))


class ActQDQ(torch.autograd.Function):
    """x_hat = round(clamp(x / s, lo, hi)) * s: a symmetric b-bit grid inside an INT8 container.

    ONNX: [Clip(lo s, hi s) when the grid is narrower than INT8] -> QuantizeLinear -> DequantizeLinear,
    zero-points 0. Clipping before rounding equals rounding then clamping because lo and hi are integers.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: float, lo: int, hi: int) -> Tensor:
        return torch.round(torch.clamp(x / scale, lo, hi)) * scale

    @staticmethod
    def symbolic(g, x, scale: float, lo: int, hi: int):
        if (lo, hi) != _INT8:
            bounds = [g.op("Constant", value_t=torch.tensor(v * scale, dtype=torch.float32)) for v in (lo, hi)]
            x = g.op("Clip", x, *bounds)
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        q = g.op("QuantizeLinear", x, s, _int8_zero(g))
        return g.op("DequantizeLinear", q, s, _int8_zero(g))


class WeightDQ(torch.autograd.Function):
    """q * scale for an integer weight: ONNX DequantizeLinear of the integer initializer.

    `axis` is the per-channel axis (ignored for a 0-d scale); `block` > 0 means block quantization along
    axis 0 (the INT4 form ONNX Runtime turns into MatMulNBits): `scale` is (K / block, N). INT4 weights
    and their zero-points are written as INT8 here and narrowed by `qsamc.export.emit` (torch has no INT4 tensors
to export). Zero-points are explicit everywhere: a missing one reads as UINT8 to ONNX Runtime's Q/DQ
rewrites.
    """

    @staticmethod
    def forward(ctx, q: Tensor, scale: Tensor, axis: int, block: int) -> Tensor:
        if block:
            scale = scale.repeat_interleave(block, dim=0)[: q.shape[0]]
        elif scale.dim() == 1:
            scale = scale.reshape(*[1] * axis, -1, *[1] * (q.dim() - axis - 1))
        return q.float() * scale

    @staticmethod
    def symbolic(g, q, scale, axis: int, block: int):
        shape = tuple(scale.type().sizes())
        if block:
            return g.op("DequantizeLinear", q, scale, _int8_zero(g, shape), axis_i=0, block_size_i=block)
        if shape:
            return g.op("DequantizeLinear", q, scale, _int8_zero(g, shape), axis_i=axis)
        return g.op("DequantizeLinear", q, scale, _int8_zero(g))


class AccumulatorGemm(torch.autograd.Function):
    """y = x_hat @ W_hat + q_b * s_b with an INT32 bias on the accumulator grid s_b = s_x s_w.

    ONNX: Gemm(x_hat, W_hat, DequantizeLinear(q_b, s_b)) on 2-D operands, which ONNX Runtime's CPU
    provider fuses (with the Q/DQ of both operands) into one QGemm: bias inside the integer kernel.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, bias_scale: Tensor) -> Tensor:
        return torch.matmul(x, weight) + bias.float() * bias_scale

    @staticmethod
    def symbolic(g, x, weight, bias, bias_scale):
        zero = g.op("Constant", value_t=torch.zeros(tuple(bias_scale.type().sizes()), dtype=torch.int32))
        return g.op("Gemm", x, weight, g.op("DequantizeLinear", bias, bias_scale, zero, axis_i=0))


class SymmetricActQuantizer(nn.Module):
    """The zero-point-0 form of an LSQ+ activation quantizer: x -> DQ(Q(x - shift)) on a signed grid.

    The `+ shift` that restores the LSQ+ value is not applied here: the lowering folds it into the
    consumer's bias, and may fold the `- shift` into the producing LayerNorm (then `shift` is 0).
    """

    def __init__(self, scale: float, shift: float, bits: int) -> None:
        super().__init__()
        self.scale, self.shift, self.bits = scale, shift, bits
        self.lo, self.hi = weight_range(bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale:.4g}, shift={self.shift:.4g}"

    def forward(self, x: Tensor) -> Tensor:
        if self.shift:
            x = x - self.shift
        return ActQDQ.apply(x, self.scale, self.lo, self.hi)


class IntLayer(nn.Module):
    """Shared state of the integer layers: weight (integer + scale, or float), bias, input quantizer.

    `act` is the input quantizer (an `LsqActQuantizer` until the offsets are lowered, then a
    `SymmetricActQuantizer`), or None for float activations.
    """

    deployment: Deployment

    def _init_weight(self, weight: Tensor, scale: Tensor | None, axis: int, block: int,
                     bias: Tensor | None, act: nn.Module | None, deployment: Deployment) -> None:
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("weight_scale", None if scale is None else scale.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.axis, self.block = axis, block
        self.act = act
        self.deployment = deployment

    def dequantized_weight(self) -> Tensor:
        if self.weight_scale is None:
            return self.weight
        return WeightDQ.apply(self.weight, self.weight_scale, self.axis, self.block)

    def quantize_input(self, x: Tensor) -> Tensor:
        return x if self.act is None else self.act(x)


class IntLinear(IntLayer):
    """y = x_hat @ W + b with W stored (in, out), the layout ONNX MatMul and MatMulNBits read.

    With a `bias_scale` (set by `QuantizeBiasPass`) the bias is INT32 on the accumulator grid and the
    layer runs as one 2-D Gemm (`AccumulatorGemm`) on the flattened tokens.
    """

    def __init__(self, weight: Tensor, scale: Tensor | None, block: int, bias: Tensor | None,
                 act: nn.Module | None, deployment: Deployment) -> None:
        super().__init__()
        self._init_weight(weight, scale, 1, block, bias, act, deployment)
        self.register_buffer("bias_scale", None)

    def forward(self, x: Tensor) -> Tensor:
        if self.bias_scale is not None:
            tokens = x.reshape(-1, x.shape[-1])
            y = AccumulatorGemm.apply(self.quantize_input(tokens), self.dequantized_weight(), self.bias, self.bias_scale)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        y = torch.matmul(self.quantize_input(x), self.dequantized_weight())
        if self.bias is None:
            return y
        if self.act is None and self.weight_scale is None:
            return y + self.bias  # a float layer: ONNX Runtime fuses MatMul + Add into one Gemm
        # A (1, out) bias, not (out,): ONNX Runtime's MatMulAddFusion turns MatMul + (out,)-Add on 3-D/4-D
        # inputs into Reshape -> Gemm before its Q/DQ fusions run, which leaves the MatMul in float
        # (3-4x slower) and breaks its INT4 rewrite; it leaves a (1, out) bias alone.
        return y + self.bias.unsqueeze(0)


class IntConv2d(IntLayer):
    """Conv with an (out, in, kh, kw) weight quantized along axis 0. A 3-D `bias` is a per-position
    bias map (the exact offset correction of a zero-padded conv, see `LowerActivationOffsetsPass`)."""

    def __init__(self, conv: nn.Conv2d, weight: Tensor, scale: Tensor | None, bias: Tensor | None,
                 act: nn.Module | None, deployment: Deployment) -> None:
        super().__init__()
        self._init_weight(weight, scale, 0, 0, bias, act, deployment)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        per_channel = self.bias is not None and self.bias.dim() == 1
        y = F.conv2d(self.quantize_input(x), self.dequantized_weight(), self.bias if per_channel else None,
                     self.stride, self.padding, self.dilation, self.groups)
        return y if self.bias is None or per_channel else y + self.bias


INT_LAYER_TYPES = (IntLinear, IntConv2d)


class ChannelNorm(torch.autograd.Function):
    """SAM's LayerNorm2d (over the channels of NCHW), computed as segment-anything computes it.

    ONNX: Transpose(NHWC) -> LayerNormalization(axis -1) -> Transpose(NCHW), one normalisation op a
    runtime keeps whole (TensorRT and `qsamc.export.float16` keep it in FP32) where the exporter would otherwise
    write nine elementwise ops, whose squared deviations FP16 can overflow.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return weight[:, None, None] * ((x - u) / torch.sqrt(s + eps)) + bias[:, None, None]

    @staticmethod
    def symbolic(g, x, weight, bias, eps: float):
        nhwc = g.op("Transpose", x, perm_i=[0, 2, 3, 1])
        y = g.op("LayerNormalization", nhwc, weight, bias, axis_i=-1, epsilon_f=eps)
        return g.op("Transpose", y, perm_i=[0, 3, 1, 2])


class ChannelLayerNorm(nn.Module):
    """The emitted form of a LayerNorm2d (same weight, bias and eps; see `ChannelNorm`)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.register_buffer("weight", norm.weight.detach().clone())
        self.register_buffer("bias", norm.bias.detach().clone())
        self.eps = norm.eps

    def forward(self, x: Tensor) -> Tensor:
        return ChannelNorm.apply(x, self.weight, self.bias, self.eps)
