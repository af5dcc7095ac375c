"""User-facing errors.

Every error a user can cause (a bad path, a malformed config, an impossible budget, an unknown target, a
corrupt checkpoint) is raised as a `QsamcError` carrying one sentence. The CLI prints that sentence and
exits non-zero; anything else is an internal error and keeps its traceback.
"""


class QsamcError(Exception):
    """A mistake in the user's input, described in one sentence."""


class ConfigError(QsamcError):
    """A model, run or search config that is unknown or malformed."""


class CheckpointError(QsamcError):
    """A checkpoint that is missing, corrupt, or for another architecture."""


class SubnetError(QsamcError):
    """A subnet description that is malformed or lies outside its search space."""


class DataError(QsamcError):
    """A dataset folder or file that is missing or malformed."""


class BudgetError(QsamcError):
    """A cost budget that no subnet can meet."""


class TargetError(QsamcError):
    """A hardware target or deployment format that qsamc does not know."""


class WriteError(QsamcError):
    """A file or folder that could not be written (a full disk, a read-only or special file system)."""
