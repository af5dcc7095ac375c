"""ONNX emission: a lowered module -> an ONNX model with TensorRT-style Q/DQ, as its target writes it.

Last export stage, and the one entry point the latency-table profiler shares with `qsamc export`:

    lower(module, example_input, target)        any module (one layer, a block) through the target's
                                                lowering passes, in the PassManager
    emit_onnx(lowered, example_input, target) -> onnx.ModelProto

Lowering is always the target's pass list (`Target.lowering_passes`) in the PassManager: export runs it
on the extracted static subnet (`export_static`), the latency tables on the subnets they cut parts
from, and `lower` on any other module through the IR of its quantized layers (`layers_ir`). `emit_onnx`
refuses a module that still holds a quantized layer or an LSQ+ activation quantizer. The integer layers
write their own QuantizeLinear / DequantizeLinear (`qsamc.lowered.layers`); the TorchScript exporter
writes the rest (LayerNorm, Softmax, GELU stay float; SAM's LayerNorm2d is written as one
LayerNormalization between transposes).

The opset and the float type are the target's (`Target.onnx_opset`, `Target.finish_onnx`); the IR
version is the lowest that the opset needs, which the installed ONNX Runtime reads (onnx >= 1.23 would
otherwise write IR 14). Scales are always graph constants: the TorchScript exporter writes an
`Identity` of the first for each repeated constant (two layers whose scales are equal), which TensorRT
reads as a computed tensor and refuses as a Q/DQ scale, so those are resolved to the constant.
`dynamic_batch` names the input's and output's first axis `batch`.

Emission is a pure function of the module (its classes, attributes and tensors), the example input's shape
and type, the target and the names, and the TorchScript exporter takes 0.3-1 s per part: a process keeps
what it emitted (`_EmittedModels`, bounded in bytes) and hands out a fresh copy when the same module is
emitted again (the latency profiler cuts the same part from several subnets; an export emits each part
once more to check it alone; one process exports a subnet again). A module with hooks, or an attribute
whose value cannot be told apart by its text, is emitted afresh every time.
"""

from __future__ import annotations

import copy
import hashlib
import io
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qsamc.ir.graph import layers_ir
from qsamc.ir.pass_manager import PassManager
from qsamc.lowered.layers import ChannelLayerNorm, IntLinear
from qsamc.lowered.static import replace_module
from qsamc.passes import CountBitopsPass, ExtractSubnetPass
from qsamc.sam import LayerNorm2d
from qsamc.supernet.layers import QUANT_LAYER_TYPES
from qsamc.supernet.quant import LsqActQuantizer

if TYPE_CHECKING:
    from qsamc.targets.base import Target


def export_static(ir, space, subnet, target: Target, example_input: torch.Tensor, dynamic_batch: bool = True):
    """The export path of one subnet: extract the static subnet -> keep a copy (the fake-quantized
    reference the ONNX model must reproduce) -> the target's lowering passes and BitOPs through the
    PassManager -> emit (with a dynamic batch axis unless told otherwise). Returns (lowered static IR,
    reference module, ONNX model)."""
    static = ExtractSubnetPass(subnet)(ir).ir
    reference = copy.deepcopy(static.root)
    PassManager([*target.lowering_passes(), CountBitopsPass(space, subnet)], verify=True)(static)
    return static, reference, emit_onnx(static.root, example_input, target, "image", "image_embeddings",
                                         dynamic_batch=dynamic_batch)


def lower(module: nn.Module, example_input: torch.Tensor, target: Target) -> nn.Module:
    """A lowered copy of any module holding quantized layers, through the target's lowering passes."""
    holder = nn.Sequential(copy.deepcopy(module)).eval()  # a layer at the root gets a path to be replaced at
    PassManager(target.lowering_passes(), verify=True)(layers_ir(holder, example_input))
    return holder[0]


def _unlowered(module: nn.Module) -> str | None:
    """The path of the first quantized layer or LSQ+ activation quantizer in `module`, if any."""
    return next((p or type(m).__name__ for p, m in module.named_modules()
                 if isinstance(m, (*QUANT_LAYER_TYPES, LsqActQuantizer))), None)


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


