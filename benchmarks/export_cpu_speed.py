"""ONNX Runtime CPU latency of exported subnets, side by side with ONNX Runtime's own quantizers.

    python benchmarks/export_cpu_speed.py [--model vit_b] [--resolution 512] [--threads 2] [--runs 5]

An untrained supernet with calibrated quantizers (weight values do not change speed) and attention
precision in its space is lowered and emitted exactly as `qsamc export --target cpu` does: its largest
subnet at FP32, at W8A8 with float attention (the paper's space), and at W8A8 with INT8 attention (q, k,
v and the softmax output on 8-bit grids, `--attention searched`). The FP32 model is also quantized by
ONNX Runtime's `quantize_static` (QDQ, per-channel, S8S8, every MatMul, min-max calibration on the same
images) and `quantize_dynamic` (the peers a user would pick instead). All models run in one process with
the same session settings, interleaved so that load from other processes hits them alike (FP32 is the
plain graph, segment-anything's attention ops; qsamc's cpu export fuses float attention into ONNX
Runtime's MultiHeadAttention, shown also unfused and at FP32); the best run
of each is compared, and each model's deviation from the FP32 output on a held-out image is reported as
max |error| / output range. A per-node profile (ORT enable_profiling) says where the time goes.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import collections
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

from qsamc.export.emit import emit_onnx
from qsamc.export.ort import ort_session
from qsamc.ir.pass_manager import PassManager
from qsamc.machine import cpu_name, int8_isa
from qsamc.passes import CalibrateActivationsPass, ExtractSubnetPass
from qsamc.supernet.space import default_space
from qsamc.targets import get_target
from qsamc.training.runs import SupernetSpec, build_model

# Node-name scopes of the searched, quantized layers (the TorchScript exporter names nodes by module path;
# ONNX Runtime's fused nodes keep a member's name). Everything else stays float in the paper's space.
LAYER_SCOPE = re.compile(r"/(attn/qkv|attn/proj|mlp/lin1|mlp/lin2|patch_embed/proj|neck\.0|neck\.2)/")
# The attention core: q@k, rel-pos, softmax, @v (and their Q/DQ when quantized).
ATTENTION_SCOPE = re.compile(r"/attn/")  # checked after LAYER_SCOPE: the rest of attention is its core


def export(ir, subnet, example, fuse: bool = True):
    static = ExtractSubnetPass(subnet)(ir).ir
    cpu = dataclasses.replace(get_target("cpu"), fuse_attention=fuse)
    PassManager(cpu.lowering_passes())(static)
    return emit_onnx(static.root, example, cpu, "image", "image_embeddings")


def ort_quantized(fp32: onnx.ModelProto, calibration: list[np.ndarray], folder: Path) -> dict[str, onnx.ModelProto]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({"image": image} for image in calibration)

        def get_next(self):
            return next(self.feeds, None)

    source = folder / "fp32.onnx"
    onnx.save(fp32, source)
    logging.getLogger().setLevel(logging.ERROR)
    quantize_static(source, folder / "static.onnx", Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    quantize_dynamic(source, folder / "dynamic.onnx", weight_type=QuantType.QInt8)
    out = {}
    for name, file in (("ONNX Runtime quantize_static (QDQ, per-channel, all MatMuls)", "static.onnx"),
                       ("ONNX Runtime quantize_dynamic", "dynamic.onnx")):
        model = onnx.load(folder / file)
        model.ir_version = min(model.ir_version, fp32.ir_version)  # onnxruntime 1.31 reads IR <= 13
        out[name] = model
    return out


def profile(model, feed, threads):
    session = ort_session(model, threads, profile=True, spinning=True)
    session.run(None, feed)
    session.run(None, feed)
    path = session.end_profiling()
    with open(path) as handle:
        events = json.load(handle)
    os.remove(path)
    per_op: collections.Counter = collections.Counter()
    parts: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            ms = event["dur"] / 2 / 1e3  # per run (two runs)
            per_op[event["args"]["op_name"]] += ms
            name = event["name"]
            part = "layers" if LAYER_SCOPE.search(name) else "attention" if ATTENTION_SCOPE.search(name) else "other"
            parts[part] += ms
    return per_op, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    space = default_space(args.model, attention_bits=(8, 32))
    model, ir = build_model(SupernetSpec(space, num_classes=2, lora=None))
    subnet = replace(space.max_subnet(), resolution=args.resolution)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, args.resolution, args.resolution, generator=generator) for _ in range(3)]
    CalibrateActivationsPass(model.supernet, images[:2], space.uniform_attention(subnet, 32))(ir)
    w8a8 = space.uniform_bits(subnet, 8, 8)
    fp32 = space.uniform_attention(space.uniform_bits(subnet, 32, 32), 32)
    models = {"FP32": export(ir, fp32, images[0], fuse=False),
              "qsamc W8A8, float attention (the paper's space)": export(ir, space.uniform_attention(w8a8, 32), images[0]),
              "qsamc W8A8, INT8 attention (--attention searched)": export(ir, space.uniform_attention(w8a8, 8), images[0]),
              "qsamc W8A8, float attention unfused (as before FuseFloatAttentionPass)":
                  export(ir, space.uniform_attention(w8a8, 32), images[0], fuse=False),
              "qsamc FP32, fused attention": export(ir, fp32, images[0])}
    with tempfile.TemporaryDirectory() as folder:
        models.update(ort_quantized(models["FP32"], [i.numpy() for i in images[:2]], Path(folder)))

    feed = {"image": images[2].numpy()}  # held out from every calibration
    sessions = {name: ort_session(m, args.threads, spinning=True) for name, m in models.items()}
    outputs = {name: session.run(None, feed)[0] for name, session in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)

    reference = outputs["FP32"]
    span = float(reference.max() - reference.min())
    cpu, isa = cpu_name(), int8_isa()
    print(f"## {args.model} encoder at {args.resolution}px, ONNX Runtime CPU ({cpu}, {isa}), {args.threads} threads, "
          f"best / median of {args.runs} interleaved runs\n")
    print("| model | ONNX size | best ms | median ms | speed-up (best) | max abs error / output range |")
    print("|---|---:|---:|---:|---:|---:|")
    best = {name: min(t) for name, t in times.items()}
    for name, m in models.items():
        median = sorted(times[name])[len(times[name]) // 2]
        error = "-" if name == "FP32" else f"{np.abs(outputs[name] - reference).max() / span:.4f}"
        print(f"| {name} | {m.ByteSize() / 1e6:.0f} MB | {best[name]:.0f} | {median:.0f} | "
              f"{best['FP32'] / best[name]:.2f}x | {error} |")

    names = list(models)[:4]
    profiles = {name: profile(models[name], feed, args.threads) for name in names}
    short = ["FP32", "W8A8", "W8A8 + INT8 attention", "W8A8 unfused"]
    print("\n## per-node profile (ms per run, by op type)\n")
    print(f"| op | {' | '.join(short)} |")
    print("|---|---:|---:|---:|---:|")
    ops = sorted(set().union(*(p[0] for p in profiles.values())), key=lambda op: -max(p[0][op] for p in profiles.values()))
    for op in ops[:18]:
        print(f"| {op} | {' | '.join(f'{profiles[n][0][op]:.0f}' for n in names)} |")
    print(f"\n| part | {' | '.join(short)} |")
    print("|---|---:|---:|---:|---:|")
    for part, label in (("layers", "searched layers (qkv, proj, lin1, lin2, patch, neck; with Q/DQ)"),
                        ("attention", "attention core (q@k, rel-pos, softmax, @v, their layout and Q/DQ)"),
                        ("other", "the rest (LayerNorm, GELU, residual adds, window partition)")):
        print(f"| {label} | {' | '.join(f'{profiles[n][1][part]:.0f}' for n in names)} |")


if __name__ == "__main__":
    main()
