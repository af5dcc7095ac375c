"""FuseFloatAttentionPass: float attention as one fused attention op (ONNX Runtime CPU).

segment-anything's attention adds its decomposed rel-pos terms as two broadcast adds over every
head's N x N scores, then a softmax: separate ONNX Runtime nodes that no fusion joins (the per-node profile
in the README: ~250 ms of a vit_b forward at 512 px). Folding the rel-pos terms into q.k (q' = [scale q,
rel_h, rel_w], k' = [k, one-hot row, one-hot column]; `qsamc.supernet.kernels`) makes the core plain
attention, which ONNX Runtime's `MultiHeadAttention` contrib op runs fused (`benchmarks/attention_core.py`).

Rules:
1. Every `attention` node whose block computes float attention (attention bits 32) is marked `fused`:
   in eval mode it computes the fold and emits `com.microsoft.MultiHeadAttention`.
2. Quantized attention is left alone (its Q/DQ MatMuls are the integer path).
3. Only targets whose runtime has the contrib op take this pass (the cpu target); TensorRT keeps the
   standard ops its own MHA fusion reads.
"""

from __future__ import annotations

from qsamc.ir.graph import IR
from qsamc.ir.pass_manager import Pass, PassResult


class FuseFloatAttentionPass(Pass):
    def call(self, ir: IR) -> PassResult:
        modified = False
        for _name, _a, attention in ir.modules("attention"):
            if getattr(attention, "attention_bits", 32) == 32 and not getattr(attention, "fused", True):
                attention.fused = True
                modified = True
        return PassResult(ir, modified)
