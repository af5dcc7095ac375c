"""Per-layer sensitivity where evolution is blind: each layer's precisions scored as ModelOpt AutoQuantize
scores its formats, and a budgeted solve over them that seeds evolution.

Score (AutoQuantize's gradient method: a second-order Taylor expansion of the loss with the Fisher
approximation of the Hessian). On the search images, with the supernet at its largest architecture, native
resolution and every layer in float: the loss gradient g at each quantized layer's output y; for each
(w, a) of the space, the layer's output y' with only that layer at (w, a), from the same input;
score = 1/2 sum(g^2 (y' - y)^2), summed over the images. A bit group's score is its layers' sum, and a
subnet's estimated loss increase the sum over its groups.

Solve (a multiple-choice knapsack, by Lagrangian relaxation as AutoQuantize's LP): for a multiplier
lambda, each group takes the (w, a) minimising score + lambda x its cost increase over the subnet at the
space's highest bits (the cost model the budget is in, one group changed at a time: exact for BitOPs, a per-layer sum
for latency tables); lambda is bisected to the smallest that meets the budget. The solution is optimal among
all assignments that cost no more than it does. Tried at the native resolution first, then lower ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from qsamc.distributed import module_device
from qsamc.search.cost import Budget, set_group_bits
from qsamc.supernet.space import SearchSpace, Subnet
from qsamc.task.evaluate import ValidationSet
from qsamc.task.losses import segmentation_loss

Pair = tuple[int, int]
FLOAT: Pair = (32, 32)


@dataclass(frozen=True)
class Sensitivity:
    """Per quantized layer, the score of each (w, a) (0 for float: the point the scores are taken at)."""

    scores: dict[str, dict[Pair, float]]

    def group_scores(self, space: SearchSpace) -> dict[str, dict[Pair, float]]:
        return {group: {pair: sum(self.scores[layer][pair] for layer in layers) for pair in self.pairs(space)}
                for group, layers in space.bit_groups().items()}

    @staticmethod
    def pairs(space: SearchSpace) -> list[Pair]:
        return [(w, a) for w in space.weight_bits for a in space.act_bits]

    def to_json(self) -> dict:
        return {layer: {f"W{w}A{a}": value for (w, a), value in pairs.items()} for layer, pairs in self.scores.items()}


def measure_sensitivity(model: torch.nn.Module, space: SearchSpace, data: ValidationSet) -> Sensitivity:
    """The scores (module docstring) of every quantized layer at every (w, a) of `space`, on `data`'s images,
    on the device the model is on (the semantic task's loss)."""
    supernet = model.supernet
    largest = space.max_subnet()
    layers = supernet.quant_layers()
    pairs = [p for p in Sensitivity.pairs(space) if p != FLOAT]
    scores = {name: dict.fromkeys(Sensitivity.pairs(space), 0.0) for name in space.quant_layers}
    device = module_device(model)
    was_training = model.training
    model.eval()
    try:
        for images, masks in data.batches(largest.resolution, device):
            supernet.configure(space.uniform_bits(largest, *FLOAT))
            seen: dict[str, tuple[tuple, dict, torch.Tensor]] = {}

            def keep(name: str) -> Callable:
                def hook(_module, args, kwargs, output):
                    output.retain_grad()
                    seen[name] = (args, kwargs, output)
                return hook

            handles = [layers[name].register_forward_hook(keep(name), with_kwargs=True) for name in space.quant_layers]
            try:
                with torch.enable_grad():
                    loss = segmentation_loss(model(images, upsample=False).float(), masks, data.ignore_index)
                    loss.backward()
            finally:
                for handle in handles:
                    handle.remove()
            with torch.no_grad():
                for name, (args, kwargs, output) in seen.items():
                    layer, weight = layers[name], output.grad.float().square()
                    for pair in pairs:
                        layer.set_bits(*pair)
                        scores[name][pair] += 0.5 * float((weight * (layer(*args, **kwargs).float() - output).square()).sum())
                    layer.set_bits(*FLOAT)
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return Sensitivity(scores)


def solve(space: SearchSpace, group_scores: dict[str, dict[Pair, float]], base: Subnet,
          cost: Callable[[Subnet], float], limit: float) -> Subnet | None:
    """The Lagrangian solution (module docstring) on `base`'s architecture under `cost <= limit`, or None when
    even the cheapest choice of every group exceeds it."""
    groups = space.bit_groups()
    top = space.uniform_bits(base, max(space.weight_bits), max(space.act_bits))  # float where the space has it
    floor = cost(top)
    increase = {g: {pair: cost(set_group_bits(top, set(layers), pair)) - floor for pair in group_scores[g]}
                for g, layers in groups.items()}

    def choose(multiplier: float) -> tuple[dict[str, Pair], float]:
        chosen = {g: min(pairs, key=lambda p: (pairs[p] + multiplier * increase[g][p], increase[g][p]))
                  for g, pairs in group_scores.items()}
        return chosen, floor + sum(increase[g][p] for g, p in chosen.items())

    cheapest = floor + sum(min(costs.values()) for costs in increase.values())
    if cheapest > limit:
        return None
    low, high = 0.0, 1.0
    while choose(high)[1] > limit:  # a multiplier large enough that the cheapest choices win
        high *= 10
        if not math.isfinite(high):
            return None
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (low, middle) if choose(middle)[1] <= limit else (middle, high)
    chosen, _ = choose(high)
    subnet = top
    for g, pair in chosen.items():
        subnet = set_group_bits(subnet, set(groups[g]), pair)
    return subnet


def sensitivity_seed(space: SearchSpace, sensitivity: Sensitivity, budgets: Sequence[Budget],
                     cost_of: Callable[[Subnet], dict[str, float]]) -> Subnet | None:
    """A subnet meeting every budget from the scores: the largest architecture, solved under the first budget
    at the highest resolution where the solution meets them all; None where none does."""
    group_scores = sensitivity.group_scores(space)
    metric = budgets[0].metric
    for resolution in sorted(space.resolutions, reverse=True):
        base = replace(space.max_subnet(), resolution=resolution)
        subnet = solve(space, group_scores, base, lambda s: cost_of(s)[metric], budgets[0].limit)
        if subnet is not None and all(cost_of(subnet)[b.metric] <= b.limit for b in budgets):
            return subnet
    return None
