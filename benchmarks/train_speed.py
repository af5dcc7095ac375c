"""Training-step cost per method and precision: aten ops dispatched, step time and peak memory.

One training step as `qsamc train` takes it (the trainer's own optimizer, param groups and head loss): the
max-depth subnet at `--resolution`, batch `--batch`, every searched layer at one precision. Methods:

- plain       plain fine-tuning of the same encoder and light head: no quantizers, no LoRA (the floor a
              quantized step is measured against; attention through the same training kernel, torch SDPA)
- QFA*        full-parameter supernet training (quantizers on every searched layer)
- multiplex-5 progressive phase 2: LoRA multiplexed over 5 bit groups, pre-trained weights frozen

The op count is every aten operator call torch.profiler records in one step (all nesting levels),
forward, backward and optimizer: the same on any machine, so it is the figure every session can measure
(a GPU step that launches fewer kernels is bound by the GPU, not by Python). Step time is the best of
`--steps` after a warm-up; peak memory is `torch.cuda.max_memory_allocated` on CUDA and the process's
peak RSS on the CPU (run one configuration per process for a clean CPU peak: `--only`). On CUDA the
forward runs under bf16 autocast, as `qsamc train` does there. `--fuse` is `qsamc --fuse`: the training
kernels' math compiled by torch.compile (`qsamc.supernet.fused`; auto compiles on CUDA only), each
configuration's compilation done in its warm-up steps.

    python benchmarks/train_speed.py [--model vit_b] [--resolution 512] [--batch 1] [--device cpu|cuda]
                                     [--steps 3] [--precisions fp32,w8a8,w4a4,w2a2] [--methods plain,qfa,multiplex]
                                     [--fuse auto|on|off]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

METHODS = {"plain": "plain fine-tuning", "qfa": "QFA*", "multiplex": "multiplex-5"}
PRECISIONS = {"fp32": 32, "w8a8": 8, "w4a4": 4, "w2a2": 2}


def one(model_name: str, method: str, precision: str, resolution: int, batch: int, device_name: str,
        steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from qsamc.supernet.space import default_space
    from qsamc.training.config import load_train_config
    from qsamc.training.runs import SupernetSpec, build_model
    from qsamc.training.train import _optimizer, peak_memory_mb

    torch.manual_seed(0)
    device = torch.device(device_name)
    schedule = {"plain": "fp32", "qfa": "full", "multiplex": "lora"}[method]
    config = load_train_config(None, {"model": model_name, "schedule": schedule, "lora_variant": "multiplex",
                                      "multiplex_modules": 5, "out": "unused"})
    space = default_space(model_name)
    spec = SupernetSpec(space, num_classes=150, lora=config.lora)
    if method == "plain":  # the same encoder and head with no quantizer modules at all
        from qsamc.sam import build_encoder
        from qsamc.task.head import SegmentationModel
        from qsamc.supernet.encoder import Supernet

        net = SegmentationModel(Supernet(build_encoder(model_name), space), 150)
        net.head.set_bits(32)
    else:
        net, _ = build_model(spec)
    net.to(device).train()
    bits = PRECISIONS[precision] if method != "plain" else 32
    subnet = replace(space.uniform_bits(space.max_subnet(), bits, bits), resolution=resolution)
    net.supernet.set_subnet(subnet)
    optimizer, _ = _optimizer(config, net, lora_phase=method == "multiplex", steps=1000)
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    masks = torch.randint(0, 150, (batch, resolution, resolution), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = net(images, masks=masks, ignore_index=255)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: lazy initialisation, allocator, kernels picked, fused functions compiled
    step()
    synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        synchronize()
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return {"ops": ops, "step_s": min(times), "peak_mb": peak_memory_mb(),
            "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--fuse", default="auto", choices=("auto", "on", "off"),
                        help="qsamc --fuse: the training kernels compiled by torch.compile")
    parser.add_argument("--json", type=str, default=None, help="also write the rows here")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # method:precision, in this process
    args = parser.parse_args()
    from qsamc.supernet.fused import set_mode

    set_mode(args.fuse)
    if args.only:
        method, precision = args.only.split(":")
        print(json.dumps(one(args.model, method, precision, args.resolution, args.batch, args.device, args.steps)))
        return
    runs = [(m, p) for m in args.methods.split(",") for p in args.precisions.split(",")
            if m != "plain" or p == "fp32"]
    rows = []
    for done, (method, precision) in enumerate(runs, 1):
        command = [sys.executable, __file__, "--model", args.model, "--resolution", str(args.resolution),
                   "--batch", str(args.batch), "--device", args.device, "--steps", str(args.steps), "--fuse", args.fuse,
                   "--only", f"{method}:{precision}"]
        started = time.perf_counter()
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
        rows.append({"method": METHODS[method], "precision": precision.upper(), **json.loads(out.strip().splitlines()[-1])})
        print(f"[{done}/{len(runs)}] {METHODS[method]} {precision}: {rows[-1]['ops']} ops, "
              f"{rows[-1]['step_s']:.3f} s ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n{args.model} at {args.resolution}px, batch {args.batch}, max-depth subnet, {args.device}"
          f"{' (bf16 autocast)' if args.device == 'cuda' else ''}; the trainer's AdamW and head loss; "
          f"--fuse {args.fuse}\n")
    print("| method | precision | aten ops / step | step time (s) | peak memory (MB) | trainable params |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['precision']} | {r['ops']:,} | {r['step_s']:.3f} | {r['peak_mb']:.0f} | "
              f"{r['trainable'] / 1e6:.2f} M |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
