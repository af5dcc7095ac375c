"""NVIDIA H100 (SXM) with TensorRT: INT8 tensor cores, INT4 weight-only GEMMs, FP16 for float.

Deployed with the same TensorRT format as the A100 (qsamc emits no FP8; see `qsamc.formats`); what
differs is the hardware: its peaks, so its roofline estimates and measured latency tables differ."""

from qsamc.formats import TENSORRT
from qsamc.targets.base import Peaks, register
from qsamc.targets.tensorrt import TensorRTTarget

H100 = register(TensorRTTarget(
    name="h100",
    description="NVIDIA H100 SXM, TensorRT 10 (INT8 / INT4 weight-only / FP16; FP8 not emitted)",
    formats=("onnx", "trt"),
    deployment=TENSORRT,
    # NVIDIA H100 SXM datasheet (dense): INT8 1979 TOPS, FP8 1979 TFLOPS, FP16 989 TFLOPS, 3350 GB/s.
    peaks=Peaks(int8_tops=1979, fp8_tflops=1979, fp16_tflops=989, memory_gbps=3350),
    deployable_weight_bits=(4, 8, 32),
    deployable_act_bits=(8, 32),
))
