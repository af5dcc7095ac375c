"""Per-layer sensitivity (AutoQuantize's gradient scores) and the budgeted solve that seeds evolution."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest
import torch

from qsamc.ir.frontend import analysis_ir
from qsamc.search.cost import BitopsCost, Budget, set_group_bits
from qsamc.search.evolution import EvolutionConfig, SubnetFitness, search
from qsamc.search.sensitivity import FLOAT, Sensitivity, measure_sensitivity, sensitivity_seed, solve
from qsamc.supernet.space import default_space
from qsamc.task.data import build_dataset
from qsamc.task.evaluate import ValidationSet
from qsamc.training.runs import load_supernet


def _small_space():
    """vit_t with bits tied per stage and two precisions each way: few enough assignments to enumerate."""
    return default_space("vit_t", granularity="stage").restrict(weight_bits=(4, 8), act_bits=(4, 8))


def test_the_solve_is_optimal_among_all_assignments_that_cost_no_more():
    space = _small_space()
    cost = BitopsCost(analysis_ir(space), space, "exclude").cost
    groups = space.bit_groups()
    rng = random.Random(0)
    pairs = Sensitivity.pairs(space)
    scores = {g: {p: (0.0 if p == (8, 8) else rng.uniform(0.1, 1.0) / (p[0] * p[1])) for p in pairs} for g in groups}
    base = space.max_subnet()
    assert 4 <= len(groups) <= 8
    every = []
    for choice in itertools.product(pairs, repeat=len(groups)):
        subnet = space.uniform_bits(base, 8, 8)
        for (g, layers), pair in zip(groups.items(), choice):
            subnet = set_group_bits(subnet, set(layers), pair)
        every.append((cost(subnet), sum(scores[g][p] for g, p in zip(groups, choice))))
    top, bottom = cost(space.uniform_bits(base, 8, 8)), cost(space.uniform_bits(base, 4, 4))
    for fraction in (0.3, 0.5, 0.7, 0.9):
        limit = bottom + fraction * (top - bottom)
        found = solve(space, scores, base, cost, limit)
        found_cost = cost(found)
        found_score = sum(scores[g][(found.bits_of(layers[0]).w, found.bits_of(layers[0]).a)] for g, layers in groups.items())
        assert found_cost <= limit
        assert all(score >= found_score - 1e-12 for c, score in every if c <= found_cost)
    assert solve(space, scores, base, cost, bottom - 1) is None
    assert solve(space, scores, base, cost, top) == space.uniform_bits(base, 8, 8)


@pytest.fixture(scope="module")
def measured(tiny_run):
    model, ir, spec = load_supernet(tiny_run)
    data = ValidationSet(build_dataset("synthetic", None, "val"), 4)
    model.train()
    sensitivity = measure_sensitivity(model, spec.space, data)
    assert model.training and all(p.grad is None for p in model.parameters())  # left as it was found
    return model, ir, spec.space, data, sensitivity


def test_scores_are_zero_in_float_and_grow_as_bits_drop(measured):
    model, _, space, data, sensitivity = measured
    assert set(sensitivity.scores) == set(space.quant_layers)
    for layer, scores in sensitivity.scores.items():
        assert scores[FLOAT] == 0
        assert scores[(2, 2)] > scores[(8, 8)] > 0, layer
        assert scores[(2, 32)] > scores[(8, 32)] > 0 and scores[(32, 2)] > scores[(32, 8)] > 0, layer


def test_a_score_is_half_the_gradient_weighted_squared_change_of_the_layers_output(measured):
    """Recomputed for one layer with autograd.grad instead of the scores' retained gradients, batch by batch."""
    from qsamc.task.losses import segmentation_loss

    model, _, space, data, sensitivity = measured
    name = "blocks.5.mlp.lin2"
    layer = model.supernet.quant_layers()[name]
    expected = 0.0
    model.eval()
    for images, masks in data.batches(space.max_subnet().resolution):
        model.supernet.configure(space.uniform_bits(space.max_subnet(), *FLOAT))
        captured = {}
        handle = layer.register_forward_hook(lambda m, args, kwargs, out: captured.update(args=args, kwargs=kwargs, out=out),
                                             with_kwargs=True)
        loss = segmentation_loss(model(images, upsample=False), masks, data.ignore_index)
        handle.remove()
        (grad,) = torch.autograd.grad(loss, captured["out"])
        with torch.no_grad():
            layer.set_bits(4, 8)
            changed = layer(*captured["args"], **captured["kwargs"])
            layer.set_bits(*FLOAT)
        expected += 0.5 * float((grad.square() * (changed - captured["out"]).square()).sum())
    model.train()
    assert expected > 0
    assert sensitivity.scores[name][(4, 8)] == pytest.approx(expected, rel=1e-5)


def test_the_seed_meets_the_budgets_and_starts_evolution(measured):
    model, ir, space, data, sensitivity = measured
    cost = BitopsCost(ir, space, "exclude")
    top = cost.cost(space.uniform_bits(space.max_subnet(), 8, 8))
    budgets = [Budget("bitops", 0.2 * top)]
    seed = sensitivity_seed(space, sensitivity, budgets, lambda s: {"bitops": cost.cost(s)})
    assert seed is not None and cost.cost(seed) <= 0.2 * top
    assert len({(b.w, b.a) for b in seed.bits}) > 1  # mixed precision, not a uniform subnet
    config = EvolutionConfig(population=4, top_k=2, mutations=1, crossovers=1, generations=1)
    result = search(space, [cost], SubnetFitness(model, data), budgets, config, sensitivity=sensitivity)
    assert space.canonical(seed) in {c.subnet for c in result.candidates}
    unseeded = search(space, [cost], SubnetFitness(model, data), budgets, replace(config, sensitivity_seed=False),
                      sensitivity=sensitivity)
    assert space.canonical(seed) not in {c.subnet for c in unseeded.candidates}
    assert sensitivity_seed(space, sensitivity, [Budget("bitops", 1.0)], lambda s: {"bitops": cost.cost(s)}) is None