def emit_onnx(module: nn.Module, example_input: torch.Tensor, target: Target, input_name: str = "input",
              output_name: str = "output", dynamic_batch: bool = False) -> onnx.ModelProto:
    """The ONNX model of a lowered `module` at the example input's shape (its batch axis dynamic with
    `dynamic_batch`), written as `target` emits: its opset and the float type of its float parts."""
    unlowered = _unlowered(module)
    if unlowered is not None:
        raise ValueError(f"emit_onnx takes a lowered module, but {unlowered} is not lowered: run the target's "
                         "lowering passes first (qsamc.export.emit.lower)")
    key = _emission_key(module, example_input, target, input_name, output_name, dynamic_batch)
    kept = _EMITTED.get(key)
    if kept is not None:
        return onnx.load_from_string(kept)
    model = _emit(module, example_input, target, input_name, output_name, dynamic_batch)
    _EMITTED.put(key, model.SerializeToString())
    return model


def _emit(module: nn.Module, example_input: torch.Tensor, target: Target, input_name: str, output_name: str,
          dynamic_batch: bool) -> onnx.ModelProto:
    norms = [p for p, m in module.named_modules() if isinstance(m, LayerNorm2d)]
    if norms:
        module = copy.deepcopy(module)
        for path in norms:
            replace_module(module, path, ChannelLayerNorm(module.get_submodule(path)))
    int4 = any(isinstance(m, IntLinear) and m.block for m in module.modules())
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        fused = any(getattr(m, "fused", False) for m in module.modules())  # ONNX Runtime's fused attention
        torch.onnx.export(module.eval(), (example_input,), buffer, dynamo=False, opset_version=target.onnx_opset(int4),
                          input_names=[input_name], output_names=[output_name], do_constant_folding=True,
                          dynamic_axes=axes, custom_opsets={"com.microsoft": 1} if fused else None)
    model = onnx.load_from_string(buffer.getvalue())
    _resolve_constant_identities(model)
    _narrow_int4(model)
    return finish_model(target.finish_onnx(model))


class _EmittedModels:
    """Serialised models by `_emission_key`, the least recently used dropped beyond `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size = limit, 0
        self.models: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str | None) -> bytes | None:
        if key is None or key not in self.models:
            return None
        self.models.move_to_end(key)
        return self.models[key]

    def put(self, key: str | None, data: bytes) -> None:
        if key is None or len(data) > self.limit // 4:
            return
        self.models[key] = data
        self.size += len(data)
        while self.size > self.limit:
            self.size -= len(self.models.popitem(last=False)[1])


_EMITTED = _EmittedModels(256 * 2**20)
# nn.Module's own bookkeeping the key leaves out: submodules are walked, and the training flag does not matter
# (emission runs the module in eval mode); tensors are hashed from _parameters and _buffers, hooks refused
_NOT_HASHED = {"_modules", "_non_persistent_buffers_set", "training"}


def _emission_key(module: nn.Module, example: torch.Tensor, target: Target, *names) -> str | None:
    """A hash of everything emission reads, or None where something cannot be hashed faithfully."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(repr((target, names, tuple(example.shape), example.dtype)).encode())
    for path, m in module.named_modules():
        digest.update(f"|{path}|{type(m).__module__}.{type(m).__qualname__}".encode())  # emitted in eval mode
        for name, value in sorted(vars(m).items()):
            if "hook" in name:
                if value:
                    return None  # a hook can change what is traced
                continue
            if name in _NOT_HASHED:
                continue
            digest.update(name.encode())
            if not _hash_value(digest, value):
                return None
    return digest.hexdigest()


def _hash_value(digest, value) -> bool:
    """Feed `value` into `digest` (tensors by their bytes); False for a value whose text hides its state."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest.update(f"T{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        return True
    if isinstance(value, np.ndarray):
        digest.update(f"A{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
        return True
    if isinstance(value, dict):
        digest.update(b"{")
        return all(_hash_value(digest, k) and _hash_value(digest, v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        digest.update(b"[")
        return all(_hash_value(digest, v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.Size)):
        digest.update(repr(value).encode())
        return True
    text = repr(value)
    if " at 0x" in text or "..." in text or isinstance(value, nn.Module):  # an address, or a summarised array
        return False
    digest.update(type(value).__qualname__.encode() + text.encode())
    return True


def finish_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The tail of every model qsamc writes: the lowest IR version its opsets need, the producer, the
    checker."""
    # onnx knows the IR versions of its own domains only (not com.microsoft, ONNX Runtime's contrib ops)
    model.ir_version = helper.find_min_ir_version_for([o for o in model.opset_import if o.domain in ("", "ai.onnx")])
    model.producer_name = "qsamc"
    onnx.checker.check_model(model)
    return model
