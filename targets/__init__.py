"""Hardware targets, one per file, and the one place that dispatches on a target's name.

A target declares its export formats, the deployment format whose rules map each searched (w, a) pair
to real containers (`qsamc.formats`), its datasheet peaks, its default latency backend, and the bits it
deploys well (`restrict_space`). `get_target` is the only lookup; an unknown name fails with the list
of known ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from qsamc.errors import TargetError
from qsamc.formats import DeploymentFormat
from qsamc.supernet.space import SearchSpace


@dataclass(frozen=True)
class Peaks:
    """Dense datasheet peaks (None where the datasheet gives none). Sparse figures are never used."""

    int8_tops: float | None = None
    int4_tops: float | None = None
    fp16_tflops: float | None = None
    fp8_tflops: float | None = None
    fp32_tflops: float | None = None
    memory_gbps: float | None = None


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    formats: tuple[str, ...]  # what `qsamc export --format` can emit for it
    deployment: DeploymentFormat
    peaks: Peaks
    latency_backend: str  # "tensorrt" or "onnxruntime"
    deployable_weight_bits: tuple[int, ...]
    deployable_act_bits: tuple[int, ...]

    def restrict_space(self, space: SearchSpace) -> SearchSpace:
        """The space narrowed to the bits this target runs well (e.g. activations >= 8 bits on GPUs)."""
        weights = tuple(b for b in space.weight_bits if b in self.deployable_weight_bits)
        acts = tuple(b for b in space.act_bits if b in self.deployable_act_bits)
        if not weights or not acts:
            raise TargetError(f"target {self.name} deploys none of the space's bit-widths")
        return space.restrict(weight_bits=weights, act_bits=acts)


_REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    if target.name in _REGISTRY:
        raise ValueError(f"target '{target.name}' is registered twice")
    _REGISTRY[target.name] = target
    return target


def known_targets() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_target(name: str) -> Target:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TargetError(f"unknown target '{name}'; known targets are {', '.join(known_targets())}") from None


from qsamc.targets import a100, cpu, h100, orin  # noqa: E402,F401  (each file registers its target)
