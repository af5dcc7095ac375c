"""The phases every TensorRT target shares (A100, H100, Jetson Orin): one runtime, different hardware.

- Lowering: the common passes; TensorRT fuses float biases itself and takes no INT32 DequantizeLinear,
  so biases stay float.
- Emission: float parts typed FP16 for a strongly typed build (`qsamc.export.float16`), opset 19 for
  FP16 Q/DQ scales (21 with INT4 block-quantized weights).
- Lint: TensorRT 10's ONNX parser and explicit-quantization rules; a problem fails the export.
- Latency backend: per-part engines timed with CUDA events (`qsamc.profiling.timers.TensorRTTimer`).
- Engine: `--format trt` builds a serialized engine with a batch optimization profile
  (`qsamc.export.tensorrt_engine`), or says what is missing and prints the `trtexec` command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import onnx

from qsamc.export.float16 import to_float16
from qsamc.export.report import EngineBuild
from qsamc.targets.base import Target

FP16_OPSET = 19  # FP16 Q/DQ scales


@dataclass(frozen=True)
class TensorRTTarget(Target):
    latency_backend: ClassVar[str] = "tensorrt"
    engine_format: ClassVar[str | None] = "trt"
    lint_required: ClassVar[bool] = True

    def onnx_opset(self, int4: bool) -> int:
        return super().onnx_opset(int4) if int4 or self.deployment.float_type != "fp16" else FP16_OPSET

    def finish_onnx(self, model: onnx.ModelProto) -> onnx.ModelProto:
        if self.deployment.float_type != "fp16":
            return model
        return to_float16(model)

    def timer(self, settings):
        from qsamc.profiling.timers import TensorRTTimer  # deferred: start-up time, search never loads them

        return TensorRTTimer(settings)

    def build_engine(self, onnx_path: Path, out: Path, batch: Any, resolution: int, staging: Path | None = None):
        """`encoder.plan` beside the ONNX (with `timing.cache`), where TensorRT and a GPU exist; returns
        the report's `EngineBuild`: the `trtexec` command, the batch profile, and why none was built. The
        paths name `out`; with `staging`, the files are read and built there (the export's folder before
        it is swapped in for `out`)."""
        from qsamc.export import tensorrt_engine  # deferred: start-up time, search never loads it

        engine, cache = out / "encoder.plan", out / "timing.cache"
        missing = tensorrt_engine.missing()
        if missing is None:
            where = staging or out
            tensorrt_engine.build_engine(where / onnx_path.name, where / engine.name, where / cache.name, batch,
                                         resolution)
        return EngineBuild(tensorrt_engine.trtexec_command(onnx_path, engine, cache, batch, resolution), vars(batch),
                           missing, None if missing else str(engine))
