"""x86 CPU with ONNX Runtime's CPU execution provider: S8S8 INT8 Q/DQ (VNNI), INT4 MatMulNBits, FP32.

Its phases:
- Lowering: the common passes, then INT32 biases (`QuantizeBiasPass`): ONNX Runtime fuses
  Q/DQ -> Gemm <- DQ(INT32 bias) into one QGemm, where a float bias stays a separate Add over the whole
  output (16% of a ViT-B encoder's time); then float attention as ONNX Runtime's fused
  `MultiHeadAttention` on the rel-pos-folded q', k' (`FuseFloatAttentionPass`).
- Emission: FP32 float parts, opset 17 (21 with INT4 block-quantized weights, which it runs as
  MatMulNBits).
- Lint: reported, never enforced (the model does not go to TensorRT).
- Latency backend: ONNX Runtime sessions configured as export's, timed on one thread's CPU clock
  (`qsamc.profiling.timers.OnnxRuntimeTimer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from qsamc.formats import ONNXRUNTIME_CPU
from qsamc.passes import FuseFloatAttentionPass, QuantizeBiasPass
from qsamc.targets.base import Peaks, Target, register


@dataclass(frozen=True)
class OnnxRuntimeCpuTarget(Target):
    latency_backend: ClassVar[str] = "onnxruntime"
    # False: float attention as segment-anything's ops (the plain FP32 graph ONNX Runtime's own quantizers
    # start from in `qsamc baseline` and the benchmarks).
    fuse_attention: bool = True

    def lowering_passes(self):
        return [*super().lowering_passes(), QuantizeBiasPass(), *([FuseFloatAttentionPass()] if self.fuse_attention else [])]

    def timer(self, settings):
        from qsamc.profiling.timers import OnnxRuntimeTimer  # deferred: start-up time, search never loads them

        return OnnxRuntimeTimer(settings)


CPU = register(OnnxRuntimeCpuTarget(
    name="cpu",
    description="x86-64 CPU (AVX512-VNNI), ONNX Runtime CPU provider (S8S8 INT8 / INT4 weight-only / FP32)",
    formats=("onnx",),
    deployment=ONNXRUNTIME_CPU,
    # CPUs differ too much for one datasheet: latency is measured (`qsamc profile --target cpu`).
    peaks=Peaks(),
    deployable_weight_bits=(2, 3, 4, 8, 32),
    deployable_act_bits=(2, 3, 4, 8, 32),
))
