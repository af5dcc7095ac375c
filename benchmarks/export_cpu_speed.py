"""ONNX Runtime CPU latency of an exported W8A8 subnet vs the FP32 ONNX of the same subnet.

    python benchmarks/export_cpu_speed.py [--model vit_b] [--resolution 512] [--threads 2] [--runs 5]

An untrained supernet with calibrated activation quantizers (weight values do not change speed) is
lowered and emitted exactly as `qsamc export --target cpu` does, once at W8A8 and once at FP32. Both
models run in the same process with the same session settings, interleaved so that load from other
processes hits both alike; the best run of each is compared. A per-node profile (ORT enable_profiling)
of both says where the time goes. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import time
from dataclasses import replace

import torch

from qsamc.training.runs import SupernetSpec, build_model
from qsamc.export.emit import emit_onnx
from qsamc.ir.pass_manager import PassManager
from qsamc.passes import CalibrateActivationsPass, ExtractSubnetPass
from qsamc.targets import get_target
from qsamc.supernet.space import default_space
from qsamc.export.ort import ort_session

# Node-name scopes of the searched, quantized layers (the TorchScript exporter names nodes by module path;
# ONNX Runtime's fused nodes keep a member's name). Everything else stays float in both models.
LAYER_SCOPE = re.compile(r"/(attn/qkv|attn/proj|mlp/lin1|mlp/lin2|patch_embed/proj|neck\.0|neck\.2)/")


def export(ir, subnet, example):
    static = ExtractSubnetPass(subnet)(ir).ir
    cpu = get_target("cpu")
    PassManager(cpu.lowering_passes())(static)
    return emit_onnx(static.root, example, cpu, "image", "image_embeddings")


def profile(model, feed, threads):
    session = ort_session(model, threads, profile=True, spinning=True)
    session.run(None, feed)
    session.run(None, feed)
    path = session.end_profiling()
    with open(path) as handle:
        events = json.load(handle)
    os.remove(path)
    per_op: collections.Counter = collections.Counter()
    layers = 0.0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            ms = event["dur"] / 2 / 1e3  # per run (two runs)
            per_op[event["args"]["op_name"]] += ms
            layers += ms if LAYER_SCOPE.search(event["name"]) else 0.0
    return per_op, layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    space = default_space(args.model)
    model, ir = build_model(SupernetSpec(space, num_classes=2, lora=None))
    subnet = replace(space.max_subnet(), resolution=args.resolution)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, args.resolution, args.resolution, generator=generator) for _ in range(2)]
    CalibrateActivationsPass(model.supernet, images, subnet)(ir)
    models = {"FP32": export(ir, space.uniform_bits(subnet, 32, 32), images[0]),
              "W8A8": export(ir, space.uniform_bits(subnet, 8, 8), images[0])}

    feed = {"image": images[0].numpy()}
    sessions = {name: ort_session(m, args.threads, spinning=True) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, session in sessions.items():
        session.run(None, feed)
    for _ in range(args.runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)

    print(f"## {args.model} encoder at {args.resolution}px, ONNX Runtime CPU, {args.threads} threads, "
          f"best / median of {args.runs} interleaved runs\n")
    print("| model | ONNX size | best ms | median ms | speed-up (best) |")
    print("|---|---|---|---|---|")
    best = {name: min(t) for name, t in times.items()}
    for name, m in models.items():
        median = sorted(times[name])[len(times[name]) // 2]
        print(f"| {name} | {m.ByteSize() / 1e6:.0f} MB | {best[name]:.0f} | {median:.0f} | "
              f"{best['FP32'] / best[name]:.2f}x |")

    profiles = {name: profile(m, feed, args.threads) for name, m in models.items()}
    print("\n## per-node profile (ms per run, by op type)\n")
    print("| op | FP32 | W8A8 |")
    print("|---|---|---|")
    ops = sorted(set(profiles["FP32"][0]) | set(profiles["W8A8"][0]),
                 key=lambda op: -max(p[0][op] for p in profiles.values()))
    for op in ops[:16]:
        print(f"| {op} | {profiles['FP32'][0][op]:.0f} | {profiles['W8A8'][0][op]:.0f} |")
    print("\n| part | FP32 ms | W8A8 ms | speed-up |")
    print("|---|---|---|---|")
    split = {name: (layers, sum(per_op.values()) - layers) for name, (per_op, layers) in profiles.items()}
    for index, part in enumerate(("searched layers (qkv, proj, lin1, lin2, patch, neck; with Q/DQ)",
                                  "float ops (attention matmuls, rel-pos, softmax, LayerNorm, GELU, adds, layout)")):
        fp32, w8a8 = split["FP32"][index], split["W8A8"][index]
        print(f"| {part} | {fp32:.0f} | {w8a8:.0f} | {fp32 / w8a8:.2f}x |")


if __name__ == "__main__":
    main()
