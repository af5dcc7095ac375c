"""Files that outlive a crash: atomic writes (temporary file, then rename), result folders replaced whole
(built beside the old one, then swapped in), the temporaries a killed write leaves behind, the checks every
command makes on its output paths before any work, and the one place where an operating system's refusal to
write (a full disk, a read-only or special file system) becomes a sentence."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from qsamc.errors import ConfigError, WriteError


def _reason(exc: BaseException) -> str:
    """Why a write failed, in words: the OS's own (No space left on device, Read-only file system)."""
    seen = exc
    while seen is not None:  # torch.save raises a RuntimeError from its zip writer, the OSError as its context
        if isinstance(seen, OSError) and seen.errno is not None:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return "the disk is full or the file system refused the write"


def _is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text
                                              or "file write failed" in text)


def make_folder(path: Path, option: str = "--out") -> None:
    """`mkdir -p path`, or one sentence saying why it cannot be made."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"{option} {path} cannot be made: {_reason(exc)}") from None


def _atomic_write(path: Path, write) -> None:
    """Call `write(temporary_path)`, then rename over `path`: readers see the old file or the new one. A
    write the OS refuses raises `WriteError` naming the file, and the earlier file (if any) is untouched."""
    make_folder(path.parent, "the folder of")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        if _is_write_failure(exc):
            earlier = f"the earlier {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise WriteError(f"could not write {path}: {_reason(exc)}; {earlier}") from None
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
    try:  # what access() cannot tell: a file system that refuses files (/proc, a read-only mount)
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {path} cannot be written: {base} refuses new files ({_reason(exc)})") from None


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


def read_json(path: Path, what: str, error: type[Exception] = ConfigError) -> Any:
    """The JSON value in `path` (a file qsamc or the user wrote), or one sentence of type `error` saying
    why it cannot be read: missing, a folder, not UTF-8, not JSON."""
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not a JSON file")
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is malformed: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror or exc}") from None


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
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # our own file object: a refused write keeps its OSError as context
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())

    _atomic_write(path, write)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


# --- result folders replaced whole ---------------------------------------------------------------------
# `qsamc search` and `qsamc export` build their results in a fresh sibling folder (`.<name>.new-XXXXXX`) and
# swap it with the old folder in one atomic rename (Linux renameat2 RENAME_EXCHANGE; elsewhere two renames,
# with the old folder parked as `.<name>.old-XXXXXX` and put back by the next command if a kill fell
# between them). A kill at any moment leaves the old results or the new ones, never a mix.

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (True), or False where the OS cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _siblings(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{kind}-*")) if out.parent.is_dir() else []


def recover_folder(out: Path) -> None:
    """Undo what a killed swap left: put a parked old folder back where no folder stands, and delete
    half-built new ones."""
    for parked in _siblings(out, "old"):
        if not out.exists():
            os.rename(parked, out)
        else:
            shutil.rmtree(parked, ignore_errors=True)
    for unfinished in _siblings(out, "new"):
        shutil.rmtree(unfinished, ignore_errors=True)


def check_results_folder(out: Path, overwrite: bool, what: str, ours: Callable[[str], bool],
                         option: str = "--out") -> None:
    """Before any work: `out` can take `what` (e.g. "a search"). A folder that already holds results is
    replaced only with `overwrite`, and only when it holds nothing but files this command writes (the
    replacement is the whole folder)."""
    check_output_folder(out, option)
    with contextlib.suppress(OSError):
        recover_folder(out)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return
    if not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ConfigError(f"{option} {out} already holds {'results' if all(map(ours, held)) else 'files'} ({shown}); "
                          "replace them with --overwrite or choose another folder")
    foreign = [name for name in held if not ours(name)]
    if foreign:
        raise ConfigError(f"--overwrite replaces {out} whole, but it holds files that are not {what}'s "
                          f"({', '.join(foreign[:4])}); choose another folder")


@contextlib.contextmanager
def replace_folder(out: Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a fresh sibling folder to write the new results in; when the block ends without an error,
    swap it in for `out` in one step (the old results, if any, are then deleted). `keep`: files of the old
    folder copied into the new one first (e.g. TensorRT's timing cache). On an error the new folder goes
    and `out` is untouched."""
    make_folder(out.parent)
    try:
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    except OSError as exc:
        raise WriteError(f"could not write {out}: {_reason(exc)}; nothing was changed") from None
    try:
        os.chmod(staging, 0o777 & ~_umask())
        for name in keep:
            if (out / name).is_file():
                shutil.copy2(out / name, staging / name)
        yield staging
        if out.exists():
            if not _exchange(staging, out):
                parked = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
                parked.rmdir()  # only its unique name is wanted: rename needs it free
                os.rename(out, parked)
                os.rename(staging, out)
                staging = parked
        else:
            os.rename(staging, out)
            staging = None
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if _is_write_failure(exc) and not isinstance(exc, WriteError):
            raise WriteError(f"could not write {out}: {_reason(exc)}; the earlier results are intact") from None
        raise
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
