"""Evolutionary search for the best subnet under a cost budget (paper Eq. 2, AutoFormer's evolution).

    a* = argmin_a  mean validation loss of subnet a   s.t.  cost_m(a) <= tau_m  for every constraint m

Runs after training, before export. Each generation keeps the top-k subnets seen so far and breeds the
next population from them by mutation (each choice resampled with probability p) and uniform crossover
(each choice from either parent). A child that breaks a budget is repaired by shrinking one random
choice at a time; if that fails it is resampled; it is never kept over budget. Evaluations are cached
per canonical subnet, so a subnet met twice (or under several budgets) is evaluated once; each
budget's search starts from the best subnets already evaluated that meet it, and each budget's answer is
the best subnet evaluated under any budget that meets it (in whatever order the budgets came); the whole
search is a function of its seed. `random_search` is the baseline at the same number of evaluations.

Fitness is any callable subnet -> `Evaluation` (`SubnetFitness` evaluates a supernet on a validation
set); under torchrun the population's evaluations are split across ranks (`evaluate_population`).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Sequence

import torch
import torch.distributed as dist

from qsamc.search.cost import Budget, CostModel, cheapest, format_cost, set_group_bits
from qsamc.errors import BudgetError, ConfigError
from qsamc.search.sensitivity import Sensitivity, sensitivity_seed
from qsamc.task.evaluate import Evaluation, ReferencePredictions, ValidationSet, evaluate_subnet
from qsamc.task.intervals import Interval, paired_bootstrap
from qsamc.supernet.space import SearchSpace, Subnet
from qsamc.threads import adapt as adapt_threads

Fitness = Callable[[Subnet], Evaluation]
Objective = Literal["loss", "miou", "ap", "fidelity", "auto"]
# `auto` (qsamc search's default) is resolved per run before a search starts (`qsamc.pipeline.search_objective`).
OBJECTIVES = ("loss", "miou", "ap", "fidelity", "auto")
# The objectives each task has: validation loss (the paper's proxy) or its own metric; for a semantic run
# also fidelity, the per-pixel KL from the FP32 reference's predictions (over the labelled pixels, their
# classes unused).
TASK_OBJECTIVES = {"semantic": ("loss", "miou", "fidelity"), "instance": ("loss", "ap")}
LOWER_IS_BETTER = ("loss", "fidelity")


@dataclass(frozen=True)
class EvolutionConfig:
    """AutoFormer's defaults; 5 generations as in the paper."""

    population: int = 50
    top_k: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.2
    generations: int = 5
    objective: Objective = "loss"
    seed: int = 0
    # A child that repeats a subnet already seen is redrawn this many times before it is accepted as is.
    fresh_tries: int = 10
    # Shrinking steps tried on an over-budget child before it is resampled.
    repair_steps: int = 50
    # Start up to half the first population from uniform-precision subnets: for each (w, a) pair the
    # largest architecture at the highest resolution that meets the budgets (the precisions runtimes
    # deploy, and the largest-that-fits starting points OFA and BigNAS use), costliest first. A random
    # subnet of a mixed space is mostly low-bit, and a few generations rarely climb back from there.
    uniform_seeds: bool = True
    # Also start from the subnet that per-layer sensitivity (AutoQuantize's gradient scores, measured on the
    # search images) and a budgeted solve pick (`qsamc.search.sensitivity`), where the caller measured them.
    sensitivity_seed: bool = True
    # Keep the best uniform-precision subnet under a budget (the best-scoring uniform seed) unless search's
    # best, a mix, beats it on the search images' mIoU with a paired bootstrap 95% interval above zero: a mix
    # is deployed only where the search split shows it better beyond its noise (semantic task;
    # `SubnetFitness.compare`). Off by default: measured on one fold only (docs/benchmarks.md).
    uniform_guard: bool = False

    def __post_init__(self) -> None:
        if min(self.population, self.top_k, self.generations) < 1 or min(self.mutations, self.crossovers) < 0:
            raise ConfigError("population, top-k and generations must be positive and mutations/crossovers not negative")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise ConfigError(f"mutation probability must lie in [0, 1], got {self.mutation_prob}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got '{self.objective}'")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvolutionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown evolution setting '{unknown[0]}'; known settings are {', '.join(sorted(known))}")
        return cls(**data)


@dataclass(frozen=True)
class Candidate:
    """One evaluated subnet: its costs under every cost model of the search, and its metrics."""

    subnet: Subnet
    costs: dict[str, float]
    evaluation: Evaluation

    def score(self, objective: Objective) -> float:
        """Lower is better."""
        return self.value(objective) if objective in LOWER_IS_BETTER else -self.value(objective)

    def value(self, objective: Objective) -> float:
        """The objective's own value (validation loss, mIoU, mask AP or fidelity), as it is reported."""
        return getattr(self.evaluation, objective)


