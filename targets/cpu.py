"""x86 CPU with ONNX Runtime's CPU execution provider: S8S8 INT8 Q/DQ (VNNI), INT4 MatMulNBits, FP32.

Two targets, one per kind of x86 CPU:
- `cpu`: AVX512-VNNI or AVX-VNNI CPUs, INT8 as S8S8 Q/DQ (ONNX Runtime's recommended default on x86).
- `cpu-avx2`: x86 CPUs without VNNI. ONNX Runtime runs S8S8 there with VPMADDUBSW, whose 16-bit pair sums
  saturate (a `cpu` export on such a CPU passes its checks only with the kernels unfused); this target
  writes the same model as U8U8 Q/DQ (`qsamc.export.unsigned`), whose kernels do not saturate.

Their phases:
- Lowering: the common passes, then INT32 biases (`QuantizeBiasPass`): ONNX Runtime fuses
  Q/DQ -> Gemm <- DQ(INT32 bias) into one QGemm, where a float bias stays a separate Add over the whole
  output (16% of a ViT-B encoder's time); then float attention as ONNX Runtime's fused
  `MultiHeadAttention` on the rel-pos-folded q', k' (`FuseFloatAttentionPass`).
- Emission: FP32 float parts, opset 17 (21 with INT4 block-quantized weights, which it runs as
  MatMulNBits); INT8 Q/DQ rewritten as UINT8 on `cpu-avx2` (`unsigned_int8`).
- Lint: reported, never enforced (the model does not go to TensorRT).
- Latency backend: ONNX Runtime sessions configured as export's, timed on one thread's CPU clock
  (`qsamc.profiling.timers.OnnxRuntimeTimer`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from qsamc.export.unsigned import as_unsigned_int8
from qsamc.formats import ONNXRUNTIME_CPU
from qsamc.passes import FuseFloatAttentionPass, QuantizeBiasPass
from qsamc.targets.base import Peaks, Target, register


@dataclass(frozen=True)
class OnnxRuntimeCpuTarget(Target):
    latency_backend: ClassVar[str] = "onnxruntime"
    # False: float attention as segment-anything's ops (the plain FP32 graph ONNX Runtime's own quantizers
    # start from in `qsamc baseline` and the benchmarks).
    fuse_attention: bool = True
    # True: INT8 Q/DQ written as UINT8 (U8U8 kernels, which do not saturate on CPUs without VNNI).
    unsigned_int8: bool = False

    def lowering_passes(self):
        return [*super().lowering_passes(), QuantizeBiasPass(), *([FuseFloatAttentionPass()] if self.fuse_attention else [])]

    def finish_onnx(self, model):
        return as_unsigned_int8(model) if self.unsigned_int8 else model

    def timer(self, settings):
        from qsamc.profiling.timers import OnnxRuntimeTimer  # deferred: start-up time, search never loads them

        return OnnxRuntimeTimer(settings)


CPU = register(OnnxRuntimeCpuTarget(
    name="cpu",
    description="x86-64 CPU with VNNI (AVX512-VNNI / AVX-VNNI), ONNX Runtime CPU provider (S8S8 INT8 / INT4 weight-only / FP32)",
    formats=("onnx",),
    deployment=ONNXRUNTIME_CPU,
    # CPUs differ too much for one datasheet: latency is measured (`qsamc profile --target cpu`).
    peaks=Peaks(),
    deployable_weight_bits=(2, 3, 4, 8, 32),
    deployable_act_bits=(2, 3, 4, 8, 32),
))


CPU_AVX2 = register(dataclasses.replace(
    CPU,
    name="cpu-avx2",
    description="x86-64 CPU without VNNI (AVX2 / AVX512), ONNX Runtime CPU provider (U8U8 INT8 / INT4 weight-only / FP32)",
    unsigned_int8=True,
))
