"""Hardware targets, one per file, and the one place that dispatches on a target's name.

A target declares how a searched (weight, activation) pair is deployed on it, its deployment formats and
their rules, its datasheet peaks and its default latency backend. Targets register themselves with
`register`; `get_target` is the only lookup, and an unknown name fails with the list of known ones.
"""

from __future__ import annotations

from typing import Protocol

from qsamc.errors import TargetError


class Target(Protocol):
    name: str
    formats: tuple[str, ...]


_REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    if target.name in _REGISTRY:
        raise ValueError(f"target '{target.name}' is registered twice")
    _REGISTRY[target.name] = target
    return target


def known_targets() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_target(name: str) -> Target:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(known_targets()) or "none yet"
        raise TargetError(f"unknown target '{name}'; known targets are {known}") from None
