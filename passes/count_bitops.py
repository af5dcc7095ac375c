"""CountBitopsPass: exact MACs and BitOPs of a subnet, per layer and per stage, from the IR alone.

BitOPs of a layer = MACs x weight bits x activation bits (HAQ/QFA convention). The formulas use only
the annotations of `AnnotateStructurePass` and the subnet's resolution, depths and MLP ratios; they
match `torch.utils.flop_counter.FlopCounterMode` FLOPs / 2 on the realised subnet exactly (tested).

Rules (batch 1, token grid g = resolution / patch, windowed grid gp = ceil(g / w) * w):
1. `conv`:      g^2 * out_channels * in_channels * kh * kw (every encoder conv outputs the token grid).
2. `linear`:    tokens * in * out, tokens = g^2 on the grid, gp^2 on padded windows; `hidden` replaces
                the output width of `mlp.lin1` and the input width of `mlp.lin2`.
3. `attention`: windows * heads * head_dim * (2 n^2 + 2 n s), n = s^2 tokens per window of side s (the
                whole grid for global attention): q@k and attn@v, plus the two decomposed rel-pos einsums.
4. Norms, GELU, softmax and elementwise nodes count no MACs; nodes of dropped blocks count nothing.

The attention matmuls run in floating point unless the subnet quantizes a block's attention (a space
with `attention_bits`, beyond the paper): then q@k and attn@v count at t x t bits for its t-bit q, k,
v and softmax output, and the rel-pos einsums, which stay float, are float MACs. `float_macs="fp32"`
(default) counts float MACs at 32 x 32 bits and reports them as their own line; `float_macs="exclude"`
leaves them out of BitOPs, which is what the paper's figures imply (a W2A2 subnet below 1% of FP32
BitOPs is impossible with them at 32 x 32).

`BitopsModel` compiles the same formulas into per-resolution tables for search, which needs tens of
thousands of evaluations per second; it never runs the model.
"""

from __future__ import annotations

import math
from typing import Any

# The report and its conventions sit with the IR, which carries them (`IR.cost`); importable from here too.
from qsamc.ir.bitops import FLOAT_MAC_CONVENTIONS, BitopsReport, FloatMacs
from qsamc.ir.graph import IR
from qsamc.ir.pass_manager import Pass, PassResult
from qsamc.supernet.space import SearchSpace, Subnet

_MAC_KINDS = ("conv", "linear", "attention")


def node_macs(a: dict[str, Any], grid: int, hidden: int | None) -> int:
    """MACs of one annotated IR node at token grid `grid` and MLP width `hidden` (rules 1-4)."""
    kind = a["kind"]
    if kind == "conv":
        kh, kw = a["kernel"]
        return grid * grid * a["out_channels"] * a["in_channels"] * kh * kw
    if kind == "linear":
        in_f, out_f = a["in_features"], a["out_features"]
        if "hidden" in a["elastic"]:
            if a["module"].endswith("lin1"):
                out_f = hidden
            else:
                in_f = hidden
        if a["token_layout"] == "windows":
            padded = math.ceil(grid / a["window"]) * a["window"]
            tokens = padded * padded
        else:
            tokens = grid * grid
        return tokens * in_f * out_f
    if kind == "attention":
        return sum(attention_macs(a, grid))
    return 0


def attention_macs(a: dict[str, Any], grid: int) -> tuple[int, int]:
    """(q@k + attn@v MACs, rel-pos einsum MACs) of an attention node at token grid `grid` (rule 3)."""
    side = a["window"] or grid
    windows = math.ceil(grid / side) ** 2
    n = side * side
    scale = windows * a["heads"] * a["head_dim"]
    return scale * 2 * n * n, scale * (2 * n * side if a["rel_pos"] else 0)


def _float_bits(float_macs: FloatMacs) -> int:
    if float_macs not in FLOAT_MAC_CONVENTIONS:
        raise ValueError(f"float_macs must be one of {FLOAT_MAC_CONVENTIONS}, got {float_macs!r}")
    return 32 * 32 if float_macs == "fp32" else 0


