"""Trained-supernet runs on disk: what `qsamc train` writes and `qsamc search` / `qsamc export` load.

A run folder holds:
  supernet.json   what to rebuild: model, search space, LoRA config, classes, quantizer options
  supernet.pt     the weights of encoder + quantizers + LoRA + head (a plain state dict)
  checkpoints/    resumable training state (see `qsamc.training.train`)
Every file is written atomically (temporary file, then rename), so a crash never leaves half a file, and
state dicts are read with `weights_only=True`: a checkpoint is untrusted input.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qsamc.errors import ConfigError, CheckpointError
from qsamc.task.head import SegmentationModel
from qsamc.supernet.lora import LoraConfig
from qsamc.supernet.quant import WeightInit
from qsamc.sam import check_state_dict, read_tensors
from qsamc.supernet.space import SearchSpace

RUN_FORMAT = "qsamc.supernet"
RUN_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    """Call `write(temporary_path)`, then rename over `path`: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path, names: tuple[str, ...]) -> None:
    """Delete the temporary files (`.<name>.XXXXXX`) that a write killed before its rename left behind."""
    if not folder.is_dir():
        return
    for name in names:
        for stale in folder.glob(f".{name}.*"):
            if stale.is_file():
                stale.unlink(missing_ok=True)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(path: Path, folder: Path, option: str, verb: str) -> None:
    """`folder` (`path` itself, or the folder a file goes in) can be made and written."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise ConfigError(f"{option} {path} cannot be {verb}: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path} cannot be written: {base} is not writable")


def check_output_folder(path: Path, option: str = "--out", purpose: str = "") -> None:
    """Before any work: `path` is a folder that can be made and written (one sentence otherwise)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file; give a folder{purpose}")
    _check_writable(path, path, option, "made")


def check_output_file(path: Path, option: str = "--out") -> None:
    """Before any work: `path` names a file (not a folder) whose folder can be made and written."""
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name")
    _check_writable(path, path.parent, option, "written")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    _atomic_write(path, write)


def save_figure(fig, path: Path, **options) -> None:
    """A matplotlib figure written atomically (rendered in memory, then `atomic_write_bytes`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", **options)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


@dataclass(frozen=True)
class SupernetSpec:
    """Everything needed to rebuild a trained supernet's modules before loading its weights."""

    space: SearchSpace
    num_classes: int
    lora: LoraConfig | None
    per_channel: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT, "version": RUN_VERSION,
            "space": self.space.to_json(), "num_classes": self.num_classes,
            "lora": None if self.lora is None else {**dataclasses.asdict(self.lora), "modules": list(self.lora.modules)},
            "per_channel": self.per_channel,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SupernetSpec:
        lora = data.get("lora")
        return cls(
            space=SearchSpace.from_json(data["space"]),
            num_classes=int(data["num_classes"]),
            lora=None if lora is None else LoraConfig(**{**lora, "modules": tuple(lora["modules"])}),
            per_channel=bool(data.get("per_channel", False)),
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
    return {k[len("head."):]: v for k, v in state.items() if k.startswith("head.") and "_quantizer." not in k}


def build_model(spec: SupernetSpec, checkpoint: str | Path | None = None, lora_seed: int = 0,
                weight_init: WeightInit = "lsq+"):
    """Supernet + quantizers (+ LoRA) + head, as training builds them; returns (model, ir).

    `checkpoint`: a SAM checkpoint (the encoder), or a qsamc FP32 reference run (encoder and head; the
    head's num_classes must match)."""
    from qsamc.passes import AttachLoraPass, InsertQuantizersPass
    from qsamc.ir.frontend import build_ir
    from qsamc.supernet.encoder import Supernet

    weights = reference_weights(checkpoint) if checkpoint is not None else None
    supernet = Supernet.build(spec.space.model, weights, spec.space)
    ir = build_ir(supernet)
    InsertQuantizersPass(spec.space, spec.per_channel, weight_init)(ir)
    if spec.lora is not None:
        AttachLoraPass(spec.lora, seed=lora_seed)(ir)
    model = SegmentationModel(supernet, spec.num_classes)
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
    try:
        data = json.loads(meta.read_text())
        if data.get("format") != RUN_FORMAT:
            raise CheckpointError(f"{meta} is not a qsamc supernet description")
        spec = SupernetSpec.from_json(data)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta} is malformed: {exc}") from None
    model, ir = build_model(spec)
    state = read_tensors(run / "supernet.pt")
    check_state_dict(model, state, str(run / "supernet.pt"), f"the supernet described by {meta.name}")
    model.load_state_dict(state)
    return model.eval(), ir, spec