@dataclass
class BudgetResult:
    budgets: tuple[Budget, ...]
    best: Candidate
    history: list[float]  # best score after each generation
    # `EvolutionConfig.uniform_guard`: the best mixed and uniform candidates' mIoU difference on the search
    # images with its interval, and whether the uniform one was kept; None where no guard ran.
    guard: dict[str, Any] | None = None


@dataclass
class SearchResult:
    candidates: list[Candidate]  # every evaluated subnet, in evaluation order
    results: list[BudgetResult]
    config: EvolutionConfig
    evaluations: int = field(init=False)
    scored_on: str = ""  # which images scored the candidates (set by `qsamc.pipeline.run_search`)
    scored_against: str = ""  # objective fidelity: the model whose predictions it measures against

    def __post_init__(self) -> None:
        self.evaluations = len(self.candidates)

    @property
    def objective(self) -> Objective:
        return self.config.objective

    def pareto_front(self, metric: str) -> list[Candidate]:
        """Candidates that no other candidate beats on both `metric` and the objective."""
        front, best = [], float("inf")
        for c in sorted(self.candidates, key=lambda c: (c.costs[metric], c.score(self.objective))):
            if c.score(self.objective) < best:
                front.append(c)
                best = c.score(self.objective)
        return front


class SubnetFitness:
    """Validation loss, mIoU and pixel accuracy of a subnet of a trained supernet (no gradients); with
    `reference`, the reference's predictions on the same images, also fidelity."""

    def __init__(self, model: torch.nn.Module, data: ValidationSet, reference: ReferencePredictions | None = None) -> None:
        self.model, self.data, self.reference = model, data, reference

    def __call__(self, subnet: Subnet) -> Evaluation:
        adapt_threads()
        return evaluate_subnet(self.model, subnet, self.data, reference=self.reference)

    def compare(self, a: Subnet, b: Subnet) -> Interval | None:
        """mIoU(a) - mIoU(b) on the search images with its paired bootstrap interval (None: no mIoU here)."""
        if self.data.task != "semantic":
            return None
        adapt_threads()
        a_eval, b_eval = (evaluate_subnet(self.model, s, self.data, per_image=True) for s in (a, b))
        return paired_bootstrap(a_eval.image_confusions, b_eval.image_confusions)


