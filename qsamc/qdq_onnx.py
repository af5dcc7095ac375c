"""Q/DQ ONNX of the fused parts of a subnet, as a target deploys them: what latency tables time.

The float module is exported by torch (TorchScript exporter, opset 20, bumped to 21 for INT4 blocks),
then each quantized layer is rewritten by its `Deployment` (`qsamc.formats`), following the Q/DQ
placement rules of TensorRT and ONNX Runtime (../shared/reference/deployment-facts.md):
1. An INT8 activation container: QuantizeLinear -> DequantizeLinear on the layer's input (per-tensor,
   symmetric: zero-point 0), so ORT fuses it into the integer kernel and TRT propagates it.
2. An INT8 weight container: the weight stored as int8 with a per-tensor DequantizeLinear.
3. An INT4 weight container (weight-only GEMMs): int4 blocks of 32 along the input axis with a
   DequantizeLinear(axis=0, block_size=32), which ORT fuses into MatMulNBits.
4. Float containers: the layer is left as exported. Outputs are never quantized; LayerNorm, Softmax
   and GELU stay float.
Scales are min-max from one float forward pass on the example input, so the Q/DQ model also computes
close to the float one (tested); latency does not depend on them. Export's `qsamc.emit.emit_onnx`
lowers trained quantizers into the same placement; this module writes it for float parts, so that one
torch export of a part serves every pair of kernels its layers can take.

The fused parts are the latency table's units, cut from a static subnet (`qsamc.static`): the patch
embedding with the positional embedding (`PatchPart`), a block's attention half (`AttentionPart`:
norm1, window partition, qkv, attention with rel-pos, proj, residual), a block's MLP half (`MlpPart`:
norm2, lin1, GELU, lin2, residual), and the neck (`NeckPart`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qsamc.formats import Deployment
from qsamc.sam import sam_modeling

OPSET = 21  # blocked INT4 DequantizeLinear
ONNX_IR_VERSION = 10  # onnx 1.23 writes 14 by default; ONNX Runtime reads at most 13
INT4_BLOCK = 32
_window_partition = sam_modeling.image_encoder.window_partition
_window_unpartition = sam_modeling.image_encoder.window_unpartition


class AttentionPart(nn.Module):
    """The first half of segment-anything's `Block.forward`: x + attn(norm1(x)), windowed or global."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.window_size = block.norm1, block.attn, block.window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut, x = x, self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, pad_hw = _window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = _window_unpartition(x, self.window_size, pad_hw, (height, width))
        return shortcut + x


class MlpPart(nn.Module):
    """The second half of `Block.forward`: x + mlp(norm2(x))."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm2, self.mlp = block.norm2, block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))


class PatchPart(nn.Module):
    def __init__(self, patch_embed: nn.Module, pos_embed: torch.Tensor) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.register_buffer("pos_embed", pos_embed.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x) + self.pos_embed


class NeckPart(nn.Module):
    def __init__(self, neck: nn.Module) -> None:
        super().__init__()
        self.neck = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(x.permute(0, 3, 1, 2))


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread: the tiny forward passes of an export gain nothing from more, and on a
    machine shared with other jobs torch's spinning worker threads make them 100x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- Q/DQ rewriting -----------------------------------------------------------------------------


def _input_ranges(module: nn.Module, example: torch.Tensor, layers: list[str]) -> dict[str, float]:
    """max |input| of every layer to be quantized, from one float forward pass."""
    ranges: dict[str, float] = {}
    modules = dict(module.named_modules())
    hooks = [
        modules[name].register_forward_pre_hook(
            lambda _m, inputs, name=name: ranges.__setitem__(name, float(inputs[0].abs().max())))
        for name in layers
    ]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def _export_float(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about SAM's shape arithmetic on a fixed input
        torch.onnx.export(module, (example,), buffer, opset_version=20, dynamo=False, do_constant_folding=True,
                          input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


def _weight_sites(model: onnx.ModelProto, module: nn.Module, layers: list[str]) -> dict[str, tuple[int, int]]:
    """(node position, input index) consuming each layer's weight, found by value: W^T for MatMul, W for Conv."""
    modules = dict(module.named_modules())
    wanted: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    for name in layers:
        weight = modules[name].weight.detach().numpy()
        weight = weight.T if isinstance(modules[name], nn.Linear) else weight
        wanted.setdefault(weight.shape, []).append((name, weight))
    inits = {i.name: i for i in model.graph.initializer}
    sites = {}
    for position, node in enumerate(model.graph.node):
        init = inits.get(node.input[1]) if len(node.input) > 1 else None
        if init is None or tuple(init.dims) not in wanted:
            continue
        value = numpy_helper.to_array(init)
        for name, weight in wanted[tuple(init.dims)]:
            if name not in sites and np.array_equal(value, weight):
                sites[name] = (position, 1)
    missing = next((name for name in layers if name not in sites), None)
    if missing is not None:
        raise RuntimeError(f"the exported ONNX has no weight initializer for layer {missing}")
    return sites


