"""Files that outlive a crash: atomic writes (temporary file, then rename), the temporaries a killed write
leaves behind, and the checks every command makes on its output paths before any work."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from qsamc.errors import ConfigError


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
