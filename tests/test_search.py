"""Evolutionary search (qsamc/search/evolution.py) with a cheap deterministic fitness: budgets, repair, determinism."""

import json
import random
from dataclasses import replace

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from qsamc.search.cost import BitopsCost, Budget, cheapest
from qsamc.errors import BudgetError, ConfigError
from qsamc.task.evaluate import Evaluation
from qsamc.ir.frontend import analysis_ir
from qsamc.search.evolution import EvolutionConfig, Searcher, budget_sets, default_ladder, evaluate_population, search
from qsamc.supernet.space import default_space
from qsamc.targets import get_target

SMALL = EvolutionConfig(population=12, top_k=4, mutations=6, crossovers=6, generations=3, seed=3)


def proxy_fitness(subnet):
    """Lower loss for more bits, larger resolution and wider MLPs: what a trained supernet roughly shows."""
    bits = sum(min(b.w, 8) + min(b.a, 8) for b in subnet.bits) / len(subnet.bits)
    loss = 10 / bits + 100 / subnet.resolution + 0.01 * sum(subnet.mlp_ratios) / len(subnet.mlp_ratios)
    return Evaluation(loss=loss, miou=1 / loss, pixel_accuracy=0.0)


@pytest.fixture(scope="module")
def vit_t():
    space = default_space("vit_t")
    return space, BitopsCost(analysis_ir(space), space)


def test_every_candidate_meets_its_budget(vit_t):
    space, bitops = vit_t
    budget = Budget("bitops", 20e9)
    searcher = Searcher(space, [bitops], proxy_fitness, SMALL)
    result = searcher.evolve([budget])
    assert searcher.cache and all(c.costs["bitops"] <= budget.limit for c in searcher.cache.values())
    assert result.best.costs["bitops"] <= budget.limit
    assert result.history == sorted(result.history, reverse=True)  # top-k is kept: never gets worse


def test_several_budgets_each_hold_and_share_the_cache(vit_t):
    space, bitops = vit_t
    budgets = [Budget("bitops", 10e9), Budget("bitops", 40e9), Budget("bitops", 150e9)]
    result = search(space, [bitops], proxy_fitness, budgets, SMALL)
    assert [r.budgets for r in result.results] == [(b,) for b in budgets]
    for r in result.results:
        assert r.best.costs["bitops"] <= r.budgets[0].limit
    losses = [r.best.evaluation.loss for r in result.results]
    assert losses == sorted(losses, reverse=True)  # a looser budget never finds a worse subnet here
    assert len({c.subnet for c in result.candidates}) == len(result.candidates) == result.evaluations


def test_each_budgets_answer_is_the_best_evaluated_subnet_that_meets_it_whatever_the_order(vit_t):
    space, bitops = vit_t
    floor = space.canonical(cheapest(space, bitops))

    def fitness(subnet):  # the cheapest subnet is the best of all: only the tightest budget's search meets it
        return replace(proxy_fitness(subnet), loss=-1.0) if space.canonical(subnet) == floor else proxy_fitness(subnet)

    budgets = [Budget("bitops", 150e9), Budget("bitops", 40e9), Budget("bitops", bitops.cost(floor))]  # loosest first
    result = search(space, [bitops], fitness, budgets, SMALL)
    for r in result.results:
        fitting = [c.evaluation.loss for c in result.candidates if c.costs["bitops"] <= r.budgets[0].limit]
        assert r.best.evaluation.loss == min(fitting) and r.best.costs["bitops"] <= r.budgets[0].limit
    assert [r.best.subnet for r in result.results] == [floor] * 3  # found last, the answer of every budget


def test_pareto_front_is_non_dominated(vit_t):
    space, bitops = vit_t
    result = search(space, [bitops], proxy_fitness, [Budget("bitops", 30e9), Budget("bitops", 100e9)], SMALL)
    front = result.pareto_front("bitops")
    for c in front:
        assert not any(o.costs["bitops"] <= c.costs["bitops"] and o.evaluation.loss < c.evaluation.loss
                       for o in result.candidates)


def test_search_is_deterministic_for_a_seed(vit_t):
    space, bitops = vit_t
    budgets = [Budget("bitops", 25e9)]
    first = search(space, [bitops], proxy_fitness, budgets, SMALL)
    again = search(space, [bitops], proxy_fitness, budgets, SMALL)
    other = search(space, [bitops], proxy_fitness, budgets, EvolutionConfig(**{**SMALL.__dict__, "seed": 4}))
    assert [c.subnet for c in first.candidates] == [c.subnet for c in again.candidates]
    assert [c.subnet for c in first.candidates] != [c.subnet for c in other.candidates]