def evaluate_population(fitness: Fitness, subnets: Sequence[Subnet]) -> list[Evaluation]:
    """Evaluate `subnets`; under torch.distributed each rank takes every world-th one, then all gather.

    Every rank runs the same seeded search, so all ranks ask for the same list in the same order.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [fitness(s) for s in subnets]
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [(i, fitness(subnets[i])) for i in range(rank, len(subnets), world)]
    gathered: list[list[tuple[int, Evaluation]] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    results: list[Evaluation | None] = [None] * len(subnets)
    for part in gathered:
        for i, evaluation in part:
            results[i] = evaluation
    return results  # type: ignore[return-value]


class Searcher:
    """The shared state of one search run: space, cost models, fitness, evaluation cache, rng."""

    def __init__(self, space: SearchSpace, costs: Sequence[CostModel], fitness: Fitness,
                 config: EvolutionConfig = EvolutionConfig(), sensitivity: Sensitivity | None = None) -> None:
        if config.objective == "auto":
            raise ConfigError("objective auto is chosen per run: resolve it first (qsamc.pipeline.search_objective)")
        self.space, self.fitness, self.config, self.sensitivity = space, fitness, config, sensitivity
        self.costs = {c.name: c for c in costs}
        self.rng = random.Random(config.seed)
        self.cache: dict[Subnet, Candidate] = {}
        self._cost_cache: dict[Subnet, dict[str, float]] = {}
        self._groups = [set(layers) for layers in space.bit_groups().values()]
        self._attention_groups = list(space.attention_groups().values())  # empty: attention is float

    # --- costs and budgets ------------------------------------------------------------------------
    def cost_of(self, subnet: Subnet) -> dict[str, float]:
        key = self.space.canonical(subnet)
        if key not in self._cost_cache:
            self._cost_cache[key] = {name: model.cost(key) for name, model in self.costs.items()}
        return self._cost_cache[key]

    def fits(self, subnet: Subnet, budgets: Sequence[Budget]) -> bool:
        costs = self.cost_of(subnet)
        return all(costs[b.metric] <= b.limit for b in budgets)

    def check_budgets(self, budgets: Sequence[Budget]) -> Subnet:
        """The cheapest subnet that meets all `budgets`; one sentence naming the cheapest cost if none does."""
        for b in budgets:
            if b.metric not in self.costs:
                raise BudgetError(f"a {b.metric} budget ({b}) needs the {b.metric} cost model, which this search does not use")
        floor = {b.metric: cheapest(self.space, self.costs[b.metric]) for b in budgets}
        for b in budgets:
            low = self.cost_of(floor[b.metric])[b.metric]
            if low > b.limit:
                raise BudgetError(
                    f"no {self.space.model} subnet meets the {b.metric} budget {b}: the cheapest achievable is "
                    f"{format_cost(b.metric, low)}"
                )
        legal = next((s for s in floor.values() if self.fits(s, budgets)), None)
        if legal is None:
            raise BudgetError(
                f"no {self.space.model} subnet found that meets the budgets {', '.join(map(str, budgets))} together"
            )
        return legal

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, subnets: Sequence[Subnet]) -> list[Candidate]:
        keys = [self.space.canonical(s) for s in subnets]
        fresh = list(dict.fromkeys(k for k in keys if k not in self.cache))
        for key, evaluation in zip(fresh, evaluate_population(self.fitness, fresh)):
            self.cache[key] = Candidate(key, self.cost_of(key), evaluation)
        return [self.cache[k] for k in keys]

    # --- variation --------------------------------------------------------------------------------
    def _resample_choices(self, subnet: Subnet, prob: float) -> Subnet:
        space, rng = self.space, self.rng
        resolution = rng.choice(space.resolutions) if rng.random() < prob else subnet.resolution
        depths = tuple(rng.choice(c) if rng.random() < prob else d for d, c in zip(subnet.depths, space.depth_choices))
        ratios = tuple(rng.choice(space.mlp_ratios) if rng.random() < prob else r for r in subnet.mlp_ratios)
        child = replace(subnet, resolution=resolution, depths=depths, mlp_ratios=ratios)
        for layers in self._groups:
            first = child.bits_of(next(iter(layers)))
            w = rng.choice(space.weight_bits) if rng.random() < prob else first.w
            a = rng.choice(space.act_bits) if rng.random() < prob else first.a
            child = set_group_bits(child, layers, (w, a))
        for blocks in self._attention_groups:
            if rng.random() < prob:
                child = space.set_attention(child, blocks, rng.choice(space.attention_bits))
        return child

    def mutate(self, parent: Subnet) -> Subnet:
        return self._resample_choices(parent, self.config.mutation_prob)

    def crossover(self, a: Subnet, b: Subnet) -> Subnet:
        """Uniform crossover: each choice (and each bit group as a whole) from either parent."""
        rng = self.rng
        pick = lambda x, y: x if rng.random() < 0.5 else y  # noqa: E731
        child = replace(
            a,
            resolution=pick(a.resolution, b.resolution),
            depths=tuple(pick(x, y) for x, y in zip(a.depths, b.depths)),
            mlp_ratios=tuple(pick(x, y) for x, y in zip(a.mlp_ratios, b.mlp_ratios)),
        )
        for layers in self._groups:
            donor = pick(a, b).bits_of(next(iter(layers)))
            child = set_group_bits(child, layers, (donor.w, donor.a))
        for blocks in self._attention_groups:
            child = self.space.set_attention(child, blocks, pick(a, b).attention_of(blocks[0]))
        return child

    def shrink(self, subnet: Subnet) -> Subnet:
        """One random choice moved one step down (resolution, a stage depth, an MLP ratio, or bits)."""
        space, rng = self.space, self.rng
        lower = lambda value, choices: max((c for c in choices if c < value), default=value)  # noqa: E731
        kind = rng.choice(("resolution", "depth", "ratio", "bits", *(("attention",) if self._attention_groups else ())))
        if kind == "resolution":
            return replace(subnet, resolution=lower(subnet.resolution, space.resolutions))
        if kind == "depth":
            s = rng.randrange(len(subnet.depths))
            depths = list(subnet.depths)
            depths[s] = lower(depths[s], space.depth_choices[s])
            return replace(subnet, depths=tuple(depths))
        if kind == "ratio":
            block = rng.choice(space.active_blocks(subnet.depths))
            ratios = list(subnet.mlp_ratios)
            ratios[block] = lower(ratios[block], space.mlp_ratios)
            return replace(subnet, mlp_ratios=tuple(ratios))
        if kind == "attention":
            blocks = rng.choice(self._attention_groups)
            return space.set_attention(subnet, blocks, lower(subnet.attention_of(blocks[0]), space.attention_bits))
        layers = rng.choice(self._groups)
        bits = subnet.bits_of(next(iter(layers)))
        pair = (lower(bits.w, space.weight_bits), bits.a) if rng.random() < 0.5 else (bits.w, lower(bits.a, space.act_bits))
        return set_group_bits(subnet, layers, pair)

    def uniform_seeds(self, budgets: Sequence[Budget]) -> list[Subnet]:
        """Per (w, a) pair (and attention bits, where they are a choice), the largest architecture at the
        highest resolution meeting `budgets`; costliest first, ties to the more balanced pair (see
        `EvolutionConfig.uniform_seeds`)."""
        space, largest, metric = self.space, self.space.max_subnet(), budgets[0].metric
        seeds = []
        for w in sorted(space.weight_bits, reverse=True):
            for a in sorted(space.act_bits, reverse=True):
                for t in sorted(space.attention_bits, reverse=True):
                    for resolution in sorted(space.resolutions, reverse=True):
                        uniform = space.uniform_attention(space.uniform_bits(replace(largest, resolution=resolution), w, a), t)
                        subnet = space.canonical(uniform)
                        if self.fits(subnet, budgets):
                            seeds.append(subnet)
                            break
        unique = list(dict.fromkeys(seeds))
        # Ties (W32A2 costs the BitOPs of W8A8) go to the balanced pair, the one runtimes deploy.
        return sorted(unique, key=lambda s: (-self.cost_of(s)[metric], -min(s.bits[0].w, s.bits[0].a)))

    def legalize(self, subnet: Subnet, budgets: Sequence[Budget], fallback: Subnet) -> Subnet:
        """`subnet` if it meets the budgets, else a repaired one, else a fresh sample, else `fallback`."""
        if self.fits(subnet, budgets):
            return subnet
        for _ in range(self.config.repair_steps):
            subnet = self.shrink(subnet)
            if self.fits(subnet, budgets):
                return subnet
        for _ in range(self.config.repair_steps):
            subnet = self.space.sample(self.rng)
            if self.fits(subnet, budgets):
                return subnet
        return fallback

    def _children(self, make: Callable[[], Subnet], count: int, budgets, fallback, seen: set[Subnet]) -> list[Subnet]:
        """`count` legal children, each redrawn a few times if it repeats a subnet already seen."""
        out = []
        for _ in range(count):
            for _ in range(self.config.fresh_tries):
                child = self.space.canonical(self.legalize(make(), budgets, fallback))
                if child not in seen:
                    break
            seen.add(child)
            out.append(child)
        return out

    # --- the two searches ---------------------------------------------------------------------------
    def evolve(self, budgets: Sequence[Budget], on_generation: Callable[[int, float], None] | None = None,
               finish: bool = True) -> BudgetResult:
        """Evolution under `budgets`; `finish`: then `finish` its result (`search` finishes every budget set's
        once all have run)."""
        cfg, rng, objective = self.config, self.rng, self.config.objective
        fallback = self.check_budgets(budgets)
        seen: set[Subnet] = set()
        seeds = self.uniform_seeds(budgets)[: cfg.population // 2] if cfg.uniform_seeds else []
        if self.sensitivity is not None and cfg.sensitivity_seed:
            seeded = sensitivity_seed(self.space, self.sensitivity, budgets, self.cost_of)
            if seeded is not None:
                seeds = list(dict.fromkeys([self.space.canonical(seeded), *seeds]))[: max(cfg.population // 2, 1)]
        seen.update(seeds)
        population = seeds + self._children(lambda: self.space.sample(rng), cfg.population - len(seeds), budgets,
                                            fallback, seen)
        # Subnets already evaluated under other budgets that meet these ones are parents for free.
        top = [c for c in self.cache.values() if self.fits(c.subnet, budgets)]
        history = []
        for generation in range(cfg.generations):
            evaluated = self.evaluate(population)
            pool = {c.subnet: c for c in top + evaluated}.values()
            top = sorted(pool, key=lambda c: (c.score(objective), c.costs[budgets[0].metric]))[: cfg.top_k]
            history.append(top[0].score(objective))
            if on_generation is not None:
                on_generation(generation, top[0].value(objective))
            if generation + 1 == cfg.generations:
                break
            parents = [c.subnet for c in top]
            population = (
                self._children(lambda: self.mutate(rng.choice(parents)), cfg.mutations, budgets, fallback, seen)
                + self._children(lambda: self.crossover(rng.choice(parents), rng.choice(parents)),
                                 cfg.crossovers, budgets, fallback, seen)
            )
        result = BudgetResult(tuple(budgets), top[0], history)
        return self.finish(result) if finish else result

    def finish(self, result: BudgetResult) -> BudgetResult:
        """The best subnet evaluated so far that meets the result's budgets (another budget's search may have
        met them with a better one: a looser budget never ends worse than a tighter one of the same run), then
        the uniform guard where configured."""
        objective, metric = self.config.objective, result.budgets[0].metric
        fitting = [c for c in self.cache.values() if self.fits(c.subnet, result.budgets)]
        best = min(fitting, key=lambda c: (c.score(objective), c.costs[metric]), default=result.best)
        guard = None
        if self.config.uniform_guard:
            best, guard = self.guarded(best, result.budgets)
        return replace(result, best=best, guard=guard)

    def guarded(self, best: Candidate, budgets: Sequence[Budget]) -> tuple[Candidate, dict[str, Any] | None]:
        """`EvolutionConfig.uniform_guard`: `best`, or the best-scoring evaluated uniform seed under `budgets`
        where `best` is a mix that does not beat it beyond the search images' paired bootstrap noise."""
        uniform = [self.cache[s] for s in self.uniform_seeds(budgets) if s in self.cache]
        compare = getattr(self.fitness, "compare", None)
        if not uniform or compare is None or best.subnet in {c.subnet for c in uniform}:
            return best, None
        incumbent = min(uniform, key=lambda c: (c.score(self.config.objective), -c.costs[budgets[0].metric]))
        interval = compare(best.subnet, incumbent.subnet)
        if interval is None:
            return best, None
        kept = interval.low <= 0
        return (incumbent if kept else best), {
            "miou_difference_to_uniform": interval.difference, "low": interval.low, "high": interval.high,
            "kept_uniform": kept}

    def random_search(self, budgets: Sequence[Budget], evaluations: int) -> BudgetResult:
        """The best of `evaluations` random subnets, made legal as evolution's children are."""
        fallback = self.check_budgets(budgets)
        seen: set[Subnet] = set()
        subnets = self._children(lambda: self.space.sample(self.rng), evaluations, budgets, fallback, seen)
        best = min(self.evaluate(subnets), key=lambda c: c.score(self.config.objective))
        return BudgetResult(tuple(budgets), best, [best.score(self.config.objective)])


