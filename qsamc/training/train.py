"""`qsamc train`: fine-tune a SAM encoder once into a mixed-precision quantized supernet (paper Sec. 3.3).

The pipeline, top to bottom (`train`):
  build the supernet from the checkpoint -> trace and annotate the IR -> insert LSQ+ quantizers ->
  calibrate activations -> for each iteration: sample a subnet (Eq. 1; the sandwich rule optionally),
  one optimizer step on a batch at its resolution -> at the progressive boundary attach LoRA, freeze the
  pre-trained weights and lift the resolution cap -> validate the max and min subnets -> write the run.

Every source of randomness is a pure function of (seed, iteration): the batch indices, their
augmentation and the sampled subnets. A checkpoint therefore only needs the weights, the optimizer and
the scheduler, and a run killed at any point and resumed ends with the same weights as one that was not.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import contextlib
import signal
import threading
import random
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qsamc.distributed import init_distributed, resolve_device
from qsamc.sam import is_quantizer_state
from qsamc.fileio import atomic_torch_save, atomic_write_json
from qsamc.training.runs import (SupernetSpec, build_model, checkpoint_path, load_checkpoint, prepare_run_folder,
                                 resume_optimizer, resume_weights, run_lock, save_supernet)
from qsamc.task.data import build_dataset, make_batch
from qsamc.errors import ConfigError, QsamcError, WriteError
from qsamc.task.evaluate import Evaluation, ValidationSet, evaluate_subnet
from qsamc.task.head import SegmentationModel
from qsamc.task.losses import distillation_loss, feature_distillation_loss, segmentation_loss
from qsamc.ir.pass_manager import PassManager
from qsamc.passes import AttachLoraPass, CalibrateActivationsPass
from qsamc.progress import progress_bar
from qsamc.supernet.lora import LowRank
from qsamc.supernet.quant import LsqActQuantizer, LsqWeightQuantizer
from qsamc.supernet.space import SearchSpace, Subnet, default_space
from qsamc.threads import adapt as adapt_threads
from qsamc.training.config import TrainConfig, check_reference_holdout, default_phase1_resolution
from qsamc.training.splits import holdout_split


class TrainingDiverged(QsamcError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainResult:
    run: Path
    iterations: int
    max_subnet: Evaluation  # the fp32 schedule: its FP32 model
    min_subnet: Evaluation | None  # None for the fp32 schedule


def training_space(config: TrainConfig, space: SearchSpace, iteration: int) -> SearchSpace:
    """The space trained at `iteration`: progressive phase 1 caps the resolution (768 for vit_*)."""
    if config.schedule != "progressive" or iteration >= config.lora_from():
        return space
    cap = default_phase1_resolution(config)
    return space.restrict(resolutions=tuple(r for r in space.resolutions if r <= cap) or (min(space.resolutions),))


def fp32_subnet(space: SearchSpace, resolution: int | None = None) -> Subnet:
    """The largest architecture with every layer in float, at `resolution` (default: the native one)."""
    largest = space.max_subnet()
    return space.uniform_bits(replace(largest, resolution=resolution or largest.resolution), 32, 32)


def sample_subnets(config: TrainConfig, space: SearchSpace, iteration: int) -> list[Subnet]:
    """The subnets trained at `iteration`: one uniform sample (Eq. 1), or max, min and one (sandwich);
    the fp32 schedule trains the float largest network only."""
    if config.schedule == "fp32":
        return [fp32_subnet(space)]
    rng = random.Random(config.seed * 1_000_003 + iteration)
    space = training_space(config, space, iteration)
    if config.sampling == "sandwich":
        return [space.max_subnet(), space.min_subnet(), space.sample(rng)]
    return [space.sample(rng)]


def batch_indices(config: TrainConfig, size: int, iteration: int, rank: int, world: int) -> tuple[int, list[int]]:
    """(epoch, indices) of this rank's batch at `iteration`: epochs are seeded permutations."""
    per_step = config.batch_size * world
    steps = max(size // per_step, 1)
    epoch, step = divmod(iteration, steps)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(config.seed * 7919 + epoch)).tolist()
    order = (order * math.ceil(per_step / size))[: max(size, per_step)]  # tiny datasets: wrap around
    start = step * per_step + rank * config.batch_size
    return epoch, order[start : start + config.batch_size]


