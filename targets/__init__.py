"""Hardware targets, one per file (`targets/base.py` says what a target owns). Importing this package
registers them; `get_target` is the only lookup."""

from qsamc.targets import a100, cpu, h100, orin  # noqa: F401  (each file registers its target)
from qsamc.targets.base import Peaks, Target, get_target, known_targets, register

__all__ = ["Peaks", "Target", "get_target", "known_targets", "register"]
