"""LowerAttentionQuantizersPass: attention's LSQ quantizers -> their Q/DQ form (quantized attention only).

Where a block's attention is quantized (`attention_bits`, beyond the paper), `AttentionQuantizers` hold
zero-point-0 LSQ quantizers on scale * q, k^T, v and the softmax output. Lowering is exact: each becomes
a `SymmetricActQuantizer` with the trained step and grid, whose ONNX form is INT8 QuantizeLinear ->
DequantizeLinear with zero-point 0 on both inputs of both attention MatMuls: the pattern ONNX Runtime
turns into integer MatMuls and TensorRT's fused MHA reads.

Rules:
1. Every `attention` node's module with quantizers has each of them replaced by its lowered form.
2. Blocks whose attention is float keep running segment-anything's code and emit no Q/DQ.
3. A quantized attention that the deployment's `int8_attention` rule does not admit (TensorRT: global
   blocks, over 512 tokens) is deployed in the float type, as a W8A32 layer is deployed weight-only:
   its module computes float attention and emits no Q/DQ. A deployment without a rule runs none in INT8.
"""

from __future__ import annotations

from qsamc.lowered.layers import SymmetricActQuantizer
from qsamc.formats import AttentionRule
from qsamc.ir.graph import IR
from qsamc.ir.pass_manager import Pass, PassResult
from qsamc.supernet.quant import LsqSymmetricActQuantizer, _MIN_SCALE


def deploys_int8(rule: AttentionRule | None, a: dict, grid: int) -> bool:
    """Whether a runtime with `rule` runs the attention node `a` (annotated) at token grid `grid` in INT8."""
    tokens = (a["window"] or grid) ** 2
    return rule is not None and rule.admits(tokens, a["head_dim"])


class LowerAttentionQuantizersPass(Pass):
    def __init__(self, rule: AttentionRule | None) -> None:
        self.rule = rule

    def call(self, ir: IR) -> PassResult:
        modified = False
        for _name, a, attention in ir.modules("attention"):
            quantizers = getattr(attention, "attention_quantizers", None)
            if quantizers is not None and attention.attention_bits < 32 and not deploys_int8(self.rule, a, ir.subnet.grid):
                attention.attention_bits = 32  # rule 3
                modified = True
            for operands in ([] if quantizers is None else quantizers.sets.values()):
                for operand, quantizer in list(operands.items()):
                    if isinstance(quantizer, LsqSymmetricActQuantizer):
                        scale = float(quantizer.scale.detach().clamp_min(_MIN_SCALE))
                        operands[operand] = SymmetricActQuantizer(scale, 0.0, quantizer.bits)
                        modified = True
        return PassResult(ir, modified)