class Teacher:
    """The frozen FP32 reference that `distill="reference"` distils from, at the student's resolution:
    (its logits at the token grid, as the student's; its encoder's output features)."""

    def __init__(self, model: SegmentationModel, space: SearchSpace) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.model.head.set_bits(32)
        self.space = space

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.supernet.configure(fp32_subnet(self.space, images.shape[-1]))
        return self.model(images, upsample=False, with_features=True)


HEAD_CALIBRATION_IMAGES = 32  # as many as `qsamc baseline` calibrates its peers (and their heads) on


@torch.no_grad()
def calibrate_head(model: SegmentationModel, space: SearchSpace, train_set, device: torch.device) -> None:
    """`--head-ranges minmax`: the light head's activation ranges min-max over the FP32 grid's features of the
    first HEAD_CALIBRATION_IMAGES images of `train_set` (the run's training images, not augmented), replacing
    the ranges training learned. One calibration serves every subnet (the head is shared; benchmarks/head_ranges.py --once)."""
    subnet = fp32_subnet(space)
    model.eval()
    model.supernet.set_subnet(subnet)
    samples = [train_set.sample(i, 0) for i in range(min(HEAD_CALIBRATION_IMAGES, len(train_set)))]
    features = [model.supernet(make_batch(samples[i : i + 8], subnet.resolution)[0].to(device))
                for i in range(0, len(samples), 8)]
    model.head.calibrate_activations(torch.cat(features))


