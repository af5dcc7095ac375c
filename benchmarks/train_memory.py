"""Peak memory and step time of one supernet training step, per fine-tuning method (paper Tab. 2).

Each method runs in fresh subprocesses on the same config: `vit_b` at 512, batch 1, the max-depth subnet
with every layer at W4A4 (so multiplex's low-bit adapters are active), AdamW. QFA* trains every weight;
the LoRA methods freeze the pre-trained weights (phase 2). The loss is the trainer's
(`qsamc.task.losses.segmentation_loss` on the head's token-grid logits).

Two figures of memory on a CPU:
- live peak: the process's peak RSS with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_),
  so every freed tensor goes back to the OS and RSS follows the memory in use: the CPU counterpart of
  torch.cuda.max_memory_allocated, which is what the script reports on a GPU.
- default-malloc peak RSS: what `top` shows in a plain run; glibc keeps freed heap memory, so it is higher.
Step time is the fastest step after the first, in the default-malloc run (a fixed mmap threshold makes
every tensor a fresh mapping, which is slow).

`--reference` adds rows for segment-anything's attention and MLP code and the upsample-then-cross-
entropy loss (qsamc before its training kernels), for the two methods the goal is stated on.
`--int8-attention` adds rows for the same two methods with every block's attention at 8 bits
(`--attention searched`, beyond the paper): that path runs segment-anything's attention with LSQ
quantizers on q, k, v and the softmax output, and keeps the attention map for backward.

    python benchmarks/train_memory.py [--model vit_b] [--resolution 512] [--steps 2] [--checkpointing] [--reference]
                                      [--int8-attention]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

METHODS = {
    "QFA* (full-parameter)": None,
    "regular LoRA": {"variant": "regular"},
    "selective LoRA": {"variant": "selective"},
    "multiplex LoRA (3)": {"variant": "multiplex", "multiplex_modules": 3},
    "multiplex LoRA (4)": {"variant": "multiplex", "multiplex_modules": 4},
    "multiplex LoRA (5)": {"variant": "multiplex", "multiplex_modules": 5},
}
REFERENCE_METHODS = ("QFA* (full-parameter)", "multiplex LoRA (5)")
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def one_method(model: str, resolution: int, steps: int, lora: dict | None, checkpointing: bool,
               reference: bool, int8_attention: bool = False) -> dict:
    import time
    from dataclasses import replace

    import torch
    import torch.nn.functional as F

    from qsamc.training.runs import SupernetSpec, build_model
    from qsamc.supernet.lora import LoraConfig
    from qsamc.task.losses import segmentation_loss
    from qsamc.supernet.space import default_space
    from qsamc.training.train import _trainable, peak_memory_mb
    from qsamc.supernet.kernels import TrainingKernel

    TrainingKernel.enabled = not reference
    torch.manual_seed(0)
    space = default_space(model, attention_bits=(8, 32) if int8_attention else (32,))
    spec = SupernetSpec(space, num_classes=150, lora=LoraConfig(**lora) if lora else None)
    net, _ = build_model(spec)
    net.supernet.activation_checkpointing = checkpointing
    net.train()
    subnet = replace(space.uniform_bits(space.max_subnet(), 4, 4), resolution=resolution)
    net.supernet.set_subnet(space.uniform_attention(subnet, 8) if int8_attention else subnet)
    optimizer = torch.optim.AdamW(_trainable(net, lora_phase=lora is not None), lr=1e-4)
    images = torch.randn(1, 3, resolution, resolution)
    masks = torch.randint(0, 150, (1, resolution, resolution))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        if reference:
            loss = F.cross_entropy(net(images), masks)
        else:
            loss = segmentation_loss(net(images, upsample=False), masks, 255)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"peak_mb": peak_memory_mb(), "step_s": min(times[1:] or times), "trainable": trainable}


def measure(args: argparse.Namespace, lora: dict | None, checkpointing: bool, reference: bool, live: bool,
            int8_attention: bool = False) -> dict:
    command = [sys.executable, __file__, "--model", args.model, "--resolution", str(args.resolution),
               "--steps", str(args.steps), "--child", json.dumps(lora)]
    command += ["--checkpointing"] * checkpointing + ["--reference"] * reference + ["--int8-attention"] * int8_attention
    env = {**os.environ, **(LIVE_MALLOC if live else {})}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true",
                        help="also measure every method with activation checkpointing per block")
    parser.add_argument("--reference", action="store_true",
                        help="also measure QFA* and multiplex-5 with segment-anything's attention/MLP and loss")
    parser.add_argument("--int8-attention", action="store_true",
                        help="also measure QFA* and multiplex-5 with every block's attention at 8 bits")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        result = one_method(args.model, args.resolution, args.steps, json.loads(args.child), args.checkpointing,
                            args.reference, args.int8_attention)
        print(json.dumps(result))
        return
    # (method, checkpointing, code): code is "reference" (segment-anything's), "kernels" or "int8 attention"
    runs = [(name, False, "reference") for name in REFERENCE_METHODS] if args.reference else []
    for checkpointing in ((False, True) if args.checkpointing else (False,)):
        runs += [(name, checkpointing, "kernels") for name in METHODS]
    runs += [(name, False, "int8 attention") for name in REFERENCE_METHODS] if args.int8_attention else []
    rows = {}
    for done, (name, checkpointing, code) in enumerate(runs, 1):
        options = (METHODS[name], checkpointing, code == "reference")
        live = measure(args, *options, live=True, int8_attention=code == "int8 attention")
        plain = measure(args, *options, live=False, int8_attention=code == "int8 attention")
        rows[name, checkpointing, code] = {**plain, "live_mb": live["peak_mb"]}
        print(f"[{done}/{len(runs)}] measured {name}{' with checkpointing' if checkpointing else ''} ({code})", file=sys.stderr)
    labels = {"reference": "segment-anything", "kernels": "training kernels",
              "int8 attention": "training kernels, INT8 attention"}
    print(f"\n{args.model} at {args.resolution}px, batch 1, W4A4 max-depth subnet, AdamW; ratios are of live peaks, to "
          "QFA* with the same code and no activation checkpointing (the paper's Tab. 2 baseline)\n")
    print("| method | code | activation checkpointing | trainable params | live peak (MB) | ratio to QFA* | "
          "default-malloc peak RSS (MB) | step time (s) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for (name, checkpointing, code), row in rows.items():
        qfa = rows["QFA* (full-parameter)", False, code]
        print(f"| {name} | {labels[code]} | "
              f"{'yes' if checkpointing else 'no'} | {row['trainable'] / 1e6:.2f} M | {row['live_mb']:.0f} | "
              f"{row['live_mb'] / qfa['live_mb']:.2f}x | {row['peak_mb']:.0f} | {row['step_s']:.2f} |")


if __name__ == "__main__":
    main()
