"""FoldOffsetIntoNormPass: move a lowered activation shift into the LayerNorm that produces the input.

Fourth export stage, after `LowerActivationOffsetsPass`. LayerNorm(x) - m = LayerNorm with bias b - m,
so the `Sub` in front of QuantizeLinear disappears for qkv (norm1), lin1 (norm2) and the neck's 3x3 conv
(neck.1, a LayerNorm2d): one elementwise pass over the activation less per layer.

Rules:
1. A quantizable node whose symmetric input quantizer has a non-zero shift, and whose input comes from a
   `norm` node through layout-only `elementwise` nodes (window partition), each with that one consumer,
   gets the shift subtracted from the norm's bias; the quantizer's shift becomes 0.
2. Not when the path zero-pads (window partition of a token grid the window does not tile): the padded
   tokens must be -m in the shifted domain, and a shifted norm would leave them 0. Those layers keep the
   explicit shift, which is exact with any padding.
"""

from __future__ import annotations

import torch

from qsamc.ir.graph import IR
from qsamc.lowered.layers import SymmetricActQuantizer
from qsamc.ir.pass_manager import Pass, PassResult


def _producing_norm(ir: IR, node: str) -> str | None:
    """The norm node feeding `node` through single-consumer elementwise nodes, if any (rule 1)."""
    g = ir.graph
    current = node
    while True:
        producers = list(g.predecessors(current))
        if len(producers) != 1 or g.out_degree(producers[0]) != 1:
            return None
        current = producers[0]
        kind = g.nodes[current]["kind"]
        if kind == "norm":
            return current
        if kind != "elementwise":
            return None


class FoldOffsetIntoNormPass(Pass):
    def call(self, ir: IR) -> PassResult:
        modified = False
        for name in ir.quantizable():
            a = ir.graph.nodes[name]
            act = ir.module_of(name).act
            if not isinstance(act, SymmetricActQuantizer) or not act.shift:
                continue
            if a.get("token_layout") == "windows" and ir.token_grid % a["window"]:
                continue  # rule 2
            norm = _producing_norm(ir, name)
            if norm is None:
                continue
            with torch.no_grad():
                ir.module_of(norm).bias -= act.shift
            act.shift = 0.0
            modified = True
        return PassResult(ir, modified)