def budget_sets(budgets: Sequence[Budget]) -> list[tuple[Budget, ...]]:
    """One constraint set per combination of the budgets of each metric, e.g. [150T, 200T] x [40ms]."""
    by_metric: dict[str, list[Budget]] = {}
    for b in budgets:
        by_metric.setdefault(b.metric, []).append(b)
    return [tuple(combo) for combo in itertools.product(*by_metric.values())]


def search(space: SearchSpace, costs: Sequence[CostModel], fitness: Fitness, budgets: Sequence[Budget],
           config: EvolutionConfig = EvolutionConfig(), method: Literal["evolution", "random"] = "evolution",
           evaluations: int | None = None,
           on_generation: Callable[[int, int, float], None] | None = None,
           sensitivity: Sensitivity | None = None) -> SearchResult:
    """Search under every budget set (a Pareto front when there are several), sharing one cache.
    `on_generation(budget set, generation, best objective value)` follows the progress (the value is
    the validation loss or the mIoU, as the objective reads). `sensitivity`: per-layer scores that seed
    each budget set's first population (`EvolutionConfig.sensitivity_seed`).

    `method="random"` draws `evaluations` random legal subnets per budget set instead.
    """
    searcher = Searcher(space, costs, fitness, config, sensitivity)
    sets = budget_sets(budgets)
    for s in sets:  # fail on an impossible budget before any evaluation
        searcher.check_budgets(s)
    results = []
    for index, s in enumerate(sets):
        if method == "random":
            results.append(searcher.random_search(s, evaluations or config.population * config.generations))
        else:
            callback = None if on_generation is None else (lambda g, best, i=index: on_generation(i, g, best))
            results.append(searcher.evolve(s, callback, finish=False))
    if method == "evolution":
        results = [searcher.finish(r) for r in results]
    return SearchResult(list(searcher.cache.values()), results, config)


def default_ladder(space: SearchSpace, model: CostModel, steps: int = 5) -> list[Budget]:
    """`steps` budgets spaced geometrically between the cheapest and the largest subnet (both excluded)."""
    low, high = model.cost(cheapest(space, model)), model.cost(space.max_subnet())
    ratio = (high / low) ** (1 / (steps + 1))
    return [Budget(model.name, low * ratio ** (i + 1)) for i in range(steps)]
