"""Trained-supernet runs on disk: what `qsamc train` writes and `qsamc search` / `qsamc export` load.

A run folder holds:
  supernet.json   what to rebuild: model, search space, LoRA config, classes, quantizer options
  supernet.pt     the weights of encoder + quantizers + LoRA + head (a plain state dict)
  checkpoints/    resumable training state (see `qsamc.training.train`)
Every file is written atomically (temporary file, then rename), so a crash never leaves half a file, and
state dicts are read with `weights_only=True`: a checkpoint is untrusted input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qsamc.errors import ConfigError, CheckpointError, QsamcError
from qsamc.fileio import (atomic_torch_save, atomic_write_json, check_output_folder, make_folder, read_json,
                          remove_stale_temporaries)
from qsamc.ir.frontend import build_ir
from qsamc.ir.pass_manager import PassManager
from qsamc.passes import AttachLoraPass, InsertQuantizersPass
from qsamc.task.head import SegmentationHead, SegmentationModel
from qsamc.task.mask2former import Mask2FormerSpec
from qsamc.supernet.encoder import Supernet
from qsamc.supernet.lora import LoraConfig
from qsamc.supernet.quant import ZERO_POINTS, WeightInit
from qsamc.sam import check_state_dict, is_quantizer_state, read_tensors
from qsamc.supernet.space import SearchSpace

RUN_FORMAT = "qsamc.supernet"
RUN_VERSION = 1

# What each field of supernet.json must be: (check, words for the message).
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_INTS = (lambda v: isinstance(v, list) and bool(v) and all(_INT[0](x) for x in v), "a non-empty list of integers")
_NUMBERS = (lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                              for x in v), "a non-empty list of numbers")
_STR = (lambda v: isinstance(v, str), "a string")
_MAPPING = (lambda v: isinstance(v, dict), "a JSON object")
_OPTIONAL_MAPPING = (lambda v: v is None or isinstance(v, dict), "a JSON object or null")
SPEC_FIELDS = {"space": _MAPPING, "num_classes": _INT, "lora": _OPTIONAL_MAPPING, "per_channel": (
    lambda v: isinstance(v, bool), "true or false"), "head": _STR, "mask2former": _OPTIONAL_MAPPING, "task": _STR,
    "zero_point": _STR}
SPACE_FIELDS = {"model": _STR, "resolutions": _INTS, "depth_choices": (
    lambda v: isinstance(v, list) and bool(v) and all(_INTS[0](c) for c in v), "a non-empty list of lists of integers"),
    "mlp_ratios": _NUMBERS, "weight_bits": _INTS, "act_bits": _INTS, "granularity": _STR, "attention_bits": _INTS}
REQUIRED_SPEC = ("space", "num_classes")
OPTIONAL_SPACE = ("attention_bits",)  # runs written before attention bits


def _check_fields(data: Any, fields: dict, required, source: str) -> None:
    if not isinstance(data, dict):
        raise CheckpointError(f"{source} must be a JSON object, not {type(data).__name__}")
    for key in required:
        if key not in data:
            raise CheckpointError(f"{source} lacks the field '{key}'")
    for key, (ok, words) in fields.items():
        if key in data and not ok(data[key]):
            raise CheckpointError(f"{source}: '{key}' must be {words}, got {json.dumps(data[key])[:60]}")


def read_spec(meta: Path) -> SupernetSpec:
    """supernet.json as a `SupernetSpec`, or one sentence naming the field that is wrong and why."""
    data = read_json(meta, "supernet description", CheckpointError)
    source = str(meta)
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{meta} is not a qsamc supernet description")
    version = data.get("version")
    if not _INT[0](version) or version < 1:
        raise CheckpointError(f"{source}: 'version' must be a positive integer, got {json.dumps(version)}")
    if version > RUN_VERSION:
        raise CheckpointError(f"{meta} was written by a newer qsamc (version {version}); this one reads version "
                              f"{RUN_VERSION}: upgrade qsamc")
    _check_fields(data, SPEC_FIELDS, REQUIRED_SPEC, source)
    _check_fields(data["space"], {f"{k}": v for k, v in SPACE_FIELDS.items()},
                  [k for k in SPACE_FIELDS if k not in OPTIONAL_SPACE], f"{source} 'space'")
    try:
        return SupernetSpec.from_json(data)
    except (KeyError, TypeError, ValueError, QsamcError) as exc:
        raise CheckpointError(f"{meta} is malformed: {exc}") from None


@dataclass(frozen=True)
class SupernetSpec:
    """Everything needed to rebuild a trained supernet's modules before loading its weights."""

    space: SearchSpace
    num_classes: int
    lora: LoraConfig | None
    per_channel: bool = False
    head: str = "light"  # `qsamc.task.head.HEADS`
    mask2former: Mask2FormerSpec | None = None  # the mask2former head's size
    task: str = "semantic"  # `qsamc.task.data.TASKS`
    zero_point: str = "integer"  # the activation quantizers' (`qsamc.supernet.quant.ZERO_POINTS`)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT, "version": RUN_VERSION,
            "space": self.space.to_json(), "num_classes": self.num_classes,
            "lora": None if self.lora is None else {**dataclasses.asdict(self.lora), "modules": list(self.lora.modules)},
            "per_channel": self.per_channel, "head": self.head,
            "mask2former": None if self.mask2former is None else dataclasses.asdict(self.mask2former),
            "task": self.task, "zero_point": self.zero_point,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SupernetSpec:
        lora, mask2former = data.get("lora"), data.get("mask2former")
        zero_point = data.get("zero_point", "continuous")  # runs written before integer zero points: LSQ+'s offset
        if zero_point not in ZERO_POINTS:
            raise ValueError(f"'zero_point' must be one of {', '.join(ZERO_POINTS)}, got '{zero_point}'")
        return cls(
            space=SearchSpace.from_json(data["space"]),
            num_classes=int(data["num_classes"]),
            lora=None if lora is None else LoraConfig(**{**lora, "modules": tuple(lora["modules"])}),
            per_channel=bool(data.get("per_channel", False)),
            head=data.get("head", "light"),  # runs written before heads were a choice have the light head
            mask2former=None if mask2former is None else Mask2FormerSpec(**mask2former),
            task=data.get("task", "semantic"),  # runs written before the instance task are semantic
            zero_point=zero_point,
        )


