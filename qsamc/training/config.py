"""The training run's config: one frozen, versioned dataclass, read from YAML or TOML, every field also a
`qsamc train` option (with the type, allowed values and help below).

Defaults < config file < options. The resolved config is written next to the results (`config.json`,
with its format and version) and is what `--resume` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from qsamc.distributed import DEVICES
from qsamc.errors import ConfigError
from qsamc.supernet.lora import LORA_VARIANTS, LoraConfig
from qsamc.supernet.quant import WEIGHT_INITS, ZERO_POINTS
from qsamc.sam import get_config
from qsamc.supernet.space import GRANULARITIES
from qsamc.task.data import TASKS
from qsamc.task.head import HEADS
from qsamc.task.mask2former import Mask2FormerSpec
from qsamc.training.runs import check_not_locked

# --attention: the space's attention bits (float only: the paper's space).
ATTENTION_MODES = {"float": (32,), "searched": (8, 32)}

SCHEDULES = ("progressive", "lora", "full", "fp32")
SAMPLINGS = ("uniform", "sandwich")
DISTILLATIONS = ("auto", "none", "reference")
# The encoder's linear layers LoRA can adapt (every block has them).
LORA_MODULES = ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")
PRECISIONS = ("auto", "fp32", "bf16")
LORA_SWITCHES = ("weight", "act")
# The light head's activation ranges: trained with LSQ+ beside the encoder's, or min-max calibrated once after
# training (the paper's head; `qsamc.training.train.calibrate_head`).
HEAD_RANGES = ("learned", "minmax")
CONFIG_FORMAT = "qsamc.train_config"
CONFIG_VERSION = 7
# Earlier versions are still read, with the settings their runs had: version 1 (before held-out splits)
# trained on every training image, version 2 held out a seeded fraction only, versions 1-3 trained with
# cross-entropy and logits KL only when distilling and without L2-SP (version 3 runs of one development
# commit wrote these fields themselves), versions 1-4 left the LoRA adapters free of L2-SP's pull,
# versions 1-5 drew held-out images one by one, and versions 1-6 used LSQ+'s continuous activation offsets.
_CONTINUOUS = {"zero_point": "continuous"}
_BEFORE_RECIPE = {"label_weight": 1.0, "feature_weight": 0.0, "l2sp": 0.0, "l2sp_lora": False, "holdout_block": 1,
                  **_CONTINUOUS}
READABLE_VERSIONS = {1: {"holdout": 0.0, **_BEFORE_RECIPE}, 2: {"holdout_match": "", **_BEFORE_RECIPE},
                     3: _BEFORE_RECIPE, 4: {"l2sp_lora": False, "holdout_block": 1, **_CONTINUOUS},
                     5: {"holdout_block": 1, **_CONTINUOUS}, 6: _CONTINUOUS, 7: {}}
# L2-SP's default strength: for a supernet distilled from a qsamc FP32 reference run, a pull so strong that
# learning rate x strength is 1 for most of each phase (the weights and the LoRA adapters' B go back to the
# reference's each step, and what trains is the quantizers; benchmarks/real_data.py); for any other supernet from a
# checkpoint (a SAM encoder meeting a new task under a random head) the gentler pull runs had before.
L2SP_REFERENCE = 10000.0
L2SP_CHECKPOINT = 100.0


@dataclass(frozen=True)
class TrainConfig:
    """A supernet fine-tuning run (paper Sec. 3.3 and its baselines).

    schedule: `progressive` (phase 1 trains all weights and quantizers without LoRA at resolutions up
    to `phase1_max_resolution`, phase 2 attaches LoRA, freezes the pre-trained weights and trains LoRA
    and quantizers at the full resolution range), `lora` (LoRA from the start), `full` (QFA*: all
    weights, no LoRA), `fp32` (plain FP32 fine-tuning of encoder and head at the native resolution: the
    reference that compressed models are judged against and that post-training quantizers start from).
    `lora_variant` picks regular / selective / multiplex; `lora_rank=0` attaches no adapters, and the LoRA phase
    trains the quantizers and the head alone on the frozen weights.

    `checkpoint` is a SAM checkpoint (encoder only) or an `fp32` run folder (encoder and head).
    `distill="reference"` trains by inplace distillation from that FP32 reference (frozen, at the subnet's
    resolution): the loss is `label_weight` x cross-entropy + `distill_weight` x KL(reference || subnet) of
    the per-pixel class distributions + `feature_weight` x the relative MSE of the encoder's output features
    (without distillation the loss is the head's own). `l2sp` pulls the weights the checkpoint gave toward
    their values there (L2-SP, decoupled). The defaults are the recipe that kept the reference's accuracy
    on held-out drives (benchmarks/recipe_study.py): `distill="auto"` distils where `checkpoint` is an FP32
    reference run, from the reference only (no labels), logits and features; `l2sp=None` is 10,000 for a
    supernet distilled from its reference (learning rate x 10,000 >= 1 for most of each phase: the weights stay
    the reference's and the quantizers train), 100 for any other supernet trained from a checkpoint and 0
    otherwise (`resolved`); with `l2sp_lora` the pull reaches the LoRA
    phase too, where the checkpoint's weights are frozen and only the adapters move the layer's weight W0 + BA:
    each adapter's B is pulled toward 0. `lora_detach` trains multiplex LoRA's
    base adapter only where a layer's bits select it, not beside a low bit-width's (the paper's Alg. 2).
    `weight_init` initialises weight step sizes by LSQ+ (the paper) or by MSE-optimal clipping (as PTQ).
    `device`: `auto` is the GPU where torch sees one (one per rank under torchrun), else the CPU.
    `precision`: `bf16` runs the forward under bf16 autocast with LSQ+ scales and all quantizer math in
    FP32; `auto` is bf16 on CUDA and fp32 on the CPU.
    """

    model: str = "vit_t"
    checkpoint: str | None = None
    dataset: str = "synthetic"
    data_root: str | None = None
    out: str = "runs/qsamc"
    granularity: str = "layer"
    schedule: str = "progressive"
    lora_variant: str = "multiplex"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_modules: tuple[str, ...] = ("attn.qkv", "mlp.lin1", "mlp.lin2")
    multiplex_modules: int = 5
    lora_switch: str = "weight"
    lora_detach: bool = False
    per_channel: bool = False
    iterations: int = 200
    phase1_iterations: int = 100
    phase1_max_resolution: int | None = None  # None: 3/4 of the native input (768 for vit_*)
    sampling: str = "uniform"
    batch_size: int = 4
    lr: float = 1e-4
    lora_lr: float = 1e-3
    lora_rest_lr: float | None = None  # None: lora_lr
    weight_decay: float = 0.01
    poly_power: float = 0.9
    seed: int = 0
    calibration_batches: int = 2
    checkpoint_every: int = 50
    val_limit: int = 32
    num_workers: int = 0
    activation_checkpointing: bool = False
    distill: str = "auto"
    distill_weight: float = 1.0
    feature_weight: float = 1.0
    label_weight: float = 0.0
    l2sp: float | None = None
    l2sp_lora: bool = True
    weight_init: str = "lsq+"
    zero_point: str = "integer"
    device: str = "auto"
    precision: str = "auto"
    head: str = "light"
    head_ranges: str = "learned"
    head_dim: int = 256
    head_queries: int = 100
    head_layers: int = 9
    task: str = "semantic"
    attention: str = "float"
    holdout: float = 0.1
    holdout_seed: int = 0
    holdout_match: str = ""
    holdout_block: int = 10

    def __post_init__(self) -> None:
        get_config(self.model)
        checks = [
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'"),
            (self.lora_variant in LORA_VARIANTS, f"lora_variant must be one of {', '.join(LORA_VARIANTS)}, got '{self.lora_variant}'"),
            (self.sampling in SAMPLINGS, f"sampling must be one of {', '.join(SAMPLINGS)}, got '{self.sampling}'"),
            (self.granularity in GRANULARITIES, f"granularity must be one of {', '.join(GRANULARITIES)}, got '{self.granularity}'"),
            (self.iterations >= 1, f"iterations must be at least 1, got {self.iterations}"),
            (self.schedule != "progressive" or 0 < self.phase1_iterations < self.iterations,
             f"progressive training needs 0 < phase1_iterations < iterations, got {self.phase1_iterations} of {self.iterations}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.seed >= 0, f"seed must be 0 or more, got {self.seed}"),
            (self.val_limit >= 1, f"val_limit must be at least 1, got {self.val_limit}"),
            (self.num_workers >= 0, f"num_workers must be 0 or more, got {self.num_workers}"),
            (math.isfinite(self.holdout) and 0 <= self.holdout <= 0.5,
             f"holdout must be a fraction from 0 to 0.5 of the training images, got {self.holdout}"),
            (self.holdout_seed >= 0, f"holdout_seed must be 0 or more, got {self.holdout_seed}"),
            (self.holdout_block >= 1, f"holdout_block must be 1 or more, got {self.holdout_block}"),
            (self.out.strip() != "", "out must name the run folder; it is empty"),
            (self.calibration_batches >= 1, f"calibration_batches must be at least 1, got {self.calibration_batches}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number above 0, got {self.lr}"),
            (math.isfinite(self.lora_lr) and self.lora_lr > 0, f"lora_lr must be a finite number above 0, got {self.lora_lr}"),
            (self.lora_rest_lr is None or (math.isfinite(self.lora_rest_lr) and self.lora_rest_lr > 0),
             f"lora_rest_lr must be a finite number above 0, got {self.lora_rest_lr}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be a finite number >= 0, got {self.weight_decay}"),
            (all(m in LORA_MODULES for m in self.lora_modules) and len(self.lora_modules) > 0,
             f"lora_modules must name some of {', '.join(LORA_MODULES)}, got {', '.join(self.lora_modules) or 'none'}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be at least 1, got {self.checkpoint_every}"),
            (self.multiplex_modules in (3, 4, 5), f"multiplex_modules must be 3, 4 or 5, got {self.multiplex_modules}"),
            (self.lora_switch in LORA_SWITCHES, f"lora_switch must be 'weight' or 'act', got '{self.lora_switch}'"),
            (self.lora_rank >= 0, f"lora_rank must be at least 0 (0: no adapters), got {self.lora_rank}"),
            (self.distill in DISTILLATIONS, f"distill must be one of {', '.join(DISTILLATIONS)}, got '{self.distill}'"),
            (self.distill != "reference" or self.checkpoint is not None,
             "distill=reference needs --checkpoint naming an FP32 reference run (`qsamc train --schedule fp32`)"),
            (self.distill != "reference" or self.schedule != "fp32",
             "the fp32 schedule trains the reference; it has no reference to distill from"),
            (math.isfinite(self.distill_weight) and self.distill_weight >= 0,
             f"distill_weight must be a finite number >= 0, got {self.distill_weight}"),
            (math.isfinite(self.feature_weight) and self.feature_weight >= 0,
             f"feature_weight must be a finite number >= 0, got {self.feature_weight}"),
            (math.isfinite(self.label_weight) and self.label_weight >= 0,
             f"label_weight must be a finite number >= 0, got {self.label_weight}"),
            (self.label_weight + self.distill_weight + self.feature_weight > 0,
             "label_weight, distill_weight and feature_weight are all 0: distillation would have no loss"),
            (self.l2sp is None or (math.isfinite(self.l2sp) and self.l2sp >= 0),
             f"l2sp must be a finite number >= 0, got {self.l2sp}"),
            (not self.l2sp or self.checkpoint is not None,
             "l2sp pulls the weights toward the checkpoint's: it needs --checkpoint"),
            (self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got '{self.device}'"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'"),
            (self.weight_init in WEIGHT_INITS, f"weight_init must be one of {', '.join(WEIGHT_INITS)}, got '{self.weight_init}'"),
            (self.zero_point in ZERO_POINTS, f"zero_point must be one of {', '.join(ZERO_POINTS)}, got '{self.zero_point}'"),
            (self.head in HEADS, f"head must be one of {', '.join(HEADS)}, got '{self.head}'"),
            (self.head_ranges in HEAD_RANGES, f"head_ranges must be one of {', '.join(HEAD_RANGES)}, got '{self.head_ranges}'"),
            (self.head_ranges == "learned" or self.head == "light",
             "head_ranges=minmax calibrates the light head's 8-bit activation ranges; the mask2former head is float"),
            (self.distill != "reference" or self.head == "light",
             "distill=reference distils the light head's per-pixel logits; the mask2former head trains without it"),
            (self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got '{self.task}'"),
            (self.attention in ATTENTION_MODES, f"attention must be one of {', '.join(ATTENTION_MODES)}, got '{self.attention}'"),
            (self.task == "semantic" or self.head == "mask2former",
             "the instance task needs --head mask2former; the light head predicts classes per pixel"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def resolved(self) -> TrainConfig:
        """`distill="auto"` and `l2sp=None` made concrete (what a run records): distillation where the checkpoint
        is a qsamc FP32 reference run (encoder and light head) and this run trains a light-head supernet from
        it; L2-SP at `L2SP_REFERENCE` for a supernet that distils from its reference, `L2SP_CHECKPOINT` for any other
        supernet trained from a checkpoint."""
        supernet_from_checkpoint = self.checkpoint is not None and self.schedule != "fp32"
        distill = self.distill
        if distill == "auto":
            saved = Path(self.checkpoint) / "config.json" if self.checkpoint else None
            reference = saved is not None and saved.is_file() and _reads_as_reference(saved)
            distill = "reference" if supernet_from_checkpoint and reference and self.head == "light" else "none"
        l2sp = self.l2sp
        if l2sp is None:
            l2sp = (L2SP_REFERENCE if distill == "reference" else L2SP_CHECKPOINT) if supernet_from_checkpoint else 0.0
        return dataclasses.replace(self, distill=distill, l2sp=l2sp)

    @property
    def lora(self) -> LoraConfig | None:
        if self.schedule in ("full", "fp32") or self.lora_rank == 0:
            return None
        return LoraConfig(self.lora_variant, self.lora_rank, self.lora_alpha, tuple(self.lora_modules),
                          self.multiplex_modules, self.lora_switch, self.lora_detach)  # type: ignore[arg-type]

    @property
    def attention_bits(self) -> tuple[int, ...]:
        """The space's attention choices: float only (the paper) or searched INT8 / float."""
        return ATTENTION_MODES[self.attention]

    @property
    def mask2former(self) -> Mask2FormerSpec | None:
        if self.head != "mask2former":
            return None
        return Mask2FormerSpec(self.head_dim, self.head_queries, self.head_layers)

    def lora_from(self) -> int | None:
        """The first iteration that trains with LoRA (None: never)."""
        return {"progressive": self.phase1_iterations, "lora": 0, "full": None, "fp32": None}[self.schedule]

    def to_json(self) -> dict[str, Any]:
        data = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **dataclasses.asdict(self)}
        data["lora_modules"] = list(self.lora_modules)
        return data


# The allowed values of the fields that take one of a few, for validation and `qsamc train --help`.
CHOICES: dict[str, tuple[str, ...]] = {
    "granularity": GRANULARITIES, "schedule": SCHEDULES, "lora_variant": LORA_VARIANTS, "lora_switch": LORA_SWITCHES,
    "sampling": SAMPLINGS, "distill": DISTILLATIONS, "weight_init": WEIGHT_INITS, "zero_point": ZERO_POINTS,
    "head_ranges": HEAD_RANGES, "device": DEVICES, "precision": PRECISIONS, "head": HEADS, "task": TASKS, "attention": tuple(ATTENTION_MODES),
}
HELP: dict[str, str] = {
    "model": "Encoder config (vit_t, vit_b, vit_l, vit_h).",
    "checkpoint": "A SAM checkpoint (the encoder) or an FP32 reference run folder (encoder and head).",
    "dataset": "Dataset format: synthetic, ade20k, camvid (semantic task); synthetic, coco (instance task).",
    "data_root": "Dataset folder (not for synthetic).",
    "out": "Run folder: checkpoints, supernet, metrics.",
    "granularity": "Bits tied per layer, block, stage or model.",
    "schedule": "progressive (QAT, then LoRA), lora, full (QFA*: all weights) or fp32 (the FP32 reference).",
    "lora_variant": "Quantization-aware LoRA: regular, selective (one adapter per bit-width) or multiplex.",
    "lora_rank": "LoRA rank; 0: the LoRA phase attaches no adapters and trains the quantizers and the head alone.",
    "lora_alpha": "LoRA scaling numerator (the update is alpha / rank x BA).",
    "lora_modules": "Comma-separated layers LoRA adapts: attn.qkv, attn.proj, mlp.lin1, mlp.lin2.",
    "multiplex_modules": "Multiplex LoRA: adapters shared across bit-widths (3, 4 or 5).",
    "lora_switch": "Multiplex LoRA: pick the adapter by the weight's or the activation's bits.",
    "lora_detach": "Multiplex LoRA: the base adapter trains only where a layer's bits select it (32 with five "
                   "modules), not beside a low bit-width's adapter (the paper's Alg. 2).",
    "per_channel": "Per-output-channel weight step sizes.",
    "iterations": "Training iterations in all.",
    "phase1_iterations": "Progressive schedule: iterations before LoRA is attached.",
    "phase1_max_resolution": "Progressive schedule: the resolution cap of phase 1 (default 3/4 of the native input).",
    "sampling": "Subnets per step: one uniform sample, or the sandwich rule (largest, smallest, random).",
    "batch_size": "Images per step (per rank).",
    "lr": "Learning rate of weights and step sizes (poly schedule), before the LoRA phase.",
    "lora_lr": "Learning rate of the LoRA phase: the adapters, and the step sizes and head that train beside them.",
    "lora_rest_lr": "LoRA phase: learning rate of what trains beside the adapters (quantizer step sizes and offsets, "
                    "the head), where it should differ from --lora-lr.",
    "weight_decay": "AdamW weight decay.",
    "poly_power": "Power of the poly learning-rate decay.",
    "seed": "Seed of batches, augmentation and sampled subnets (a resumed run repeats them).",
    "calibration_batches": "Training batches that initialise the activation ranges.",
    "checkpoint_every": "Iterations between checkpoints.",
    "val_limit": "Validation images for the final max/min subnet scores.",
    "num_workers": "Data-loader worker processes.",
    "activation_checkpointing": "Recompute each block in backward (less memory, slower steps).",
    "distill": "reference: inplace distillation from the FP32 reference given as --checkpoint; auto (the default): "
               "reference where --checkpoint is an FP32 reference run, else none.",
    "distill_weight": "Distillation: weight of the KL to the reference's per-pixel class distributions.",
    "feature_weight": "Distillation: weight of the MSE of the encoder's output features to the reference's, relative "
                      "to the reference features' mean square.",
    "label_weight": "Distillation: weight of the cross-entropy on the labels (default 0: learn from the reference "
                    "only; without distillation the labels are the loss).",
    "l2sp": "L2-SP: each step pulls every weight the checkpoint gave toward its value there by learning rate x l2sp of "
            "the difference (decoupled, as AdamW's decay). Default: 10000 for a supernet distilled from its reference "
            "(the weights stay the reference's and the quantizers train), 100 for any other supernet trained from a "
            "checkpoint, 0 otherwise.",
    "l2sp_lora": "L2-SP reaches the LoRA adapters: each step pulls every adapter's B toward 0 (the layer's weight W0 + BA "
                 "toward the checkpoint's) by the LoRA learning rate x l2sp.",
    "weight_init": "Weight step sizes start at LSQ+'s 3-sigma rule or at the MSE-optimal clipping.",
    "zero_point": "Activation quantizers' zero point: integer (the default: 0 exactly on the grid, so SAM's zero "
                  "padding stays 0) or continuous (LSQ+'s learned offset, the paper).",
    "device": "auto (a GPU where torch sees one), cpu or cuda.",
    "precision": "auto (bf16 on CUDA, fp32 on the CPU), fp32 or bf16 autocast.",
    "head": "The task head: light (a W8A8 conv head) or mask2former (the paper's setup; qsamc[mask2former]).",
    "head_ranges": "The light head's 8-bit activation ranges: learned (trained with LSQ+, the default) or minmax "
                   "(calibrated min-max once after training on the FP32 grid's features of 32 training images, as "
                   "the paper's head; one head for every subnet).",
    "head_dim": "Mask2Former head: width of its pixel and transformer decoders.",
    "head_queries": "Mask2Former head: object queries.",
    "head_layers": "Mask2Former head: masked-attention decoder layers.",
    "task": "semantic (mIoU) or instance (COCO-format data, mask AP; needs --head mask2former).",
    "holdout": "Fraction of the training images never trained on; qsamc search scores subnets on them (0: none).",
    "holdout_seed": "Seed of the held-out images (the same settings hold out the same images in every run).",
    "holdout_match": "Hold out the training images whose file names match this glob instead of a seeded "
                     "fraction, e.g. '0006R0_*' (one CamVid drive): search scores on a drive never trained on.",
    "holdout_block": "Hold out the seeded fraction in runs of this many images consecutive by file name (video "
                     "frames beside a training frame are near copies of it; 1: single images).",
    "attention": "float (the paper: attention matmuls stay float) or searched (q, k, v and softmax output "
                 "8-bit or float per block, or per stage / model with --granularity; beyond the paper).",
}


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Convert a file or flag value to the field's type, with one sentence when it cannot be."""
    hint = typing.get_type_hints(TrainConfig)[name]
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    try:
        if typing.get_origin(base) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(i).strip() for i in items)
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{name}' expects {getattr(base, '__name__', base)}, got {value!r}") from None


def _read_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give the YAML, TOML or JSON file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field names to values")
    return data


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML/TOML/JSON file, then `overrides` (flag values as strings or values)."""
    known = {f.name: f for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    written = _read_file(Path(path)) if path else {}
    if "format" in written or "version" in written:  # a config.json that qsamc wrote
        fmt, version = written.pop("format", None), written.pop("version", None)
        if fmt != CONFIG_FORMAT or version not in READABLE_VERSIONS:
            *earlier, last = READABLE_VERSIONS
            raise ConfigError(f"config file {path} is not a qsamc training config of version "
                              f"{', '.join(map(str, earlier))} or {last}")
        written = {**READABLE_VERSIONS[version], **written}
    for source in (written, overrides or {}):
        for key, value in source.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown config field '{key}'; known fields are {', '.join(known)}")
            values[name] = _coerce(name, known[name].type, value)
    return TrainConfig(**values)


def _reads_as_reference(saved: Path) -> bool:
    """Whether the run config at `saved` is an FP32 reference's with the light head (unreadable: no)."""
    try:
        written = load_train_config(saved)
    except ConfigError:
        return False
    return written.schedule == "fp32" and written.head == "light"


def default_phase1_resolution(config: TrainConfig) -> int:
    native = get_config(config.model).img_size
    return config.phase1_max_resolution or native * 3 // 4


def resolve_train_config(path: str | Path | None, options: dict[str, Any], resume: bool) -> TrainConfig:
    """What `qsamc train` runs: the file, then `options` (field -> value, the options given); with
    `resume`, the config saved in the run folder."""
    config = load_train_config(path, options)
    if not resume:
        return config
    others = [name for name in options if name != "out"]
    if others:
        raise ConfigError(f"--resume continues the run with its saved config; it takes --out (or --config) only, "
                          f"not --{others[0].replace('_', '-')} (start a new run for other settings)")
    run = Path(config.out)
    check_not_locked(run)  # a train that is still starting has not written config.json yet
    saved = run / "config.json"
    if not saved.is_file():
        raise ConfigError(f"cannot resume: {saved} does not exist (pass the run's --out or its --config)")
    # The run is where its folder is now, not where config.json says it was written (a copied or moved run).
    return dataclasses.replace(load_train_config(saved), out=str(run))


def check_reference_holdout(config: TrainConfig) -> None:
    """A run that starts from a qsamc FP32 reference on the same dataset holds out the same training images
    it did: otherwise the weights the run starts from have seen the images search scores on."""
    if config.checkpoint is None or not (Path(config.checkpoint) / "config.json").is_file():
        return  # a SAM checkpoint never saw this dataset's training split
    reference = load_train_config(Path(config.checkpoint) / "config.json")
    if (reference.dataset, reference.data_root) != (config.dataset, config.data_root):
        return
    if reference.holdout_match or config.holdout_match:
        if reference.holdout_match != config.holdout_match:
            raise ConfigError(
                f"the reference {config.checkpoint} held out the training images matching "
                f"'{reference.holdout_match or '(a seeded fraction)'}' and this run would hold out those matching "
                f"'{config.holdout_match or '(a seeded fraction)'}': search would score on images the reference "
                f"trained on; pass --holdout-match '{reference.holdout_match}'")
        return
    if (reference.holdout, reference.holdout_seed, reference.holdout_block) != (config.holdout, config.holdout_seed,
                                                                                config.holdout_block):
        raise ConfigError(
            f"the reference {config.checkpoint} held out {reference.holdout:g} of the training images (seed "
            f"{reference.holdout_seed}, runs of {reference.holdout_block}) and this run would hold out "
            f"{config.holdout:g} (seed {config.holdout_seed}, runs of {config.holdout_block}): search would score on "
            f"images the reference trained on; pass --holdout {reference.holdout:g} --holdout-seed "
            f"{reference.holdout_seed} --holdout-block {reference.holdout_block}")
