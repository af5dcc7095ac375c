"""Cost models for search (paper Eq. 2's constraint `cost(a) <= tau`) and the budgets they are held to.

Three models, one interface (`name`, `unit`, `cost(subnet)`):
1. `BitopsCost`: BitOPs from the foundation's tabulated IR formulas (the paper's constraint).
2. `TableLatency`: latency measured on the target, summed from a latency table (`qsamc.search.latency_table`).
3. `RooflineLatency`: an *estimate* from the target's datasheet peaks, per IR node
   max(MACs / compute peak, bytes / memory bandwidth), in the containers the target deploys. Only used
   when no table exists and the user asks for it; it ignores launch overheads and fusion.

Budgets are written as users quote them: '150T' (BitOPs), '40ms' (latency).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

from qsamc.errors import BudgetError, TargetError
from qsamc.formats import Container
from qsamc.ir.graph import IR
from qsamc.passes.count_bitops import BitopsModel, FloatMacs, attention_macs, node_macs
from qsamc.passes.lower_attention import deploys_int8
from qsamc.supernet.space import LayerBits, SearchSpace, Subnet
from qsamc.units import SI, si_prefix

if TYPE_CHECKING:
    from qsamc.targets import Target

Metric = Literal["bitops", "latency"]
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """An upper bound on one metric: BitOPs, or latency in seconds."""

    metric: Metric
    limit: float

    def __str__(self) -> str:
        return format_cost(self.metric, self.limit)


def parse_budget(text: str) -> Budget:
    """'150T' / '2.5P' / '3e14' -> BitOPs; '40ms' / '12.5ms' / '0.2s' / '900us' -> latency in seconds."""
    match = _BUDGET.match(text)
    suffix = match.group(2) if match else ""
    if match is None or (suffix.upper() not in SI and suffix not in _TIME) or float(match.group(1)) <= 0:
        raise BudgetError(
            f"cannot read the budget '{text}'; write BitOPs as a positive number with an optional "
            "K/M/G/T/P suffix (150T, 2.5P) or a latency in s/ms/us (40ms, 12.5ms)"
        )
    value = float(match.group(1))
    if suffix in _TIME:
        return Budget("latency", value * _TIME[suffix])
    return Budget("bitops", value * SI[suffix.upper()])


def format_cost(metric: Metric, value: float) -> str:
    if metric == "latency":
        return f"{value * 1e3:.3g}ms"
    prefix, scale = si_prefix(value)
    return f"{value / scale:.4g}{prefix}"


class CostModel(Protocol):
    name: Metric
    description: str

    def cost(self, subnet: Subnet) -> float: ...


class BitopsCost:
    """BitOPs of a subnet: attention matmuls at 32 x 32 bits, as `qsamc bitops` counts them, or left out
    (`float_macs="exclude"`, the paper's convention)."""

    name: Metric = "bitops"
    description = "BitOPs"

    def __init__(self, ir: IR, space: SearchSpace, float_macs: FloatMacs = "fp32") -> None:
        self._model = BitopsModel(ir, space, float_macs)

    def cost(self, subnet: Subnet) -> float:
        return float(self._model.cost(subnet)[1])


_BYTES: dict[Container, float] = {"int4": 0.5, "int8": 1, "fp8": 1, "fp16": 2, "fp32": 4}


class RooflineLatency:
    """Roofline estimate (seconds) from datasheet peaks: an estimate, not a measurement.

    Per node: max(2 * MACs / peak of its compute container, bytes moved / memory bandwidth), where
    bytes are the weight in its container, the input in its activation container and the output in
    the float type. Float-only nodes (norms, GELU, window shuffles) are memory-bound. Nodes are summed:
    no overlap, no fusion, no launch overhead.
    """

    name: Metric = "latency"
    description = "latency (roofline estimate from datasheet peaks)"

    def __init__(self, ir: IR, space: SearchSpace, target: Target) -> None:
        peaks = target.peaks
        self._ops = {"int8": peaks.int8_tops, "fp8": peaks.fp8_tflops, "fp16": peaks.fp16_tflops,
                     "fp32": peaks.fp32_tflops}
        if peaks.memory_gbps is None:
            raise TargetError(
                f"target {target.name} has no datasheet peaks to estimate latency from; measure a latency "
                f"table with `qsamc profile --target {target.name}` instead"
            )
        fmt = target.deployment
        needed = {fmt.float_type} | {fmt.deploy(w, a, kind).compute for w in space.weight_bits
                                     for a in space.act_bits for kind in ("linear", "conv")}
        missing = sorted(c for c in needed if self._ops[c] is None)
        if missing:
            raise TargetError(f"target {target.name} has no datasheet peak for {missing[0]} compute to estimate latency from")
        self.space, self.target, self.ir = space, target, ir
        self._bandwidth = peaks.memory_gbps * 1e9
        self._max_grid = space.grid(space.config.img_size)

    def _seconds(self, a: dict, grid: int, hidden: int | None, bits: tuple[int, int] | None) -> float:
        fmt = self.target.deployment
        tokens = grid * grid
        macs = node_macs(a, grid, hidden)
        if a["kind"] in ("linear", "conv") and bits is not None:
            d = fmt.deploy(*bits, kind=a["kind"])
            if a["kind"] == "linear":
                in_f = hidden if a["module"].endswith("lin2") else a["in_features"]
                out_f = hidden if a["module"].endswith("lin1") else a["out_features"]
                weights, inputs, outputs = in_f * out_f, tokens * in_f, tokens * out_f
            else:
                kh, kw = a["kernel"]
                weights = a["out_channels"] * a["in_channels"] * kh * kw
                inputs, outputs = macs // (a["out_channels"] * kh * kw), tokens * a["out_channels"]
            moved = weights * _BYTES[d.weight] + inputs * _BYTES[d.act] + outputs * _BYTES[fmt.float_type]
            return max(2 * macs / (self._ops[d.compute] * 1e12), moved / self._bandwidth)
        # Float nodes: read and write their output-sized tensor once, scaled from the traced shape.
        elements = math.prod(a["shape"]) * tokens / self._max_grid**2
        if hidden is not None and "hidden" in a["elastic"]:
            elements *= hidden / (self.space.config.embed_dim * self.space.config.mlp_ratio)
        moved = 2 * elements * _BYTES[fmt.float_type]
        compute = 2 * macs / (self._ops[fmt.float_type] * 1e12)
        if (a["kind"] == "attention" and bits is not None and bits[0] == 8 and self._ops["int8"]
                and deploys_int8(fmt.int8_attention, a, grid)):
            matmul = attention_macs(a, grid)[0]  # q@k and attn@v on INT8 tensor cores, rel-pos in float
            compute = 2 * matmul / (self._ops["int8"] * 1e12) + 2 * (macs - matmul) / (self._ops[fmt.float_type] * 1e12)
        return max(compute, moved / self._bandwidth)

    def cost(self, subnet: Subnet) -> float:
        space = self.space
        grid = subnet.grid
        active = set(space.active_blocks(subnet.depths))
        total = 0.0
        for _, a in self.ir.nodes():
            if a["kind"] in ("input", "output") or (a["block"] is not None and a["block"] not in active):
                continue
            hidden = space.hidden_units(subnet.mlp_ratios[a["block"]]) if a["block"] is not None else None
            if a.get("quantizable"):
                bits = subnet.bits_of(a["module"])[1:]
            elif a["kind"] == "attention":
                bits = (subnet.attention_of(a["block"]),) * 2
            else:
                bits = None
            total += self._seconds(a, grid, hidden, bits)
        return total


def cheapest(space: SearchSpace, model: CostModel) -> Subnet:
    """The cheapest subnet under `model`: the smallest geometry, then per bit group the cheapest pair.

    Exact for BitOPs (monotone in every choice) and for costs that add up per bit group (latency
    tables): lower bits are not always faster (a W8A32 layer runs in FP32 on a CPU), so every pair of
    each group is tried with the others fixed.
    """
    best = space.min_subnet()
    pairs = [(w, a) for w in space.weight_bits for a in space.act_bits]
    for layers in space.bit_groups().values():
        chosen = set(layers)
        options = [set_group_bits(best, chosen, pair) for pair in pairs]
        best = min(options, key=model.cost)
    for blocks in space.attention_groups().values():  # INT8 attention is not always the cheaper
        best = min((space.set_attention(best, blocks, bits) for bits in space.attention_bits), key=model.cost)
    return best


def set_group_bits(subnet: Subnet, layers: set[str], pair: tuple[int, int]) -> Subnet:
    """`subnet` with the layers of one bit group at `pair`."""
    bits = tuple(LayerBits(b.layer, *pair) if b.layer in layers else b for b in subnet.bits)
    return replace(subnet, bits=bits)
