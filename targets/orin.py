"""NVIDIA Jetson AGX Orin 64GB (GPU) with TensorRT: INT8 and FP16; memory bandwidth is the bottleneck."""

from qsamc.formats import TENSORRT
from qsamc.targets.base import Peaks, register
from qsamc.targets.tensorrt import TensorRTTarget

ORIN = register(TensorRTTarget(
    name="orin",
    description="NVIDIA Jetson AGX Orin 64GB GPU, TensorRT 10 (INT8 / INT4 weight-only / FP16)",
    formats=("onnx", "trt"),
    deployment=TENSORRT,
    # Jetson AGX Orin 64GB datasheet: ~85 dense INT8 TOPS on the GPU (170 sparse), 204.8 GB/s. The
    # datasheet quotes no dense FP16 figure; Ampere tensor cores run FP16 at half the INT8 rate
    # (64 tensor cores x 256 FP16 FMA/clock x 2 x 1.3 GHz = 42.6 TFLOPS).
    peaks=Peaks(int8_tops=85, fp16_tflops=42.5, memory_gbps=204.8),
    deployable_weight_bits=(4, 8, 32),
    deployable_act_bits=(8, 32),
))