def test_evaluations_are_cached_per_canonical_subnet(vit_t):
    space, bitops = vit_t
    calls = []
    searcher = Searcher(space, [bitops], lambda s: calls.append(s) or proxy_fitness(s), SMALL)
    shallow = space.min_subnet()
    active = set(space.active_blocks(shallow.depths))
    # Differs only in the MLP ratios of dropped blocks: the same network.
    variant = replace(shallow, mlp_ratios=tuple(r if i in active else 3.5 for i, r in enumerate(shallow.mlp_ratios)))
    assert variant != shallow
    searcher.evaluate([shallow, variant, shallow])
    assert len(calls) == 1


def test_repaired_candidate_is_legal_for_the_restricted_space(vit_t):
    space, _ = vit_t
    target = get_target("a100")
    restricted = target.restrict_space(space)
    bitops = BitopsCost(analysis_ir(restricted), restricted)
    budget = Budget("bitops", 15e9)
    searcher = Searcher(restricted, [bitops], proxy_fitness, SMALL)
    fallback = searcher.check_budgets([budget])
    rng = random.Random(0)
    over = [s for s in (restricted.sample(rng) for _ in range(20)) if bitops.cost(s) > budget.limit]
    assert len(over) > 10
    for big in over:
        repaired = searcher.legalize(big, [budget], fallback)
        assert restricted.validate(repaired) is repaired
        assert {b.a for b in repaired.bits} <= {8, 32} and {b.w for b in repaired.bits} <= {4, 8, 32}
        assert bitops.cost(repaired) <= budget.limit


def test_budget_below_the_cheapest_subnet_names_the_cheapest_cost(vit_t):
    space, bitops = vit_t
    low = bitops.cost(cheapest(space, bitops))
    with pytest.raises(BudgetError) as info:
        search(space, [bitops], proxy_fitness, [Budget("bitops", 1e9)], SMALL)
    assert str(info.value) == (f"no vit_t subnet meets the bitops budget 1G: the cheapest achievable is "
                               f"{Budget('bitops', low)}")


def test_budget_for_a_metric_without_a_cost_model(vit_t):
    space, bitops = vit_t
    with pytest.raises(BudgetError, match="needs the latency cost model"):
        search(space, [bitops], proxy_fitness, [Budget("latency", 0.01)], SMALL)


def test_random_search_uses_the_same_number_of_evaluations(vit_t):
    space, bitops = vit_t
    evolution = search(space, [bitops], proxy_fitness, [Budget("bitops", 30e9)], SMALL)
    baseline = search(space, [bitops], proxy_fitness, [Budget("bitops", 30e9)], SMALL, method="random",
                      evaluations=evolution.evaluations)
    assert baseline.evaluations == evolution.evaluations
    assert all(c.costs["bitops"] <= 30e9 for c in baseline.candidates)


def test_budget_sets_combine_metrics():
    b1, b2, l1 = Budget("bitops", 1e12), Budget("bitops", 2e12), Budget("latency", 0.04)
    assert budget_sets([b1, l1, b2]) == [(b1, l1), (b2, l1)]


def test_default_ladder_lies_between_min_and_max(vit_t):
    space, bitops = vit_t
    ladder = default_ladder(space, bitops)
    low, high = bitops.cost(space.min_subnet()), bitops.cost(space.max_subnet())
    assert len(ladder) == 5 and all(low < b.limit < high for b in ladder)
    assert [b.limit for b in ladder] == sorted(b.limit for b in ladder)


def test_config_rejects_nonsense():
    with pytest.raises(ConfigError):
        EvolutionConfig(mutation_prob=1.5)
    with pytest.raises(ConfigError):
        EvolutionConfig(objective="accuracy")


