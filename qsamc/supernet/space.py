"""The search space (paper Tab. 1, Sec. 3.2) and the `Subnet` value that names one point of it.

Elastic operators: input resolution, stage-wise depth, MLP ratio per block, and (weight, activation)
bit-widths per quantized layer. Training samples subnets from the space, search walks it, and export
reads one `Subnet` back from JSON; all three validate against the same `SearchSpace`.

Beyond the paper, attention precision can be a choice too (`attention_bits`, off by default: (32,)
keeps every block's attention float, the paper's space). With (8, 32) each block's q, k, v and softmax
output are on 8-bit grids or float, per block (layer and block granularity), per stage or for the whole
model; the decomposed rel-pos terms stay float (see `qsamc.supernet.kernels`).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from qsamc.errors import SubnetError
from qsamc.sam import EncoderConfig, get_config

BIT_CHOICES = (2, 3, 4, 8, 32)
ATTENTION_BIT_CHOICES = (8, 32)
FLOAT_BITS = 32
MLP_RATIOS = (3.0, 3.5, 4.0)
Granularity = Literal["layer", "block", "stage", "model"]
GRANULARITIES = ("layer", "block", "stage", "model")
# The quantized layers of each transformer block (paper Sec. 4.1); the rest of a block stays float.
BLOCK_LAYERS = ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")
SUBNET_FORMAT = "qsamc.subnet"
SUBNET_VERSION = 1


def quantized_layers(config: EncoderConfig) -> tuple[str, ...]:
    """Module paths of the quantized layers: patch embedding, each block's linears, neck convolutions."""
    blocks = [f"blocks.{i}.{name}" for i in range(config.depth) for name in BLOCK_LAYERS]
    return ("patch_embed.proj", *blocks, "neck.0", "neck.2")


class LayerBits(NamedTuple):
    layer: str
    w: int
    a: int


