"""Quantization-aware LoRA (paper Sec. 3.3, Alg. 1 and 2, Fig. 2, Tab. 5).

`AttachLoraPass` gives each adapted layer one of these. The layer computes with quantize(W0 + delta),
so the weight that export later merges is exactly the weight that was trained (Alg. 1's
W~ = quantize(W0 + BA) - BA, then y = x W~ + x BA, is the same forward and the same gradients under the
straight-through estimator). `delta(shape, w_bits, a_bits)` returns the (sliced) low-rank update for the
layer's active bit-width:

- `regular`:   one adapter.
- `selective`: one adapter per bit-width, switched by the layer's bits; only the selected one trains.
- `multiplex`: a base adapter always applied, plus an adapter bound to low bit-widths (Tab. 5 groups);
               with `detach` (Alg. 2), the base adapter is not updated when a low bit-width is selected.

Elastic MLP slicing slices the adapters: the first k rows of B (lin1) or columns of A (lin2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

LoraVariant = Literal["regular", "selective", "multiplex"]
LORA_VARIANTS = ("regular", "selective", "multiplex")
# Tab. 5: bit-widths assigned to each LoRA module; the group holding 32 is the base.
MULTIPLEX_GROUPS: dict[int, tuple[tuple[int, ...], ...]] = {
    3: ((2,), (3,), (4, 8, 32)),
    4: ((2,), (3,), (4,), (8, 32)),
    5: ((2,), (3,), (4,), (8,), (32,)),
}


@dataclass(frozen=True)
class LoraConfig:
    variant: LoraVariant = "multiplex"
    rank: int = 8
    alpha: float = 16.0
    modules: tuple[str, ...] = ("attn.qkv", "mlp.lin1", "mlp.lin2")  # the paper's placement
    multiplex_modules: int = 5
    switch: Literal["weight", "act"] = "weight"  # which of the layer's bits selects an adapter
    detach: bool = False

    def __post_init__(self) -> None:
        if self.variant not in LORA_VARIANTS:
            raise ValueError(f"LoRA variant must be one of {', '.join(LORA_VARIANTS)}, got '{self.variant}'")
        if self.multiplex_modules not in MULTIPLEX_GROUPS:
            raise ValueError(f"multiplex LoRA has 3, 4 or 5 modules, got {self.multiplex_modules}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if self.switch not in ("weight", "act"):
            raise ValueError(f"LoRA switch must be 'weight' or 'act', got '{self.switch}'")


class LowRank(nn.Module):
    """delta = (alpha / r) * B @ A with A (r x in) Gaussian-initialised and B (out x r) zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scaling = alpha / rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        out_features, in_features = shape[0], math.prod(shape[1:])
        return ((self.B[:out_features] @ self.A[:, :in_features]) * self.scaling).reshape(shape)


class Lora(nn.Module):
    """A layer's adapters. `delta` is what the layer adds to its active weight slice before quantizing."""

    def __init__(self, config: LoraConfig, in_features: int, out_features: int, bit_choices: tuple[int, ...]) -> None:
        super().__init__()
        self.config = config
        make = lambda: LowRank(in_features, out_features, config.rank, config.alpha)  # noqa: E731
        if config.variant == "regular":
            self.groups: tuple[tuple[int, ...], ...] = (tuple(bit_choices),)
        elif config.variant == "selective":
            self.groups = tuple((b,) for b in bit_choices)
        else:
            self.groups = tuple(g for g in MULTIPLEX_GROUPS[config.multiplex_modules]
                                if set(g) & set(bit_choices) or 32 in g)
        self.adapters = nn.ModuleDict({self.key(g): make() for g in self.groups})
        self.base = self.key(next(g for g in self.groups if 32 in g)) if config.variant == "multiplex" else None

    @staticmethod
    def key(group: tuple[int, ...]) -> str:
        return "b" + "_".join(str(b) for b in group)

    def group_of(self, bits: int) -> str:
        for g in self.groups:
            if bits in g:
                return self.key(g)
        raise KeyError(f"no LoRA module for {bits} bits (modules cover {self.groups})")

    def terms(self, w_bits: int, a_bits: int) -> list[tuple[LowRank, bool]]:
        """The adapters the layer's bits select, each with whether it trains: the base adapter (multiplex)
        then the selected one; under `detach` (Alg. 2) the base does not train beside a low bit-width's."""
        bits = w_bits if self.config.switch == "weight" else a_bits
        selected = self.adapters[self.group_of(bits)]
        if self.base is None:
            return [(selected, True)]
        base = self.adapters[self.base]
        if selected is base:
            return [(base, True)]
        return [(base, not self.config.detach), (selected, True)]

    def delta(self, shape: torch.Size, w_bits: int, a_bits: int) -> torch.Tensor:
        total = None
        for adapter, trains in self.terms(w_bits, a_bits):
            delta = adapter.delta(shape) if trains else adapter.delta(shape).detach()
            total = delta if total is None else total + delta
        return total