def _rank(rank: int, world: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    space = default_space("vit_t")
    subnets = [space.sample(random.Random(i)) for i in range(5)]
    seen = []
    results = evaluate_population(lambda s: seen.append(s) or proxy_fitness(s), subnets)
    queue.put((rank, len(seen), [r.loss for r in results]))
    dist.destroy_process_group()


def test_population_evaluation_splits_across_gloo_ranks():
    port = 29500 + random.Random().randrange(2000)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    procs = [context.Process(target=_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    reports = sorted(queue.get() for _ in procs)
    space = default_space("vit_t")
    expected = [proxy_fitness(space.sample(random.Random(i))).loss for i in range(5)]
    assert [r[1] for r in reports] == [3, 2]  # rank 0 evaluates 0, 2, 4; rank 1 evaluates 1, 3
    assert reports[0][2] == reports[1][2] == expected


def test_uniform_seeds_are_the_largest_fitting_uniform_subnets_costliest_first(vit_t):
    space, bitops = vit_t
    w8a8 = space.uniform_bits(space.max_subnet(), 8, 8)
    budget = Budget("bitops", bitops.cost(w8a8))
    searcher = Searcher(space, [bitops], proxy_fitness, SMALL)
    seeds = searcher.uniform_seeds([budget])
    assert seeds[0] == space.canonical(w8a8)
    assert len(seeds) == len(set(seeds)) and all(searcher.fits(s, [budget]) for s in seeds)
    costs = [bitops.cost(s) for s in seeds]
    assert costs == sorted(costs, reverse=True)
    for seed in seeds:
        assert len({(b.w, b.a) for b in seed.bits}) == 1 and seed.depths == space.max_subnet().depths
        higher = [r for r in space.resolutions if r > seed.resolution]  # the highest resolution that fits
        assert not higher or not searcher.fits(replace(seed, resolution=higher[0]), [budget])
    # W8A8 under its own budget: the search never ends worse than the uniform subnet it was seeded with.
    result = searcher.evolve([budget])
    assert result.best.evaluation.loss <= proxy_fitness(w8a8).loss


def test_evolution_config_round_trips_through_json():
    config = EvolutionConfig(population=12, top_k=3, objective="miou", seed=4, uniform_seeds=False)
    assert EvolutionConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    with pytest.raises(ConfigError, match=r"^unknown evolution setting 'populaton'; known settings are crossovers, "):
        EvolutionConfig.from_json({**config.to_json(), "populaton": 3})
    with pytest.raises(ConfigError, match=r"^objective must be one of loss, miou, ap, fidelity, auto, got 'speed'$"):
        EvolutionConfig.from_json({**config.to_json(), "objective": "speed"})


class _MixFavouringFitness:
    """proxy_fitness with every mixed-precision subnet a whole unit of loss better, so evolution ends on a mix,
    and a `compare` whose interval's lower bound the test sets (what SubnetFitness computes on real images)."""

    def __init__(self, low: float) -> None:
        self.low, self.compared = low, []

    def __call__(self, subnet):
        base = proxy_fitness(subnet)
        mixed = len({(b.w, b.a) for b in subnet.bits}) > 1
        return replace(base, loss=base.loss - (1.0 if mixed else 0.0))

    def compare(self, a, b):
        from qsamc.task.intervals import Interval

        self.compared.append((a, b))
        return Interval(0.01, self.low, 0.02, 100)


@pytest.mark.parametrize("low, kept", [(-0.001, True), (0.0, True), (0.001, False)])
def test_the_uniform_guard_keeps_the_best_uniform_subnet_unless_a_mix_wins_beyond_noise(vit_t, low, kept):
    space, bitops = vit_t
    budget = Budget("bitops", 30e9)
    fitness = _MixFavouringFitness(low)
    searcher = Searcher(space, [bitops], fitness, replace(SMALL, uniform_guard=True))
    result = searcher.evolve([budget])
    uniform = [searcher.cache[s] for s in searcher.uniform_seeds([budget]) if s in searcher.cache]
    incumbent = min(uniform, key=lambda c: c.evaluation.loss).subnet  # the best-scoring uniform seed
    (mixed, compared_with), = fitness.compared
    assert compared_with == incumbent and len({(b.w, b.a) for b in mixed.bits}) > 1
    assert result.guard == {"miou_difference_to_uniform": 0.01, "low": low, "high": 0.02, "kept_uniform": kept}
    assert result.best.subnet == (incumbent if kept else mixed)
    # Off (the default), no comparison runs and the mix stands.
    plain = Searcher(space, [bitops], _MixFavouringFitness(low), SMALL).evolve([budget])
    assert plain.guard is None and plain.best.subnet == mixed
