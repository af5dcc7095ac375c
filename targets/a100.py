"""NVIDIA A100 (SXM 80GB) with TensorRT: INT8 tensor cores, INT4 weight-only GEMMs, FP16 for float."""

from qsamc.formats import TENSORRT
from qsamc.targets.base import Peaks, register
from qsamc.targets.tensorrt import TensorRTTarget

A100 = register(TensorRTTarget(
    name="a100",
    description="NVIDIA A100 SXM 80GB, TensorRT 10 (INT8 / INT4 weight-only / FP16)",
    formats=("onnx", "trt"),
    deployment=TENSORRT,
    # NVIDIA A100 datasheet (dense): INT8 624 TOPS, INT4 1248 TOPS, FP16 312 TFLOPS, 2039 GB/s (80GB SXM).
    peaks=Peaks(int8_tops=624, int4_tops=1248, fp16_tflops=312, memory_gbps=2039),
    # No 2/3-bit kernels exist: sub-8-bit activations cost accuracy and buy no speed over INT8.
    deployable_weight_bits=(4, 8, 32),
    deployable_act_bits=(8, 32),
))
