"""ONNX emission, TensorRT lint and `qsamc export`, checked in real ONNX Runtime sessions."""

from __future__ import annotations

import dataclasses
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lowering_helpers import calibrated_vit_t, dyadic_input, dyadic_layer
from qsamc.export.emit import emit_onnx, lower
from qsamc.formats import ONNXRUNTIME_CPU, TENSORRT
from qsamc.targets import get_target
from qsamc.supernet.space import load_subnet
from qsamc.export.ort import ort_session
from qsamc.export.float16 import constant_values
from qsamc.export.verify import lint_tensorrt
from qsamc.machine import int8_isa

A100, CPU = get_target("a100"), get_target("cpu")
# A TensorRT target with FP32 float parts: the lowering alone, exact to the last bit.
A100_FP32 = A100.with_float_type("fp32")
TENSORRT_FP32 = A100_FP32.deployment


def emitted(module: torch.nn.Module, x: torch.Tensor, target) -> onnx.ModelProto:
    """`module` through the target's lowering passes, then emitted as the target writes it."""
    return emit_onnx(lower(module, x, target), x, target)


def _run(model: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(ort_session(model).run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv3x3"])
def test_layer_at_each_bit_width_exports_and_matches(bits, conv):
    layer = dyadic_layer(bits, bits, conv=conv)
    x = dyadic_input((1, 16, 6, 6) if conv else (1, 4, 4, 64))
    model = emitted(layer, x, A100_FP32)
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(_run(model, x), expected, rtol=0, atol=1e-5)
    assert lint_tensorrt(model, TENSORRT_FP32) == []
    ops = [n.op_type for n in model.graph.node]
    assert ("Clip" in ops) == (bits < 8)  # a b-bit grid inside INT8: clip to its range, same step


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv3x3"])
def test_tensorrt_layers_compute_in_fp16_and_match_to_fp16_rounding(bits, conv):
    """The shipped TensorRT form: FP16 float parts and FP16 scales (opset 19), FP32 input and output. The
    dyadic layer's grid values and scales are exact in FP16, so the ONNX result is the PyTorch result
    rounded to FP16 at the GEMM and at the bias add: two half-ulps, within 2^-10 of the output's peak."""
    layer = dyadic_layer(bits, bits, conv=conv)
    x = dyadic_input((1, 16, 6, 6) if conv else (1, 4, 4, 64))
    model = emitted(layer, x, A100)
    assert model.opset_import[0].version == 19 and lint_tensorrt(model) == []
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(_run(model, x), expected, rtol=0, atol=2.0**-10 * float(expected.abs().max()))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    gemm = next(n for n in model.graph.node if n.op_type in ("MatMul", "Conv"))
    assert types[gemm.output[0]] == TensorProto.FLOAT16
    scales = {i.name: i.data_type for i in model.graph.initializer}
    scales.update({n.output[0]: n.attribute[0].t.data_type for n in model.graph.node if n.op_type == "Constant"})
    assert {scales[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"} == {TensorProto.FLOAT16}
    assert [i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)] == [TensorProto.FLOAT] * 2


def test_emitting_the_same_module_again_hands_out_a_copy_of_the_first_emission(monkeypatch):
    """Emission is kept per module content: the same lowered layer emits once and comes back as an equal,
    independent model; one changed weight, attribute, input shape or target emits afresh, and a module
    with a hook is never kept."""
    import qsamc.export.emit as emit_module

    calls = []
    original = emit_module._emit
    monkeypatch.setattr(emit_module, "_emit", lambda *args: calls.append(1) or original(*args))
    monkeypatch.setattr(emit_module, "_EMITTED", emit_module._EmittedModels(2**24))
    x = dyadic_input((1, 4, 4, 64))
    layer = lower(dyadic_layer(8, 8), x, CPU)
    first = emit_onnx(layer, x, CPU)
    first.graph.node[0].name = "changed by its user"
    again = emit_onnx(layer, x, CPU)
    assert calls == [1] and again.graph.node[0].name != "changed by its user"
    assert again.SerializeToString() == emit_onnx(copy.deepcopy(layer), x, CPU).SerializeToString()
    assert calls == [1]
    with torch.no_grad():
        layer.bias[3] += 1  # one step of one value of one tensor (the cpu target keeps INT32 biases)
    changed = emit_onnx(layer, x, CPU)
    assert calls == [1, 1] and changed.SerializeToString() != again.SerializeToString()
    torch.testing.assert_close(_run(changed, x), layer(x), rtol=0, atol=2.0**-6)
    emit_onnx(layer, dyadic_input((1, 4, 8, 64)), CPU)  # another input shape
    emit_onnx(layer, x, dataclasses.replace(CPU, fuse_attention=False))  # a target that differs in one field
    assert calls == [1, 1, 1, 1]
    hook = layer.register_forward_hook(lambda module, args, output: output * 2)
    emit_onnx(layer, x, CPU)
    emit_onnx(layer, x, CPU)
    assert calls == [1, 1, 1, 1, 1, 1]
    hook.remove()
    emit_onnx(layer, x, CPU)
    assert calls == [1, 1, 1, 1, 1, 1]  # the hook-free layer's emission was kept


def test_lint_rejects_an_fp32_float_part_on_a_tensorrt_target():
    layer, x = dyadic_layer(8, 8), dyadic_input((1, 4, 4, 64))
    problems = lint_tensorrt(emitted(layer, x, A100_FP32), TENSORRT)
    assert "MatMul node '/MatMul' runs in FP32 where the target's float type is FP16" in problems
    assert lint_tensorrt(emitted(layer, x, A100), TENSORRT) == []


def test_equal_scales_of_two_layers_stay_graph_constants():
    """The TorchScript exporter writes Identity(first) for a repeated constant; TensorRT refuses a Q/DQ
    scale that is not a constant (it was why uniform W8A8 failed on TensorRT targets)."""
    class TwoBranches(torch.nn.Module):  # two layers with the same weights and scales
        def __init__(self):
            super().__init__()
            self.a = dyadic_layer(8, 8)
            self.b = copy.deepcopy(self.a)

        def forward(self, x):
            return self.a(x) + self.b(x)

    for target in (A100, A100_FP32):
        model = emitted(TwoBranches(), dyadic_input((1, 4, 4, 64)), target)
        assert "Identity" not in {n.op_type for n in model.graph.node}
        assert lint_tensorrt(model, target.deployment) == []


def test_emission_refuses_a_module_that_is_not_lowered():
    """One lowering path: the target's passes (`lower`, export's PassManager); emission never lowers."""
    layer, x = dyadic_layer(8, 8), dyadic_input((1, 4, 4, 64))
    with pytest.raises(ValueError, match=r"^emit_onnx takes a lowered module, but QuantLinear is not lowered: run the "
                                         r"target's lowering passes first"):
        emit_onnx(layer, x, CPU)
    holder = torch.nn.Sequential(torch.nn.Identity(), layer)
    with pytest.raises(ValueError, match=r"^emit_onnx takes a lowered module, but 1 is not lowered"):
        emit_onnx(holder, x, CPU)
    lowered = lower(layer, x, CPU)
    assert type(lowered).__name__ == "IntLinear" and lowered.bias.dtype == torch.int32  # CPU: INT32 bias pass ran
    assert lower(layer, x, A100).bias.dtype == torch.float32  # TensorRT targets keep float biases
    assert type(layer).__name__ == "QuantLinear"  # the module given is not changed


def test_qdq_sits_on_the_inputs_of_weighted_ops_only():
    model = emitted(dyadic_layer(8, 8), dyadic_input((1, 4, 4, 64)), A100_FP32)
    producers = {out: n for n in model.graph.node for out in n.output}
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert [producers[i].op_type for i in matmul.input] == ["DequantizeLinear", "DequantizeLinear"]
    consumers = [n.op_type for n in model.graph.node if matmul.output[0] in n.input]
    assert consumers == ["Add"]  # the output stays float
    assert model.opset_import[0].version == 17 and model.ir_version == 8


def test_a_block_keeps_layernorm_and_softmax_in_float(vit_t_block):
    block, tokens = vit_t_block
    model = emit_onnx(block, tokens, A100_FP32)
    ops = {n.op_type for n in model.graph.node}
    assert {"LayerNormalization", "Softmax", "QuantizeLinear"} <= ops
    assert lint_tensorrt(model, TENSORRT_FP32) == []
    with torch.no_grad():
        expected = block(tokens)
    assert float((_run(model, tokens) - expected).abs().mean()) < 1e-3
    # The shipped form: softmax, GELU and the attention matmuls in FP16, LayerNorm and the Q after it in FP32.
    shipped = onnx.shape_inference.infer_shapes(emit_onnx(block, tokens, A100))
    assert lint_tensorrt(shipped) == []
    types = {v.name: v.type.tensor_type.elem_type for v in shipped.graph.value_info}
    out_types = {n.op_type: set() for n in shipped.graph.node}
    for n in shipped.graph.node:
        out_types[n.op_type] |= {types.get(o) for o in n.output}
    assert out_types["Softmax"] == out_types["Erf"] == {TensorProto.FLOAT16}
    assert out_types["LayerNormalization"] == {TensorProto.FLOAT}
    assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in shipped.graph.node if n.op_type == "MatMul")


def test_cpu_target_puts_8x8_biases_into_the_integer_gemm():
    layer = dyadic_layer(8, 8)
    x = dyadic_input((1, 4, 4, 64))
    model = emitted(layer, x, CPU)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    producers = {out: n for n in model.graph.node for out in n.output}
    assert [producers[i].op_type for i in gemm.input] == ["DequantizeLinear"] * 3
    with torch.no_grad():
        expected = layer(x)
    step = layer.act_quantizer[8].scale.item() * layer.weight_quantizer[8].scale.item()
    assert float((_run(model, x) - expected).abs().max()) <= step / 2 + 1e-6


CPU_AVX2 = get_target("cpu-avx2")


def _constant_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {i.name: i.data_type for i in model.graph.initializer}
    types.update({n.output[0]: n.attribute[0].t.data_type for n in model.graph.node if n.op_type == "Constant"})
    return types


def _runs(model: onnx.ModelProto, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The model's output with ONNX Runtime's integer kernels fused, and as written (float Q/DQ)."""
    feed = {model.graph.input[0].name: x.numpy()}
    return tuple(ort_session(model, exact=exact).run(None, feed)[0] for exact in (False, True))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv3x3"])
def test_cpu_avx2_writes_the_cpu_model_in_u8u8(bits, conv):
    """cpu-avx2 is cpu's model with every INT8 Q/DQ as UINT8, integers and zero-points + 128: no INT8
    tensor left, bit for bit the same output as written, and its fused kernels as close to it as cpu's
    INT8 GEMM is to the subnet (half an accumulator step: the INT32 bias)."""
    layer = dyadic_layer(bits, bits, conv=conv)
    x = dyadic_input((1, 16, 6, 6) if conv else (1, 4, 4, 64))
    signed, unsigned = emitted(layer, x, CPU), emitted(layer, x, CPU_AVX2)
    assert [n.op_type for n in signed.graph.node] == [n.op_type for n in unsigned.graph.node]
    before, after = _constant_types(signed), _constant_types(unsigned)
    shifted = {name for name, t in before.items() if t == TensorProto.INT8}
    assert shifted and {after[name] for name in shifted} == {TensorProto.UINT8}
    assert TensorProto.INT8 not in after.values()
    assert (TensorProto.INT32 in after.values()) == (bits == 8 and not conv)  # cpu's INT32 bias (8x8 Gemm) stays
    zero_points = [n.input[2] for n in unsigned.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and after[n.input[2]] == TensorProto.UINT8]
    values = constant_values(unsigned)
    assert zero_points and all(np.all(values[z] == 128) for z in zero_points)  # every INT8 zero-point was 0
    fused, written = _runs(unsigned, x)
    np.testing.assert_array_equal(written, _runs(signed, x)[1])
    step = layer.act_quantizer[bits].scale.item() * layer.weight_quantizer[bits].scale.item()
    assert float(np.abs(fused - written).max()) <= step / 2 + 1e-6


def test_cpu_avx2_kernels_do_not_saturate_where_s8s8_may():
    """A layer whose products reach VPMADDUBSW's limit: activations at the top of the INT8 grid against
    weights at +-127 steps (a pair sums to 2 x 255 x 127 > 32767 once ONNX Runtime shifts S8 activations
    to U8). Fused, the U8U8 model computes what it says on every x86 CPU; the S8S8 one on this CPU only if
    it has VNNI."""
    layer = dyadic_layer(8, 8)
    with torch.no_grad():
        signs = torch.where(torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0)
        layer.weight.copy_(signs * 127 * layer.weight_quantizer[8].scale)
    x = torch.full((1, 4, 4, 64), 1000.0)
    unsigned_fused, written = _runs(emitted(layer, x, CPU_AVX2), x)
    peak = float(np.abs(written).max())
    assert float(np.abs(unsigned_fused - written).max()) <= 1e-5 * peak
    signed_fused, _ = _runs(emitted(layer, x, CPU), x)
    if int8_isa() == "no VNNI":
        assert float(np.abs(signed_fused - written).max()) > 0.1 * peak  # what cpu-avx2 exists for


def test_cpu_avx2_exports_verify_with_the_kernels_fused(run_folder, tmp_path):
    """The whole command on cpu-avx2: the same checks as cpu, every one passed by the fused kernels."""
    from qsamc.pipeline import export_subnet

    run = run_folder[0]
    report = export_subnet(run, run / "w8a8.json", "cpu-avx2", "onnx", tmp_path / "out", dataset="synthetic", val_limit=4)
    assert report.target == "cpu-avx2" and report.fused_deviations() == []
    assert report.fidelity.kernels == "fused" and all(p.kernels == "fused" for p in report.parts)
    model = onnx.load(tmp_path / "out" / "encoder.onnx")
    assert TensorProto.INT8 not in _constant_types(model).values()


def test_int4_weights_use_opset_21_block_quantization():
    layer = dyadic_layer(4, 32)
    x = dyadic_input((1, 5, 64))
    model = emitted(layer, x, CPU)
    assert model.opset_import[0].version == 21 and model.ir_version == 10
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 64}
    weight = next(i for i in model.graph.initializer if i.name == dq.input[0])
    assert weight.data_type == TensorProto.INT4
    with torch.no_grad():
        torch.testing.assert_close(_run(model, x), layer(x), rtol=0, atol=1e-5)
    assert lint_tensorrt(model, ONNXRUNTIME_CPU) == []


def _with_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(value))
    return model


def test_lint_catches_zero_points_integer_ops_and_opsets():
    model = emitted(dyadic_layer(8, 8), dyadic_input((1, 5, 64)), A100)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    shifted = _with_constant(model, q.input[2], np.array(3, dtype=np.int8))
    assert any("non-zero zero-point" in p for p in lint_tensorrt(shifted))
    unsigned = _with_constant(model, q.input[2], np.array(0, dtype=np.uint8))
    assert any("UINT8" in p for p in lint_tensorrt(unsigned))
    integer = onnx.ModelProto.FromString(model.SerializeToString())
    integer.graph.node.append(helper.make_node("MatMulInteger", ["a", "b"], ["c"], name="mmi"))
    integer.graph.node.append(helper.make_node("NonMaxSuppression", ["d"], ["e"], name="nms"))
    problems = lint_tensorrt(integer)
    assert any("integer arithmetic" in p for p in problems) and any("not a TensorRT 10 operator" in p for p in problems)
    integer.opset_import[0].version = 8
    assert any("outside TensorRT 10's range" in p for p in lint_tensorrt(integer))


@pytest.fixture(scope="module")
def run_folder(calibrated_run):
    """The session's calibrated run (its w8a8.json: a sampled architecture at W8A8) and its model, IR and spec."""
    model, ir, spec = calibrated_vit_t()
    return calibrated_run, model, ir, spec


@pytest.fixture(scope="module")
def vit_t_block(run_folder):
    """Block 2 (global attention) of a lowered vit_t subnet and the tokens it reads."""
    from qsamc.ir.pass_manager import PassManager
    from qsamc.passes import ExtractSubnetPass

    _, _, ir, spec = run_folder
    subnet = spec.space.uniform_bits(spec.space.max_subnet(), 8, 8)
    static = ExtractSubnetPass(subnet)(ir).ir
    PassManager(A100.lowering_passes())(static)
    tokens = torch.randn(1, 16, 16, 64, generator=torch.Generator().manual_seed(0))
    return static.root.blocks["2"], tokens


def test_export_cli_writes_a_verified_model_report_and_trtexec_command(run_cli, run_folder, tmp_path, monkeypatch, capsys):
    """`--format trt` where TensorRT is missing: one sentence, exit 2, and the ONNX, report and precision
    map still written next to the equivalent trtexec command."""
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: this checks the fallback")
    except ImportError:
        pass
    run, out = run_folder[0], tmp_path / "out"
    code, stdout, stderr = run_cli("export", "--supernet", run, "--subnet", run / "w8a8.json",
                                "--target", "orin", "--format", "trt", "--out", out)
    assert code == 2 and stderr == ("error: no TensorRT engine was built: TensorRT is not installed "
                                    "(pip install tensorrt, on a machine with an NVIDIA GPU)\n")
    assert "trtexec --onnx=" in stdout and "BitOPs" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["fidelity"]["ok"] and report["cost"]["bitops"] > 0 and report["lint"] == []
    assert {row["weight"] for row in report["layers"]} == {"int8"}
    assert (out / "precision.png").stat().st_size > 0
    model = onnx.load(out / "encoder.onnx")
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "LayerNormalization"}


@pytest.mark.parametrize("case", ["missing run", "bad subnet file", "subnet outside the space", "unknown target",
                                  "format the target lacks"])
def test_export_cli_user_errors_are_one_sentence_and_keep_existing_files(run_cli, case, run_folder, tmp_path, monkeypatch, capsys):
    run = run_folder[0]
    subnet = run / "w8a8.json"
    if case == "bad subnet file":
        subnet = tmp_path / "bad.json"
        subnet.write_text("{not json")
    if case == "subnet outside the space":
        data = json.loads((run / "w8a8.json").read_text())
        data["resolution"] = 80
        subnet = tmp_path / "outside.json"
        subnet.write_text(json.dumps(data))
    args = {"--supernet": tmp_path / "nope" if case == "missing run" else run, "--subnet": subnet,
            "--target": "tpu" if case == "unknown target" else "cpu",
            "--format": "trt" if case == "format the target lacks" else "onnx"}
    out = tmp_path / "out"
    out.mkdir()
    (out / "encoder.onnx").write_text("earlier work")
    code, _, stderr = run_cli("export", *[v for pair in args.items() for v in pair], "--out", out)
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert (out / "encoder.onnx").read_text() == "earlier work"


# --- verification: layer by layer, task level, and a lowering that is wrong on purpose ----------


def _export(run_folder, tmp_path, **options):
    from qsamc.pipeline import export_subnet

    run = run_folder[0]
    return export_subnet(run, run / "w8a8.json", "cpu", "onnx", tmp_path / "out", **options)


def test_export_checks_every_part_alone_and_the_task_metric(run_folder, tmp_path):
    report = _export(run_folder, tmp_path, dataset="synthetic", val_limit=4)
    subnet = load_subnet(run_folder[0] / "w8a8.json")
    blocks = [str(i) for i in run_folder[3].space.active_blocks(subnet.depths)]
    expected = ["patch_embed", *[f"blocks.{b}.{half}" for b in blocks for half in ("attention", "mlp")], "neck"]
    assert [p.part for p in report.parts] == expected
    assert all(p.ok and p.max_rel_tolerance == 2.0**-7 for p in report.parts)
    assert report.task.val_images == 4 and report.task.ok
    assert abs(report.task.pytorch_miou - report.task.onnx_miou) <= 0.002
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["parts"] == [p.to_json() for p in report.parts] and saved["task"] == report.task.to_json()
    assert saved["subnet"] == subnet.to_json() and saved["cost"] == report.cost.to_json()
    # What the printout says where a check passed only with the kernels unfused (x86 without VNNI).
    fused = dataclasses.replace(report, parts=[dataclasses.replace(p, kernels="fused", fused_max_rel=None,
                                                                   fused_mean_rel=None) for p in report.parts])
    assert fused.fused_deviations() == [] and "this CPU's INT8 kernels" not in dict(fused.summary_rows())
    unfused = dataclasses.replace(
        fused, fidelity=dataclasses.replace(report.fidelity, kernels="exact", fused_max_rel=0.5, fused_mean_rel=0.25),
        task=dataclasses.replace(report.task, kernels="exact", fused_onnx_miou=0.125))
    assert dict(unfused.summary_rows())["this CPU's INT8 kernels"].endswith(
        "fused, on this CPU: the whole model max 5.00e-01, mean 2.50e-01; validation mIoU 0.1250")
    assert dict(unfused.summary_rows())["on a CPU without VNNI"].startswith("export with --target cpu-avx2")
    avx2 = dataclasses.replace(unfused, target="cpu-avx2")
    assert "this CPU's INT8 kernels" in dict(avx2.summary_rows()) and "on a CPU without VNNI" not in dict(avx2.summary_rows())


@pytest.mark.parametrize("defect", ["offset folded with the wrong sign", "activation scale one step off"])
def test_a_broken_lowering_fails_the_export_in_its_part(run_folder, tmp_path, monkeypatch, defect):
    """Break one layer's lowering on purpose, the 6th layer lowered: blocks.2's qkv (the subnet keeps
    blocks 0 and 2 of stage 0, the global block last). The export must refuse, name the part, and
    write nothing."""
    import qsamc.passes.lower_activation_offsets as offsets
    from qsamc.export.verify import ExportError

    original, calls = offsets.lower_activation_offset, []

    def broken(layer, input_hw=None):
        changed = original(layer, input_hw)
        calls.append(layer)
        if len(calls) == 6:
            if defect.startswith("offset"):
                layer.act.shift = -layer.act.shift
            else:
                layer.act.scale *= 1 + 2.0 ** -(layer.act.bits - 1)
        return changed

    monkeypatch.setattr(offsets, "lower_activation_offset", broken)
    with pytest.raises(ExportError, match=r"the lowered blocks\.2\.attention differs .* a lowering defect"):
        _export(run_folder, tmp_path)
    assert not (tmp_path / "out").exists()


def test_the_whole_model_check_runs_unfused_kernels_only_where_the_fused_session_misses():
    """`verify_fidelity` takes the deployed session's figures where they pass; where they miss (here a session
    of the same layer with a weight one step off stands in for kernels that deviate), the model as written
    decides and the fused figures are kept beside it."""
    from qsamc.export.verify import measure_fidelity, verify_fidelity

    layer, x = dyadic_layer(8, 8), dyadic_input((1, 4, 4, 64))
    model = emitted(layer, x, A100_FP32)
    deviating = copy.deepcopy(layer)
    with torch.no_grad():
        deviating.weight[0] += 8 * deviating.weight.abs().max() / 127
    off = emitted(deviating, x, A100_FP32)

    def verified(fused: onnx.ModelProto, exact: onnx.ModelProto):
        asked = []
        fidelity = verify_fidelity(lambda unfused: asked.append(unfused) or measure_fidelity(
            ort_session(exact, exact=True) if unfused else ort_session(fused), layer, [x], 8))
        return fidelity, asked

    passed, asked = verified(model, off)
    assert asked == [False]
    assert passed.ok and passed.kernels == "fused" and passed.fused_max_rel is None and passed.max_rel < 1e-6
    fallback, asked = verified(off, model)
    assert asked == [False, True] and fallback.ok and fallback.kernels == "exact" and fallback.max_rel < 1e-6
    assert fallback.fused_max_rel > fallback.max_rel_tolerance
    assert fallback.to_json()["fused_max_rel"] == fallback.fused_max_rel
    wrong, _ = verified(off, off)
    assert not wrong.ok and wrong.kernels == "exact" and wrong.max_rel == wrong.fused_max_rel


def test_the_task_check_scores_unfused_kernels_only_where_the_fused_ones_miss():
    """ONNX Runtime's fused INT8 kernels first (as deployed); graph optimisations off only where those miss
    0.2 points (x86 without VNNI saturates), and an export fails only where both miss."""
    from qsamc.export.verify import ExportError, check_export, check_task

    def scorer(fused: float, exact: float, asked: list):
        return lambda unfused: asked.append(unfused) or (exact if unfused else fused)

    asked = []
    check = check_task(0.400, scorer(0.4019, 0.300, asked), 7)
    assert asked == [False] and check.ok
    assert (check.onnx_miou, check.kernels, check.fused_onnx_miou) == (0.4019, "fused", None)
    asked = []
    check = check_task(0.400, scorer(0.3967, 0.4001, asked), 7)
    assert asked == [False, True] and check.ok and check.kernels == "exact"
    assert (check.onnx_miou, check.fused_onnx_miou, check.val_images) == (0.4001, 0.3967, 7)
    assert check.to_json() == {"pytorch_miou": 0.400, "onnx_miou": 0.4001, "val_images": 7, "kernels": "exact",
                               "fused_onnx_miou": 0.3967, "ok": True}
    check = check_task(0.400, scorer(0.3967, 0.3970, []), 7)
    assert not check.ok and check.kernels == "exact"
    with pytest.raises(ExportError, match=r"validation mIoU is 0\.3970 against the PyTorch subnet's 0\.4000"):
        check_export([], None, False, task=check)


def test_the_task_check_defaults_to_the_runs_own_validation_data(run_folder, tmp_path):
    from qsamc.pipeline import training_dataset

    # This test writes the run's config.json: into a copy, so that the session's shared run stays as it is.
    run_folder = (Path(shutil.copytree(run_folder[0], tmp_path / "run")), *run_folder[1:])
    run = run_folder[0]
    (run / "config.json").write_text(json.dumps({"dataset": "synthetic", "data_root": None}))
    try:
        assert training_dataset(run) == ("synthetic", None)
        report = _export(run_folder, tmp_path, val_limit=2)
        assert report.task.val_images == 2 and report.task.ok
        (run / "config.json").write_text(json.dumps({"dataset": "camvid", "data_root": str(tmp_path / "moved")}))
        assert training_dataset(run) == (None, None)  # its data is gone: the check is not run
    finally:
        (run / "config.json").unlink()
    assert training_dataset(run) == (None, None)


# --- TensorRT targets: uniform exports, dynamic batch, the fused-attention rule --------------------


def test_tensorrt_targets_share_one_deployment_format():
    from qsamc.targets import get_target

    assert {get_target(name).deployment for name in ("a100", "h100", "orin")} == {TENSORRT}


@pytest.mark.parametrize(("target", "bits"), [("a100", (8, 8)), ("h100", (4, 8)), ("orin", (4, 32))],
                         ids=["a100-W8A8", "h100-W4A8", "orin-W4A16"])
def test_uniform_exports_of_every_tensorrt_target_verify(run_folder, tmp_path, target, bits):
    """Each TensorRT target exports one uniform subnet (they share one format, so each bit pair exports the
    same on all three). W4A16: 4-bit weights with FP16 activations, INT4 weight-only GEMMs."""
    from qsamc.pipeline import export_subnet

    run, _, _, spec = run_folder
    subnet = spec.space.uniform_bits(spec.space.max_subnet(), *bits)
    subnet.save(tmp_path / "subnet.json")
    report = export_subnet(run, tmp_path / "subnet.json", target, "onnx", tmp_path / "out", samples=1)
    assert report.lint == [] and report.fidelity.ok and all(p.ok for p in report.parts)
    model = onnx.load(tmp_path / "out" / "encoder.onnx")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.opset_import[0].version == (21 if bits == (4, 32) else 19)  # INT4 weight-only: block Q/DQ
    session = ort_session(model)
    x = torch.randn(4, 3, subnet.resolution, subnet.resolution, generator=torch.Generator().manual_seed(1))
    batched = session.run(None, {"image": x.numpy()})[0]
    single = np.concatenate([session.run(None, {"image": x[i : i + 1].numpy()})[0] for i in range(4)])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-2 * np.abs(single).max())


def _attention_graph(tokens: int, head_dim: int, quantize: tuple[str, ...]) -> onnx.ModelProto:
    """softmax(q @ k) @ v on (1, tokens, head_dim) activations, with Q/DQ in front of the named operands."""
    nodes, inits = [], [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                        numpy_helper.from_array(np.array(0, np.int8), "z")]

    def maybe_qdq(name: str) -> str:
        if name not in quantize:
            return name
        nodes.extend([helper.make_node("QuantizeLinear", [name, "s", "z"], [f"{name}_q"], name=f"{name}_Q"),
                      helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_dq"], name=f"{name}_DQ")])
        return f"{name}_dq"

    q, kt, v = maybe_qdq("q"), maybe_qdq("kt"), maybe_qdq("v")
    nodes.append(helper.make_node("MatMul", [q, kt], ["scores"], name="qk"))
    nodes.append(helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="softmax"))
    p = maybe_qdq("p")
    nodes.append(helper.make_node("MatMul", [p, v], ["out"], name="pv"))
    fp16 = TensorProto.FLOAT16
    inputs = [helper.make_tensor_value_info("q", fp16, [1, tokens, head_dim]),
              helper.make_tensor_value_info("kt", fp16, [1, head_dim, tokens]),
              helper.make_tensor_value_info("v", fp16, [1, tokens, head_dim])]
    inits = [numpy_helper.from_array(np.array(0.05, np.float16), "s"), inits[1]]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("out", fp16, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_lint_admits_int8_attention_only_as_tensorrt_fuses_it():
    whole = ("q", "kt", "p", "v")
    assert lint_tensorrt(_attention_graph(196, 64, ())) == []  # float attention: FP16 MHA
    assert lint_tensorrt(_attention_graph(196, 64, whole)) == []  # a 14x14 window, head size 64
    partial = lint_tensorrt(_attention_graph(196, 64, ("q", "kt", "v")))
    assert partial == ["attention MatMul node 'pv' has Q/DQ on one input only; TensorRT fuses INT8 attention only "
                       "with Q/DQ on q and k, on the softmax output and on v"]
    assert lint_tensorrt(_attention_graph(4096, 64, whole)) == [
        f"attention MatMul node '{n}' is quantized over 4096 tokens with head size 64, outside fused INT8 attention "
        "(at most 512 tokens, head size 16/32/64): keep it in the float type" for n in ("qk", "pv")]
    vit_h = lint_tensorrt(_attention_graph(196, 80, whole))
    assert len(vit_h) == 2 and all("head size 80" in p for p in vit_h)
    # ONNX Runtime's CPU provider runs Q/DQ attention matmuls of any size as integer MatMuls
    assert not any("attention" in p for p in lint_tensorrt(_attention_graph(4096, 80, whole), ONNXRUNTIME_CPU))
    no_rule = dataclasses.replace(ONNXRUNTIME_CPU, int8_attention=None)
    assert any("no fused INT8 attention" in p for p in lint_tensorrt(_attention_graph(196, 64, whole), no_rule))


def test_a_scale_fp16_cannot_hold_keeps_its_dequantize_in_fp32():
    """A weight scale below FP16's normal range (2^-14) would lose its grid in FP16: that DequantizeLinear
    stays FP32, its output is Cast to FP16 for the GEMM, and the model still matches."""
    from qsamc.export.float16 import to_float16

    layer, x = dyadic_layer(8, 8), dyadic_input((1, 4, 4, 64))
    with torch.no_grad():
        layer.weight.mul_(2.0**-12)
        layer.weight_quantizer[8].scale.mul_(2.0**-12)  # 2^-7 * 2^-12: subnormal in FP16
    model = emitted(layer, x, A100)
    assert lint_tensorrt(model) == []
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    weight_dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.input[0])
    assert types[weight_dq.output[0]] == TensorProto.FLOAT
    consumer = next(n for n in model.graph.node if weight_dq.output[0] in n.input)
    assert consumer.op_type == "Cast" and {a.name: a.i for a in consumer.attribute}["to"] == TensorProto.FLOAT16
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(_run(model, x), expected, rtol=0, atol=2.0**-10 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="need opset 19"):
        to_float16(emitted(layer, x, A100_FP32))


def test_batch_profile_is_checked_and_reaches_trtexec():
    from qsamc.errors import ConfigError
    from qsamc.export.tensorrt_engine import BatchProfile, trtexec_command

    with pytest.raises(ConfigError, match=r"^the batch profile needs 1 <= min <= opt <= max, got min 4, opt 2, max 8$"):
        BatchProfile(4, 2, 8)
    command = trtexec_command(Path("e.onnx"), Path("e.plan"), Path("t.cache"), BatchProfile(1, 4, 16), 256)
    assert ("--minShapes=image:1x3x256x256 --optShapes=image:4x3x256x256 --maxShapes=image:16x3x256x256 "
            in command) and command.startswith("trtexec --onnx=e.onnx --stronglyTyped ")


def test_an_export_into_an_earlier_export_is_all_or_nothing(run_folder, tmp_path, monkeypatch):
    """A kill (here: a failure) after the first new file leaves the earlier export as it was, and the
    half-built folder a killed export left beside it is removed by the next one; a whole export replaces
    the earlier one in one step."""
    import qsamc.export.report as export_report
    from qsamc.pipeline import export_subnet

    run, out = run_folder[0], tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"subnet": "an earlier one"}')
    (out / "encoder.onnx").write_text("an earlier model")
    (tmp_path / ".out.new-x1y2z3").mkdir()  # left by a killed export
    (tmp_path / ".out.new-x1y2z3" / "encoder.onnx").write_text("half")

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_report, "plot_precision_map", killed)
    with pytest.raises(KeyboardInterrupt):
        export_subnet(run, run / "w8a8.json", "cpu", "onnx", out, samples=1, overwrite=True)
    assert (out / "report.json").read_text() == '{"subnet": "an earlier one"}'
    assert (out / "encoder.onnx").read_text() == "an earlier model"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    monkeypatch.undo()
    report = export_subnet(run, run / "w8a8.json", "cpu", "onnx", out, samples=1, overwrite=True)
    assert json.loads((out / "report.json").read_text())["files"] == report.files
    assert sorted(p.name for p in out.iterdir()) == ["encoder.onnx", "precision.png", "report.json"]
