"""x86 CPU with ONNX Runtime's CPU execution provider: S8S8 INT8 Q/DQ (VNNI), INT4 MatMulNBits, FP32."""

from qsamc.formats import ONNXRUNTIME_CPU
from qsamc.targets import Peaks, Target, register

CPU = register(Target(
    name="cpu",
    description="x86-64 CPU (AVX512-VNNI), ONNX Runtime CPU provider (S8S8 INT8 / INT4 weight-only / FP32)",
    formats=("onnx",),
    deployment=ONNXRUNTIME_CPU,
    # CPUs differ too much for one datasheet: latency is measured (`qsamc profile --target cpu`).
    peaks=Peaks(),
    latency_backend="onnxruntime",
    deployable_weight_bits=(2, 3, 4, 8, 32),
    deployable_act_bits=(2, 3, 4, 8, 32),
))