@dataclass(frozen=True)
class Subnet:
    """One subnet: resolution, depth per stage, MLP ratio per block, (w, a) bits per quantized layer.

    Blocks dropped by `depths` keep an MLP ratio and bits so that every subnet has the same fields;
    those values have no effect (`SearchSpace.canonical` resets them).
    """

    model: str
    resolution: int
    depths: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    bits: tuple[LayerBits, ...]
    # Per block, the bits of attention's q, k, v and softmax output; () is float attention everywhere.
    attention: tuple[int, ...] = ()

    def bits_of(self, layer: str) -> LayerBits:
        return self._bits_by_layer[layer]

    def attention_of(self, block: int) -> int:
        """Block `block`'s attention bits (32: float)."""
        return self.attention[block] if self.attention else FLOAT_BITS

    @property
    def grid(self) -> int:
        """The token grid's side: the resolution over the model's patch size."""
        return self.resolution // get_config(self.model).patch_size

    @property
    def _bits_by_layer(self) -> dict[str, LayerBits]:
        cache = self.__dict__.get("_bits_cache")
        if cache is None:
            cache = {b.layer: b for b in self.bits}
            object.__setattr__(self, "_bits_cache", cache)
        return cache

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SUBNET_FORMAT,
            "version": SUBNET_VERSION,
            "model": self.model,
            "resolution": self.resolution,
            "depths": list(self.depths),
            "mlp_ratios": list(self.mlp_ratios),
            "bits": {b.layer: [b.w, b.a] for b in self.bits},
            **({"attention": list(self.attention)} if self.attention else {}),
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "subnet") -> Subnet:
        """Parse the JSON form; a malformed field raises one sentence naming it."""
        if not isinstance(data, dict):
            raise SubnetError(f"{source} must be a JSON object, not {type(data).__name__}")
        if data.get("format", SUBNET_FORMAT) != SUBNET_FORMAT:
            raise SubnetError(f"{source} is a '{data.get('format')}' file, not a qsamc subnet")
        if data.get("version", SUBNET_VERSION) != SUBNET_VERSION:
            raise SubnetError(f"{source} has version {data.get('version')}; this qsamc reads {SUBNET_VERSION}")
        for key in ("model", "resolution", "depths", "mlp_ratios", "bits"):
            if key not in data:
                raise SubnetError(f"{source} lacks the field '{key}'")

        def ints(value: Any, name: str) -> tuple[int, ...]:
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise SubnetError(f"{source}: '{name}' must be a list of integers")
            return tuple(value)

        if not isinstance(data["model"], str):
            raise SubnetError(f"{source}: 'model' must be a string")
        if not isinstance(data["resolution"], int) or isinstance(data["resolution"], bool):
            raise SubnetError(f"{source}: 'resolution' must be an integer")
        ratios = data["mlp_ratios"]
        if not isinstance(ratios, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ratios):
            raise SubnetError(f"{source}: 'mlp_ratios' must be a list of numbers")
        if not isinstance(data["bits"], dict):
            raise SubnetError(f"{source}: 'bits' must map layer names to [weight_bits, activation_bits]")
        bits = []
        for layer, pair in data["bits"].items():
            wa = ints(pair, f"bits.{layer}")
            if len(wa) != 2:
                raise SubnetError(f"{source}: 'bits.{layer}' must be [weight_bits, activation_bits]")
            bits.append(LayerBits(layer, *wa))
        return cls(
            model=data["model"],
            resolution=data["resolution"],
            depths=ints(data["depths"], "depths"),
            mlp_ratios=tuple(float(r) for r in ratios),
            bits=tuple(bits),
            attention=ints(data.get("attention", []), "attention"),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load_subnet(path: str | Path) -> Subnet:
    path = Path(path)
    if not path.is_file():
        raise SubnetError(f"subnet file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SubnetError(f"subnet file {path} is not valid JSON: {exc}") from None
    return Subnet.from_json(data, source=f"subnet file {path}")


@dataclass(frozen=True)
class SearchSpace:
    """The elastic choices of one encoder. Frozen and JSON round-trippable; `restrict` narrows it."""

    model: str
    resolutions: tuple[int, ...]
    depth_choices: tuple[tuple[int, ...], ...]
    mlp_ratios: tuple[float, ...] = MLP_RATIOS
    weight_bits: tuple[int, ...] = BIT_CHOICES
    act_bits: tuple[int, ...] = BIT_CHOICES
    granularity: Granularity = "layer"
    attention_bits: tuple[int, ...] = (FLOAT_BITS,)
    config: EncoderConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", get_config(self.model))
        problems = self._problems()
        if problems:
            raise SubnetError(f"search space for {self.model}: {problems[0]}")

    def _problems(self) -> list[str]:
        cfg, out = self.config, []
        patch = cfg.patch_size
        if not self.resolutions or any(r % patch or r <= 0 or r > cfg.img_size for r in self.resolutions):
            out.append(f"resolutions must be multiples of {patch} up to {cfg.img_size}, got {list(self.resolutions)}")
        if len(self.depth_choices) != len(cfg.stages):
            out.append(f"depth_choices needs one list per stage ({len(cfg.stages)}), got {len(self.depth_choices)}")
        for s, (choices, blocks) in enumerate(zip(self.depth_choices, cfg.stages)):
            if not choices or any(d < 1 or d > len(blocks) for d in choices):
                out.append(f"depth choices of stage {s} must lie in 1..{len(blocks)}, got {list(choices)}")
        if not self.mlp_ratios or any(self.hidden_units(r) < 1 or r > cfg.mlp_ratio for r in self.mlp_ratios):
            out.append(f"MLP ratios must lie in (0, {cfg.mlp_ratio}], got {list(self.mlp_ratios)}")
        for name, choices in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if not choices or any(b not in BIT_CHOICES for b in choices):
                out.append(f"{name} must be drawn from {list(BIT_CHOICES)}, got {list(choices)}")
        if not self.attention_bits or any(b not in ATTENTION_BIT_CHOICES for b in self.attention_bits):
            out.append(f"attention_bits must be drawn from {list(ATTENTION_BIT_CHOICES)}, got {list(self.attention_bits)}")
        if self.granularity not in GRANULARITIES:
            out.append(f"granularity must be one of {', '.join(GRANULARITIES)}, got '{self.granularity}'")
        return out

    # --- structure ------------------------------------------------------------------------------
    @property
    def quant_layers(self) -> tuple[str, ...]:
        return quantized_layers(self.config)

    def grid(self, resolution: int) -> int:
        """The token grid's side at `resolution` (`Subnet.grid` for a subnet)."""
        return resolution // self.config.patch_size

    def hidden_units(self, ratio: float) -> int:
        """MLP width kept at `ratio`: the first k units of `mlp.lin1` (and inputs of `mlp.lin2`)."""
        return int(self.config.embed_dim * ratio)

    def active_blocks(self, depths: tuple[int, ...]) -> tuple[int, ...]:
        """Blocks kept by stage-wise depth: the first d-1 windowed blocks and the global block."""
        kept = []
        for d, blocks in zip(depths, self.config.stages):
            kept.extend(blocks[: d - 1])
            kept.append(blocks[-1])
        return tuple(kept)

    def bit_group(self, layer: str) -> str:
        """The group whose layers share bits at this space's granularity."""
        if self.granularity == "layer":
            return layer
        if self.granularity == "model":
            return "model"
        if not layer.startswith("blocks."):
            return layer.split(".")[0]  # patch_embed / neck are units of their own
        block = int(layer.split(".")[1])
        if self.granularity == "block":
            return f"blocks.{block}"
        stage = next(s for s, blocks in enumerate(self.config.stages) if block in blocks)
        return f"stage.{stage}"

    def bit_groups(self) -> dict[str, tuple[str, ...]]:
        groups: dict[str, list[str]] = {}
        for layer in self.quant_layers:
            groups.setdefault(self.bit_group(layer), []).append(layer)
        return {g: tuple(layers) for g, layers in groups.items()}

    @property
    def quantized_attention(self) -> bool:
        """Whether attention precision is part of this space (else every subnet's attention is float)."""
        return self.attention_bits != (FLOAT_BITS,)

    def attention_groups(self) -> dict[str, tuple[int, ...]]:
        """Blocks whose attention shares bits at this space's granularity ({} when attention is float)."""
        if not self.quantized_attention:
            return {}
        groups: dict[str, list[int]] = {}
        for block in range(self.config.depth):
            if self.granularity == "model":
                name = "attention"
            elif self.granularity == "stage":
                name = f"attention.stage.{next(s for s, b in enumerate(self.config.stages) if block in b)}"
            else:
                name = f"attention.{block}"
            groups.setdefault(name, []).append(block)
        return {g: tuple(blocks) for g, blocks in groups.items()}

    def _attention(self, group_bits: dict[str, int]) -> tuple[int, ...]:
        out = [FLOAT_BITS] * self.config.depth
        for group, blocks in self.attention_groups().items():
            for block in blocks:
                out[block] = group_bits[group]
        return tuple(out) if self.quantized_attention else ()

    def set_attention(self, subnet: Subnet, blocks: tuple[int, ...], bits: int) -> Subnet:
        """`subnet` with the attention of `blocks` (one attention group) at `bits`."""
        attention = list(subnet.attention)
        for block in blocks:
            attention[block] = bits
        return replace(subnet, attention=tuple(attention))

    def uniform_attention(self, subnet: Subnet, bits: int) -> Subnet:
        """`subnet` with every block's attention at `bits` (no change where attention is float-only)."""
        return replace(subnet, attention=self._attention({g: bits for g in self.attention_groups()}))

    # --- subnets --------------------------------------------------------------------------------
    def _subnet(self, resolution, depths, ratios, group_bits: dict[str, tuple[int, int]],
                attention: dict[str, int]) -> Subnet:
        bits = tuple(LayerBits(l, *group_bits[self.bit_group(l)]) for l in self.quant_layers)
        return Subnet(self.model, resolution, tuple(depths), tuple(float(r) for r in ratios), bits,
                      self._attention(attention))

    def max_subnet(self) -> Subnet:
        wa = (max(self.weight_bits), max(self.act_bits))
        return self._subnet(
            max(self.resolutions),
            [max(c) for c in self.depth_choices],
            [max(self.mlp_ratios)] * self.config.depth,
            {g: wa for g in self.bit_groups()},
            {g: max(self.attention_bits) for g in self.attention_groups()},
        )

    def min_subnet(self) -> Subnet:
        wa = (min(self.weight_bits), min(self.act_bits))
        return self._subnet(
            min(self.resolutions),
            [min(c) for c in self.depth_choices],
            [min(self.mlp_ratios)] * self.config.depth,
            {g: wa for g in self.bit_groups()},
            {g: min(self.attention_bits) for g in self.attention_groups()},
        )

    def uniform_bits(self, subnet: Subnet, w: int, a: int) -> Subnet:
        """`subnet` with every layer at (w, a) bits."""
        return replace(subnet, bits=tuple(LayerBits(b.layer, w, a) for b in subnet.bits))

    def sample(self, rng: random.Random) -> Subnet:
        """A subnet drawn uniformly per choice (paper Eq. 1); deterministic for a seeded `rng`."""
        resolution = rng.choice(self.resolutions)
        depths = [rng.choice(c) for c in self.depth_choices]
        ratios = [rng.choice(self.mlp_ratios) for _ in range(self.config.depth)]
        bits = {g: (rng.choice(self.weight_bits), rng.choice(self.act_bits)) for g in self.bit_groups()}
        # Drawn last, and only where attention is a choice: the paper's space keeps its random stream.
        attention = {g: rng.choice(self.attention_bits) for g in self.attention_groups()}
        return self._subnet(resolution, depths, ratios, bits, attention)

    def canonical(self, subnet: Subnet) -> Subnet:
        """The same network with the unused choices of dropped blocks set to the maximum.

        Two subnets that differ only in dropped blocks compute the same function; search caches on this.
        """
        active = set(self.active_blocks(subnet.depths))
        ratios = tuple(r if i in active else max(self.mlp_ratios) for i, r in enumerate(subnet.mlp_ratios))
        top = (max(self.weight_bits), max(self.act_bits))

        def live(layer: str) -> bool:
            return not layer.startswith("blocks.") or int(layer.split(".")[1]) in active

        # A dropped layer whose bit group still has a live layer (stage or model granularity) keeps the
        # group's bits, so the canonical subnet still honours the tie; a wholly dropped group gets `top`.
        group_bits: dict[str, tuple[int, int]] = {}
        for b in subnet.bits:
            if live(b.layer):
                group_bits.setdefault(self.bit_group(b.layer), (b.w, b.a))
        bits = tuple(
            b if live(b.layer) else LayerBits(b.layer, *group_bits.get(self.bit_group(b.layer), top))
            for b in subnet.bits
        )
        attention = subnet.attention
        if attention:
            live_bits = {g: next((attention[b] for b in blocks if b in active), max(self.attention_bits))
                         for g, blocks in self.attention_groups().items()}
            attention = self._attention(live_bits)
        return replace(subnet, mlp_ratios=ratios, bits=bits, attention=attention)

    def validate(self, subnet: Subnet) -> Subnet:
        """Return `subnet` if it lies in this space; else raise one sentence naming the field."""
        if subnet.model != self.model:
            raise SubnetError(f"subnet is for model '{subnet.model}', not '{self.model}'")
        if subnet.resolution not in self.resolutions:
            raise SubnetError(f"resolution {subnet.resolution} is not one of {list(self.resolutions)}")
        if len(subnet.depths) != len(self.depth_choices):
            raise SubnetError(f"depths has {len(subnet.depths)} entries; {self.model} has {len(self.depth_choices)} stages")
        for s, (d, choices) in enumerate(zip(subnet.depths, self.depth_choices)):
            if d not in choices:
                raise SubnetError(f"depths[{s}] = {d} is not one of the choices {list(choices)} for stage {s}")
        if len(subnet.mlp_ratios) != self.config.depth:
            raise SubnetError(f"mlp_ratios has {len(subnet.mlp_ratios)} entries; {self.model} has {self.config.depth} blocks")
        for i, r in enumerate(subnet.mlp_ratios):
            if r not in self.mlp_ratios:
                raise SubnetError(f"mlp_ratios[{i}] = {r} is not one of {list(self.mlp_ratios)}")
        names = [b.layer for b in subnet.bits]
        if names != list(self.quant_layers):
            missing = next((l for l in self.quant_layers if l not in names), None)
            unknown = next((l for l in names if l not in self.quant_layers), None)
            what = f"lacks layer '{missing}'" if missing else (
                f"names unknown layer '{unknown}'" if unknown else "lists its layers out of order or twice")
            raise SubnetError(f"bits {what}")
        group_bits: dict[str, LayerBits] = {}
        for b in subnet.bits:
            if b.w not in self.weight_bits:
                raise SubnetError(f"bits.{b.layer} weight bits {b.w} is not one of {list(self.weight_bits)}")
            if b.a not in self.act_bits:
                raise SubnetError(f"bits.{b.layer} activation bits {b.a} is not one of {list(self.act_bits)}")
            first = group_bits.setdefault(self.bit_group(b.layer), b)
            if (first.w, first.a) != (b.w, b.a):
                raise SubnetError(
                    f"bits.{b.layer} = [{b.w}, {b.a}] differs from bits.{first.layer} = [{first.w}, {first.a}], "
                    f"but bits are tied per {self.granularity}"
                )
        self._validate_attention(subnet)
        return subnet

    def _validate_attention(self, subnet: Subnet) -> None:
        if not subnet.attention:
            if FLOAT_BITS not in self.attention_bits:
                raise SubnetError(f"subnet has float attention, but this space's attention bits are "
                                  f"{list(self.attention_bits)}")
            return
        if not self.quantized_attention:
            raise SubnetError("subnet sets attention bits, but attention is float in this space")
        if len(subnet.attention) != self.config.depth:
            raise SubnetError(f"attention has {len(subnet.attention)} entries; {self.model} has {self.config.depth} blocks")
        for group, blocks in self.attention_groups().items():
            for block in blocks:
                bits = subnet.attention[block]
                if bits not in self.attention_bits:
                    raise SubnetError(f"attention[{block}] = {bits} is not one of {list(self.attention_bits)}")
                if bits != subnet.attention[blocks[0]]:
                    raise SubnetError(f"attention[{block}] = {bits} differs from attention[{blocks[0]}] = "
                                      f"{subnet.attention[blocks[0]]}, but attention bits are tied per {self.granularity}")

    def count(self) -> int:
        """The exact number of distinct subnets (dropped blocks' choices do not make new subnets)."""
        groups = self.bit_groups()
        pairs = len(self.weight_bits) * len(self.act_bits)
        total = 0
        for depths in itertools.product(*self.depth_choices):
            active = set(self.active_blocks(depths))
            live_groups = sum(
                any(not l.startswith("blocks.") or int(l.split(".")[1]) in active for l in layers)
                for layers in groups.values()
            )
            live_attention = sum(any(b in active for b in blocks) for blocks in self.attention_groups().values())
            total += (len(self.mlp_ratios) ** len(active) * pairs ** live_groups
                      * len(self.attention_bits) ** live_attention)
        return total * len(self.resolutions)

    def log10_count(self) -> float:
        return math.log10(self.count())

    # --- serialisation --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "resolutions": list(self.resolutions),
            "depth_choices": [list(c) for c in self.depth_choices],
            "mlp_ratios": list(self.mlp_ratios),
            "weight_bits": list(self.weight_bits),
            "act_bits": list(self.act_bits),
            "granularity": self.granularity,
            "attention_bits": list(self.attention_bits),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchSpace:
        return cls(
            model=data["model"],
            resolutions=tuple(data["resolutions"]),
            depth_choices=tuple(tuple(c) for c in data["depth_choices"]),
            mlp_ratios=tuple(float(r) for r in data["mlp_ratios"]),
            weight_bits=tuple(data["weight_bits"]),
            act_bits=tuple(data["act_bits"]),
            granularity=data["granularity"],
            attention_bits=tuple(data.get("attention_bits", (FLOAT_BITS,))),  # runs before attention bits
        )

    def restrict(self, **changes: Any) -> SearchSpace:
        """A narrower space, e.g. `restrict(act_bits=(8, 32))` for what a GPU target deploys well."""
        return replace(self, **changes)


def default_space(model: str, granularity: Granularity = "layer", attention_bits: tuple[int, ...] = (FLOAT_BITS,)) -> SearchSpace:
    """The paper's space (Tab. 1), scaled to the encoder; `attention_bits=(8, 32)` adds attention precision.

    Resolution: from half the native input to the native input in 9 steps (512..1024 step 64 for
    `vit_*`). Depth: each stage keeps at least two thirds of its blocks (ViT-L's {4, 5, 6} of 6).
    """
    cfg = get_config(model)
    step = cfg.img_size // 16
    resolutions = tuple(range(cfg.img_size // 2, cfg.img_size + 1, step))
    depth_choices = tuple(
        tuple(range(math.ceil(2 * len(blocks) / 3), len(blocks) + 1)) for blocks in cfg.stages
    )
    return SearchSpace(model, resolutions, depth_choices, granularity=granularity, attention_bits=tuple(attention_bits))
