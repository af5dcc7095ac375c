"""Measured latency tables as search reads them: the table file, the keys of a subnet's fused parts, and
`TableLatency`, search's latency cost model (`qsamc profile` builds the tables: `qsamc.profiling`).

A table holds one entry per fused part of the encoder, timed on the target's backend as the Q/DQ ONNX
that export emits for that part:
  patch_embed | resolution | conv kernel          patch embedding + positional embedding
  attention   | grid | window | qkv, proj kernels [| int8]  norm1, window partition, qkv, attention, proj,
                                                    residual ("int8": its matmuls deployed in INT8, where a
                                                    space quantizes attention and the target admits it)
  mlp         | grid | hidden | lin1, lin2 kernels norm2, lin1, GELU, lin2, residual
  neck        | grid | neck.0, neck.2 kernels
A kernel is a layer's deployed containers (`Deployment.kernel`, e.g. 'int8xint8'), so every (w, a) pair
that deploys alike shares an entry. A subnet's predicted latency is overhead + context_scale * the sum of
its entries.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsamc.errors import ConfigError
from qsamc.passes.lower_attention import deploys_int8
from qsamc.supernet.space import SearchSpace, Subnet

if TYPE_CHECKING:
    from qsamc.targets.base import Target

TABLE_FORMAT = "qsamc.latency_table"
TABLE_VERSION = 1


def part_key(*parts: Any) -> str:
    return "|".join(str(p) for p in parts)


class PartKeys:
    """The table keys of a subnet's fused parts, from the target's deployment of each layer's bits."""

    def __init__(self, space: SearchSpace, target: Target) -> None:
        self.space, self.target = space, target
        cfg = space.config
        self.window = {b: (0 if b in cfg.global_attn_indexes else cfg.window_size) for b in range(cfg.depth)}
        self.head_dim = cfg.embed_dim // cfg.num_heads

    def attention(self, subnet: Subnet, block: int) -> tuple[str, ...]:
        """The attention key's suffix: ('int8',) where the block's attention is quantized and the target
        runs it in INT8, else () (float attention, the tables' original keys)."""
        if subnet.attention_of(block) == 32:
            return ()
        node = {"window": self.window[block], "head_dim": self.head_dim}
        return ("int8",) if deploys_int8(self.target.deployment.int8_attention, node, subnet.grid) else ()

    def kernel(self, subnet: Subnet, layer: str) -> str:
        kind = "linear" if layer.startswith("blocks.") else "conv"
        bits = subnet.bits_of(layer)
        return self.target.deployment.deploy(bits.w, bits.a, kind).kernel

    def keys(self, subnet: Subnet) -> list[str]:
        space, k = self.space, lambda layer: self.kernel(subnet, layer)
        grid = subnet.grid
        keys = [part_key("patch_embed", subnet.resolution, k("patch_embed.proj"))]
        for b in space.active_blocks(subnet.depths):
            hidden = space.hidden_units(subnet.mlp_ratios[b])
            keys.append(part_key("attention", grid, self.window[b], k(f"blocks.{b}.attn.qkv"), k(f"blocks.{b}.attn.proj"),
                                 *self.attention(subnet, b)))
            keys.append(part_key("mlp", grid, hidden, k(f"blocks.{b}.mlp.lin1"), k(f"blocks.{b}.mlp.lin2")))
        keys.append(part_key("neck", grid, k("neck.0"), k("neck.2")))
        return keys

    def representatives(self, kind: str) -> dict[str, tuple[int, int]]:
        """One (w, a) pair per distinct kernel that the space's bits produce on the target."""
        out: dict[str, tuple[int, int]] = {}
        for w, a in itertools.product(self.space.weight_bits, self.space.act_bits):
            out.setdefault(self.target.deployment.deploy(w, a, kind).kernel, (w, a))  # type: ignore[arg-type]
        return out


# --- the table --------------------------------------------------------------------------------------


@dataclass
class LatencyTable:
    target: str
    backend: str
    model: str
    space: dict[str, Any]
    overhead: float
    entries: dict[str, float]
    context_scale: float = 1.0
    libraries: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    date: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "target": self.target, "backend": self.backend,
                "model": self.model, "date": self.date, "libraries": self.libraries, "machine": self.machine,
                "settings": self.settings, "space": self.space, "overhead_s": self.overhead,
                "context_scale": self.context_scale, "entries_s": self.entries}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != TABLE_FORMAT or data.get("version") != TABLE_VERSION:
                raise ConfigError(f"{path} is not a version-{TABLE_VERSION} qsamc latency table")
            return cls(data["target"], data["backend"], data["model"], data["space"], float(data["overhead_s"]),
                       {k: float(v) for k, v in data["entries_s"].items()}, float(data["context_scale"]),
                       data.get("libraries", {}),
                       data.get("machine", {}), data.get("settings", {}), data.get("date", ""))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"cannot read the latency table {path}: {exc}") from None


def default_table_path(target: Target, model: str) -> Path:
    root = Path(os.environ.get("QSAMC_LATENCY_DIR", Path.home() / ".cache" / "qsamc" / "latency"))
    return root / f"{target.name}-{target.latency_backend}-{model}.json"


class TableLatency:
    """Search's latency cost model: overhead + the table entries of a subnet's fused parts (seconds)."""

    name = "latency"
    description = "latency (measured table)"

    def __init__(self, table: LatencyTable, space: SearchSpace, target: Target, source: str = "the latency table") -> None:
        if (table.target, table.model) != (target.name, space.model):
            raise ConfigError(f"{source} was measured for {table.model} on {table.target}, not {space.model} on {target.name}")
        self.table, self.keys = table, PartKeys(space, target)
        missing = next((k for k in self.keys.keys(space.max_subnet()) + self.keys.keys(space.min_subnet())
                        if k not in table.entries), None)
        if missing is not None:
            hint = " --attention searched" if space.quantized_attention else ""
            raise ConfigError(f"{source} has no entry '{missing}' for this search space; rebuild it with "
                              f"`qsamc profile --target {target.name} --model {space.model}{hint}`")
        self.source = source

    def cost(self, subnet: Subnet) -> float:
        return self.table.overhead + self.table.context_scale * self.parts(subnet)

    def parts(self, subnet: Subnet) -> float:
        """The sum of the subnet's part entries, before the context scale."""
        entries = self.table.entries
        try:
            return sum(entries[k] for k in self.keys.keys(subnet))
        except KeyError as missing:
            raise ConfigError(f"{self.source} has no entry {missing} for this search space; rebuild it with "
                              f"`qsamc profile --target {self.keys.target.name} --model {subnet.model}`") from None


