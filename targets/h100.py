"""NVIDIA H100 (SXM) with TensorRT: INT8 and FP8 tensor cores, INT4 weight-only GEMMs, FP16 for float."""

from qsamc.formats import TENSORRT_HOPPER
from qsamc.targets import Peaks, Target, register

H100 = register(Target(
    name="h100",
    description="NVIDIA H100 SXM, TensorRT 10 (INT8 / FP8 / INT4 weight-only / FP16)",
    formats=("onnx", "trt"),
    deployment=TENSORRT_HOPPER,
    # NVIDIA H100 SXM datasheet (dense): INT8 1979 TOPS, FP8 1979 TFLOPS, FP16 989 TFLOPS, 3350 GB/s.
    peaks=Peaks(int8_tops=1979, fp8_tflops=1979, fp16_tflops=989, memory_gbps=3350),
    latency_backend="tensorrt",
    deployable_weight_bits=(4, 8, 32),
    deployable_act_bits=(8, 32),
))
