"""Verification of an emitted ONNX model, run on every export: TensorRT lint, fidelity, parts, task metric.

- `lint_tensorrt(model, deployment)`: what TensorRT 10's ONNX parser and explicit quantization accept,
  checked without TensorRT (TensorRT developer guide and onnx-tensorrt's operator matrix): opset 9..24,
  known operators only, no integer-arithmetic ops (QLinearMatMul, MatMulInteger, ConvInteger: Q/DQ
  only), zero-points all 0, positive constant scales, INT8 / FP8 / INT4-weight types, per-tensor
  activations, per-channel or blocked (INT4) weights; float parts in the deployment's float type (a
  strongly typed engine runs an FP32 node in FP32); attention quantized only as fused INT8 MHA admits.
- `measure_fidelity(session, reference, inputs)`: runs the model in a real ONNX Runtime session and
  compares it with the PyTorch fake-quantized subnet.
- Every check runs ONNX Runtime's fused integer kernels first (as deployed) and, only where they miss,
  the graph as written (optimisations off): `kernels: exact` then says the lowering is right and this
  CPU's fused kernels are not (x86 without VNNI), with their figures beside it.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto

from qsamc.distributed import module_device
from qsamc.errors import QsamcError
from qsamc.export.emit import emit_onnx
from qsamc.export.float16 import FP32_OPS, LAYOUT_OPS, constant_values, fp16_safe_scale
from qsamc.export.ort import ort_session
from qsamc.export.parts import AttentionPart, MlpPart, NeckPart, PatchPart, one_torch_thread
from qsamc.formats import TENSORRT, AttentionRule, DeploymentFormat

TENSORRT_OPSETS = (9, 24)
# TensorRT 10's ONNX operator support matrix (onnx-tensorrt docs/operators.md), the part that an
# exported encoder can reach.
TENSORRT_OPS = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape
Conv ConvTranspose Cos CumSum DepthToSpace DequantizeLinear Div Einsum Elu Equal Erf Exp Expand Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool Greater GreaterOrEqual GridSample
HardSigmoid Identity InstanceNormalization LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
MatMul Max MaxPool Mean Min Mod Mul Neg Not Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL2
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape Resize ScatterElements ScatterND Shape
Sigmoid Sign Sin Size Slice Softmax Softplus SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh Tile TopK
Transpose Trilu Unsqueeze Where Xor
""".split())
INTEGER_OPS = frozenset({"QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearConv", "QGemm",
                         "MatMulIntegerToFloat", "DynamicQuantizeLinear"})
QUANT_TYPES = {TensorProto.INT8: "int8", TensorProto.FLOAT8E4M3FN: "fp8", TensorProto.INT4: "int4"}


