"""`qsamc baseline`: ModelOpt PTQ / AutoQuantize and ONNX Runtime quantize_static of an FP32 reference, run
for real on a tiny reference, scored with qsamc's own BitOPs and metric."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

from qsamc.ir.frontend import count_bitops
from qsamc.baselines import (QatSettings, calibration_images, load_reference, modelopt_ptq, modelopt_qat, parse_bits,
                             run_baselines, _modelopt_bits)
from qsamc.training.runs import load_supernet
from qsamc.errors import CheckpointError, ConfigError
from qsamc.training.train import fp32_subnet


@pytest.fixture(scope="module")
def reference_run(fp32_reference_run):
    """The session's FP32 reference (conftest's REFERENCE_TRAIN), shared with test_reference.py."""
    return fp32_reference_run


@pytest.fixture(scope="module")
def results(reference_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines")
    found = run_baselines(reference_run, "synthetic", None, out, effective_bits=(6.0,), calibration=4, val_limit=4,
                          latency_runs=2)
    return {r.label: r for r in found}, out


def test_the_reference_loads_as_plain_torch_modules_computing_the_trained_fp32_model(reference_run):
    reference = load_reference(reference_run)
    model, _, spec = load_supernet(reference_run)
    model.head.set_bits(32)
    model.supernet.set_subnet(fp32_subnet(spec.space))
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reference.model(x), model(x), rtol=1e-5, atol=1e-5)
    linears = [m for m in reference.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)  # what ModelOpt rewrites


def test_every_method_runs_and_is_scored_with_qsamcs_bitops(results, reference_run):
    found, out = results
    assert list(found) == ["FP32 reference", "ModelOpt PTQ W8A8", "ModelOpt PTQ W4A8", "ModelOpt PTQ W4A4",
                           "ModelOpt PTQ W8A8 (INT8_DEFAULT_CFG as is)", "ModelOpt AutoQuantize 6 bits",
                           "ORT quantize_static W8A8"]
    space = load_reference(reference_run).spec.space
    for label, (w, a) in (("FP32 reference", (32, 32)), ("ModelOpt PTQ W8A8", (8, 8)), ("ModelOpt PTQ W4A4", (4, 4)),
                          ("ORT quantize_static W8A8", (8, 8))):
        expected = count_bitops(space, space.uniform_bits(space.max_subnet(), w, a), "exclude")[1]
        assert (found[label].macs, found[label].bitops) == (expected.macs, expected.bitops)
    assert found["ModelOpt PTQ W4A4"].bitops * 4 == found["ModelOpt PTQ W8A8"].bitops
    for result in found.values():
        assert 0 <= result.evaluation.miou <= 1
    assert found["ORT quantize_static W8A8"].latency_ms > 0
    saved = json.loads((out / "baselines.json").read_text())
    assert [r["label"] for r in saved["results"]] == list(found) and saved["val_images"] == 4


def test_modelopt_quantizes_every_searched_layer_at_the_asked_bits_and_the_head_at_8(reference_run):
    reference = load_reference(reference_run)
    images = calibration_images("synthetic", None, 2, reference.resolution)
    model = modelopt_ptq(reference, images, 4, 4)
    assert {(b.w, b.a) for b in _modelopt_bits(model, reference).bits} == {(4, 4)}
    head = model.head.conv
    assert (head.weight_quantizer.num_bits, head.input_quantizer.num_bits) == (8, 8)
    norm = model.encoder.blocks[0].norm1
    assert not norm.input_quantizer.is_enabled  # only qsamc's quantized layers
    as_is = modelopt_ptq(reference, images, 8, 8, layer_norms=True)
    assert as_is.encoder.blocks[0].norm1.input_quantizer.is_enabled  # INT8_DEFAULT_CFG untouched
    x = images[0][:1]
    with torch.no_grad():
        quantized, exact = model(x), reference.model(x)
    assert not torch.equal(quantized, exact)  # fake quantization is really on


def test_autoquantize_chooses_w8a8_w4a8_or_float_per_layer(results):
    chosen = {(b.w, b.a) for b in results[0]["ModelOpt AutoQuantize 6 bits"].subnet.bits}
    assert chosen and chosen <= {(8, 8), (4, 8), (32, 32)}


def test_ort_static_writes_a_qdq_model_that_quantizes_every_matmul(results):
    found, _ = results
    model = onnx.load(found["ORT quantize_static W8A8"].notes["onnx"])
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(producers.get(i) == "DequantizeLinear" for n in matmuls for i in n.input)


def test_parse_bits():
    assert parse_bits("W4A8") == (4, 8) and parse_bits("w2a2") == (2, 2)
    for bad in ("W5A8", "8x8", "W4"):
        with pytest.raises(ConfigError, match="bits must look like W8A8"):
            parse_bits(bad)


def test_a_supernet_run_is_not_a_reference(tiny_run):
    run = tiny_run  # the session's finished supernet run (progressive schedule)
    with pytest.raises(CheckpointError, match="is not an FP32 reference run"):
        load_reference(run)


@pytest.mark.parametrize("case", ["missing run", "unknown method", "bad bits"])
def test_baseline_cli_user_errors_are_one_sentence(run_cli, reference_run, tmp_path, case):
    args = ["baseline", "--reference", tmp_path / "nope" if case == "missing run" else reference_run,
            "--out", tmp_path / "out", "--val-limit", "2"]
    if case == "unknown method":
        args += ["--method", "gptq"]
    if case == "bad bits":
        args += ["--bits", "W9A9"]
    code, _, stderr = run_cli(*args)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr


def test_peers_can_be_scored_on_the_references_held_out_images_and_never_calibrate_on_them(reference_run, tmp_path):
    from qsamc.task.data import build_dataset
    from qsamc.task.holdout import split_holdout
    from qsamc.training.splits import trained_images

    held = split_holdout(build_dataset("synthetic", None, "train"), 0.1, 0, block=10)[1]  # REFERENCE_TRAIN's default
    held_names = {held.image_name(i) for i in range(len(held))}
    calibrated = trained_images(reference_run, "synthetic", None)
    assert len(calibrated) == 64 - len(held) == 58
    assert not held_names & {calibrated.image_name(i) for i in range(len(calibrated))}

    found = run_baselines(reference_run, "synthetic", None, tmp_path / "out", methods=("modelopt-ptq",),
                          ptq_bits=((8, 8),), calibration=2, split="holdout", per_image=True)
    assert [r.label for r in found] == ["FP32 reference", "ModelOpt PTQ W8A8", "ModelOpt PTQ W8A8 (INT8_DEFAULT_CFG as is)"]
    pixels = load_reference(reference_run).resolution ** 2
    for result in found:  # each of the 6 held-out images, every pixel counted once
        confusions = result.evaluation.image_confusions
        assert confusions.shape == (6, 4, 4) and confusions.sum() == 6 * pixels
    saved = json.loads((tmp_path / "out" / "baselines.json").read_text())
    assert (saved["split"], saved["val_images"]) == ("holdout", 6)
    assert "image_confusions" not in saved["results"][0]["evaluation"]
    with pytest.raises(ConfigError, match=r"^baselines are scored on val or holdout, got 'train'$"):
        run_baselines(reference_run, "synthetic", None, tmp_path / "other", split="train")


def _amaxes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("_amax")}


def test_modelopt_qat_trains_the_weights_through_frozen_calibrated_ranges(reference_run):
    """QAT starts from ModelOpt PTQ at the same bits (the same calibrated ranges, kept), moves every weight,
    and brings the quantized model closer to the reference on the images it trained on."""
    from qsamc.task.losses import distillation_loss
    from qsamc.training.splits import trained_images

    reference = load_reference(reference_run)
    images = calibration_images("synthetic", None, 4, reference.resolution)
    train_set = trained_images(reference_run, "synthetic", None)
    ptq = modelopt_ptq(reference, images, 2, 2)  # far from the reference: the KL has something to learn
    settings = QatSettings(iterations=8, batch_size=2, lr=1e-4)
    qat = modelopt_qat(reference, images, 2, 2, train_set, settings, 255)
    assert _amaxes(qat).keys() == _amaxes(ptq).keys() and len(_amaxes(qat)) > 20
    for name, amax in _amaxes(ptq).items():
        assert torch.equal(_amaxes(qat)[name], amax), name
    assert {(b.w, b.a) for b in _modelopt_bits(qat, reference).bits} == {(2, 2)}
    ptq_weights = dict(ptq.named_parameters())
    moved = [name for name, p in qat.named_parameters() if not torch.equal(p, ptq_weights[name])]
    assert len(moved) == len(ptq_weights)
    seen = {train_set.image_name(i) for i in range(len(train_set))}
    assert len(seen) == 58  # the reference's training images, never its held-out ones
    batch = torch.cat(images)[:4]
    masks = torch.zeros(batch.shape[0], *batch.shape[-2:], dtype=torch.long)
    with torch.no_grad():
        target = reference.model.head(reference.model.encoder(batch), None)
        kl = {label: float(distillation_loss(m.head(m.encoder(batch), None), target, masks, 255))
              for label, m in (("ptq", ptq), ("qat", qat))}
    assert kl["qat"] < 0.9 * kl["ptq"]  # 0.066 against 0.092 when written


def test_modelopt_qat_is_a_peer_asked_for_by_name(reference_run, tmp_path):
    found = run_baselines(reference_run, "synthetic", None, tmp_path / "out", methods=("modelopt-qat",),
                          ptq_bits=((8, 8), (4, 4)), calibration=2, val_limit=2,
                          qat=QatSettings(iterations=2, batch_size=1))
    assert [r.label for r in found] == ["FP32 reference", "ModelOpt QAT W8A8", "ModelOpt QAT W4A4"]
    assert found[2].bitops * 4 == found[1].bitops
    assert found[1].notes == {"iterations": 2, "batch_size": 1, "lr": 1e-5, "label_weight": 0.0}
    for bad, match in (({"iterations": 0}, "QAT needs at least 1 iteration"), ({"lr": 0.0}, "QAT's learning rate")):
        with pytest.raises(ConfigError, match=match):
            QatSettings(**bad)
