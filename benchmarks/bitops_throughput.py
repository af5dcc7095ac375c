"""BitOPs throughput for search, and the exactness check the README quotes (issue 2, section 5).

Search evaluates tens of thousands of subnets, so `BitopsModel.cost` must be closed-form over the IR's
tables, never a model run. This script times it on ViT-L (the paper's model) over seeded random subnets,
times `CountBitopsPass` (same formulas, with per-stage and per-layer breakdown) for comparison, checks
that both agree, and checks exactness against PyTorch's own counter: ViT-L's max subnet at 1024, IR MACs
vs `FlopCounterMode` FLOPs / 2 on a meta-device supernet (no weights, no compute). Prints a markdown
table. Runs in well under a minute on 2 CPU cores.

    python benchmarks/bitops_throughput.py [--model vit_l] [--subnets 20000] [--pass-subnets 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from qsamc.passes import BitopsModel, CountBitopsPass
from qsamc.ir.frontend import analysis_ir
from qsamc.supernet.space import default_space
from qsamc.supernet.encoder import Supernet


def flop_counter_macs(model: str, subnet) -> int:
    """FLOPs / 2 of one forward pass of the realised subnet on the meta device, as torch counts them."""
    with torch.device("meta"):
        supernet = Supernet.build(model)
    space = supernet.space
    # MACs do not depend on bits: the float realisation (attention bits need quantizers a meta model lacks)
    supernet.set_subnet(space.uniform_bits(replace(subnet, attention=()), 32, 32))
    x = torch.zeros(1, 3, subnet.resolution, subnet.resolution, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        supernet(x)
    return counter.get_total_flops() // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_l")
    parser.add_argument("--subnets", type=int, default=20_000)
    parser.add_argument("--pass-subnets", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", choices=("float", "searched"), default="float",
                        help="searched: attention precision in the space (INT8 attention matmuls count at 8 x 8 bits)")
    args = parser.parse_args()

    space = default_space(args.model, attention_bits=(8, 32) if args.attention == "searched" else (32,))
    start = time.perf_counter()
    ir = analysis_ir(space)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    model = BitopsModel(ir, space)
    tables_s = time.perf_counter() - start

    rng = random.Random(args.seed)
    subnets = [space.sample(rng) for _ in range(args.subnets)]  # sampling is not timed
    cost = model.cost
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for subnet in subnets:
            cost(subnet)
        runs.append(time.perf_counter() - start)
    model_rate = args.subnets / statistics.median(runs)

    few = subnets[: args.pass_subnets]
    reports = []
    start = time.perf_counter()
    for subnet in few:
        CountBitopsPass(space, subnet)(ir)
        reports.append(ir.cost.to_json())
    pass_rate = len(few) / (time.perf_counter() - start)
    agree = all(model.cost(s) == (r["macs"], r["bitops"]) for s, r in zip(few, reports))

    top = space.max_subnet()
    CountBitopsPass(space, top)(ir)
    ir_macs = ir.cost.macs
    start = time.perf_counter()
    torch_macs = flop_counter_macs(args.model, top)
    counter_s = time.perf_counter() - start

    print(f"# BitOPs throughput and exactness: {args.model}, attention {args.attention}, {len(space.quant_layers)} quantized layers, "
          f"10^{space.log10_count():.1f} subnets")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}); one Python thread")
    print(f"one-time: trace + annotate on meta {trace_s:.2f} s, cost tables {tables_s * 1e3:.1f} ms\n")
    print("| evaluator | subnets | subnets/s | us/subnet |")
    print("|---|---:|---:|---:|")
    print(f"| `BitopsModel.cost` (totals) | {args.subnets:,} | {model_rate:,.0f} | {1e6 / model_rate:.1f} |")
    print(f"| `CountBitopsPass` (per-stage and per-layer breakdown) | {len(few):,} | {pass_rate:,.0f} | "
          f"{1e6 / pass_rate:.1f} |")
    print(f"\nBitopsModel == CountBitopsPass (MACs and BitOPs) on all {len(few)} subnets: {agree}\n")
    print(f"| exactness: {args.model} max subnet at {top.resolution} | MACs | GMAC |")
    print("|---|---:|---:|")
    print(f"| IR (`CountBitopsPass`) | {ir_macs:,} | {ir_macs / 1e9:.2f} |")
    print(f"| `FlopCounterMode` FLOPs / 2, meta device ({counter_s:.1f} s) | {torch_macs:,} | {torch_macs / 1e9:.2f} |")
    print(f"\nexact match: {ir_macs == torch_macs}")
    if ir_macs != torch_macs or not agree:
        raise SystemExit("MAC counts disagree")


if __name__ == "__main__":
    main()
