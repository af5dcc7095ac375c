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
from qsamc.sam import is_quantizer_state
from qsamc.supernet.lora import LoraConfig, LowRank
from qsamc.supernet.quant import MSE_CANDIDATES, LsqActQuantizer, LsqWeightQuantizer, _grid
from qsamc.supernet.space import default_space
from qsamc.task.losses import distillation_loss, feature_distillation_loss, segmentation_loss
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


def test_a_reference_run_loads_with_the_head_it_trained(reference_run, tiny_run):
    """A reference run's head trained at 32 bits and its activation quantizers never saw data: loaded, it
    computes in float as it trained (not W8A8 with ranges taken from the first batch it meets). A supernet
    run's head keeps W8A8 with the ranges it trained."""
    from qsamc.task.head import HEAD_BITS, SegmentationHead

    reference, _, _ = load_supernet(reference_run)
    head = reference.head
    assert not head.has_activation_ranges()
    assert (head.conv.w_bits, head.conv.a_bits, head.classifier.w_bits, head.classifier.a_bits) == (32,) * 4
    float_head = SegmentationHead(head.conv.in_channels, head.classifier.out_channels, quantized=False)
    float_head.load_state_dict({k: v for k, v in head.state_dict().items() if not is_quantizer_state(k)})
    features = torch.randn(2, head.conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        torch.testing.assert_close(head(features, None), float_head(features, None), rtol=0, atol=0)
    assert not head.has_activation_ranges()  # scoring it initialised nothing
    supernet, _, _ = load_supernet(tiny_run)
    assert supernet.head.has_activation_ranges() and supernet.head.conv.a_bits == HEAD_BITS


def test_minmax_head_ranges_are_calibrated_once_after_training_on_the_fp32_grid(reference_run, tmp_path):
    """`--head-ranges minmax`: after training, the light head's activation ranges are min-max over the FP32
    grid's features of the run's first 32 training images (here all of them, not augmented), the classifier's
    through the conv as calibrated; the run records the choice."""
    from qsamc.task.head import HEAD_BITS
    from qsamc.training.splits import run_config, trained_images
    from qsamc.task.data import make_batch

    run = tmp_path / "minmax"
    train(config(run, checkpoint=str(reference_run), head_ranges="minmax"), show_progress=False)
    assert run_config(run).head_ranges == "minmax" and run_config(reference_run).head_ranges == "learned"
    model, _, spec = load_supernet(run)
    images = trained_images(run, "synthetic", None)
    subnet = fp32_subnet(spec.space)
    model.supernet.set_subnet(subnet)
    samples = [images.sample(i, 0) for i in range(min(32, len(images)))]
    with torch.no_grad():
        features = torch.cat([model.supernet(make_batch([s], subnet.resolution)[0]) for s in samples])
        hidden = model.head.act(model.head.conv(features))
    for layer, inputs in ((model.head.conv, features), (model.head.classifier, hidden)):
        quantizer = layer.act_quantizer[HEAD_BITS]
        lo, hi = float(inputs.min()), float(inputs.max())
        assert float(quantizer.offset.detach()) == pytest.approx(lo, rel=1e-5, abs=1e-6)
        assert float(quantizer.scale.detach()) == pytest.approx((hi - lo) / 255, rel=1e-5)


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


def classes(run: Path) -> int:
    return json.loads((run / "supernet.json").read_text())["num_classes"]


def test_feature_distillation_is_the_mse_relative_to_the_references_mean_square():
    reference = torch.tensor([[1.0, -2.0], [2.0, 1.0]])
    assert float(feature_distillation_loss(reference, reference)) == 0
    assert float(feature_distillation_loss(torch.zeros(2, 2), reference)) == 1
    assert float(feature_distillation_loss(reference + 1, reference)) == pytest.approx(1 / 2.5, rel=1e-6)
    assert float(feature_distillation_loss(10 * (reference + 1), 10 * reference)) == pytest.approx(1 / 2.5, rel=1e-6)


def test_distilled_loss_weighs_labels_logits_and_features(reference_run):
    """A student equal to its reference at the FP32 subnet: the KL and feature terms are exactly 0, so the
    loss is label_weight x the cross-entropy; a quantized subnet moves both."""
    model, _ = build_model(SupernetSpec(default_space("vit_t"), classes(reference_run), None, True), reference_run,
                           weight_init="mse")
    model.eval()
    space = default_space("vit_t")
    teacher = T.Teacher(model, space)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    masks = torch.randint(0, classes(reference_run), (2, 128, 128), generator=torch.Generator().manual_seed(1))
    model.supernet.set_subnet(fp32_subnet(space, 128))
    model.head.set_bits(32)
    with torch.no_grad():
        cross_entropy = segmentation_loss(model(images, upsample=False).float(), masks, 255)
        both = config("x", checkpoint=str(reference_run), distill="reference", label_weight=1.0, feature_weight=2.0)
        assert float(T.distilled_loss(both, model, teacher, images, masks, 255)) == pytest.approx(float(cross_entropy), rel=1e-6)
        only_reference = replace(both, label_weight=0.0)
        assert float(T.distilled_loss(only_reference, model, teacher, images, masks, 255)) == 0
        model.supernet.set_subnet(space.uniform_bits(replace(space.max_subnet(), resolution=128), 2, 2))
        features_only = replace(only_reference, distill_weight=0.0)
        moved = float(T.distilled_loss(features_only, model, teacher, images, masks, 255))
        logits, features = model(images, upsample=False, with_features=True)
        assert moved == pytest.approx(2 * float(feature_distillation_loss(features, teacher(images)[1])), rel=1e-6)
        assert moved > 0


def test_l2sp_moves_each_anchored_weight_by_lr_times_strength_toward_the_checkpoint(reference_run):
    model, _ = build_model(SupernetSpec(default_space("vit_t"), classes(reference_run), None, True), reference_run,
                           weight_init="mse")
    anchor = T.WeightAnchor(model, strength=0.5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    optimizer = torch.optim.AdamW(T.param_groups(model, list(model.parameters()), 0.1, 0.0), lr=0.1)
    anchor(optimizer)
    for name, p in model.named_parameters():
        if "_quantizer." in name:  # step sizes and offsets have no anchor
            assert torch.equal(p, start[name] + 1), name
        else:  # 0.1 x 0.5 of the way back: start + 0.95
            torch.testing.assert_close(p, start[name] + 0.95, rtol=0, atol=1e-6)


def test_the_default_recipe_distils_from_a_reference_run_only_and_anchors_any_checkpoint(reference_run, tmp_path):
    sam = tmp_path / "sam_vit_t.pth"
    sam.write_bytes(b"")  # only its kind matters to the recipe: a file, not a reference run folder
    cases = [({"checkpoint": str(reference_run)}, ("reference", 10000.0)),
             ({"checkpoint": str(sam)}, ("none", 100.0)),
             ({}, ("none", 0.0)),
             ({"checkpoint": str(reference_run), "schedule": "fp32"}, ("none", 0.0)),
             ({"checkpoint": str(reference_run), "head": "mask2former"}, ("none", 100.0)),
             ({"checkpoint": str(reference_run), "distill": "none", "l2sp": 0.0}, ("none", 0.0)),
             ({"checkpoint": str(reference_run), "distill": "none"}, ("none", 100.0)),
             ({"checkpoint": str(reference_run), "l2sp": 100.0}, ("reference", 100.0)),
             ({"checkpoint": str(tiny_run_like(tmp_path))}, ("none", 100.0))]
    for changes, expected in cases:
        resolved = load_train_config(None, changes).resolved()
        assert (resolved.distill, resolved.l2sp) == expected, changes
        assert resolved.resolved() == resolved
    defaults = load_train_config(None, {})
    assert (defaults.label_weight, defaults.distill_weight, defaults.feature_weight) == (0.0, 1.0, 1.0)


def tiny_run_like(tmp_path: Path) -> Path:
    """A run folder whose config.json is a supernet run's, not a reference's."""
    run = tmp_path / "supernet-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**load_train_config(None, {}).to_json()}))
    return run


def test_a_run_written_before_the_recipe_resumes_with_the_loss_it_had(tmp_path):
    saved = tmp_path / "config.json"
    written = load_train_config(None, {"checkpoint": "ref", "distill": "reference"}).to_json()
    for field in ("label_weight", "feature_weight", "l2sp"):
        del written[field]
    saved.write_text(json.dumps({**written, "version": 3}))
    old = load_train_config(saved)
    assert (old.label_weight, old.distill_weight, old.feature_weight, old.l2sp) == (1.0, 1.0, 0.0, 0.0)


def test_l2sp_pulls_each_lora_adapters_b_toward_zero_once_tracked(reference_run):
    """In the LoRA phase the layer's weight is W0 + BA with W0 frozen: the pull reaches it through B alone."""
    model, _ = build_model(SupernetSpec(default_space("vit_t"), classes(reference_run), LoraConfig(), True),
                           reference_run, weight_init="mse")
    adapters = [m for m in model.modules() if isinstance(m, LowRank)]
    assert len(adapters) == 12 * 3 * 5  # blocks x (qkv, lin1, lin2) x multiplex modules
    with torch.no_grad():
        for m in adapters:
            m.B.fill_(1.0)
    a_before = [m.A.detach().clone() for m in adapters]
    anchor = T.WeightAnchor(model, strength=0.5)
    optimizer = torch.optim.AdamW(T.param_groups(model, list(model.parameters()), 0.1, 0.0), lr=0.1)
    anchor(optimizer)  # not tracked yet (phase 1 has no adapters): B stays
    assert all(torch.equal(m.B, torch.ones_like(m.B)) for m in adapters)
    anchor.track_adapters(model)
    anchor(optimizer)  # 0.1 x 0.5 of the way to 0
    for m, a in zip(adapters, a_before):
        torch.testing.assert_close(m.B, torch.full_like(m.B, 0.95), rtol=0, atol=1e-7)
        assert torch.equal(m.A, a)  # A is a random projection with no checkpoint value


@pytest.mark.parametrize("reach", [True, False])
def test_a_lora_phase_under_l2sp_keeps_its_adapters_at_the_checkpoints_weight(reference_run, tmp_path, reach):
    """lr x l2sp = 1e-3 x 1000: the pull takes B all the way back to 0 after the LoRA phase's one step."""
    run = tmp_path / "anchored"
    train(config(run, checkpoint=str(reference_run), l2sp=1000.0, l2sp_lora=reach, lora_lr=1e-3), show_progress=False)
    model, _, _ = load_supernet(run)
    bs = [m.B for m in model.modules() if isinstance(m, LowRank)]
    assert bs and all(bool((b == 0).all()) for b in bs) == reach


def test_rank_0_trains_the_quantizers_and_head_alone_on_the_frozen_weights_in_the_lora_phase(reference_run, tmp_path,
                                                                                                monkeypatch):
    at_boundary = {}
    original = T._start_phase

    def snapshot(config, model, *args, **kwargs):
        if kwargs.get("lora_phase", args[3] if len(args) > 3 else False):
            at_boundary.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return original(config, model, *args, **kwargs)

    monkeypatch.setattr(T, "_start_phase", snapshot)
    run = tmp_path / "rank0"
    # Without L2-SP: the default's pull would put the head back at the reference's every step.
    train(config(run, checkpoint=str(reference_run), lora_rank=0, l2sp=0.0), show_progress=False)
    model, _, spec = load_supernet(run)
    assert spec.lora is None and not any(isinstance(m, LowRank) for m in model.modules())
    final = dict(model.named_parameters())
    assert at_boundary and set(final) == set(at_boundary)
    moved = {n for n in final if not torch.equal(final[n], at_boundary[n])}
    weights = {n for n in final if n.startswith("supernet.") and not is_quantizer_state(n)}
    assert weights and not moved & weights  # the encoder's weights are frozen
    assert any(is_quantizer_state(n) for n in moved) and any(n.startswith("head.") for n in moved)


def test_a_run_written_before_l2sp_reached_the_adapters_resumes_without_it(tmp_path):
    saved = tmp_path / "config.json"
    written = load_train_config(None, {"checkpoint": "ref"}).to_json()
    assert written["l2sp_lora"] is True and written["version"] >= 5
    del written["l2sp_lora"]
    saved.write_text(json.dumps({**written, "version": 4}))
    assert load_train_config(saved).l2sp_lora is False


def test_runs_before_integer_zero_points_keep_lsq_plus_offsets(tmp_path):
    """A version-6 config resumes, and a supernet.json without the field rebuilds, with continuous offsets."""
    saved = tmp_path / "config.json"
    written = load_train_config(None, {}).to_json()
    assert written["zero_point"] == "integer" and written["version"] == 7
    del written["zero_point"]
    saved.write_text(json.dumps({**written, "version": 6}))
    assert load_train_config(saved).zero_point == "continuous"
    spec = SupernetSpec(default_space("vit_t"), 4, None)
    data = spec.to_json()
    assert data["zero_point"] == "integer" and SupernetSpec.from_json(data) == spec
    del data["zero_point"]
    old = SupernetSpec.from_json(data)
    assert old.zero_point == "continuous"
    model, _ = build_model(old)
    acts = [m for m in model.supernet.modules() if isinstance(m, LsqActQuantizer)]
    assert acts and {m.zero_point for m in acts} == {"continuous"}
    model, _ = build_model(spec)
    assert {m.zero_point for m in model.supernet.modules() if isinstance(m, LsqActQuantizer)} == {"integer"}


def test_l2sp_leaves_a_sam_checkpoints_random_head_free(reference_run):
    model, _ = build_model(SupernetSpec(default_space("vit_t"), classes(reference_run), None, True), reference_run,
                           weight_init="mse")
    anchors = T.WeightAnchor(model, 1.0, with_head=False).anchors
    assert anchors and all(name.startswith("supernet.") for name in anchors)
    assert any(name.startswith("head.") for name in T.WeightAnchor(model, 1.0).anchors)


@pytest.mark.parametrize("changes, match", [
    ({"label_weight": 0.0, "distill_weight": 0.0, "feature_weight": 0.0}, "label_weight, distill_weight and "
     "feature_weight are all 0: distillation would have no loss"),
    ({"l2sp": 1.0}, "l2sp pulls the weights toward the checkpoint's: it needs --checkpoint"),
    ({"l2sp": -1.0}, "l2sp must be a finite number >= 0"),
    ({"feature_weight": float("inf")}, "feature_weight must be a finite number >= 0"),
    ({"distill": "reference"}, "distill=reference needs --checkpoint naming an FP32 reference run"),
    ({"distill": "teacher"}, "distill must be one of auto, none, reference"),
    ({"distill_weight": float("nan")}, "distill_weight must be a finite number"),
    ({"weight_init": "max"}, "weight_init must be one of lsq\\+, mse"),
    ({"zero_point": "half"}, "zero_point must be one of integer, continuous, got 'half'"),
    ({"head_ranges": "both"}, "head_ranges must be one of learned, minmax, got 'both'"),
    ({"head_ranges": "minmax", "head": "mask2former"}, "head_ranges=minmax calibrates the light head's"),
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
