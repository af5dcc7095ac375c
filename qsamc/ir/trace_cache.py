"""Traced graphs kept on disk between commands: `torch.export` takes seconds for every supernet a command
builds (6.5 s for vit_t on a 2-core CPU), and every `qsamc train`, `search`, `export` and `profile` builds
one of a structure traced before.

A traced graph is plain data (node names, kinds, module paths, ATen op names, shapes; edges), written as
JSON, never pickled. Its file is named by a hash of the structure it was traced from (`graph._structure_key`),
the versions of torch and segment-anything, and the text of qsamc's own source files, so a change to any
of them traces afresh. The folder is `$QSAMC_CACHE_DIR`, else `$XDG_CACHE_HOME/qsamc`, else
`~/.cache/qsamc`; `QSAMC_CACHE_DIR=off` turns the cache off. A cache that cannot be read or written is
passed over: the graph is traced as without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from qsamc.errors import WriteError
from qsamc.fileio import atomic_write_bytes

TRACE_FORMAT = "qsamc.trace"
TRACE_VERSION = 1
ENV = "QSAMC_CACHE_DIR"

# (node name, attributes) in graph order, and edges in the order they were added
TraceData = tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, str]]]


def cache_dir() -> Path | None:
    """The folder traced graphs are kept in, or None when the cache is off."""
    chosen = os.environ.get(ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "none") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qsamc"


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """A hash of what a trace's result depends on besides the structure: torch, segment-anything and every
    source file of qsamc."""
    digest = hashlib.sha256(f"{torch.__version__}|{_version('segment-anything')}".encode())
    package = Path(__file__).resolve().parents[1]
    for source in sorted(package.rglob("*.py")):
        digest.update(str(source.relative_to(package)).encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def _path(key: tuple) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    name = hashlib.sha256(f"{_code_version()}|{key!r}".encode()).hexdigest()[:32]
    return folder / "traces" / f"{name}.json"


def load(key: tuple) -> TraceData | None:
    """The graph traced from `key`'s structure, if a readable one is cached."""
    path = _path(key)
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(data, dict) and data.get("format") == TRACE_FORMAT and data.get("version") == TRACE_VERSION
            and data.get("key") == repr(key) and _well_formed(data.get("nodes"), data.get("edges"))):
        return None
    return [(name, attrs) for name, attrs in data["nodes"]], [(u, v) for u, v in data["edges"]]


def _well_formed(nodes: Any, edges: Any) -> bool:
    if not (isinstance(nodes, list) and isinstance(edges, list)):
        return False
    names = set()
    for node in nodes:
        if not (isinstance(node, list) and len(node) == 2 and isinstance(node[0], str) and isinstance(node[1], dict)
                and {"kind", "module", "ops", "shape"} <= node[1].keys()):
            return False
        names.add(node[0])
    return all(isinstance(e, list) and len(e) == 2 and e[0] in names and e[1] in names for e in edges)


def store(key: tuple, data: TraceData) -> None:
    """Keep a traced graph for the next command (atomically; nothing is kept where it cannot be written)."""
    path = _path(key)
    if path is None:
        return
    nodes, edges = data
    text = json.dumps({"format": TRACE_FORMAT, "version": TRACE_VERSION, "key": repr(key),
                       "nodes": [[name, attrs] for name, attrs in nodes], "edges": [list(e) for e in edges]})
    try:
        atomic_write_bytes(path, text.encode())
    except (OSError, WriteError):
        pass
