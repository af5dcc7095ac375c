"""Search quality at equal evaluations: evolutionary search vs random search (issue 4, section 5).

The embedded default: vit_t on the synthetic dataset. Without `--run`, the supernet is a calibrated,
untrained vit_t (activation quantizers initialised from random images), so losses differ by the
quantization noise of each subnet rather than by learned quality; pass a `qsamc train` run folder to
benchmark a trained one. For each BitOPs budget (default: 3 rungs of the default ladder), evolution runs
with AutoFormer's defaults; random search then evaluates exactly as many distinct legal subnets. Both
share nothing (separate caches), and every seed gives one row. Prints a markdown table.

    python benchmarks/search_quality.py [--run RUN] [--seeds 2] [--val-limit 16] [--generations 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qsamc.training.runs import SupernetSpec, build_model, load_supernet
from qsamc.search.cost import BitopsCost
from qsamc.task.data import build_dataset
from qsamc.task.evaluate import ValidationSet
from qsamc.passes import CalibrateActivationsPass
from qsamc.search.evolution import EvolutionConfig, SubnetFitness, default_ladder, search
from qsamc.supernet.space import default_space


def calibrated_supernet():
    torch.manual_seed(0)
    spec = SupernetSpec(default_space("vit_t"), num_classes=4, lora=None)
    model, ir = build_model(spec)
    CalibrateActivationsPass(model, [torch.randn(4, 3, 256, 256)])(ir)
    return model.eval(), ir, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="A training run folder (default: a calibrated untrained vit_t).")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--val-limit", type=int, default=16)
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for vit_t on shared CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, ir, spec = load_supernet(args.run) if args.run else calibrated_supernet()
    space = spec.space
    bitops = BitopsCost(ir, space)
    budgets = default_ladder(space, bitops)[::2]
    data = ValidationSet(build_dataset("synthetic", None, "val"), args.val_limit, batch_size=8)
    fitness = SubnetFitness(model, data)

    print(f"model {space.model} ({'run ' + args.run if args.run else 'calibrated, untrained'}), synthetic val "
          f"x{len(data.samples)}, evolution: population 50, top-k 10, 25 mutations (p 0.2), 25 crossovers, "
          f"{args.generations} generations\n")
    print("| budget (BitOPs) | seed | evaluations | evolution best loss | random best loss | evolution - random |")
    print("|---|---|---|---|---|---|")
    gaps = []
    start = time.time()
    for budget in budgets:
        for seed in range(args.seeds):
            config = EvolutionConfig(generations=args.generations, seed=seed)
            evolution = search(space, [bitops], fitness, [budget], config)
            baseline = search(space, [bitops], fitness, [budget], config, method="random",
                              evaluations=evolution.evaluations)
            e, r = evolution.results[0].best.evaluation.loss, baseline.results[0].best.evaluation.loss
            gaps.append(e - r)
            print(f"| {budget} | {seed} | {evolution.evaluations} | {e:.4f} | {r:.4f} | {e - r:+.4f} |")
    wins = sum(g < 0 for g in gaps)
    print(f"\nevolution better in {wins}/{len(gaps)} runs, median loss gap {statistics.median(gaps):+.4f} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
