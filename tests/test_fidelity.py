"""Fidelity: the per-pixel KL from the FP32 reference's predictions, as an evaluation and as search's objective."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from qsamc.errors import ConfigError
from qsamc.pipeline import fidelity_reference, run_search, search_objective
from qsamc.search.evolution import EvolutionConfig, Searcher
from qsamc.task.data import build_dataset
from qsamc.task.evaluate import ReferencePredictions, ValidationSet, evaluate, evaluate_subnet
from qsamc.training.config import load_train_config
from qsamc.training.runs import load_supernet
from qsamc.training.splits import search_images
from qsamc.training.train import fp32_subnet, train
from conftest import parse_flags, tiny_train

SEARCH = EvolutionConfig(population=4, top_k=2, mutations=2, crossovers=2, generations=1, objective="fidelity")


def projection(seed: int, classes: int) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, classes, 1)


def test_fidelity_is_the_mean_kl_from_the_references_prediction_upsampled_over_labelled_pixels():
    data = ValidationSet(build_dataset("synthetic", None, "val"), limit=5, batch_size=2)
    student, teacher = projection(0, data.num_classes).requires_grad_(False), projection(1, data.num_classes)
    grid = lambda images: F.avg_pool2d(teacher(images), 4)  # logits at a head's grid, a quarter the size
    reference = ReferencePredictions.predict(grid, data, 64)
    evaluation = evaluate(student, data, 32, reference=reference)
    total, pixels = 0.0, 0
    for (images, masks), coarse in zip(data.batches(32), reference.logits):
        target = F.log_softmax(F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False), 1)
        kl = F.kl_div(F.log_softmax(student(images), 1), target, log_target=True, reduction="none").sum(1)
        labelled = masks != data.ignore_index
        total, pixels = total + kl[labelled].sum().item(), pixels + int(labelled.sum())
    assert pixels > 0 and evaluation.fidelity == pytest.approx(total / pixels, rel=1e-5)
    assert evaluation.fidelity > 0.01
    assert evaluation.metrics()["fidelity"] == evaluation.fidelity
    # The same model at the reference's own grid and resolution predicts exactly what the reference does.
    upsampled = lambda images: F.interpolate(grid(images), size=images.shape[-2:], mode="bilinear",
                                             align_corners=False)
    assert evaluate(upsampled, data, 64, reference=reference).fidelity == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(evaluate(student, data, 32).fidelity) and "fidelity" not in evaluate(student, data, 32).metrics()


@pytest.fixture(scope="module")
def distilled_run(fp32_reference_run, tmp_path_factory):
    """A tiny supernet distilled from the session's FP32 reference."""
    run = tmp_path_factory.mktemp("distilled") / "run"
    flags = parse_flags(tiny_train(iterations="3", phase1_iterations="2", checkpoint_every="3"))
    train(replace(load_train_config(None, flags), out=str(run), checkpoint=str(fp32_reference_run)), show_progress=False)
    return run


def test_search_by_fidelity_scores_every_candidate_against_the_reference_run(distilled_run, fp32_reference_run, tmp_path):
    result, _ = run_search(distilled_run, "cpu", True, False, ["30G"], tmp_path / "s", val_limit=2, config=SEARCH)
    pareto = json.loads((tmp_path / "s" / "pareto.json").read_text())
    assert pareto["objective"] == "fidelity" and pareto["scored_against"] == f"the FP32 reference {fp32_reference_run}"
    assert result.scored_against == pareto["scored_against"]
    # Each candidate's fidelity is evaluate_subnet's against the reference run's own predictions.
    reference_model, _, _ = load_supernet(fp32_reference_run)
    model, _, spec = load_supernet(distilled_run)
    data = ValidationSet(search_images(distilled_run, "synthetic", None, "auto", "semantic")[0], 2)
    resolution = spec.space.max_subnet().resolution
    reference_model.supernet.configure(fp32_subnet(reference_model.supernet.space, resolution))
    reference_model.head.set_bits(32)
    predictions = ReferencePredictions.predict(lambda x: reference_model(x, upsample=False), data, resolution)
    best = result.results[0].best
    expected = evaluate_subnet(model, best.subnet, data, reference=predictions).fidelity
    assert best.evaluation.fidelity == pytest.approx(expected, rel=1e-5)
    assert all(c["fidelity"] > 0 for c in pareto["candidates"])
    fitting = [c.evaluation.fidelity for c in result.candidates if c.costs["bitops"] <= 30e9]
    assert best.evaluation.fidelity == min(fitting)


def test_without_a_reference_fidelity_is_against_the_supernets_largest_fp32_subnet(distilled_run, tiny_run, tmp_path):
    model, _, spec = load_supernet(tiny_run)
    data = ValidationSet(build_dataset("synthetic", None, "val"), 2)
    reference, against = fidelity_reference(tiny_run, model, spec, data)
    assert against == "the supernet's largest FP32 subnet"
    # The reference is the largest FP32 subnet with the float head: the deployed W8A8 head departs from it a little.
    deployed = evaluate_subnet(model, fp32_subnet(spec.space), data, reference=reference).fidelity
    model.head.set_bits(32)
    assert evaluate_subnet(model, fp32_subnet(spec.space), data, reference=reference).fidelity == pytest.approx(0, abs=1e-7)
    assert 0 < deployed < 1e-4
    moved = tmp_path / "moved"
    shutil.copytree(distilled_run, moved, ignore=shutil.ignore_patterns(".lock"))
    saved = json.loads((moved / "config.json").read_text())
    saved["checkpoint"] = str(tmp_path / "deleted-reference")
    (moved / "config.json").write_text(json.dumps(saved))
    model, _, spec = load_supernet(moved)
    assert fidelity_reference(moved, model, spec, data)[1] == (
        f"the supernet's largest FP32 subnet (its reference {tmp_path / 'deleted-reference'} is gone)")


def test_the_default_objective_is_fidelity_for_a_run_distilled_from_a_reference_else_loss(distilled_run, tiny_run):
    assert search_objective(distilled_run, "semantic", "auto") == "fidelity"
    assert search_objective(tiny_run, "semantic", "auto") == "loss"  # trained from scratch: no reference
    assert search_objective(distilled_run, "instance", "auto") == "loss"
    assert search_objective(distilled_run, "semantic", "miou") == "miou"  # what is asked for stands
    assert EvolutionConfig().objective == "loss"  # the library default; qsamc search passes auto


def test_an_unknown_or_unresolved_objective_is_one_sentence(vit_t_space):
    with pytest.raises(ConfigError, match="objective must be one of loss, miou, ap, fidelity, auto, got 'kl'$"):
        EvolutionConfig(objective="kl")
    with pytest.raises(ConfigError, match=r"objective auto is chosen per run: resolve it first"):
        Searcher(vit_t_space, [], lambda subnet: None, EvolutionConfig(objective="auto"))
