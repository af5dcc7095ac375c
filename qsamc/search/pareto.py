"""What `qsamc search` writes: the best subnet per budget, `pareto.json` and the Pareto plot.

The last step of search. Subnet files are the JSON that `qsamc export --subnet` reads; `pareto.json`
records every evaluated candidate with its costs, the containers the target deploys each live layer
in, and its validation metrics, so a front can be re-plotted or re-ranked without re-evaluating.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from qsamc.fileio import save_figure
from qsamc.search.cost import CostModel
from qsamc.search.evolution import Candidate, SearchResult
from qsamc.supernet.space import SearchSpace, Subnet
from qsamc.units import si_prefix

if TYPE_CHECKING:
    from qsamc.targets import Target

PARETO_FORMAT = "qsamc.pareto"
PARETO_VERSION = 1
OBJECTIVE_LABELS = {"loss": "validation loss", "miou": "validation mIoU", "ap": "validation mask AP",
                    "fidelity": "KL from the reference's predictions"}


def deployed_precisions(space: SearchSpace, target: Target, subnet: Subnet) -> dict[str, str]:
    """Each live quantized layer: its searched grid and the target's containers, e.g. 'W3A8 -> int8xint8'."""
    active = set(space.active_blocks(subnet.depths))
    out = {}
    for b in subnet.bits:
        in_block = b.layer.startswith("blocks.")
        if in_block and int(b.layer.split(".")[1]) not in active:
            continue
        kernel = target.deployment.deploy(b.w, b.a, "linear" if in_block else "conv").kernel
        out[b.layer] = f"W{b.w}A{b.a} -> {kernel}"
    return out


def is_search_file(name: str) -> bool:
    """Whether `name` is a file `qsamc search` (or the quickstart's choice of subnet) writes."""
    return name in ("pareto.json", "pareto.png", "quickstart-subnet.json") or (
        name.startswith("best-") and name.endswith(".json"))


def best_name(budgets: Sequence[Any]) -> str:
    return "best-" + "-".join(str(b) for b in budgets) + ".json"


def _candidate_json(c: Candidate, space: SearchSpace, target: Target) -> dict[str, Any]:
    return {"subnet": c.subnet.to_json(), "costs": c.costs,
            "deployed": deployed_precisions(space, target, c.subnet),
            **c.evaluation.metrics()}


def write_search(result: SearchResult, space: SearchSpace, target: Target, costs: Sequence[CostModel],
                 out: Path) -> list[Path]:
    """Best subnet per budget set, pareto.json and pareto.png under `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    index = {id(c): i for i, c in enumerate(result.candidates)}
    best = []
    for r in result.results:
        path = out / best_name(r.budgets)
        r.best.subnet.save(path)
        written.append(path)
        best.append({"budgets": [str(b) for b in r.budgets], "subnet_file": path.name,
                     "candidate": index[id(r.best)], "history": r.history,
                     **({"uniform_guard": r.guard} if r.guard is not None else {})})
    metrics = [c.name for c in costs]
    data = {
        "format": PARETO_FORMAT, "version": PARETO_VERSION, "model": space.model, "target": target.name,
        "deployment": target.deployment.name, "objective": result.objective, "scored_on": result.scored_on,
        **({"scored_against": result.scored_against} if result.scored_against else {}),
        "evolution": result.config.to_json(),
        "space": space.to_json(),
        "cost_models": {c.name: c.description for c in costs}, "evaluations": result.evaluations,
        "best": best,
        "front": {m: [index[id(c)] for c in result.pareto_front(m)] for m in metrics},
        "candidates": [_candidate_json(c, space, target) for c in result.candidates],
    }
    (out / "pareto.json").write_text(json.dumps(data, indent=1) + "\n")
    written.append(out / "pareto.json")
    written.append(plot_pareto(result, costs, out / "pareto.png"))
    return written


def plot_pareto(result: SearchResult, costs: Sequence[CostModel], path: Path) -> Path:
    """One panel per cost metric: every candidate, the front, each budget and its best subnet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objective = result.objective
    score = lambda c: c.value(objective)  # noqa: E731
    fig, axes = plt.subplots(1, len(costs), figsize=(6 * len(costs), 4.5), squeeze=False)
    for ax, model in zip(axes[0], costs):
        m = model.name
        top = max(c.costs[m] for c in result.candidates)
        if m == "latency":
            scale, unit = 1e-3, "ms"
        else:
            unit, scale = si_prefix(top)
        ax.scatter([c.costs[m] / scale for c in result.candidates], [score(c) for c in result.candidates],
                   s=8, alpha=0.35, color="grey", label="evaluated")
        front = result.pareto_front(m)
        ax.plot([c.costs[m] / scale for c in front], [score(c) for c in front], "-o", ms=3, color="C0",
                label="Pareto front")
        for i, r in enumerate(result.results):
            limit = next((b.limit for b in r.budgets if b.metric == m), None)
            if limit is not None:
                ax.axvline(limit / scale, ls="--", lw=0.8, color=f"C{1 + i % 8}")
            ax.scatter([r.best.costs[m] / scale], [score(r.best)], marker="*", s=140, color=f"C{1 + i % 8}",
                       zorder=3, label=f"best under {', '.join(map(str, r.budgets))}")
        ax.set_xlabel(f"{model.description} [{unit}]" if m == "latency" else f"BitOPs [{unit or 'ops'}]")
        ax.set_ylabel(OBJECTIVE_LABELS[objective])
        ax.set_title(f"{m}: {result.evaluations} subnets evaluated")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path

