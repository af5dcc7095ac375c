"""Measured latency tables (qsamc/profiling, qsamc/search/latency_table.py, qsamc/export/parts.py) with real ONNX
Runtime sessions."""

import dataclasses
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from qsamc.search.cost import Budget
from qsamc.export.emit import emit_onnx
from qsamc.errors import ConfigError
from qsamc.task.evaluate import Evaluation
from qsamc.export.ort import ort_session
from qsamc.profiling.profile import _part_jobs, build_table, reference_supernet, validate_table
from qsamc.profiling.timers import OnnxRuntimeTimer, ProfileSettings
from qsamc.search.latency_table import LatencyTable, PartKeys, TableLatency
from qsamc.export.parts import lowered_subnet, part_onnx
from qsamc.search.evolution import EvolutionConfig, search
from qsamc.supernet.space import default_space
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
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}


def mlp_part(space, w: int, a: int, tmp_path):
    """The MLP part of a vit_t subnet at (w, a) bits, and the same block's nodes in the exported encoder."""
    supernet = reference_supernet(space)
    subnet = space.uniform_bits(space.max_subnet(), w, a)
    subnet = dataclasses.replace(subnet, resolution=128)
    static = lowered_subnet(supernet, subnet, CPU)
    part, example = part_onnx(static, "mlp", 0, CPU)
    whole = emit_onnx(static, torch.randn(1, 3, 128, 128), CPU)
    return part, example, whole


@pytest.mark.parametrize("w, a, kernel", [(8, 8, "QGemm"), (4, 32, "MatMulNBits"), (2, 3, "MatMulIntegerToFloat")])
def test_parts_are_the_exported_encoders_nodes(tiny_space, w, a, kernel, tmp_path):
    """A table part is emitted by export's emitter from export's lowered layers: the MLP half holds the
    same Q/DQ nodes as that block in the whole exported encoder, and ORT picks the integer kernel."""
    part, example, whole = mlp_part(tiny_space, w, a, tmp_path)
    compute = {"QuantizeLinear", "DequantizeLinear", "Clip", "Sub", "MatMul", "Gemm", "Erf"}
    ops = [n.op_type for n in part.graph.node if n.op_type in compute]
    in_block = [n.op_type for n in whole.graph.node if n.op_type in compute and "/blocks.0/mlp/" in n.name]
    assert "DequantizeLinear" in ops and ops == in_block
    assert ("QuantizeLinear" in ops) == (a < 32)
    assert kernel in ort_ops(part, tmp_path)
    zero_points = [i for i in part.graph.initializer if "zero" in i.name.lower()]
    assert all(not numpy_helper.to_array(z).any() for z in zero_points)  # symmetric
    out = ort_session(part, FAST.threads, spinning=True).run(None, {"input": example.numpy()})[0]
    assert OnnxRuntimeTimer(FAST).time(part, example.numpy()) > 0
    assert out.shape == tuple(example.shape) and np.isfinite(out).all()


def test_int4_part_has_explicit_zero_points(tiny_space, tmp_path):
    part, _, _ = mlp_part(tiny_space, 4, 32, tmp_path)
    blocked = [n for n in part.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    assert blocked and all(len(n.input) == 3 for n in blocked)
    assert any(i.data_type == TensorProto.INT4 for i in part.graph.initializer) or any(
        n.op_type == "Constant" and n.attribute[0].t.data_type == TensorProto.INT4 for n in part.graph.node)


def test_every_part_is_cut_from_a_subnet_that_sums_its_key():
    """Each entry is timed on a subnet whose own keys name it: the part holds the kernels its key says."""
    space = default_space("vit_t")
    keys = PartKeys(space, CPU)
    jobs = _part_jobs(space, CPU, reference_supernet(space))
    assert len({j.key for j in jobs}) == len(jobs)
    assert all(j.key in keys.keys(j.subnet) for j in jobs)


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
