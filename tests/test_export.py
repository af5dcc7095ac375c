"""ONNX emission, TensorRT lint and `qsamc export`, checked in real ONNX Runtime sessions."""

from __future__ import annotations

import json
import random

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lowering_helpers import calibrated_vit_t, dyadic_input, dyadic_layer
from qsamc.checkpoint import save_supernet
from qsamc.emit import emit_onnx
from qsamc.formats import ONNXRUNTIME_CPU, TENSORRT
from qsamc.space import load_subnet
from qsamc.verify import lint_tensorrt, ort_session


def _run(model: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(ort_session(model).run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv3x3"])
def test_layer_at_each_bit_width_exports_and_matches(bits, conv):
    layer = dyadic_layer(bits, bits, conv=conv)
    x = dyadic_input((1, 16, 6, 6) if conv else (1, 4, 4, 64))
    model = emit_onnx(layer, x, TENSORRT)
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(_run(model, x), expected, rtol=0, atol=1e-5)
    assert lint_tensorrt(model) == []
    ops = [n.op_type for n in model.graph.node]
    assert ("Clip" in ops) == (bits < 8)  # a b-bit grid inside INT8: clip to its range, same step


def test_qdq_sits_on_the_inputs_of_weighted_ops_only():
    model = emit_onnx(dyadic_layer(8, 8), dyadic_input((1, 4, 4, 64)), TENSORRT)
    producers = {out: n for n in model.graph.node for out in n.output}
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert [producers[i].op_type for i in matmul.input] == ["DequantizeLinear", "DequantizeLinear"]
    consumers = [n.op_type for n in model.graph.node if matmul.output[0] in n.input]
    assert consumers == ["Add"]  # the output stays float
    assert model.opset_import[0].version == 17 and model.ir_version == 8


def test_a_block_keeps_layernorm_and_softmax_in_float(vit_t_block):
    block, tokens = vit_t_block
    model = emit_onnx(block, tokens, TENSORRT)
    ops = {n.op_type for n in model.graph.node}
    assert {"LayerNormalization", "Softmax", "QuantizeLinear"} <= ops
    assert lint_tensorrt(model) == []
    with torch.no_grad():
        expected = block(tokens)
    assert float((_run(model, tokens) - expected).abs().mean()) < 1e-3


def test_cpu_target_puts_8x8_biases_into_the_integer_gemm():
    layer = dyadic_layer(8, 8)
    x = dyadic_input((1, 4, 4, 64))
    model = emit_onnx(layer, x, ONNXRUNTIME_CPU)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    producers = {out: n for n in model.graph.node for out in n.output}
    assert [producers[i].op_type for i in gemm.input] == ["DequantizeLinear"] * 3
    with torch.no_grad():
        expected = layer(x)
    step = layer.act_quantizer[8].scale.item() * layer.weight_quantizer[8].scale.item()
    assert float((_run(model, x) - expected).abs().max()) <= step / 2 + 1e-6


def test_int4_weights_use_opset_21_block_quantization():
    layer = dyadic_layer(4, 32)
    x = dyadic_input((1, 5, 64))
    model = emit_onnx(layer, x, ONNXRUNTIME_CPU)
    assert model.opset_import[0].version == 21 and model.ir_version == 10
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 64}
    weight = next(i for i in model.graph.initializer if i.name == dq.input[0])
    assert weight.data_type == TensorProto.INT4
    with torch.no_grad():
        torch.testing.assert_close(_run(model, x), layer(x), rtol=0, atol=1e-5)
    assert lint_tensorrt(model) == []


def _with_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(value))
    return model


def test_lint_catches_zero_points_integer_ops_and_opsets():
    model = emit_onnx(dyadic_layer(8, 8), dyadic_input((1, 5, 64)), TENSORRT)
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
def run_folder(tmp_path_factory):
    model, ir, spec = calibrated_vit_t()
    run = tmp_path_factory.mktemp("run")
    save_supernet(run, spec, model)
    subnet = spec.space.uniform_bits(spec.space.sample(random.Random(7)), 8, 8)
    subnet.save(run / "w8a8.json")
    return run, model, ir, spec


@pytest.fixture(scope="module")
def vit_t_block(run_folder):
    """Block 2 (global attention) of a lowered vit_t subnet and the tokens it reads."""
    from qsamc.pass_manager import PassManager
    from qsamc.passes import ExtractSubnetPass, FoldOffsetIntoNormPass, FoldWeightQuantizersPass, LowerActivationOffsetsPass

    _, _, ir, spec = run_folder
    subnet = spec.space.uniform_bits(spec.space.max_subnet(), 8, 8)
    static = ExtractSubnetPass(subnet)(ir).ir
    PassManager([FoldWeightQuantizersPass(TENSORRT), LowerActivationOffsetsPass(), FoldOffsetIntoNormPass()])(static)
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
    assert [p["part"] for p in report.parts] == expected
    assert all(p["ok"] and p["max_rel_tolerance"] == 2.0**-7 for p in report.parts)
    assert report.task["val_images"] == 4 and report.task["ok"]
    assert abs(report.task["pytorch_miou"] - report.task["onnx_miou"]) <= 0.002
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["parts"] == report.parts and saved["task"] == report.task


@pytest.mark.parametrize("defect", ["offset folded with the wrong sign", "activation scale one step off"])
def test_a_broken_lowering_fails_the_export_in_its_part(run_folder, tmp_path, monkeypatch, defect):
    """Break one layer's lowering on purpose, the 6th layer lowered: blocks.2's qkv (the subnet keeps
    blocks 0 and 2 of stage 0, the global block last). The export must refuse, name the part, and
    write nothing."""
    import qsamc.passes.lower_activation_offsets as offsets
    from qsamc.verify import ExportError

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


def test_the_task_check_defaults_to_the_runs_own_validation_data(run_folder, tmp_path):
    from qsamc.pipeline import training_dataset

    run = run_folder[0]
    (run / "config.json").write_text(json.dumps({"dataset": "synthetic", "data_root": None}))
    try:
        assert training_dataset(run) == ("synthetic", None)
        report = _export(run_folder, tmp_path, val_limit=2)
        assert report.task["val_images"] == 2 and report.task["ok"]
        (run / "config.json").write_text(json.dumps({"dataset": "camvid", "data_root": str(tmp_path / "moved")}))
        assert training_dataset(run) == (None, None)  # its data is gone: the check is not run
    finally:
        (run / "config.json").unlink()
    assert training_dataset(run) == (None, None)
