"""Thread counts for torch and ONNX Runtime, chosen on purpose and kept right while a command runs.

On a shared CPU, intra-op threads that spin-wait at every barrier take the cores from each other's work:
the quickstart beside two other qsamc processes on 2 cores trained 15x slower, where one thread each ran
at full speed. So a command runs with:
1. `qsamc --threads N ...` or QSAMC_THREADS=N: exactly N threads, for the whole command;
2. otherwise the cores this process may use that no other process is busy on (its CPU affinity, less
   the other runnable tasks the kernel counts in /proc/stat), at least one; under torchrun, the cores
   shared evenly between the node's ranks (LOCAL_WORLD_SIZE). The count is chosen when the command
   starts and looked at again every few seconds from the training and search loops (`adapt`), so a job
   that starts beside a running qsamc takes it down to one thread, and back up when the job ends.
With one thread, torch never waits at a barrier; with more, OpenMP's short default spin is the fastest
when the cores are free (a sleeping wait policy cost 15-25% of the quickstart's training here).
ONNX Runtime sessions that verify or evaluate take the current count with spinning off
(`session.intra_op.allow_spinning=0`); sessions that time a model (the export report's latency, the
baselines', latency tables with their own `--threads`) spin: they time what a deployment runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from qsamc.errors import ConfigError

ENV = "QSAMC_THREADS"
# Samples of the run queue, a few milliseconds apart: one reading can catch a short-lived task.
_SAMPLES = 5


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # how it was chosen, for the command's first line

    def describe(self) -> str:
        return f"threads: {self.threads} ({self.reason})"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_elsewhere() -> int:
    """Runnable tasks of other processes now: the kernel's procs_running less this process's running
    threads, the median of a few samples. 0 where /proc is not there."""
    counts = []
    for sample in range(_SAMPLES):
        try:
            stat = open("/proc/stat").read()
        except OSError:
            return 0
        running = next((int(line.split()[1]) for line in stat.splitlines() if line.startswith("procs_running")), 1)
        counts.append(max(running - _own_running_threads(), 0))
        if sample < _SAMPLES - 1:
            time.sleep(0.005)
    return sorted(counts)[len(counts) // 2]


def _own_running_threads() -> int:
    running = 0
    for task in os.listdir("/proc/self/task"):
        try:
            fields = open(f"/proc/self/task/{task}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        running += fields[0] == "R"
    return max(running, 1)


# Far above any machine's cores; torch and ONNX Runtime take an int32 count.
MAX_THREADS = 4096


def parse_threads(value: str | int, source: str) -> int:
    try:
        threads = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source} must be a whole number of threads, got {value!r}") from None
    if threads < 1:
        raise ConfigError(f"{source} must be at least 1, got {threads}")
    if threads > MAX_THREADS:
        raise ConfigError(f"{source} must be at most {MAX_THREADS}, got {threads}")
    return threads


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The thread count of this command (rules 1 and 2 above)."""
    if requested is not None:
        return ThreadChoice(parse_threads(requested, "--threads"), "--threads")
    if os.environ.get(ENV):
        return ThreadChoice(parse_threads(os.environ[ENV], ENV), ENV)
    cores = usable_cores()
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if ranks > 1:
        return ThreadChoice(max(cores // ranks, 1), f"{cores} cores shared by {ranks} ranks")
    busy = busy_elsewhere()
    free = max(cores - busy, 1)
    if busy == 0:
        return ThreadChoice(free, f"all {cores} cores free")
    return ThreadChoice(free, f"{free} of {cores} cores free; {busy} busy elsewhere")


# Seconds between two looks at the run queue (`adapt`): one look costs about 25 ms.
ADAPT_EVERY = 5.0

_chosen: ThreadChoice | None = None
_last_look = 0.0


def apply_threads(requested: int | None = None) -> ThreadChoice:
    """Choose this command's thread count and give it to torch; ONNX Runtime sessions ask `current()`."""
    global _chosen, _last_look
    import torch

    _chosen = choose_threads(requested)
    _last_look = time.monotonic()
    torch.set_num_threads(_chosen.threads)
    return _chosen


def adapt() -> None:
    """Between steps of a long loop: follow the free cores again (rule 2) if the count was not fixed and
    the last look is a few seconds old. Nothing happens for library use without `apply_threads`."""
    global _chosen, _last_look
    if _chosen is None or _chosen.reason in ("--threads", ENV) or time.monotonic() - _last_look < ADAPT_EVERY:
        return
    import torch

    again = choose_threads()
    _last_look = time.monotonic()
    if again.threads != torch.get_num_threads():
        torch.set_num_threads(again.threads)
    _chosen = again


def current() -> int:
    """Threads for this process's work: the command's choice, else torch's own setting (library use)."""
    if _chosen is not None:
        return _chosen.threads
    import torch

    return torch.get_num_threads()
