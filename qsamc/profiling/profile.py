"""`qsamc profile`: build a target's measured latency table (read by search: `qsamc.search.latency_table`).

Each entry is a fused part of the encoder (`qsamc.export.parts`), timed on the target's latency backend
(`Target.timer`) as the Q/DQ ONNX that export emits for it, the median of repeated runs after warm-up.
Splitting a block into its attention and MLP halves keeps the table linear in the kernels per half
(4 x 4 per half on the CPU instead of 4^4 per block); the cut is a residual add, which no backend fuses
across. Each timed run also pays the runtime's fixed cost of one call; entries store the time net of that
cost (`overhead`, timed on an empty graph).

Whole subnets are the ground truth: cut from a supernet and exported by export's own stages
(`ExtractSubnetPass`, the target's lowering passes, `qsamc.export.emit.emit_onnx`), then timed the same
way. Each part is cut from such a lowered subnet (one whose layers take the part's kernels) and emitted
by the same `emit_onnx`, one thread (~50 ms per part; vit_t's ~830 parts in under a minute). A part timed
alone runs from warm caches; inside a whole model its weights come from further away, so whole models
run ~10-20% slower than the sum of their parts on the CPU (measured). `profile` therefore times a few
whole calibration subnets and stores one `context_scale` (the median of measured / summed).
`--validate` measures other random subnets.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import platform
import random
import statistics
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch

from qsamc.export.emit import emit_onnx
from qsamc.export.parts import lowered_subnet, one_torch_thread, part_onnx
from qsamc.ir.graph import IR
from qsamc.ir.pass_manager import PassManager
from qsamc.machine import cpu_name
from qsamc.passes import CalibrateActivationsPass
from qsamc.profiling.timers import ProfileSettings, Timer
from qsamc.search.latency_table import LatencyTable, PartKeys, TableLatency, part_key
from qsamc.supernet.space import LayerBits, SearchSpace, Subnet, default_space
from qsamc.training.runs import SupernetSpec, build_model

if TYPE_CHECKING:
    from qsamc.targets.base import Target

CALIBRATION_SEED = "qsamc-latency-calibration"  # a stream of its own: validation never reuses these subnets


def _machine(threads: int) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "gpu": gpu, "platform": platform.platform()}


@dataclass(frozen=True)
class PartJob:
    key: str
    subnet: Subnet  # a subnet whose layers take the part's kernels
    part: str
    block: int | None = None


def _part_jobs(space: SearchSpace, target: Target, supernet: IR) -> list[PartJob]:
    """One job per entry of the table, grouped by subnet so that each subnet is lowered once.

    For each resolution, MLP ratio and pair of linear kernels (k1, k2), a shallowest subnet of the
    reference supernet at that MLP ratio with every qkv and lin1 on k1 and every proj and lin2 on k2 (its patch
    embedding and neck layers cycling through the conv kernels and their pairs) yields the MLP entry,
    and at the first ratio the attention entries and the patch and neck entries it covers.
    """
    keys = PartKeys(space, target)
    linear, conv = keys.representatives("linear"), keys.representatives("conv")
    conv_pairs = list(itertools.product(conv, repeat=2))
    cfg, full = space.config, supernet.root.space
    windowed = next(b for b in range(cfg.depth) if b not in cfg.global_attn_indexes)
    first = ("attn.qkv", "mlp.lin1")  # the first layer of each half; the second takes the other kernel
    jobs = []
    for resolution in space.resolutions:
        grid = space.grid(resolution)
        for index, ratio in enumerate(space.mlp_ratios):
            pairs = list(itertools.product(linear, repeat=2))
            for n in range(max(len(pairs), len(conv_pairs) if index == 0 else 0)):
                k1, k2 = pairs[n % len(pairs)]
                c1, c2 = conv_pairs[n % len(conv_pairs)]
                c = list(conv)[n % len(conv)]
                layer_bits = {"patch_embed.proj": conv[c], "neck.0": conv[c1], "neck.2": conv[c2]}

                def bits(layer: str) -> tuple[int, int]:
                    return layer_bits.get(layer) or linear[k1 if layer.endswith(first) else k2]

                base = full.min_subnet()  # fewest blocks to lower; it keeps a windowed and a global one
                subnet = replace(base, resolution=resolution, mlp_ratios=(ratio,) * cfg.depth,
                                 bits=tuple(LayerBits(b.layer, *bits(b.layer)) for b in base.bits))
                if n < len(pairs):
                    jobs.append(PartJob(part_key("mlp", grid, space.hidden_units(ratio), k1, k2), subnet, "mlp", windowed))
                if index:
                    continue  # the other parts do not depend on the MLP ratio
                if n < len(pairs):
                    jobs += [PartJob(part_key("attention", grid, keys.window[b], k1, k2), subnet, "attention", b)
                             for b in (windowed, cfg.global_attn_indexes[0])]
                    # Quantized attention, where the space has it: the same halves with INT8 matmuls, on the
                    # blocks the target runs them in INT8 (the others deploy float: the entry above).
                    quantized = full.uniform_attention(subnet, min(space.attention_bits))
                    jobs += [PartJob(part_key("attention", grid, keys.window[b], k1, k2, *keys.attention(quantized, b)),
                                     quantized, "attention", b)
                             for b in (windowed, cfg.global_attn_indexes[0]) if keys.attention(quantized, b)]
                if n < len(conv):
                    jobs.append(PartJob(part_key("patch_embed", resolution, c), subnet, "patch_embed"))
                if n < len(conv_pairs):
                    jobs.append(PartJob(part_key("neck", grid, c1, c2), subnet, "neck"))
    return jobs


def build_table(space: SearchSpace, target: Target, settings: ProfileSettings = ProfileSettings(),
                calibration: int = 10, progress: Callable[[int, int], None] | None = None) -> LatencyTable:
    """Time every fused part the space can produce on `target`, then fit the context scale on
    `calibration` random whole subnets of the reference supernet."""
    timer = target.timer(settings)
    supernet = reference_supernet(space)
    jobs = _part_jobs(space, target, supernet)
    overhead = timer.overhead()
    entries = {}
    lowered = functools.lru_cache(maxsize=1)(lambda subnet: lowered_subnet(supernet, subnet, target))
    for done, job in enumerate(jobs):
        model, example = part_onnx(lowered(job.subnet), job.part, job.block, target)
        entries[job.key] = max(timer.time(model, example.numpy()) - overhead, 0.0)
        if progress is not None:
            progress(done + 1, len(jobs) + calibration)
    table = LatencyTable(
        target.name, timer.name, space.model, space.to_json(), overhead, entries, 1.0, timer.libraries(),
        _machine(settings.threads), {"threads": settings.threads, "warmup": settings.warmup,
                                     "repeats": settings.repeats, "clock": settings.clock, "statistic": "median"},
        datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if calibration:
        cost, rng = TableLatency(table, space, target), random.Random(CALIBRATION_SEED)
        ratios = []
        for i in range(calibration):
            subnet = space.sample(rng)
            measured = measure_subnet(supernet, target, subnet, timer)
            ratios.append((measured - overhead) / cost.parts(subnet))
            if progress is not None:
                progress(len(jobs) + i + 1, len(jobs) + calibration)
        table.context_scale = statistics.median(ratios)
    return table


@dataclass(frozen=True)
class Validation:
    subnet: Subnet
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured


def reference_supernet(space: SearchSpace) -> IR:
    """A supernet with every quantizer, calibrated on random images: whole subnets are cut from it and
    exported exactly as `qsamc export` does (values do not change latency, the graph does). It is the
    model's whole default space, since a supernet is traced at its native resolution and starts at its
    float maximum; the subnets of a narrowed space are subnets of it. Built once per process."""
    return _reference_supernet(space.model, space.attention_bits)


@functools.lru_cache(maxsize=1)
def _reference_supernet(model: str, attention_bits: tuple[int, ...]) -> IR:
    torch.manual_seed(0)
    # Per-layer bits (the table's subnets mix kernels within a block) and per-block attention bits.
    full = default_space(model, "layer", attention_bits)
    with one_torch_thread():
        supernet, ir = build_model(SupernetSpec(full, num_classes=2, lora=None))
        resolution = max(full.resolutions)
        PassManager([CalibrateActivationsPass(supernet, [torch.randn(2, 3, resolution, resolution)])])(ir)
    return ir


def measure_subnet(supernet_ir: IR, target: Target, subnet: Subnet, timer: Timer) -> float:
    """The measured latency of a whole subnet, exported by export's own stages (extract, lower, emit)."""
    static = lowered_subnet(supernet_ir, subnet, target)
    example = torch.randn(1, 3, subnet.resolution, subnet.resolution)
    with one_torch_thread():
        model = emit_onnx(static, example, target)
    return timer.time(model, example.numpy())


def validate_table(table: LatencyTable, space: SearchSpace, target: Target, count: int, seed: int = 0,
                   settings: ProfileSettings = ProfileSettings()) -> list[Validation]:
    """Predicted vs measured latency of `count` random whole subnets of the reference supernet."""
    cost = TableLatency(table, space, target)
    timer = target.timer(settings)
    rng = random.Random(seed)
    supernet = reference_supernet(space)
    out = []
    for _ in range(count):
        subnet = space.sample(rng)
        out.append(Validation(subnet, cost.cost(subnet), measure_subnet(supernet, target, subnet, timer)))
    return out