def _symmetric_int8(x: np.ndarray) -> tuple[np.ndarray, float]:
    scale = max(float(np.abs(x).max()), 1e-8) / 127
    return np.clip(np.round(x / scale), -127, 127).astype(np.int8), scale


def _int4_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 blocks of INT4_BLOCK rows (the input axis of a MatMul weight [K, N])."""
    k, n = w.shape
    blocks = w.reshape(k // INT4_BLOCK, INT4_BLOCK, n)
    scale = np.maximum(np.abs(blocks).max(axis=1), 1e-8) / 7
    q = np.clip(np.round(blocks / scale[:, None, :]), -8, 7).astype(np.int8).reshape(k, n)
    return q, scale.astype(np.float32)


class QdqExporter:
    """Exports a float module once; `emit(layers)` then writes its Q/DQ form for any deployment of them.

    A latency table needs the same part under many deployments: the torch export (the slow step) is
    shared, each deployment only rewrites a copy of the graph.
    """

    def __init__(self, module: nn.Module, example: torch.Tensor, layers: list[str]) -> None:
        self.module = module.eval()
        self.example = example
        with one_torch_thread():
            self.ranges = _input_ranges(self.module, example, layers)
            self.float_model = _export_float(self.module, example)
        self.sites = _weight_sites(self.float_model, self.module, layers)

    def emit(self, layers: dict[str, Deployment]) -> onnx.ModelProto:
        """The Q/DQ ONNX with the layers named in `layers` (module paths) deployed as given (rules 1-4)."""
        model = copy.deepcopy(self.float_model)
        graph = model.graph
        inserts = []
        for name, deployment in layers.items():
            position, index = self.sites[name]
            inserts.append((position, self._rewrite(graph, graph.node[position], index, name, deployment)))
        # Each layer's Q/DQ right before it, keeping topological order; from the back, so that the
        # positions not yet used stay valid.
        for position, before in sorted(inserts, key=lambda item: -item[0]):
            for offset, extra in enumerate(before):
                graph.node.insert(position + offset, extra)
        used = {x for n in graph.node for x in n.input}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        del model.opset_import[:]
        model.opset_import.append(helper.make_opsetid("", OPSET))
        model.ir_version = ONNX_IR_VERSION
        onnx.checker.check_model(model)
        return model

    def _rewrite(self, graph: onnx.GraphProto, node: onnx.NodeProto, index: int, name: str,
                 deployment: Deployment) -> list[onnx.NodeProto]:
        """Point `node` at Q/DQ'd input and weight; return the new nodes that must precede it."""
        before = []
        tag = name.replace(".", "_")
        if deployment.act == "int8":
            scale = max(self.ranges[name], 1e-8) / 127
            graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_x_scale"),
                                      numpy_helper.from_array(np.array(0, np.int8), f"{tag}_x_zero")])
            before += [
                helper.make_node("QuantizeLinear", [node.input[0], f"{tag}_x_scale", f"{tag}_x_zero"], [f"{tag}_xq"]),
                helper.make_node("DequantizeLinear", [f"{tag}_xq", f"{tag}_x_scale", f"{tag}_x_zero"], [f"{tag}_xdq"]),
            ]
            node.input[0] = f"{tag}_xdq"
        if deployment.weight not in ("int8", "int4"):
            return before
        w = numpy_helper.to_array(next(i for i in graph.initializer if i.name == node.input[index]))
        if deployment.weight == "int8":
            q, scale = _symmetric_int8(w)
            graph.initializer.extend([numpy_helper.from_array(q, f"{tag}_wq"),
                                      numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_w_scale"),
                                      numpy_helper.from_array(np.array(0, np.int8), f"{tag}_w_zero")])
            before.append(helper.make_node("DequantizeLinear", [f"{tag}_wq", f"{tag}_w_scale", f"{tag}_w_zero"],
                                           [f"{tag}_wdq"]))
        else:
            q, scales = _int4_blocks(w)
            graph.initializer.extend([helper.make_tensor(f"{tag}_wq", TensorProto.INT4, q.shape, q.flatten().tolist()),
                                      numpy_helper.from_array(scales, f"{tag}_w_scale")])
            before.append(helper.make_node("DequantizeLinear", [f"{tag}_wq", f"{tag}_w_scale"], [f"{tag}_wdq"],
                                           axis=0, block_size=INT4_BLOCK))
        node.input[index] = f"{tag}_wdq"
        return before


def to_qdq(module: nn.Module, example: torch.Tensor, layers: dict[str, Deployment]) -> onnx.ModelProto:
    """`module` as Q/DQ ONNX with the layers named in `layers` deployed as given."""
    return QdqExporter(module, example, list(layers)).emit(layers)
