"""Peak memory and step time of one supernet training step, per fine-tuning method (paper Tab. 2).

Each method runs in a fresh subprocess (peak RSS is per process) on the same config: `vit_b` at 512,
batch 1, the max-depth subnet with every layer at W4A4 (so multiplex's low-bit adapters are active),
AdamW. QFA* trains every weight; the LoRA methods freeze the pre-trained weights (phase 2). Prints a
markdown table with ratios to QFA*; on a GPU it reports torch.cuda.max_memory_allocated instead.

    python benchmarks/train_memory.py [--model vit_b] [--resolution 512] [--steps 3] [--checkpointing]
"""

from __future__ import annotations

import argparse
import json
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


def one_method(model: str, resolution: int, steps: int, lora: dict | None, checkpointing: bool) -> dict:
    import time

    import torch

    from qsamc.checkpoint import SupernetSpec, build_model
    from qsamc.lora import LoraConfig
    from qsamc.space import default_space
    from qsamc.train import _trainable, peak_memory_mb

    torch.manual_seed(0)
    space = default_space(model)
    spec = SupernetSpec(space, num_classes=150, lora=LoraConfig(**lora) if lora else None)
    net, _ = build_model(spec)
    net.supernet.activation_checkpointing = checkpointing
    net.train()
    subnet = space.uniform_bits(space.max_subnet(), 4, 4)
    from dataclasses import replace
    net.supernet.set_subnet(replace(subnet, resolution=resolution))
    optimizer = torch.optim.AdamW(_trainable(net, lora_phase=lora is not None), lr=1e-4)
    images = torch.randn(1, 3, resolution, resolution)
    masks = torch.randint(0, 150, (1, resolution, resolution))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(images), masks)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"peak_mb": peak_memory_mb(), "step_s": min(times[1:] or times), "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true",
                        help="also measure every method with activation checkpointing per block")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        lora = json.loads(args.child)
        print(json.dumps(one_method(args.model, args.resolution, args.steps, lora, args.checkpointing)))
        return
    rows: dict[tuple[str, bool], dict] = {}
    for checkpointing in ((False, True) if args.checkpointing else (False,)):
        for name, lora in METHODS.items():
            command = [sys.executable, __file__, "--model", args.model, "--resolution", str(args.resolution),
                       "--steps", str(args.steps), "--child", json.dumps(lora)]
            if checkpointing:
                command.append("--checkpointing")
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows[name, checkpointing] = json.loads(out.strip().splitlines()[-1])
            print(f"measured {name}{' with checkpointing' if checkpointing else ''}", file=sys.stderr)
    base = rows["QFA* (full-parameter)", False]
    print(f"\n{args.model} at {args.resolution}px, batch 1, W4A4 max-depth subnet, AdamW; ratios are to QFA* "
          "without activation checkpointing (the paper's Tab. 2 baseline)\n")
    print("| method | activation checkpointing | trainable params | peak memory (MB) | ratio to QFA* | step time (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, checkpointing), row in rows.items():
        print(f"| {name} | {'yes' if checkpointing else 'no'} | {row['trainable'] / 1e6:.2f} M | {row['peak_mb']:.0f} | "
              f"{row['peak_mb'] / base['peak_mb']:.2f}x | {row['step_s']:.2f} |")

if __name__ == "__main__":
    main()
