"""The U8U8 form of an emitted Q/DQ model, for x86 CPUs without VNNI (the `cpu-avx2` target).

ONNX Runtime runs an INT8 GEMM whose activations or weights are signed (S8S8, U8S8) with VPMADDUBSW on
AVX2 / AVX512 CPUs without VNNI: it multiplies unsigned by signed bytes and adds each pair of products
into a saturating 16-bit sum, so a pair of large activations against large weights (2 x 255 x 127 >
32767) is clamped and the layer computes something other than the graph says. Its U8U8 kernels widen
both operands to 16 bits first and never saturate (ONNX Runtime's quantization guide: "try reduce_range
or the U8U8 format"). `reduce_range` changes the model (7-bit weights); U8U8 does not:

    QuantizeLinear(x, s, z) over INT8 + 128  ==  QuantizeLinear(x, s, z + 128) over UINT8
    DequantizeLinear(q, s, z) over INT8      ==  DequantizeLinear(q + 128, s, z + 128) over UINT8

for every x (both saturate at the same grid points), so every INT8 weight, weight zero-point and
activation zero-point shifted by 128 into UINT8 is the same function, which ONNX Runtime fuses into the
same QLinearConv / QGemm / QLinearMatMul / MatMulIntegerToFloat kernels, in their U8U8 variants. INT4
block-quantized weights (MatMulNBits: float activations) and INT32 biases are left as they are.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# Where an INT8 tensor may be read in a Q/DQ model: a Q's zero-point, a DQ's input or zero-point.
_INT8_USES = frozenset({("QuantizeLinear", 2), ("DequantizeLinear", 0), ("DequantizeLinear", 2)})


def _int8_constants(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """Every INT8 graph constant (initializers and `Constant` node values), by the name nodes read it as."""
    tensors = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.INT8}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            if node.attribute[0].t.data_type == TensorProto.INT8:
                tensors[node.output[0]] = node.attribute[0].t
    return tensors


def as_unsigned_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every INT8 Q/DQ rewritten as UINT8 (values and zero-points + 128), in place.

    Refuses (ValueError) an INT8 constant read other than as a Q/DQ zero-point or a DQ's integer input,
    or a QuantizeLinear typed by `output_dtype`: a rewrite there would not be the same function."""
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and any(a.name == "output_dtype" for a in node.attribute):
            raise ValueError(f"QuantizeLinear node '{node.name}' sets output_dtype; the U8U8 rewrite reads the "
                             "type from its zero-point")
    uses: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            uses[name].append((node.op_type, index))
    for name, tensor in _int8_constants(model).items():
        other = [use for use in uses[name] if use not in _INT8_USES]
        if other:
            raise ValueError(f"INT8 tensor '{name}' is read by {other[0][0]} (input {other[0][1]}); the U8U8 "
                             "rewrite only shifts Q/DQ zero-points and dequantized integers")
        shifted = numpy_helper.to_array(tensor).astype(np.int16) + 128
        tensor.CopyFrom(numpy_helper.from_array(shifted.astype(np.uint8), tensor.name))
    # Quantized activations (QuantizeLinear outputs) are UINT8 now wherever the exporter typed them.
    for info in (*model.graph.value_info, *model.graph.output):
        if info.type.tensor_type.elem_type == TensorProto.INT8:
            info.type.tensor_type.elem_type = TensorProto.UINT8
    return model
