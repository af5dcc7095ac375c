"""ONNX emission: a static (or already lowered) module -> an ONNX model with TensorRT-style Q/DQ.

Last export stage, and the one entry point the latency-table profiler shares with `qsamc export`:

    emit_onnx(module, example_input, deployment_format) -> onnx.ModelProto

`module` is any part of a static subnet (the whole `StaticEncoder`, one block, one layer): its
`QuantLinear` / `QuantConv2d` layers are lowered on a copy with the same rules as the export passes
(`fold_weight_quantizer`, `lower_activation_offset`, `quantize_bias`), and layers already lowered (`IntLinear`,
`IntConv2d`) are emitted as they are; pass a block of the lowered encoder to get exactly the export's
graph, LayerNorm folding included. The integer layers write their own QuantizeLinear / DequantizeLinear
(`qsamc.export.lowered`); the TorchScript exporter writes the rest (LayerNorm, Softmax, GELU stay float).

Opset 17 (per-channel Q/DQ needs 13, one LayerNormalization op needs 17), 19 where the deployment's
float type is FP16 (FP16 Q/DQ scales, `qsamc.export.float16`), 21 when an INT4 weight is present (block
quantization); the IR version is the lowest that the opset needs, which the installed ONNX Runtime reads
(onnx >= 1.23 would otherwise write IR 14). Scales are always graph constants: the TorchScript exporter
writes an `Identity` of the first for each repeated constant (two layers whose scales are equal), which
TensorRT reads as a computed tensor and refuses as a Q/DQ scale, so those are resolved to the constant.
`dynamic_batch` names the input's and output's first axis `batch`.
"""

from __future__ import annotations

import copy
import io
import warnings

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qsamc.export.float16 import to_float16
from qsamc.formats import DeploymentFormat
from qsamc.supernet.layers import QUANT_LAYER_TYPES
from qsamc.export.lowered import INT_LAYER_TYPES, ChannelLayerNorm, IntLinear
from qsamc.passes.fold_weight_quantizers import fold_weight_quantizer
from qsamc.passes.lower_activation_offsets import lower_activation_offset
from qsamc.passes.quantize_bias import fuses_int32_bias, quantize_bias
from qsamc.supernet.quant import LsqActQuantizer
from qsamc.sam import LayerNorm2d
from qsamc.export.static import replace_module

BASE_OPSET = 17
FP16_OPSET = 19
INT4_OPSET = 21


def lowering_passes(deployment: DeploymentFormat) -> list:
    """Export's lowering of an extracted static subnet, in order: fold weight quantizers into integer
    weights -> lower LSQ+ activation offsets to zero-point 0 -> fold the offsets into the norms -> INT32
    biases where the runtime fuses them. `qsamc export` and the latency tables both run exactly this."""
    from qsamc.passes import FoldOffsetIntoNormPass, FoldWeightQuantizersPass, LowerActivationOffsetsPass, QuantizeBiasPass

    lowering = [FoldWeightQuantizersPass(deployment), LowerActivationOffsetsPass(), FoldOffsetIntoNormPass()]
    if fuses_int32_bias(deployment):
        lowering.append(QuantizeBiasPass())
    return lowering


def export_static(ir, space, subnet, deployment: DeploymentFormat, example_input: torch.Tensor,
                  dynamic_batch: bool = True):
    """The export path of one subnet: extract the static subnet -> keep a copy (the fake-quantized
    reference the ONNX model must reproduce) -> lowering passes and BitOPs through the PassManager ->
    emit (with a dynamic batch axis unless told otherwise). Returns (lowered static IR, reference module,
    ONNX model)."""
    from qsamc.ir.pass_manager import PassManager
    from qsamc.passes import CountBitopsPass, ExtractSubnetPass

    static = ExtractSubnetPass(subnet)(ir).ir
    reference = copy.deepcopy(static.root)
    PassManager([*lowering_passes(deployment), CountBitopsPass(space, subnet)], verify=True)(static)
    return static, reference, emit_onnx(static.root, example_input, deployment, "image", "image_embeddings",
                                         dynamic_batch=dynamic_batch)