def reference_weights(checkpoint: str | Path) -> Path:
    """The weights file of `--checkpoint`: a SAM checkpoint, or a qsamc run folder's `supernet.pt`."""
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / "supernet.pt").is_file():
            raise CheckpointError(f"checkpoint folder {path} is not a qsamc run: supernet.pt is missing")
        return path / "supernet.pt"
    return path


def read_head_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The task head's float weights in a qsamc run's `supernet.pt` (empty for a SAM checkpoint)."""
    state = read_tensors(reference_weights(checkpoint))
    return {k[len("head."):]: v for k, v in state.items() if k.startswith("head.") and not is_quantizer_state(k)}


def build_model(spec: SupernetSpec, checkpoint: str | Path | None = None, lora_seed: int = 0,
                weight_init: WeightInit = "lsq+"):
    """Supernet + quantizers (+ LoRA) + head, as training builds them; returns (model, ir).

    `checkpoint`: a SAM checkpoint (the encoder), or a qsamc FP32 reference run (encoder and head; the
    head's num_classes must match)."""
    weights = reference_weights(checkpoint) if checkpoint is not None else None
    supernet = Supernet.build(spec.space.model, weights, spec.space)
    ir = build_ir(supernet)
    passes = [InsertQuantizersPass(spec.space, spec.per_channel, weight_init, spec.zero_point)]
    if spec.lora is not None:
        passes.append(AttachLoraPass(spec.lora, seed=lora_seed))
    PassManager(passes)(ir)
    model = SegmentationModel(supernet, spec.num_classes, spec.head, spec.mask2former, spec.task)
    head = read_head_state(weights) if weights is not None else {}
    if head:
        model.head.load_float_state(head, str(weights))
    return model, ir


def save_supernet(run: Path, spec: SupernetSpec, model: SegmentationModel) -> None:
    atomic_torch_save(model.state_dict(), run / "supernet.pt")
    atomic_write_json(run / "supernet.json", spec.to_json())


def load_supernet(run: str | Path):
    """Rebuild a trained supernet from its run folder; returns (model, ir, spec)."""
    run = Path(run)
    meta = run / "supernet.json"
    if not meta.is_file():
        raise CheckpointError(f"{run} is not a qsamc training run: {meta.name} is missing")
    spec = read_spec(meta)
    model, ir = build_model(spec)
    state = read_tensors(run / "supernet.pt")
    check_state_dict(model, state, str(run / "supernet.pt"), f"the supernet described by {meta.name}")
    model.load_state_dict(state)
    if isinstance(model.head, SegmentationHead) and not model.head.has_activation_ranges():
        model.head.set_bits(32)  # an FP32 reference run's head, trained at 32 bits: it computes as it trained
    return model.eval(), ir, spec


def checkpoint_path(run: Path) -> Path:
    return run / "checkpoints" / "last.pt"


def load_checkpoint(run: Path) -> dict:
    path = checkpoint_path(run)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"cannot resume: {path} is not a readable checkpoint ({type(exc).__name__})") from None
    needed = ("iteration", "model", "optimizer", "scheduler")
    if not isinstance(state, dict) or not all(k in state for k in needed):
        raise CheckpointError(f"cannot resume: {path} is not a qsamc training checkpoint (it needs "
                              f"{', '.join(needed)})")
    return state


