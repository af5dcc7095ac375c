"""Deployment formats: which integer and float types a runtime really executes, and how a searched
(weight bits, activation bits) pair of one layer is carried in them.

Search trains and ranks b-bit grids for b in {2, 3, 4, 8, 32}; no runtime has 2- or 3-bit kernels.
A format maps each pair to the containers it runs in (a 3-bit activation grid is carried exactly in an
INT8 container: same accuracy, INT8 speed). Targets (`qsamc.targets`) pick a format; lowering and the
latency tables read the same `Deployment`, so the cost that search optimises is the cost export builds.

Facts (TensorRT developer guide, "Working with Quantized Types"; ONNX Runtime quantization docs):
TensorRT 10 explicit quantization takes symmetric Q/DQ only (zero-point 0), INT8 weights and
activations, INT4 weight-only GEMMs (block-quantized, opset 21), and runs every other layer in the type
the ONNX model gives it when built strongly typed (so qsamc types the float parts FP16,
`qsamc.export.float16`). TensorRT fuses INT8 multi-head attention only for sequences of at most 512 tokens
and head sizes 16, 32 or 64, with Q/DQ on q, k, the softmax output and v (NVIDIA/TensorRT issues 4167,
2981, 3724): `AttentionRule`. ONNX Runtime's CPU provider fuses S8S8 INT8 Q/DQ (QLinearMatMul,
MatMulIntegerToFloat, QLinearConv) and INT4 block-quantized weights into MatMulNBits. qsamc emits no FP8:
Hopper's FP8 tensor cores would need their own accuracy check, so `h100` deploys as `a100` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Container = Literal["int4", "int8", "fp8", "fp16", "fp32"]
# what `qsamc export --format` writes: a Q/DQ ONNX model, or a TensorRT engine beside it; a target offers some
EXPORT_FORMATS = ("onnx", "trt")
LayerKind = Literal["linear", "conv"]


@dataclass(frozen=True)
class Deployment:
    """How one quantized layer runs: weight and activation containers, and the compute precision."""

    weight: Container
    act: Container
    compute: Container
    weight_bits: int  # the searched grid carried in the weight container (32 = float)
    act_bits: int

    @property
    def kernel(self) -> str:
        """A short name for latency tables and reports, e.g. 'int8xint8', 'int4xfp16'."""
        return f"{self.weight}x{self.act}"


@dataclass(frozen=True)
class AttentionRule:
    """Where a runtime runs attention's matmuls in INT8: at most `max_tokens` per sequence (a window, or
    the whole token grid for a global block) and a head size in `head_dims` (empty: any). Attention it
    does not admit stays in the float type (fused FP16 MHA on TensorRT)."""

    max_tokens: int
    head_dims: tuple[int, ...] = ()

    def admits(self, tokens: int, head_dim: int) -> bool:
        return tokens <= self.max_tokens and (not self.head_dims or head_dim in self.head_dims)


@dataclass(frozen=True)
class DeploymentFormat:
    """A runtime's rules. `float_type` is what un-quantized layers and all float ops run in;
    `int8_attention` where the runtime runs INT8 attention matmuls (None: it never does, or qsamc has no rule)."""

    name: str
    float_type: Container
    int4_weight_only: bool  # INT4 weight-only GEMMs (never for convolutions)
    int8_weight_only: bool  # INT8 weights with float activations run a real kernel
    int8_attention: AttentionRule | None = None

    def deploy(self, w_bits: int, a_bits: int, kind: LayerKind = "linear") -> Deployment:
        """The containers of a layer searched at (w_bits, a_bits).

        1. Both quantized (<= 8 bits): INT8 x INT8 compute; sub-8-bit grids ride in INT8 containers.
        2. Weight quantized, activation float: weight-only kernels where the runtime has them (INT4 for
           grids <= 4 bits on GEMMs, else INT8); otherwise the weight is dequantized to the float type
           at build time (same accuracy, float speed).
        3. Activation quantized, weight float: no integer kernel takes a float weight, so the
           activation grid is kept by a Q/DQ pair and the layer computes in the float type.
        4. Both float: the float type.
        """
        f = self.float_type
        if w_bits <= 8 and a_bits <= 8:
            return Deployment("int8", "int8", "int8", w_bits, a_bits)
        if w_bits <= 8:
            if kind == "linear" and w_bits <= 4 and self.int4_weight_only:
                return Deployment("int4", f, f, w_bits, a_bits)
            if kind == "linear" and self.int8_weight_only:
                return Deployment("int8", f, f, w_bits, a_bits)
            return Deployment(f, f, f, w_bits, a_bits)
        if a_bits <= 8:
            return Deployment(f, "int8", f, w_bits, a_bits)
        return Deployment(f, f, f, w_bits, a_bits)


TENSORRT_MHA = AttentionRule(max_tokens=512, head_dims=(16, 32, 64))
TENSORRT = DeploymentFormat(
    "tensorrt", float_type="fp16", int4_weight_only=True, int8_weight_only=True, int8_attention=TENSORRT_MHA,
)
# ONNX Runtime's CPU provider runs a Q/DQ MatMul of any size as an integer MatMul.
ANY_ATTENTION = AttentionRule(max_tokens=2**31 - 1)
ONNXRUNTIME_CPU = DeploymentFormat(
    "onnxruntime-cpu", float_type="fp32", int4_weight_only=True, int8_weight_only=False, int8_attention=ANY_ATTENTION,
)
