"""FoldWeightQuantizersPass: fake-quantized weights -> integer weights + scales in the target's containers.

Second export stage, on the static subnet. Every `QuantLinear` / `QuantConv2d` becomes an `IntLinear` /
`IntConv2d` (`qsamc.lowered.layers`) that computes the same function (tested against the unlowered layer).

Rules (containers from `DeploymentFormat.deploy(w, a, kind)`):
1. A quantized weight (w <= 8 bits) is folded with its trained LSQ quantizer: q = round(clamp(W/s)) on the
   signed w-bit grid, kept with s exactly as trained: one scale per tensor or one per output channel.
2. INT8 container: q is stored as int8 (a w-bit grid with w < 8 fits it unchanged).
3. INT4 container (weight-only GEMMs): q is stored for block quantization along the input axis, the
   trained per-tensor or per-channel scale repeated over the blocks (block 128/64/32/16, the largest
   dividing the input width): the same values, in the form ONNX opset 21 and MatMulNBits read.
4. Float container (the runtime has no kernel for this pair): the weight is stored dequantized, q * s,
   so accuracy is the trained grid's and speed the float type's.
5. Float weights (32 bits) stay float. The activation quantizer moves over unchanged (one bit-width).
6. Linear weights are stored transposed, (in, out), the layout of ONNX MatMul.
"""

from __future__ import annotations

import torch

from qsamc.formats import DeploymentFormat
from qsamc.ir.graph import IR
from qsamc.supernet.layers import QuantConv2d, QuantLinear
from qsamc.lowered.layers import IntConv2d, IntLinear
from qsamc.ir.pass_manager import Pass, PassResult
from qsamc.lowered.static import replace_module

INT4_BLOCKS = (128, 64, 32, 16)


def int4_block(in_features: int) -> int:
    """The block size of rule 3 (ONNX Runtime's MatMulNBits needs a power of two >= 16)."""
    return next((b for b in INT4_BLOCKS if in_features % b == 0), INT4_BLOCKS[-1])


@torch.no_grad()
def fold_weight_quantizer(layer: QuantLinear | QuantConv2d, deployment: DeploymentFormat) -> IntLinear | IntConv2d:
    """The integer form of one frozen layer (rules 1-6)."""
    kind = "linear" if isinstance(layer, QuantLinear) else "conv"
    deploy = deployment.deploy(layer.w_bits, layer.a_bits, kind)
    weight, scale, block = layer.weight.detach(), None, 0
    if layer.w_bits <= 8:
        q, s = layer.weight_quantizer[layer.w_bits].integer(weight)
        if deploy.weight in ("int8", "int4"):
            weight, scale = q, s.reshape(-1) if s.dim() else s
        else:
            weight = q.float() * s
    act = layer.act_quantizer[layer.a_bits] if layer.a_bits <= 8 else None
    if kind == "conv":
        return IntConv2d(layer, weight, scale, layer.bias, act, deploy)
    weight = weight.t().contiguous()
    if deploy.weight == "int4":
        block = int4_block(weight.shape[0])
        blocks = -(-weight.shape[0] // block)
        scale = scale.reshape(1, -1).expand(blocks, weight.shape[1]).contiguous()
    return IntLinear(weight, scale, block, layer.bias, act, deploy)


class FoldWeightQuantizersPass(Pass):
    """Rewrite the static subnet's quantized layers in place (the IR's nodes keep their module paths)."""

    def __init__(self, deployment: DeploymentFormat) -> None:
        self.deployment = deployment

    def call(self, ir: IR) -> PassResult:
        modified = False
        for name in ir.quantizable():
            layer = ir.module_of(name)
            if isinstance(layer, (QuantLinear, QuantConv2d)):
                replace_module(ir.root, ir.graph.nodes[name]["module"], fold_weight_quantizer(layer, self.deployment))
                modified = True
        return PassResult(ir, modified)
