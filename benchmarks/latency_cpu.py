"""Latency-table accuracy on the `cpu` target, and how badly BitOPs ranks CPU latency (issue 4, section 5).

Builds (or reads, with `--table`) the vit_t latency table for `cpu` on this machine, then measures
`--subnets` random whole subnets exported by export's own stages (extract, lowering passes, `emit_onnx`),
none of them the table's calibration subnets. Prints two markdown tables:
1. table accuracy: median and max absolute error of predicted vs measured latency;
2. ranking: Kendall's tau between measured latency and BitOPs, and between measured latency and the
   table's prediction, over the same subnets (tau = 1: the same order).

    python benchmarks/latency_cpu.py [--table PATH] [--subnets 20] [--seed 1] [--plain-attention]

`--plain-attention` measures the cpu target without its fused float attention (`FuseFloatAttentionPass`),
to tell the table's accuracy with and without that op apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time

import torch

from qsamc.search.cost import BitopsCost
from qsamc.profiling.profile import build_table, validate_table
from qsamc.profiling.timers import ProfileSettings
from qsamc.search.latency_table import LatencyTable
from qsamc.ir.frontend import analysis_ir
from qsamc.supernet.space import default_space
from qsamc.targets import get_target


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-a: (concordant - discordant pairs) / all pairs."""
    pairs = list(itertools.combinations(range(len(x)), 2))
    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    return sum(sign(x[i] - x[j]) * sign(y[i] - y[j]) for i, j in pairs) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default=None, help="An existing vit_t cpu table (default: build one).")
    parser.add_argument("--subnets", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plain-attention", action="store_true", help="The cpu target without fused float attention.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    space, target, settings = default_space("vit_t"), get_target("cpu"), ProfileSettings()
    if args.plain_attention:
        target = dataclasses.replace(target, fuse_attention=False)
    start = time.time()
    if args.table:
        table = LatencyTable.load(args.table)
    else:
        table = build_table(space, target, settings)
    built = time.time() - start
    checks = validate_table(table, space, target, args.subnets, args.seed, settings)
    errors = [abs(c.error) for c in checks]
    bitops = BitopsCost(analysis_ir(space), space)
    measured = [c.measured for c in checks]

    attention = "plain" if args.plain_attention else "fused"
    print(f"vit_t on cpu, {attention} float attention ({table.machine.get('cpu')}, onnxruntime {table.libraries.get('onnxruntime')}, "
          f"{settings.threads} thread, {settings.clock} clock, median of {settings.repeats} runs): "
          f"{len(table.entries)} entries, context scale {table.context_scale:.3f}, "
          f"{'read' if args.table else f'built in {built:.0f} s'}\n")
    print("| random subnets | predicted range | measured range | median abs error | max abs error |")
    print("|---|---|---|---|---|")
    print(f"| {len(checks)} | {min(c.predicted for c in checks) * 1e3:.2f}-{max(c.predicted for c in checks) * 1e3:.2f} ms "
          f"| {min(measured) * 1e3:.2f}-{max(measured) * 1e3:.2f} ms | {statistics.median(errors):.1%} "
          f"| {max(errors):.1%} |\n")
    tau_bitops = kendall_tau([bitops.cost(c.subnet) for c in checks], measured)
    tau_table = kendall_tau([c.predicted for c in checks], measured)
    print("| ranking of measured CPU latency by | Kendall's tau |")
    print("|---|---|")
    print(f"| BitOPs | {tau_bitops:.3f} |")
    print(f"| latency table | {tau_table:.3f} |")


if __name__ == "__main__":
    main()
