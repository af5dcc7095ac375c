"""Progress bars for long work (training iterations, search generations, latency profiling).

One look everywhere: a bar, done/total, rate, elapsed and ETA, plus live fields (loss, best fitness).
Disabled bars (other ranks, tests, `--quiet`) cost nothing.
"""

from __future__ import annotations

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self.progress, self.task = progress, task

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, advance: float = 0, **fields: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=advance, **fields)

    def advance(self, steps: float) -> None:
        self.update(advance=steps)


class _Rate(TextColumn):
    """Iterations per second from rich's speed estimate."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # noqa: D102
        speed = task.finished_speed or task.speed
        return "  -  it/s" if speed is None else f"{speed:5.2f} it/s"


def progress_bar(total: int, description: str, enabled: bool = True, fields: dict[str, str] | None = None) -> _Bar:
    """A context-managed bar; `fields` are shown after the ETA and updated with `bar.update(name=...)`."""
    if not enabled:
        return _Bar(None, None)
    fields = fields or {}
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               _Rate(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    progress = Progress(*columns, transient=False)
    task = progress.add_task(description, total=total, **fields)
    return _Bar(progress, task)