class ExportError(QsamcError):
    """An export that does not verify: the ONNX model disagrees with the subnet or TensorRT rejects it."""


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {i.name: i.data_type for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def lint_tensorrt(model: onnx.ModelProto, deployment: DeploymentFormat = TENSORRT) -> list[str]:
    """Every reason TensorRT 10 would reject `model` or run it other than `deployment` says (empty: none):
    parser and Q/DQ rules, float parts in the deployment's float type (`_lint_float_type`), and attention
    quantized only as the deployment's fused INT8 attention admits (`_lint_attention`)."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    lo, hi = TENSORRT_OPSETS
    if opset is None or not lo <= opset <= hi:
        problems.append(f"opset {opset} is outside TensorRT 10's range {lo}..{hi}")
    constants, types = constant_values(model), _elem_types(model)
    for node in model.graph.node:
        where = f"{node.op_type} node '{node.name}'"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where} is in domain '{node.domain}', which TensorRT does not parse")
        elif node.op_type in INTEGER_OPS:
            problems.append(f"{where} does integer arithmetic; TensorRT takes Q/DQ only")
        elif node.op_type not in TENSORRT_OPS:
            problems.append(f"{where} is not a TensorRT 10 operator")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems += _lint_qdq(node, where, constants, types)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)  # Reshape targets computed from Shape
    value_types = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    if deployment.float_type == "fp16":
        problems += _lint_float_type(model, constants, value_types)
    problems += _lint_attention(model, deployment.int8_attention, constants, value_types)
    return problems


# Nodes an FP16 model may still run in FP32: the LayerNorm islands and their layout ops and Q (see
# `qsamc.export.float16`), the Casts around them, and Q/DQ whose scale FP16 cannot hold.
_FP32_ALLOWED = frozenset({*FP32_OPS, *LAYOUT_OPS, "Cast", "Constant", "QuantizeLinear"})


def _lint_float_type(model: onnx.ModelProto, constants: dict[str, np.ndarray], value_types: dict) -> list[str]:
    """Every node of an FP16 deployment that computes a float result in FP32 (TensorRT builds strongly
    typed: it would run that node in FP32)."""
    problems = []
    for node in model.graph.node:
        if node.op_type in _FP32_ALLOWED:
            continue
        if node.op_type == "DequantizeLinear" and not fp16_safe_scale(constants.get(node.input[1], np.ones(1))):
            continue
        if any(o in value_types and value_types[o].elem_type == TensorProto.FLOAT for o in node.output):
            problems.append(f"{node.op_type} node '{node.name}' runs in FP32 where the target's float type is FP16")
    return problems


def _lint_attention(model: onnx.ModelProto, rule: AttentionRule | None, constants: dict[str, np.ndarray],
                    value_types: dict) -> list[str]:
    """Attention matmuls (MatMuls of two activations) quantized the way the runtime fuses INT8 attention:
    both inputs of both batched matmuls through Q/DQ, at a sequence length and head size the rule admits;
    attention that is not quantized is left alone (it runs in the float type)."""
    producers = {o: n for n in model.graph.node for o in n.output}

    def producer(name: str):  # looking through Casts (an FP32 DequantizeLinear's Cast to FP16)
        node = producers.get(name)
        while node is not None and node.op_type == "Cast":
            name, node = node.input[0], producers.get(node.input[0])
        return name, node

    def dequantized(name: str) -> bool:
        _, node = producer(name)
        return node is not None and node.op_type == "DequantizeLinear" and node.input[0] not in constants

    def is_weight(name: str) -> bool:
        name, node = producer(name)
        return name in constants or (node is not None and node.op_type == "DequantizeLinear"
                                     and node.input[0] in constants)

    def dims(name: str) -> list[int]:
        shape = value_types[name].shape.dim if name in value_types else []
        return [d.dim_value for d in shape]

    problems = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or any(is_weight(i) for i in node.input):
            continue
        where = f"attention MatMul node '{node.name}'"
        quantized = [dequantized(i) for i in node.input]
        if not any(quantized):
            continue
        if not all(quantized):
            problems.append(f"{where} has Q/DQ on one input only; TensorRT fuses INT8 attention only with Q/DQ on "
                            "q and k, on the softmax output and on v")
            continue
        tokens, head_dim = _attention_size(dims(node.input[0]), dims(node.input[1]))
        if rule is None:
            problems.append(f"{where} is quantized, but this runtime has no fused INT8 attention")
        elif not rule.admits(tokens, head_dim):
            problems.append(f"{where} is quantized over {tokens} tokens with head size {head_dim}, outside fused INT8 "
                            f"attention (at most {rule.max_tokens} tokens, head size "
                            f"{'/'.join(map(str, rule.head_dims))}): keep it in the float type")
    return problems


def _attention_size(a: list[int], b: list[int]) -> tuple[int, int]:
    """(tokens, head size) of q @ k^T (a: [.., N, d], b: [.., d, N]) or of p @ v (a: [.., N, N], b: [.., N, d])."""
    if len(a) < 2 or len(b) < 2:
        return 0, 0
    if a[-1] == a[-2] and b[-2] == a[-1]:  # p @ v
        return b[-2], b[-1]
    return a[-2], a[-1]


def _lint_qdq(node: onnx.NodeProto, where: str, constants: dict[str, np.ndarray], types: dict[str, int]) -> list[str]:
    problems = []
    scale = constants.get(node.input[1])
    attrs = {a.name: a.i for a in node.attribute}
    if scale is None:
        problems.append(f"{where} has a non-constant scale")
    elif not np.all(scale > 0):
        problems.append(f"{where} has a non-positive scale")
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zero is not None:
        if zero not in constants:
            problems.append(f"{where} has a non-constant zero-point")
        elif np.any(constants[zero].astype(np.float64) != 0):
            problems.append(f"{where} has a non-zero zero-point; TensorRT supports symmetric quantization only")
    # The quantized type: the zero-point's type, or the DQ input's when it is a constant.
    qtype = types.get(zero) if zero else types.get(node.input[0] if node.op_type == "DequantizeLinear" else "")
    if qtype is None and node.op_type == "QuantizeLinear":
        qtype = TensorProto.UINT8  # ONNX's default output type without a zero-point
    if qtype is not None and qtype not in QUANT_TYPES:
        problems.append(f"{where} quantizes to {TensorProto.DataType.Name(qtype)}; TensorRT takes INT8, FP8 or INT4")
    weight = node.op_type == "DequantizeLinear" and node.input[0] in constants
    if qtype == TensorProto.INT4 and not weight:
        problems.append(f"{where} is INT4 on an activation; TensorRT's INT4 is weight-only")
    if scale is not None and scale.ndim > 0:
        if not weight:
            problems.append(f"{where} quantizes an activation per channel; TensorRT needs per-tensor scales there")
        elif "block_size" in attrs and attrs["block_size"] and qtype != TensorProto.INT4:
            problems.append(f"{where} block-quantizes a non-INT4 weight")
        elif scale.ndim > 1 and not attrs.get("block_size"):
            problems.append(f"{where} has a {scale.ndim}-D scale without block_size")
    return problems


@dataclass(frozen=True)
class Fidelity:
    """ONNX Runtime vs the PyTorch fake-quantized subnet, absolute and relative to the output's peak.

    `noise_*` is the subnet's own float-rounding noise floor: how far the fake-quantized subnet moves
    when its input moves by 1e-4 of its spread (see `fidelity_tolerance`).
    """

    max_abs: float
    mean_abs: float
    output_scale: float
    max_rel: float
    mean_rel: float
    noise_max_rel: float
    noise_mean_rel: float
    max_rel_tolerance: float
    mean_rel_tolerance: float
    samples: int
    kernels: str = "fused"  # as in `PartCheck`: `exact` where the fused kernels missed and `fused_*` say by how much
    fused_max_rel: float | None = None
    fused_mean_rel: float | None = None

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.max_rel_tolerance and self.mean_rel <= self.mean_rel_tolerance

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


# FP16's unit roundoff: a value carried in FP16 is off by up to this fraction of itself, so an FP16 float
# path (TensorRT targets) moves each output by that much and, where an input sits within it of a grid
# boundary, rounds the input the other way (a flip). The mean tolerance of an FP16 model takes this
# much of the output peak on top; the max (one step) already covers both.
FP16_ROUNDOFF = 2.0 ** -11


def _fp16_allowance(float_type: str) -> float:
    return FP16_ROUNDOFF if float_type == "fp16" else 0.0


def fidelity_tolerance(min_act_bits: int, noise_max: float, noise_mean: float,
                       float_type: str = "fp32") -> tuple[float, float]:
    """(max, mean) relative tolerance: one quantization step of the coarsest activation grid.

    ONNX Runtime and PyTorch round floats differently (a fused integer GEMM sums exactly, Q multiplies
    by 1/s), so a value on a rounding boundary can land one step apart: one step, 2^-(b-1) of the
    output range for a b-bit grid, bounds the max; such flips are rare, so the mean must stay far below
    (1/64 step). In a deep stack of low-bit grids one flip can move later ones too; the subnet does that
    by itself under a 1e-4 input change (its noise floor), and the ONNX model is only
    required to stay within 4x that floor where the floor exceeds the step bound.
    """
    step = 2.0 ** -(min(min_act_bits, 8) - 1)
    return max(step, 4 * noise_max), max(step / 64 + _fp16_allowance(float_type), 4 * noise_mean)


@torch.no_grad()
def measure_fidelity(session: ort.InferenceSession, reference: torch.nn.Module, inputs: list[torch.Tensor],
                     min_act_bits: int, float_type: str = "fp32") -> Fidelity:
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(0)
    diffs, noises, peak = [], [], 0.0
    for x in inputs:
        expected = reference(x).float()
        actual = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        nudged = reference(x + 1e-4 * x.std() * torch.randn(x.shape, generator=generator)).float()
        diffs.append((actual - expected).abs())
        noises.append((nudged - expected).abs())
        peak = max(peak, float(expected.abs().max()))
    scale = peak or 1.0
    diff, noise = torch.cat([d.flatten() for d in diffs]), torch.cat([n.flatten() for n in noises])
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    noise_max, noise_mean = float(noise.max()) / scale, float(noise.mean()) / scale
    max_tol, mean_tol = fidelity_tolerance(min_act_bits, noise_max, noise_mean, float_type)
    return Fidelity(max_abs, mean_abs, peak, max_abs / scale, mean_abs / scale, noise_max, noise_mean,
                    max_tol, mean_tol, len(inputs))


def verify_fidelity(measure: Callable[[bool], Fidelity]) -> Fidelity:
    """The whole-model check: `measure(exact)` is `measure_fidelity` with ONNX Runtime's fused kernels
    (`exact=False`, as deployed) and, only where that misses the tolerance, with graph optimisations off,
    as `check_parts` does for each part."""
    fidelity = measure(False)
    if fidelity.ok:
        return fidelity
    return replace(measure(True), kernels="exact", fused_max_rel=fidelity.max_rel, fused_mean_rel=fidelity.mean_rel)


# --- layer by layer (as Polygraphy compares engines) ------------------------------------------------

PART_LAYERS = {"patch_embed": ("patch_embed.proj",), "attention": ("attn.qkv", "attn.proj"),
               "mlp": ("mlp.lin1", "mlp.lin2"), "neck": ("neck.0", "neck.2")}


@dataclass(frozen=True)
class PartCheck:
    """One lowered part, run alone in ONNX Runtime on the PyTorch subnet's own input to that part, against
    the PyTorch subnet's output of that part; errors relative to the part's output peak.

    `kernels` says which session the errors come from: `fused` (ONNX Runtime's integer kernels, as
    deployed) or, where those miss the bound, `exact` (graph optimisations off: every Q/DQ, GEMM and
    bias evaluated as the ONNX graph says). A part that passes only `exact` has a correct lowering and
    this CPU's fused INT8 kernels deviating: `fused_max_rel` / `fused_mean_rel` say by how much. On x86
    CPUs without VNNI, ONNX Runtime's U8S8/S8S8 GEMMs use VPMADDUBSW, whose 16-bit pair sums saturate
    (ONNX Runtime's quantization docs; their remedy is 7-bit weights, `reduce_range`)."""

    part: str
    max_rel: float
    mean_rel: float
    max_rel_tolerance: float
    mean_rel_tolerance: float
    kernels: str = "fused"
    fused_max_rel: float | None = None
    fused_mean_rel: float | None = None

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.max_rel_tolerance and self.mean_rel <= self.mean_rel_tolerance

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def part_tolerance(min_act_bits: int) -> tuple[float, float]:
    """(max, mean) relative tolerance of one part fed the reference's exact input: one step of its
    coarsest activation grid at most (a rounding flip), and 1/64 of a step on average (flips are rare).
    No noise-floor allowance: nothing upstream can amplify a flip into this part."""
    step = 2.0 ** -(min(min_act_bits, 8) - 1)
    return step, step / 64


@torch.no_grad()
def check_parts(reference: torch.nn.Module, lowered: torch.nn.Module, subnet, image: torch.Tensor,
                target) -> list[PartCheck]:
    """Every part of the lowered static subnet (patch embedding, each block's attention and MLP halves,
    the neck: the parts latency tables time), emitted alone by export's emitter and run in ONNX Runtime
    on the fake-quantized reference's input to it. A wrong lowering shows in its part, undiluted.

    The parts are emitted with FP32 float parts whatever the target's float type: this checks the
    lowering (integer weights, scales, offsets, biases), which is exact, to one rounding flip. An FP16
    float path flips far more values (FP16 resolves a value near the top of an 8-bit grid to 1/16 of a
    step), which the LayerNorms after the next layer amplify; its effect is checked where it matters, on
    the whole shipped model and its task metric (`measure_fidelity`, the task-level check)."""
    target = target.with_float_type("fp32")

    def parts(static):
        yield "patch_embed", "", PatchPart(static.patch_embed, static.pos_embed)
        for index, block in static.blocks.items():
            yield f"blocks.{index}.attention", f"blocks.{index}.", AttentionPart(block)
            yield f"blocks.{index}.mlp", f"blocks.{index}.", MlpPart(block)
        yield "neck", "", NeckPart(static.neck)

    checks, x = [], image
    with one_torch_thread():
        for (name, prefix, expected_part), (_, _, lowered_part) in zip(parts(reference), parts(lowered)):
            kind = name.rsplit(".", 1)[-1]
            bits = min((subnet.bits_of(prefix + layer).a for layer in PART_LAYERS[kind]), default=32)
            expected = expected_part(x).float()
            model = emit_onnx(lowered_part, x, target)
            peak = float(expected.abs().max()) or 1.0

            def errors(exact: bool) -> tuple[float, float]:
                session = ort_session(model, threads=1, exact=exact)
                actual = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
                diff = (actual - expected).abs()
                return float(diff.max()) / peak, float(diff.mean()) / peak

            check = PartCheck(name, *errors(exact=False), *part_tolerance(bits))
            if not check.ok:  # the lowering, or this CPU's fused kernels? The exact session tells.
                check = PartCheck(name, *errors(exact=True), *part_tolerance(bits), "exact",
                                  check.max_rel, check.mean_rel)
            checks.append(check)
            x = expected  # the next part is fed the reference's own input
    return checks


def onnx_encoder_forward(session: ort.InferenceSession, head: torch.nn.Module):
    """Images -> logits with the encoder in an ONNX Runtime session (static batch 1) and `head` in torch:
    how the task-level check scores an exported encoder through its head."""
    name = session.get_inputs()[0].name
    device = module_device(head)

    @torch.no_grad()
    def forward(images: torch.Tensor) -> torch.Tensor:
        features = [torch.from_numpy(session.run(None, {name: image[None].cpu().numpy()})[0]) for image in images]
        return head(torch.cat(features).to(device), images.shape[-2:])

    return forward


TASK_TOLERANCE = 0.002  # mIoU, 0.2 points


@dataclass(frozen=True)
class TaskCheck:
    """Validation mIoU through the head, with the encoder in PyTorch and in ONNX Runtime.

    `kernels` says which session `onnx_miou` comes from, as in `PartCheck`: `fused` (ONNX Runtime's
    integer kernels, as deployed) or, where those miss the tolerance, `exact` (graph optimisations off),
    with the fused session's mIoU in `fused_onnx_miou`: the lowering is right and this CPU's INT8
    kernels move the task metric (x86 without VNNI: VPMADDUBSW's saturating pair sums)."""

    pytorch_miou: float
    onnx_miou: float
    val_images: int
    kernels: str = "fused"
    fused_onnx_miou: float | None = None

    @property
    def ok(self) -> bool:
        return abs(self.pytorch_miou - self.onnx_miou) <= TASK_TOLERANCE

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_task(pytorch_miou: float, onnx_miou: Callable[[bool], float], val_images: int) -> TaskCheck:
    """The task-level check: `onnx_miou(exact)` scores the ONNX model with ONNX Runtime's fused kernels
    (`exact=False`, as deployed) and, only where those miss the tolerance, with graph optimisations off."""
    check = TaskCheck(pytorch_miou, onnx_miou(False), val_images)
    if not check.ok:  # the lowering, or this CPU's fused kernels? The exact session tells.
        check = TaskCheck(pytorch_miou, onnx_miou(True), val_images, "exact", check.onnx_miou)
    return check


def check_export(lint: list[str], fidelity: Fidelity, lint_required: bool, parts: list[PartCheck] = (),
                 task: TaskCheck | None = None) -> None:
    """Raise one sentence when the export does not verify (lint problems count where the target requires
    them: TensorRT targets): a part that disagrees fed the reference's own input, a task metric that
    moved, or the whole model."""
    if lint and lint_required:
        raise ExportError(f"the ONNX model is not TensorRT-compatible: {lint[0]}")
    bad = next((p for p in parts if not p.ok), None)
    if bad is not None:
        raise ExportError(
            f"the lowered {bad.part} differs from the fake-quantized subnet's, fed the same input, by "
            f"{bad.max_rel:.2e} (max) / {bad.mean_rel:.2e} (mean) of its output scale, above one quantization "
            f"step ({bad.max_rel_tolerance:.2e} / {bad.mean_rel_tolerance:.2e}): a lowering defect")
    if task is not None and not task.ok:
        raise ExportError(
            f"the ONNX model's validation mIoU is {task.onnx_miou:.4f} against the PyTorch subnet's "
            f"{task.pytorch_miou:.4f}, more than {TASK_TOLERANCE * 100:.1f} points apart")
    if not fidelity.ok or not math.isfinite(fidelity.max_rel):
        raise ExportError(
            f"the ONNX model differs from the fake-quantized subnet by {fidelity.max_rel:.2e} (max) / "
            f"{fidelity.mean_rel:.2e} (mean) of the output scale, above the tolerance of one quantization "
            f"step ({fidelity.max_rel_tolerance:.2e} / {fidelity.mean_rel_tolerance:.2e})")