def resume_weights(model, state: dict, run: Path) -> None:
    """A checkpoint's weights into this run's model, or one sentence saying that it is another run's."""
    source = str(checkpoint_path(run))
    if not isinstance(state["model"], dict):
        raise CheckpointError(f"cannot resume: {source} holds no model weights")
    check_state_dict(model, state["model"], source, f"the run described by {run / 'config.json'}")
    model.load_state_dict(state["model"])


def resume_optimizer(optimizer, scheduler, state: dict, run: Path) -> None:
    """A checkpoint's optimizer and scheduler state, or one sentence saying that it is another run's."""
    source = str(checkpoint_path(run))
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume: the optimizer state in {source} does not fit the run described by "
                              f"{run / 'config.json'} ({str(exc).splitlines()[0]})") from None


# What a run folder holds; `--overwrite` removes exactly these before a new run starts.
RUN_FILES = ("config.json", "supernet.json", "supernet.pt", "validation.json", "metrics.csv", "checkpoints")


def prepare_run_folder(run: Path, resume: bool, overwrite: bool) -> None:
    """Check where the run goes before any work: a folder (not a file), and one that holds no other run
    unless `overwrite` (which removes that run's files) or `resume` (which continues it)."""
    check_output_folder(run, purpose=" for the run")
    remove_stale_temporaries(run, RUN_FILES)  # left by a write that a kill interrupted
    remove_stale_temporaries(run / "checkpoints", ("last.pt",))
    held = [name for name in RUN_FILES if (run / name).exists()]
    if resume or not held:
        return
    if not overwrite:
        raise ConfigError(f"{run} already holds a training run ({', '.join(held)}); continue it with --resume or "
                          "replace it with --overwrite")
    for name in held:
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _busy(run: Path) -> ConfigError:
    return ConfigError(f"another qsamc train is writing to {run}; wait for it to finish or choose another --out")


def check_not_locked(run: Path) -> None:
    """Refuse `run` while another `qsamc train` holds its lock (it may not have written config.json yet)."""
    lock = run / ".lock"
    if not lock.is_file():
        return
    try:
        with open(lock, "r") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _busy(run) from None
    except OSError:
        return


@contextlib.contextmanager
def run_lock(run: Path):
    """One writer per run folder: an exclusive lock on `run/.lock` for the whole run. The OS releases it
    when the process dies, so a killed run never leaves it stuck. A run that fails before writing anything
    (a bad dataset, a checkpoint that does not load) leaves no trace: the lock goes, and the folder too
    when this run made it."""
    made = not run.exists()
    make_folder(run)
    try:
        handle = open(run / ".lock", "a")
    except OSError as exc:
        raise ConfigError(f"--out {run} cannot be written: {exc.strerror or exc}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(run) from None
        try:
            yield
        except BaseException:
            if sorted(p.name for p in run.iterdir()) == [".lock"]:
                (run / ".lock").unlink(missing_ok=True)
                if made:
                    run.rmdir()
            raise
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