def distilled_loss(config: TrainConfig, wrapped: nn.Module, teacher: Teacher, images: torch.Tensor,
                   masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """`label_weight` x cross-entropy + `distill_weight` x per-pixel KL to the reference + `feature_weight` x
    the relative MSE of the encoder's features to the reference's (terms of weight 0 are not computed)."""
    logits, features = wrapped(images, upsample=False, with_features=True)
    reference_logits, reference_features = teacher(images)
    logits = logits.float()
    loss = logits.new_zeros(())
    if config.label_weight:
        loss = loss + config.label_weight * segmentation_loss(logits, masks, ignore_index)
    if config.distill_weight:
        loss = loss + config.distill_weight * distillation_loss(logits, reference_logits.float(), masks, ignore_index)
    if config.feature_weight:
        loss = loss + config.feature_weight * feature_distillation_loss(features.float(), reference_features.float())
    return loss


class WeightAnchor:
    """L2-SP, decoupled: after each optimizer step, every weight the checkpoint gave moves toward the
    checkpoint's value by its group's learning rate x `strength` of the difference (as AdamW decays toward 0).
    The checkpoint gave the encoder's weights, and the head's where it is a reference run (`with_head`; a SAM
    checkpoint's head starts at random and is free). In the LoRA phase the encoder's weights are frozen and a
    layer computes with W0 + BA: `track_adapters` pulls each adapter's B toward 0 the same way, so the weight the
    layer computes with stays anchored at the checkpoint's (A is a random projection with no checkpoint value).
    Quantizer step sizes and offsets have no anchor; frozen weights are left alone."""

    def __init__(self, model: nn.Module, strength: float, with_head: bool = True) -> None:
        self.strength = strength
        self.anchors = {name: p.detach().clone() for name, p in model.named_parameters()
                        if not is_quantizer_state(name) and ".lora." not in name
                        and (with_head or name.startswith("supernet."))}
        # Each anchored parameter and its anchor, by the parameter's identity (as optimizer groups hold them).
        self._pairs = {id(p): (p, self.anchors[name]) for name, p in model.named_parameters() if name in self.anchors}
        self._adapters: dict[int, nn.Parameter] = {}

    def track_adapters(self, model: nn.Module) -> None:
        """Pull the B of every LoRA adapter in `model` toward 0 from now on (call once LoRA is attached)."""
        self._adapters = {id(m.B): m.B for m in model.modules() if isinstance(m, LowRank)}

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            rate = min(group["lr"] * self.strength, 1.0)
            pairs = [self._pairs[id(p)] for p in group["params"] if id(p) in self._pairs and p.requires_grad]
            if pairs:
                torch._foreach_lerp_([p for p, _ in pairs], [anchor for _, anchor in pairs], rate)
            adapters = [p for p in group["params"] if id(p) in self._adapters and p.requires_grad]
            if adapters:
                torch._foreach_mul_(adapters, 1.0 - rate)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _trainable(model: SegmentationModel, lora_phase: bool) -> list[nn.Parameter]:
    """Phase 1 (and QFA*) trains everything; the LoRA phase freezes the pre-trained encoder weights."""
    for name, param in model.named_parameters():
        frozen = lora_phase and name.startswith("supernet.") and ".lora." not in name and not is_quantizer_state(name)
        param.requires_grad_(not frozen)
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: nn.Module, params: list[nn.Parameter], lr: float, weight_decay: float,
                 adapter_lr: float | None = None) -> list[dict]:
    """AdamW groups: weights, LoRA and head at `lr` with weight decay (LoRA's adapters in a group of their own
    at `adapter_lr` where it is given); LSQ+ step sizes and offsets without it. Adam moves every parameter by
    about its learning rate per step, whatever the gradient's scale (LSQ's gradient scaling assumes SGD), and
    an 8-bit weight step size is ~1e-4: at the weights' learning rate it would change several-fold per step
    while a 2-bit one barely moves. So each bit-width's step sizes get a learning rate proportional to their
    mean size, a relative step of `lr` for every bit-width; offsets live on the activations' scale and keep
    `lr`."""
    wanted = {id(p) for p in params}
    steps: dict[tuple[str, int], list[nn.Parameter]] = {}
    offsets: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, (LsqWeightQuantizer, LsqActQuantizer)):
            if id(module.scale) in wanted:
                steps.setdefault((type(module).__name__, module.bits), []).append(module.scale)
            if isinstance(module, LsqActQuantizer) and id(module.offset) in wanted:
                offsets.append(module.offset)
    adapters = ([p for m in model.modules() if isinstance(m, LowRank) for p in m.parameters() if id(p) in wanted]
                if adapter_lr is not None else [])
    special = {id(p) for group in (*steps.values(), offsets, adapters) for p in group}
    groups = [{"params": [p for p in params if id(p) not in special], "lr": lr, "weight_decay": weight_decay}]
    if adapters:
        groups.append({"params": adapters, "lr": adapter_lr, "weight_decay": weight_decay})
    for (_, _bits), scales in sorted(steps.items()):
        size = float(torch.cat([s.detach().abs().reshape(-1) for s in scales]).mean())
        groups.append({"params": scales, "lr": lr * size, "weight_decay": 0.0})
    if offsets:
        groups.append({"params": offsets, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _optimizer(config: TrainConfig, model: SegmentationModel, lora_phase: bool, steps: int):
    params = _trainable(model, lora_phase)
    lr = config.lora_lr if lora_phase else config.lr
    # `lora_rest_lr`: what trains beside the adapters at a rate of its own, the adapters at `lora_lr`.
    adapter_lr = None
    if lora_phase and config.lora_rest_lr is not None:
        lr, adapter_lr = config.lora_rest_lr, config.lora_lr
    # The fused AdamW: one kernel per parameter group on CUDA and a few ops per tensor on the CPU, where
    # the default loops over tensors in Python (~28 aten ops each). It differs from that loop in the last
    # bit of some updates; gradients and losses are untouched.
    optimizer = torch.optim.AdamW(param_groups(model, params, lr, config.weight_decay, adapter_lr), lr=lr,
                                  weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(1.0 - step / max(steps, 1), 0.0) ** config.poly_power)
    return optimizer, scheduler


def _phase_steps(config: TrainConfig, lora_phase: bool) -> int:
    """The iterations of one phase: the whole run without a LoRA phase, else the iterations before or after
    the progressive boundary."""
    lora_from = config.lora_from()
    if lora_from is None:
        return config.iterations
    return config.iterations - lora_from if lora_phase else lora_from


def _start_phase(config: TrainConfig, model: SegmentationModel, ir, device: torch.device, world: int,
                 lora_phase: bool, state: dict | None = None, run: Path | None = None,
                 anchor: WeightAnchor | None = None):
    """A training phase starts: for the LoRA phase, attach LoRA (seeded apart from the rest) on `device`, and
    L2-SP's `anchor` pulls the adapters where `config.l2sp_lora`;
    resuming, the checkpoint's weights; a new optimizer over what the phase trains (the LoRA phase freezes
    W0) and its scheduler, resuming from the checkpoint's state; across ranks, a new DDP wrapper that sees
    the phase's parameters. Returns (optimizer, scheduler, the module a step calls)."""
    if lora_phase and config.lora is not None:  # rank 0: the phase trains the quantizers and head alone
        PassManager([AttachLoraPass(config.lora, seed=config.seed + 1)])(ir)
        model.to(device)
        if anchor is not None and config.l2sp_lora:
            anchor.track_adapters(model)
    if state is not None:
        resume_weights(model, state, run)
    optimizer, scheduler = _optimizer(config, model, lora_phase, _phase_steps(config, lora_phase))
    if state is not None:
        resume_optimizer(optimizer, scheduler, state, run)
    wrapped: nn.Module = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    return optimizer, scheduler, wrapped


def _calibrate(config: TrainConfig, model: SegmentationModel, ir, space: SearchSpace, train_set,
               device: torch.device) -> None:
    """LSQ+ activation initialisation from `config.calibration_batches` batches at the (phase-capped) max
    subnet."""
    calibration_subnet = training_space(config, space, 0).max_subnet()
    resolution = calibration_subnet.resolution
    calibration = [
        make_batch([train_set.sample(i, 0) for i in batch_indices(config, len(train_set), k, 0, 1)[1]], resolution)[0]
        for k in range(config.calibration_batches)
    ]
    PassManager([CalibrateActivationsPass(model, [b.to(device) for b in calibration], calibration_subnet)])(ir)


class _Logger:
    """metrics.csv (and TensorBoard when installed), written by rank 0 only."""

    FIELDS = ("iteration", "phase", "loss", "lr", "resolution", "depths", "iter_per_s", "memory_mb")

    def __init__(self, run: Path, resume_from: int | None) -> None:
        self.path = run / "metrics.csv"
        kept = []
        if resume_from is not None and self.path.exists():
            # Rows logged after the checkpoint we resume from belong to iterations that run again.
            with open(self.path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["iteration"]) <= resume_from]
        self.handle = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=self.FIELDS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(run / "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def log(self, row: dict) -> None:
        try:
            self.writer.writerow(row)
            self.handle.flush()
        except OSError as exc:
            raise WriteError(f"could not write {self.path}: {os.strerror(exc.errno) if exc.errno else exc}; the "
                             f"last checkpoint in {checkpoint_path(self.path.parent)} is intact") from None
        if self.tensorboard is not None:
            for key in ("loss", "lr", "iter_per_s", "memory_mb"):
                self.tensorboard.add_scalar(f"train/{key}", row[key], row["iteration"])

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def training_device(config: TrainConfig, rank: int = 0) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None) for this rank: `config.device` and `config.precision` resolved."""
    device = resolve_device(config.device, rank)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    return device, torch.bfloat16 if bf16 else None


class TrainingInterrupted(QsamcError):
    """Ctrl-C or SIGTERM: the run stopped at an iteration boundary with its checkpoint saved."""

    exit_code = 130


class _StopRequest:
    """SIGINT / SIGTERM ask the loop to stop at the next iteration boundary (a second one stops at once)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(config: TrainConfig, resume: bool = False, show_progress: bool = True, overwrite: bool = False) -> TrainResult:
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; choose one")
    config = config.resolved()  # the recipe's automatic choices, recorded in the run's config.json
    check_reference_holdout(config)
    run = Path(config.out)
    rank, world = init_distributed(config.device)
    if rank == 0:
        prepare_run_folder(run, resume, overwrite)
    with run_lock(run) if rank == 0 else contextlib.nullcontext():
        return _train(config, resume, show_progress, rank, world)


def _train(config: TrainConfig, resume: bool, show_progress: bool, rank: int, world: int) -> TrainResult:
    device, autocast_dtype = training_device(config, rank)
    run = Path(config.out)
    torch.manual_seed(config.seed)

    # 1. Data, space, model with quantizers.
    train_set = build_dataset(config.dataset, config.data_root, "train", augment=True, seed=config.seed, task=config.task)
    val_set = build_dataset(config.dataset, config.data_root, "val", seed=config.seed, task=config.task)
    for split in (train_set, val_set):  # a bad file is found now, not after every iteration has run
        split.check_files()
    train_set, _ = holdout_split(config, train_set)  # the held-out images are never trained on: search's
    space = default_space(config.model, config.granularity, config.attention_bits)  # type: ignore[arg-type]
    spec = SupernetSpec(space, train_set.num_classes, config.lora, config.per_channel, config.head, config.mask2former,
                        config.task, config.zero_point)
    model, ir = build_model(replace(spec, lora=None), config.checkpoint,
                            weight_init=config.weight_init)  # type: ignore[arg-type]
    model.supernet.activation_checkpointing = config.activation_checkpointing
    if config.schedule == "fp32":
        model.head.set_bits(32)
    model.to(device)
    teacher = Teacher(model, space) if config.distill == "reference" else None
    # A reference run folder gave the head too (build_model loads it); a SAM checkpoint's head is random.
    anchor = (WeightAnchor(model, config.l2sp, with_head=(Path(config.checkpoint) / "supernet.json").is_file())
              if config.l2sp else None)

    lora_from = config.lora_from()
    state = load_checkpoint(run) if resume else None
    start = state["iteration"] if state else 0
    if state is None:
        # 2. LSQ+ activation initialisation (a resumed run has its quantizers in its checkpoint).
        _calibrate(config, model, ir, space, train_set, device)
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run / "config.json", config.to_json())
    # 3. The phase the run is in starts (LoRA attached past the progressive boundary; resumed, the weights and
    # optimizer of its checkpoint); the loop starts the LoRA phase at the boundary. A checkpoint written at the
    # boundary predates the LoRA: the loop attaches it, as it did.
    lora_attached = lora_from is not None and (start > lora_from if state else start >= lora_from)
    optimizer, scheduler, wrapped = _start_phase(config, model, ir, device, world, lora_attached, state, run, anchor)

    logger = _Logger(run, start if resume else None) if rank == 0 else None
    bar = progress_bar(config.iterations, "training supernet", enabled=show_progress and rank == 0,
                       fields={"loss": "-", "lr": "-", "mem": "-"})
    tick = time.perf_counter()
    stop = _StopRequest()
    try:
        with bar, stop:
            bar.advance(start)
            for iteration in range(start, config.iterations):
                adapt_threads()  # follow the free cores (qsamc.threads)
                if lora_from is not None and iteration == lora_from and not lora_attached:  # 3. the boundary
                    lora_attached = True
                    optimizer, scheduler, wrapped = _start_phase(config, model, ir, device, world, lora_phase=True,
                                                                anchor=anchor)
                # 4. One step: the iteration's subnets, each on the iteration's batch at its resolution.
                epoch, indices = batch_indices(config, len(train_set), iteration, rank, world)
                samples = [train_set.sample(i, epoch) for i in indices]
                subnets = sample_subnets(config, space, iteration)
                total = 0.0
                for subnet in subnets:
                    model.supernet.set_subnet(subnet)
                    images, masks = (t.to(device) for t in make_batch(samples, subnet.resolution))
                    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                        enabled=autocast_dtype is not None):
                        if teacher is None:  # the head's own loss (the light head's CE, Mask2Former's set loss)
                            loss = wrapped(images, masks=masks, ignore_index=train_set.ignore_index)
                        else:
                            loss = distilled_loss(config, wrapped, teacher, images, masks, train_set.ignore_index)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"the loss became {loss.item()} at iteration {iteration + 1}; training stopped and the last "
                            f"good checkpoint in {checkpoint_path(run)} was kept (lower the learning rate)")
                    (loss / len(subnets)).backward()
                    total += loss.item() / len(subnets)
                optimizer.step()
                if anchor is not None:
                    anchor(optimizer)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = iteration + 1
                if rank == 0:
                    now = time.perf_counter()
                    lr = optimizer.param_groups[0]["lr"]
                    memory = peak_memory_mb()
                    logger.log({"iteration": done, "phase": 2 if lora_attached else 1, "loss": f"{total:.5f}",
                                "lr": f"{lr:.3e}", "resolution": subnets[-1].resolution,
                                "depths": "-".join(map(str, subnets[-1].depths)),
                                "iter_per_s": f"{1.0 / max(now - tick, 1e-9):.3f}", "memory_mb": f"{memory:.0f}"})
                    tick = now
                    bar.update(advance=1, loss=f"{total:.4f}", lr=f"{lr:.2e}", mem=f"{memory:.0f}MB")
                    # 5. Atomic checkpoints: a kill at any moment leaves the previous one intact.
                    if done % config.checkpoint_every == 0 or done == config.iterations or stop.signal:
                        atomic_torch_save({"iteration": done, "model": model.state_dict(),
                                           "optimizer": optimizer.state_dict(),
                                           "scheduler": scheduler.state_dict()}, checkpoint_path(run))
                if stop.signal and done < config.iterations:
                    raise TrainingInterrupted(
                        f"{stop.signal} stopped training after iteration {done} of {config.iterations}; its checkpoint is "
                        f"saved in {checkpoint_path(run)}: continue with qsamc train --resume --out {run}")
    finally:
        if logger is not None:
            logger.close()

    # 6. The head's min-max ranges where asked for; validate the extremes of the space and write the supernet
    # that search and export load.
    if config.head_ranges == "minmax" and config.schedule != "fp32":
        plain = build_dataset(config.dataset, config.data_root, "train", task=config.task)  # no augmentation
        calibrate_head(model, space, holdout_split(config, plain)[0], device)
    validation = ValidationSet(val_set, limit=config.val_limit)
    if config.schedule == "fp32":
        max_eval, min_eval = evaluate_subnet(model, fp32_subnet(space), validation), None
    else:
        max_eval = evaluate_subnet(model, space.max_subnet(), validation)
        min_eval = evaluate_subnet(model, space.min_subnet(), validation)
    if rank == 0:
        save_supernet(run, spec, model)
        atomic_write_json(run / "validation.json", {
            "max_subnet": max_eval.metrics(), "min_subnet": None if min_eval is None else min_eval.metrics(),
            "val_images": len(validation.samples), "schedule": config.schedule})
    if world > 1:
        dist.barrier()
    return TrainResult(run, config.iterations, max_eval, min_eval)

