"""Measured latency tables (qsamc/latency.py, qsamc/qdq_onnx.py) with real ONNX Runtime sessions."""

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from qsamc.cost import Budget
from qsamc.errors import ConfigError
from qsamc.evaluate import Evaluation
from qsamc.latency import (
    LatencyTable, OnnxRuntimeTimer, PartKeys, ProfileSettings, TableLatency, build_table, validate_table,
)
from qsamc.qdq_onnx import INT4_BLOCK, to_qdq
from qsamc.search import EvolutionConfig, search
from qsamc.space import default_space
from qsamc.targets import get_target

FAST = ProfileSettings(warmup=2, repeats=5)
CPU = get_target("cpu")


@pytest.fixture(scope="module")
def tiny_space():
    """One resolution and MLP ratio, W8 with A8 or float: 2 kernels per layer on the CPU, 18 entries."""
    return default_space("vit_t").restrict(resolutions=(128,), mlp_ratios=(4.0,), weight_bits=(8,), act_bits=(8, 32))


@pytest.fixture(scope="module")
def tiny_table(tiny_space):
    return build_table(tiny_space, CPU, FAST, calibration=1)


def ort_ops(model: onnx.ModelProto, tmp_path) -> set[str]:
    """The op types ONNX Runtime runs after its graph optimizations (a real session)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=OnnxRuntimeTimer.disabled_optimizers)
    return {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96)).eval(), torch.randn(1, 8, 8, 64)


def run(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    session = OnnxRuntimeTimer(FAST).session(model)
    return session.run(None, {"x": x.numpy()})[0]


def test_int8_layer_gets_symmetric_qdq_and_an_integer_kernel(linear, tmp_path):
    module, x = linear
    model = to_qdq(module, x, {"0": CPU.deployment.deploy(8, 8)})
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "Add"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["0_x_zero"].dtype == np.int8 and inits["0_x_zero"] == 0  # symmetric: zero-point 0
    assert inits["0_wq"].dtype == np.int8 and inits["0_wq"].shape == (64, 96)
    assert "MatMulIntegerToFloat" in ort_ops(model, tmp_path)
    reference = module(x).detach().numpy()
    assert np.abs(run(model, x) - reference).max() < 0.05 * np.abs(reference).max()


def test_int4_weight_only_layer_is_block_quantized_into_matmulnbits(linear, tmp_path):
    module, x = linear
    model = to_qdq(module, x, {"0": CPU.deployment.deploy(4, 32)})
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": INT4_BLOCK}
    weight = next(i for i in model.graph.initializer if i.name == dq.input[0])
    assert weight.data_type == TensorProto.INT4
    assert "QuantizeLinear" not in [n.op_type for n in model.graph.node]  # activations stay float
    assert "MatMulNBits" in ort_ops(model, tmp_path)
    reference = module(x).detach().numpy()
    assert np.abs(run(model, x) - reference).max() < 0.2 * np.abs(reference).max()


def test_float_weight_with_int8_activation_keeps_the_float_weight(linear):
    module, x = linear
    model = to_qdq(module, x, {"0": CPU.deployment.deploy(32, 8)})
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "DequantizeLinear", "MatMul", "Add"]


def test_table_has_one_entry_per_part_and_kernel_pair(tiny_table, tiny_space):
    kernels = ["fp32xfp32", "int8xint8"]
    pairs = [f"{a}|{b}" for a in kernels for b in kernels]
    expected = ({f"patch_embed|128|{k}" for k in kernels} | {f"attention|8|{w}|{p}" for w in (0, 4) for p in pairs}
                | {f"mlp|8|256|{p}" for p in pairs} | {f"neck|8|{p}" for p in pairs})
    assert set(tiny_table.entries) == expected
    assert all(v >= 0 for v in tiny_table.entries.values()) and tiny_table.overhead > 0
    assert 0.5 < tiny_table.context_scale < 3
    assert (tiny_table.target, tiny_table.backend, tiny_table.model) == ("cpu", "onnxruntime", "vit_t")
    assert tiny_table.libraries["onnxruntime"] and tiny_table.machine["cpu"] and tiny_table.date
    assert tiny_table.settings == {"threads": 1, "warmup": 2, "repeats": 5, "clock": "cpu", "statistic": "median"}


def test_table_round_trips_through_json(tiny_table, tmp_path):
    tiny_table.save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["format"] == "qsamc.latency_table"
    assert LatencyTable.load(tmp_path / "t.json") == tiny_table


def test_prediction_is_overhead_plus_scaled_sum_of_parts(tiny_table, tiny_space):
    cost = TableLatency(tiny_table, tiny_space, CPU)
    subnet = tiny_space.max_subnet()
    keys = PartKeys(tiny_space, CPU).keys(subnet)
    assert len(keys) == 2 + 2 * len(tiny_space.active_blocks(subnet.depths))
    parts = sum(tiny_table.entries[k] for k in keys)
    assert cost.cost(subnet) == pytest.approx(tiny_table.overhead + tiny_table.context_scale * parts)
    shallow = tiny_space.min_subnet()  # fewer blocks: a strict subset of the parts
    assert cost.cost(tiny_space.uniform_bits(shallow, 8, 32)) < cost.cost(tiny_space.uniform_bits(subnet, 8, 32))


def test_validation_measures_whole_exported_subnets(tiny_table, tiny_space):
    checks = validate_table(tiny_table, tiny_space, CPU, 1, settings=FAST)
    assert len(checks) == 1 and checks[0].measured > 0 and checks[0].predicted > 0
    assert math.isfinite(checks[0].error) and abs(checks[0].error) < 1.0


def test_search_under_a_measured_latency_budget(tiny_table, tiny_space):
    cost = TableLatency(tiny_table, tiny_space, CPU)
    limit = (cost.cost(tiny_space.min_subnet()) + cost.cost(tiny_space.max_subnet())) / 2
    fitness = lambda s: Evaluation(10 - sum(b.a for b in s.bits) / 100 - sum(s.depths), 0.0, 0.0)  # noqa: E731
    config = EvolutionConfig(population=6, top_k=2, mutations=3, crossovers=3, generations=2)
    result = search(tiny_space, [cost], fitness, [Budget("latency", limit)], config)
    assert all(c.costs["latency"] <= limit for c in result.candidates)


def test_table_for_another_target_or_space_is_refused(tiny_table, tiny_space):
    with pytest.raises(ConfigError, match="^the latency table was measured for vit_t on cpu, not vit_t on a100$"):
        TableLatency(tiny_table, tiny_space, get_target("a100"))
    with pytest.raises(ConfigError, match=r"has no entry 'patch_embed\|256\|.*`qsamc profile --target cpu --model vit_t`"):
        TableLatency(tiny_table, default_space("vit_t"), CPU)


def test_unreadable_table_is_one_sentence(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="is not a version-1 qsamc latency table"):
        LatencyTable.load(path)
