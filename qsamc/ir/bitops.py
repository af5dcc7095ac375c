"""The BitOPs types the IR carries: `BitopsReport` (`IR.cost`, what `CountBitopsPass` counted) and the
float-MAC conventions it is counted under. They sit with the IR, which reads and writes them (`IR.from_json`);
the pass that counts them (`qsamc.passes.count_bitops`) builds on the IR and re-exports them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FloatMacs = Literal["fp32", "exclude"]
FLOAT_MAC_CONVENTIONS = ("fp32", "exclude")


@dataclass(frozen=True)
class BitopsReport:
    """Totals and breakdowns of one subnet. `float_*` is the attention-matmul line."""

    macs: int
    bitops: int
    float_macs: int
    float_bitops: int
    convention: FloatMacs
    per_part: dict[str, dict[str, int]] = field(default_factory=dict)
    per_layer: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "macs": self.macs, "bitops": self.bitops,
            "float_macs": self.float_macs, "float_bitops": self.float_bitops,
            "float_macs_convention": self.convention,
            "per_part": self.per_part, "per_layer": self.per_layer,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BitopsReport:
        return cls(data["macs"], data["bitops"], data["float_macs"], data["float_bitops"],
                   data["float_macs_convention"], data["per_part"], data["per_layer"])
