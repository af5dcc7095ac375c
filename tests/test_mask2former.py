"""The Mask2Former head (qsamc/task/mask2former.py) as a choice beside the light head: its targets, its
loss and inference, and a tiny supernet trained, searched and exported with it (semantic task)."""

import json
import shutil

import pytest
import torch

from qsamc.errors import CheckpointError, ConfigError
from qsamc.task.head import SegmentationHead
from qsamc.task.mask2former import Mask2FormerHead, Mask2FormerSpec, semantic_targets
from qsamc.training.config import TrainConfig, load_train_config
from qsamc.training.runs import load_supernet

SMALL = Mask2FormerSpec(dim=32, queries=8, decoder_layers=2, encoder_layers=1, points=1024)


def test_semantic_targets_are_one_mask_per_class_present():
    masks = torch.tensor([[[0, 0, 2], [2, 255, 2]], [[255, 255, 255], [255, 255, 255]]])
    mask_labels, class_labels = semantic_targets(masks, num_classes=3, ignore_index=255)
    assert class_labels[0].tolist() == [0, 2] and class_labels[1].tolist() == []
    assert mask_labels[0].tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 1], [1, 0, 1]]]
    assert mask_labels[1].shape == (0, 2, 3)


def test_the_head_fits_a_fixed_batch_and_reads_as_class_log_probabilities():
    torch.manual_seed(0)
    head = Mask2FormerHead(32, 3, SMALL)
    features = torch.randn(2, 32, 4, 4)
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    masks[0, :32], masks[1, :, 40:] = 1, 2
    optimizer = torch.optim.AdamW(head.parameters(), 1e-3)
    losses = []
    for _ in range(40):
        loss = head.loss(features, masks, 255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        log_probabilities = head(features, (64, 64))
    assert log_probabilities.shape == (2, 3, 64, 64)
    torch.testing.assert_close(log_probabilities.exp().sum(1), torch.ones(2, 64, 64))
    assert (log_probabilities.argmax(1) == masks).float().mean() > 0.9


def test_head_choices_are_checked():
    with pytest.raises(ConfigError, match=r"^head must be one of light, mask2former, got 'fpn'$"):
        TrainConfig(head="fpn")
    with pytest.raises(ConfigError, match=r"^distill=reference distils the light head's per-pixel logits"):
        TrainConfig(head="mask2former", distill="reference", checkpoint="runs/reference")
    with pytest.raises(ConfigError, match=r"^the mask2former head needs a width that is a multiple of 8"):
        Mask2FormerSpec(dim=12)
    assert TrainConfig().mask2former is None
    assert TrainConfig(head="mask2former", head_dim=64, head_queries=20, head_layers=3).mask2former == \
        Mask2FormerSpec(64, 20, 3)


def _train_tiny_mask2former(tmp_path_factory, **options):
    """A tiny supernet with the Mask2Former head trained for 6 iterations on generated data."""
    from qsamc.training.train import train

    run = tmp_path_factory.mktemp("m2f") / "run"
    config = load_train_config(None, {
        "out": str(run), "iterations": 6, "phase1_iterations": 3, "batch_size": 2, "val_limit": 4,
        "checkpoint_every": 3, "calibration_batches": 1, "head": "mask2former", "head_dim": 32,
        "head_queries": 8, "head_layers": 2, **options})
    return run, train(config, show_progress=False)


@pytest.fixture(scope="module")
def mask2former_run(tmp_path_factory):
    return _train_tiny_mask2former(tmp_path_factory)


def test_a_run_records_its_head_and_is_read_back_with_it(mask2former_run):
    run, result = mask2former_run
    assert json.loads((run / "supernet.json").read_text())["head"] == "mask2former"
    assert json.loads((run / "config.json").read_text())["head"] == "mask2former"
    model, _, spec = load_supernet(run)
    assert isinstance(model.head, Mask2FormerHead) and spec.mask2former == Mask2FormerSpec(32, 8, 2)
    assert 0.0 <= result.max_subnet.miou <= 1.0 and result.max_subnet.loss > 0


def test_search_and_export_score_subnets_through_the_mask2former_head(mask2former_run, tmp_path):
    from qsamc.pipeline import export_subnet, run_search
    from qsamc.search.evolution import EvolutionConfig

    run, _ = mask2former_run
    config = EvolutionConfig(population=4, top_k=2, mutations=2, crossovers=2, generations=1, objective="miou")
    # Scored on val (not the run's held-out images), so that search's figure is the export check's.
    searched, written = run_search(run, "cpu", True, False, ["20G"], tmp_path / "search", val_limit=4, config=config,
                                   split="val")
    best = searched.results[0].best
    assert 0.0 <= best.evaluation.miou <= 1.0 and best.costs["bitops"] <= 20e9
    report = export_subnet(run, tmp_path / "search" / "best-20G.json", "cpu", "onnx", tmp_path / "export",
                           samples=1, dataset="synthetic", val_limit=4)
    assert report.task.ok and report.task.pytorch_miou == pytest.approx(best.evaluation.miou, abs=0.002)


def test_baselines_refuse_a_mask2former_reference(mask2former_run, tmp_path):
    from qsamc.baselines import load_reference

    run, _ = mask2former_run
    reference = tmp_path / "reference"
    shutil.copytree(run, reference)
    (reference / "validation.json").write_text(json.dumps({"schedule": "fp32"}))
    with pytest.raises(ConfigError, match=r"has a mask2former head; the post-training baselines quantize the light"):
        load_reference(reference)
    with pytest.raises(CheckpointError, match=r"does not fit a 4-class head"):
        SegmentationHead(32, 4).load_float_state(Mask2FormerHead(32, 4, SMALL).state_dict(), "m2f")


# --- the instance task: COCO-format instances, mask AP, searched on AP --------------------------------------

def test_the_instance_task_needs_the_mask2former_head():
    with pytest.raises(ConfigError, match=r"^the instance task needs --head mask2former; the light head predicts"):
        TrainConfig(task="instance")
    with pytest.raises(ConfigError, match=r"^task must be one of semantic, instance, got 'panoptic'$"):
        TrainConfig(task="panoptic", head="mask2former")


@pytest.fixture(scope="module")
def instance_run(tmp_path_factory):
    return _train_tiny_mask2former(tmp_path_factory, task="instance")


def test_an_instance_run_records_its_task_and_scores_mask_ap(instance_run):
    run, result = instance_run
    assert json.loads((run / "supernet.json").read_text())["task"] == "instance"
    validation = json.loads((run / "validation.json").read_text())
    assert set(validation["max_subnet"]) == {"loss", "ap", "ap50", "ap75"}
    model, _, spec = load_supernet(run)
    assert spec.task == "instance" and model.head.task == "instance" and model.head.num_classes == 3
    for evaluation in (result.max_subnet, result.min_subnet):
        assert 0.0 <= evaluation.ap <= evaluation.ap50 <= 1.0 and evaluation.loss > 0
    assert result.max_subnet.metrics() == validation["max_subnet"]


def test_search_on_an_instance_run_ranks_subnets_by_mask_ap(instance_run, tmp_path):
    from qsamc.pipeline import export_subnet, run_search
    from qsamc.search.evolution import EvolutionConfig

    run, result = instance_run
    config = EvolutionConfig(population=4, top_k=2, mutations=2, crossovers=2, generations=1, objective="ap")
    searched, _ = run_search(run, "cpu", True, False, ["20G"], tmp_path / "search", val_limit=4, config=config)
    candidates = searched.candidates
    assert searched.results[0].best.evaluation.ap == max(c.evaluation.ap for c in candidates
                                                         if c.costs["bitops"] <= 20e9)
    pareto = json.loads((tmp_path / "search" / "pareto.json").read_text())
    assert pareto["objective"] == "ap" and set(pareto["candidates"][0]) >= {"loss", "ap", "ap50", "ap75"}
    with pytest.raises(ConfigError, match=r"is an instance-segmentation run; its objectives are loss or ap, not miou$"):
        run_search(run, "cpu", True, False, ["20G"], tmp_path / "other", val_limit=4,
                   config=EvolutionConfig(population=4, generations=1, objective="miou"))
    report = export_subnet(run, tmp_path / "search" / "best-20G.json", "cpu", "onnx", tmp_path / "export", samples=1)
    assert report.task is None and report.fidelity is not None  # the encoder is verified; the head is not exported
