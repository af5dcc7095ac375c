"""The FP16 float path of TensorRT targets: an emitted FP32 Q/DQ model rewritten so that every float part
(LayerNorm excepted) is typed FP16.

TensorRT builds qsamc's engines strongly typed: each layer runs in the type the ONNX model gives it, so
an FP32 softmax, GELU or attention matmul runs in FP32 (TF32 at best) even in an "INT8" engine. The
rewrite, as ModelOpt's ONNX quantization does for its non-quantized parts:

- every FLOAT constant (initializers, `Constant` nodes, `ConstantOfShape` values) becomes FLOAT16 and
  every `Cast(to=FLOAT)` casts to FLOAT16; integer tensors (the INT8/INT4 weights, zero-points, shapes)
  are untouched;
- the model's input and output stay FP32 (one Cast each at the boundary), so callers feed the same
  arrays as before;
- FP32 islands, with Casts around them: `LayerNormalization` (its variance of SAM's residual stream can
  overflow FP16; its gain and bias keep their FP32 values) together with the QuantizeLinear that reads
  it (the grid rounds the FP32 normalised value: an FP16 hop in between flips values across grid
  points, which the LayerNorm after the next layer then amplifies), and any QuantizeLinear /
  DequantizeLinear whose scale FP16 cannot hold to 11 bits (below FP16's normal range, 2^-14, or above
  its maximum). Every other scale becomes FP16: its grid moves by at most 2^-11 of a step.

Needs opset >= 19, where QuantizeLinear / DequantizeLinear take FP16 scales.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP32_OPS = frozenset({"LayerNormalization"})
LAYOUT_OPS = ("Transpose", "Reshape")
MIN_OPSET = 19
_FP16_NORMAL_MIN = 2.0 ** -14
_FP16_MAX = 65504.0


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every graph constant of `model` (initializers and `Constant` node values), by tensor name."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def fp16_safe_scale(values: np.ndarray) -> bool:
    magnitude = np.abs(values.astype(np.float64))
    return bool(np.all((magnitude >= _FP16_NORMAL_MIN) & (magnitude <= _FP16_MAX)))


def _to_fp16(tensor: TensorProto) -> TensorProto:
    values = numpy_helper.to_array(tensor)
    return numpy_helper.from_array(np.clip(values, -_FP16_MAX, _FP16_MAX).astype(np.float16), tensor.name)


def to_float16(model: onnx.ModelProto, fp32_ops: frozenset[str] = FP32_OPS) -> onnx.ModelProto:
    """A copy of `model` whose float parts are FP16, but for the FP32 islands described above."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < MIN_OPSET:
        raise ValueError(f"FP16 Q/DQ scales need opset {MIN_OPSET} or later, not {opset}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    values = constant_values(model)
    constant = values.get

    def is_fp32_node(node: onnx.NodeProto) -> bool:
        if node.op_type in fp32_ops:
            return True
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = constant(node.input[1])
            return scale is not None and scale.dtype == np.float32 and not fp16_safe_scale(scale)
        return False

    # A QuantizeLinear reading an island (through layout ops) joins it: LayerNorm -> Q stays FP32 end to
    # end, so the grid rounds the FP32 LayerNorm output (an FP16 hop in between flips values across it).
    producer = {o: n for n in graph.node for o in n.output}
    islands: list[onnx.NodeProto] = []
    island_ids: set[int] = set()
    for node in graph.node:  # topological order: producers first
        joins = (node.op_type in ("QuantizeLinear", *LAYOUT_OPS) and node.input
                 and id(producer.get(node.input[0])) in island_ids)
        if is_fp32_node(node) or joins:
            islands.append(node)
            island_ids.add(id(node))
    # The constants an island reads keep their FP32 values: private FP32 copies, never shared.
    kept: set[str] = set()
    for node in islands:
        for index, name in enumerate(node.input):
            value = constant(name)
            if value is not None and value.dtype == np.float32:
                copy = f"{name}_fp32_{node.name or index}"
                graph.initializer.append(numpy_helper.from_array(value, copy))
                node.input[index] = copy
                kept.add(copy)

    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in kept:
            init.CopyFrom(_to_fp16(init))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_to_fp16(attr.t))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16

    # FP32 islands: an island's float output is `<name>_fp32`, read as it is by other islands and through
    # one Cast down by everything else; an island's activation input from outside is Cast up (its other
    # inputs are its constants).
    constants = set(values) | kept
    integers = _integer_tensors(model)
    island_outputs = {o for n in islands for i, o in enumerate(n.output) if _output_is_float(n, i)}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) not in island_ids:
            nodes.append(node)
            continue
        for index, name in enumerate(node.input):
            if name in island_outputs:
                node.input[index] = f"{name}_fp32"
            elif name and name not in constants and name not in integers:
                up = f"{name}_to_fp32_{node.name}"
                nodes.append(helper.make_node("Cast", [name], [up], to=TensorProto.FLOAT, name=f"{up}_cast"))
                node.input[index] = up
        nodes.append(node)
        for index, name in enumerate(node.output):
            if name in island_outputs:
                node.output[index] = f"{name}_fp32"
                nodes.append(helper.make_node("Cast", [f"{name}_fp32"], [name], to=TensorProto.FLOAT16,
                                              name=f"{name}_to_fp16"))

    # The model's float input and output stay FP32.
    for graph_input in graph.input:
        if graph_input.type.tensor_type.elem_type == TensorProto.FLOAT:
            half = f"{graph_input.name}_fp16"
            for node in nodes:
                node.input[:] = [half if i == graph_input.name else i for i in node.input]
            nodes.insert(0, helper.make_node("Cast", [graph_input.name], [half], to=TensorProto.FLOAT16,
                                             name=f"{half}_cast"))
    for graph_output in graph.output:
        if graph_output.type.tensor_type.elem_type == TensorProto.FLOAT:
            half = f"{graph_output.name}_fp16"
            for node in nodes:
                node.output[:] = [half if o == graph_output.name else o for o in node.output]
                node.input[:] = [half if i == graph_output.name else i for i in node.input]
            nodes.append(helper.make_node("Cast", [half], [graph_output.name], to=TensorProto.FLOAT,
                                          name=f"{graph_output.name}_cast"))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def _output_is_float(node: onnx.NodeProto, index: int) -> bool:
    """Whether an FP32 island's output is a float tensor (a QuantizeLinear's is integer)."""
    return not (node.op_type == "QuantizeLinear" or (node.op_type == "LayerNormalization" and index > 0))


def _integer_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors that are not float: QuantizeLinear outputs and whatever shape inference types as such."""
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.UNDEFINED)
    names = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type not in floats}
    return names | {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