@torch.no_grad()
def lower_module(module: nn.Module, example_input: torch.Tensor, deployment: DeploymentFormat) -> nn.Module:
    """A lowered copy of `module`: integer weights in the deployment's containers, zero-point-0 inputs."""
    lowered = copy.deepcopy(module).eval()
    layers = {p: m for p, m in lowered.named_modules() if isinstance(m, QUANT_LAYER_TYPES + INT_LAYER_TYPES)}
    input_hw: dict[str, tuple[int, int]] = {}

    def record(path: str):
        def hook(_module, args) -> None:
            input_hw[path] = tuple(args[0].shape[-2:])
        return hook

    hooks = [m.register_forward_pre_hook(record(p)) for p, m in layers.items()]
    try:
        lowered(example_input)  # records each layer's input size (padded convs need it)
    finally:
        for hook in hooks:
            hook.remove()
    for path, norm in [(p, m) for p, m in lowered.named_modules() if isinstance(m, LayerNorm2d)]:
        replace_module(lowered, path, ChannelLayerNorm(norm))
    for path, layer in layers.items():
        if isinstance(layer, QUANT_LAYER_TYPES):
            layer = fold_weight_quantizer(layer, deployment)
            if path:
                replace_module(lowered, path, layer)
            else:
                lowered = layer
        lower_activation_offset(layer, input_hw.get(path))
        if fuses_int32_bias(deployment):
            quantize_bias(layer)
    return lowered


def _as_int4(tensor: TensorProto) -> TensorProto:
    values = numpy_helper.to_array(tensor)
    return helper.make_tensor(tensor.name, TensorProto.INT4, values.shape, values.flatten().tolist())


def _narrow_int4(model: onnx.ModelProto) -> None:
    """Rewrite the INT8-held weights and zero-points of block-quantized DequantizeLinear nodes as INT4."""
    blocked = {name for n in model.graph.node
               if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)
               for name in (n.input[0], n.input[2])}
    for init in model.graph.initializer:
        if init.name in blocked:
            init.CopyFrom(_as_int4(init))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in blocked:
            value = node.attribute[0].t
            value.CopyFrom(_as_int4(value))


def _resolve_constant_identities(model: onnx.ModelProto) -> None:
    """Point every consumer of `Identity(constant)` at the constant itself and drop the Identity."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    source: dict[str, str] = {}  # Identity output -> the constant it repeats (chains followed)
    for node in model.graph.node:
        if node.op_type == "Identity" and (node.input[0] in constants or node.input[0] in source):
            source[node.output[0]] = source.get(node.input[0], node.input[0])
    outputs = {o.name for o in model.graph.output}
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in source
                                                and n.output[0] not in outputs)]
    for node in keep:
        node.input[:] = [source.get(i, i) if i not in outputs else i for i in node.input]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def emit_onnx(module: nn.Module, example_input: torch.Tensor, deployment: DeploymentFormat,
              input_name: str = "input", output_name: str = "output", dynamic_batch: bool = False) -> onnx.ModelProto:
    """The ONNX model of `module` (lowered first where needed) at the example input's shape (its batch
    axis dynamic with `dynamic_batch`), its float parts in the deployment's float type."""
    lowered = lower_module(module, example_input, deployment)
    leftover = [p for p, m in lowered.named_modules() if isinstance(m, LsqActQuantizer)]
    if leftover:
        raise RuntimeError(f"activation quantizer {leftover[0]} was not lowered to zero-point 0")
    int4 = any(isinstance(m, IntLinear) and m.block for m in lowered.modules())
    fp16 = deployment.float_type == "fp16"
    opset = INT4_OPSET if int4 else FP16_OPSET if fp16 else BASE_OPSET
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(lowered, (example_input,), buffer, dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=[output_name], do_constant_folding=True,
                          dynamic_axes=axes)
    model = onnx.load_from_string(buffer.getvalue())
    _resolve_constant_identities(model)
    _narrow_int4(model)
    if fp16:
        model = to_float16(model)
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    model.producer_name = "qsamc"
    onnx.checker.check_model(model)
    return model