class CountBitopsPass(Pass):
    """Annotate every node with `present`, `macs` and `bitops`; set the IR's `cost` (a `BitopsReport`)."""

    def __init__(self, space: SearchSpace, subnet: Subnet, float_macs: FloatMacs = "fp32") -> None:
        self.space, self.subnet = space, space.validate(subnet)
        self.float_bits = _float_bits(float_macs)
        self.convention = float_macs

    def call(self, ir: IR) -> PassResult:
        subnet, space = self.subnet, self.space
        grid = subnet.grid
        active = set(space.active_blocks(subnet.depths))
        macs = bitops = float_macs = float_bitops = 0
        per_part: dict[str, dict[str, int]] = {}
        per_layer = []
        for name, a in ir.nodes():
            block = a["block"]
            a["present"] = block is None or block in active
            hidden = space.hidden_units(subnet.mlp_ratios[block]) if block is not None else None
            a["macs"] = node_macs(a, grid, hidden) if a["present"] else 0
            counted_bits = None
            if a["kind"] == "attention":
                bits = subnet.attention_of(block)
                matmul = attention_macs(a, grid)[0] if a["present"] and bits < 32 else 0
                a["bitops"] = matmul * bits * bits + (a["macs"] - matmul) * self.float_bits
                float_macs += a["macs"] - matmul
                float_bitops += (a["macs"] - matmul) * self.float_bits
                counted_bits = [bits, bits] if matmul else None
            elif a["quantizable"]:
                w, x = subnet.bits_of(a["module"])[1:]
                a["bitops"] = a["macs"] * w * x
                counted_bits = [w, x]
            else:
                a["bitops"] = 0
            macs += a["macs"]
            bitops += a["bitops"]
            if a["kind"] in _MAC_KINDS and a["present"]:
                part = f"stage {a['stage']}" if a["stage"] is not None else a["module"].split(".")[0]
                row = per_part.setdefault(part, {"macs": 0, "bitops": 0})
                row["macs"] += a["macs"]
                row["bitops"] += a["bitops"]
                per_layer.append({"node": name, "kind": a["kind"], "bits": counted_bits,
                                  "macs": a["macs"], "bitops": a["bitops"]})
        report = BitopsReport(macs, bitops, float_macs, float_bitops, self.convention, per_part, per_layer)
        ir.cost = report
        return PassResult(ir, modified=True)


class BitopsModel:
    """The IR's MAC formulas tabulated per resolution and MLP ratio: `cost(subnet)` in microseconds.

    Only the totals are computed; `CountBitopsPass` gives the breakdown. Both read the same annotated IR.
    """

    def __init__(self, ir: IR, space: SearchSpace, float_macs: FloatMacs = "fp32") -> None:
        self.space = space
        self.float_bits = _float_bits(float_macs)
        bit_index = {layer: i for i, layer in enumerate(space.quant_layers)}
        ratios = space.mlp_ratios
        self._resolution_index = {r: i for i, r in enumerate(space.resolutions)}
        # One table per resolution: (block, bits index or -1 for float, MACs per MLP-ratio index, the
        # attention matmuls' MACs: counted at the block's attention bits where the subnet quantizes them).
        self._tables = []
        for resolution in space.resolutions:
            grid = space.grid(resolution)
            rows = []
            for _, a in ir.nodes():
                if a["kind"] not in _MAC_KINDS:
                    continue
                by_ratio = tuple(node_macs(a, grid, space.hidden_units(r)) for r in ratios)
                index = bit_index[a["module"]] if a["quantizable"] else -1
                matmul = attention_macs(a, grid)[0] if a["kind"] == "attention" else 0
                rows.append((a["block"], index, by_ratio, matmul))
            self._tables.append(rows)
        self._ratio_index = {r: i for i, r in enumerate(ratios)}

    def cost(self, subnet: Subnet) -> tuple[int, int]:
        """(MACs, BitOPs) of a subnet already validated against the space."""
        table = self._tables[self._resolution_index[subnet.resolution]]
        active = [False] * self.space.config.depth
        for block in self.space.active_blocks(subnet.depths):
            active[block] = True
        ratio_index = [self._ratio_index[r] for r in subnet.mlp_ratios]
        bits, attention = subnet.bits, subnet.attention
        macs = bitops = 0
        for block, index, by_ratio, matmul in table:
            if block is None:
                m = by_ratio[-1]
            elif not active[block]:
                continue
            else:
                m = by_ratio[ratio_index[block]]
            macs += m
            if index < 0:
                t = attention[block] if matmul and attention else 32
                bitops += (m - matmul) * self.float_bits + matmul * t * t if t < 32 else m * self.float_bits
            else:
                b = bits[index]
                bitops += m * b.w * b.a
        return macs, bitops
