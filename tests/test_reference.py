"""The FP32 reference (`qsamc train --schedule fp32`), supernets started from it (encoder and head), inplace
distillation from it, and the MSE weight-scale initialisation."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import qsamc.training.train as T
from qsamc.training.runs import SupernetSpec, build_model, load_supernet
from qsamc.errors import CheckpointError, ConfigError
from qsamc.supernet.quant import MSE_CANDIDATES, LsqWeightQuantizer, _grid
from qsamc.supernet.space import default_space
from qsamc.task.losses import distillation_loss
from qsamc.training.train import fp32_subnet, train
from conftest import parse_flags, tiny_train
from qsamc.training.config import load_train_config

FLAGS = tiny_train(iterations="3", phase1_iterations="2", checkpoint_every="3")


def config(out: Path, **changes):
    return replace(load_train_config(None, parse_flags(FLAGS)), out=str(out), **changes)


@pytest.fixture(scope="module")
def reference_run(fp32_reference_run):
    """The session's FP32 reference: `config(run, schedule="fp32", lr=1e-3)` (conftest's REFERENCE_TRAIN)."""
    return fp32_reference_run


def test_fp32_schedule_trains_the_float_largest_network_at_the_native_resolution(reference_run):
    with open(reference_run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["resolution"] for r in rows] == ["256"] * 3 and {r["depths"] for r in rows} == {"3-3-3-3"}
    assert {r["phase"] for r in rows} == {"1"}
    validation = json.loads((reference_run / "validation.json").read_text())
    assert validation["schedule"] == "fp32" and validation["min_subnet"] is None
    assert 0 <= validation["max_subnet"]["miou"] <= 1
    assert json.loads((reference_run / "supernet.json").read_text())["lora"] is None


def test_fp32_subnet_is_the_largest_network_in_float():
    space = default_space("vit_t")
    subnet = fp32_subnet(space, 192)
    assert subnet.resolution == 192 and subnet.depths == space.max_subnet().depths
    assert {(b.w, b.a) for b in subnet.bits} == {(32, 32)}


def test_a_supernet_starts_from_the_reference_encoder_and_head(reference_run):
    reference, _, spec = load_supernet(reference_run)
    model, _ = build_model(SupernetSpec(spec.space, spec.num_classes, None, True), reference_run, weight_init="mse")
    saved = reference.state_dict()
    for name, value in model.state_dict().items():
        if "_quantizer." not in name and ".lora." not in name:
            assert torch.equal(value, saved[name]), name
    # The head's weight scales are re-calibrated from the loaded weights (min-max, 8 bits).
    conv = model.head.conv
    assert torch.equal(conv.weight_quantizer[8].scale, conv.weight.abs().max() / 127)


def test_a_bare_sam_checkpoint_still_gives_a_random_head(tmp_path):
    encoder_only = tmp_path / "encoder.pt"
    model, _ = build_model(SupernetSpec(default_space("vit_t"), 4, None))
    torch.save({k[len("supernet."):]: v for k, v in model.state_dict().items()
                if k.startswith("supernet.") and "_quantizer." not in k}, encoder_only)
    rebuilt, _ = build_model(SupernetSpec(default_space("vit_t"), 4, None), encoder_only)
    assert torch.equal(rebuilt.supernet.blocks[0].attn.qkv.weight, model.supernet.blocks[0].attn.qkv.weight)


def test_a_lora_supernet_is_refused_as_a_starting_point(reference_run, tiny_run):
    lora_run = tiny_run  # the session's finished progressive run: LoRA attached in its phase 2
    with pytest.raises(CheckpointError, match="trained with LoRA; start from an FP32 reference run"):
        build_model(SupernetSpec(default_space("vit_t"), 4, None), lora_run)


def test_a_head_of_another_task_is_one_sentence(reference_run):
    with pytest.raises(CheckpointError, match="does not fit a 7-class head: 'classifier.weight' has shape"):
        build_model(SupernetSpec(default_space("vit_t"), 7, None), reference_run)


def test_distillation_loss_is_the_mean_kl_over_labelled_pixels():
    teacher = torch.tensor([[[[0.0, 2.0]], [[0.0, 0.0]]]])  # [1, 2 classes, 1, 2 pixels]
    student = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]]])
    masks = torch.tensor([[[0, 255]]])
    assert distillation_loss(teacher, teacher, masks, 255) == 0
    # Pixel 0: teacher and student both uniform -> 0; pixel 1 is ignored.
    assert distillation_loss(student, teacher, masks, 255) == 0
    masks = torch.tensor([[[0, 0]]])
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    expected = float((p * (p.log() - torch.tensor(0.5).log())).sum()) / 2
    assert float(distillation_loss(student, teacher, masks, 255)) == pytest.approx(expected, rel=1e-6)


def test_distillation_runs_the_frozen_reference_at_each_subnets_resolution(reference_run, tmp_path, monkeypatch):
    seen = []
    original = T.Teacher.__call__

    def spy(self, images):
        seen.append(images.shape[-1])
        logits = original(self, images)
        assert all(not p.requires_grad for p in self.model.parameters())
        return logits

    monkeypatch.setattr(T.Teacher, "__call__", spy)
    run = tmp_path / "distilled"
    cfg = config(run, checkpoint=str(reference_run), distill="reference", iterations=3, phase1_iterations=2)
    train(cfg, show_progress=False)
    expected = [s.resolution for i in range(3) for s in T.sample_subnets(cfg, default_space("vit_t"), i)]
    assert seen == expected
    assert json.loads((run / "config.json").read_text())["distill"] == "reference"


@pytest.mark.parametrize("changes, match", [
    ({"distill": "reference"}, "distill=reference needs --checkpoint naming an FP32 reference run"),
    ({"distill": "teacher"}, "distill must be one of none, reference"),
    ({"distill_weight": float("nan")}, "distill_weight must be a finite number"),
    ({"weight_init": "max"}, "weight_init must be one of lsq\\+, mse"),
    ({"schedule": "fp32", "distill": "reference", "checkpoint": "x"}, "the fp32 schedule trains the reference"),
])
def test_bad_reference_options_are_one_sentence(changes, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, changes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("channels", [None, 6])
def test_mse_init_picks_the_candidate_with_the_least_squared_error(bits, channels):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(bits)) * 0.1
    w[0, 0] = 1.5  # an outlier that 3 sigma would clip
    quantizer = LsqWeightQuantizer(bits, channels)
    quantizer.initialize(w, "mse")
    rows = w.reshape(1, -1) if channels is None else w
    n, p = quantizer.n, quantizer.p
    for row, chosen in zip(rows, quantizer.scale.detach().reshape(-1)):
        top = row.abs().max() / max(p, 1)
        errors = {f: float(((_grid(row, top * f, None, n, p) * top * f - row) ** 2).sum()) for f in MSE_CANDIDATES}
        best = min(errors, key=errors.get)
        assert float(chosen) == pytest.approx(float(top * best), rel=1e-6)
        chosen_error = float(((_grid(row, chosen, None, n, p) * chosen - row) ** 2).sum())
        assert chosen_error <= min(errors.values()) * (1 + 1e-6)


def test_mse_init_keeps_an_8_bit_outlier_that_lsq_plus_clips():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    w[3, 5] = 0.5
    lsq, mse = LsqWeightQuantizer(8), LsqWeightQuantizer(8)
    lsq.initialize(w)
    mse.initialize(w, "mse")
    # LSQ+'s 3 sigma range ends near 0.06, far inside the outlier; MSE clips it by a few steps at most.
    assert float(lsq.scale.detach()) * 127 < 0.1 and float(mse.scale.detach()) * 127 > 0.45
