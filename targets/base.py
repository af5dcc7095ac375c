"""What a hardware target is, and the registry that `get_target` reads.

A target is one file in this folder. It declares its datasheet peaks, its export formats and the bits
it deploys well, and it owns the phases that differ between runtimes, which every other stage asks it
for instead of comparing names:

  lowering_passes()   export's lowering of a static subnet (and what the latency tables time)
  onnx_opset(int4)    the ONNX opset its emitted models declare
  finish_onnx(model)  emission settings applied to an emitted model (the float type of its float parts)
  lint(model)         what its runtime refuses in a model; `lint_required` when a problem fails an export
  timer(settings)     its latency backend, for `qsamc profile` and latency validation
  build_engine(...)   its engine format, where it has one (`engine_format`)

The runtime-specific phases live in the runtime's base class (`targets/tensorrt.py`; the CPU target
with ONNX Runtime in `targets/cpu.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qsamc.errors import TargetError
from qsamc.export.verify import lint_tensorrt
from qsamc.formats import EXPORT_FORMATS, Container, DeploymentFormat
from qsamc.passes import (FoldOffsetIntoNormPass, FoldWeightQuantizersPass, LowerActivationOffsetsPass,
                          LowerAttentionQuantizersPass)
from qsamc.supernet.space import SearchSpace

if TYPE_CHECKING:
    import onnx

    from qsamc.ir.pass_manager import Pass
    from qsamc.profiling.timers import ProfileSettings, Timer

# Opset 17: per-channel Q/DQ needs 13, one LayerNormalization op 17. 21: INT4 block quantization.
BASE_OPSET = 17
INT4_OPSET = 21


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
    deployable_weight_bits: tuple[int, ...]
    deployable_act_bits: tuple[int, ...]

    latency_backend: ClassVar[str]  # names the latency tables this target's timer writes
    engine_format: ClassVar[str | None] = None  # the `--format` that builds an engine after the ONNX
    lint_required: ClassVar[bool] = False  # whether a lint problem fails the export

    def restrict_space(self, space: SearchSpace) -> SearchSpace:
        """The space narrowed to the bits this target runs well (e.g. activations >= 8 bits on GPUs)."""
        weights = tuple(b for b in space.weight_bits if b in self.deployable_weight_bits)
        acts = tuple(b for b in space.act_bits if b in self.deployable_act_bits)
        if not weights or not acts:
            raise TargetError(f"target {self.name} deploys none of the space's bit-widths")
        return space.restrict(weight_bits=weights, act_bits=acts)

    def with_float_type(self, float_type: Container) -> Target:
        """The same target emitting its float parts in `float_type` (the export's part checks emit FP32
        parts, as the lowering is exact there; see `qsamc.export.verify.check_parts`)."""
        return dataclasses.replace(self, deployment=dataclasses.replace(self.deployment, float_type=float_type))

    def lowering_passes(self) -> list[Pass]:
        """Fold weight quantizers into integer weights -> lower LSQ+ activation offsets to zero-point 0 ->
        fold the offsets into the norms that produce them -> lower quantized attention to Q/DQ."""
        return [FoldWeightQuantizersPass(self.deployment), LowerActivationOffsetsPass(), FoldOffsetIntoNormPass(),
                LowerAttentionQuantizersPass(self.deployment.int8_attention)]

    def onnx_opset(self, int4: bool) -> int:
        return INT4_OPSET if int4 else BASE_OPSET

    def finish_onnx(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return model

    def lint(self, model: onnx.ModelProto) -> list[str]:
        """What TensorRT 10 would refuse in `model` under this target's rules (reported on every target)."""
        return lint_tensorrt(model, self.deployment)

    def timer(self, settings: ProfileSettings) -> Timer:
        raise NotImplementedError

    def build_engine(self, onnx_path: Path, out: Path, batch: Any, resolution: int, staging: Path | None = None):
        raise TargetError(f"target {self.name} builds no engine; it exports {', '.join(self.formats)}")


_REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    if target.name in _REGISTRY:
        raise ValueError(f"target '{target.name}' is registered twice")
    if not set(target.formats) <= set(EXPORT_FORMATS):
        raise ValueError(f"target '{target.name}' exports {target.formats}; qsamc writes {EXPORT_FORMATS}")
    _REGISTRY[target.name] = target
    return target


def known_targets() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_target(name: str) -> Target:
    """The one place that dispatches on a target's name; an unknown name fails with the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TargetError(f"unknown target '{name}'; known targets are {', '.join(known_targets())}") from None
