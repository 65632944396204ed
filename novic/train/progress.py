"""A rich progress bar with count, rate and ETA, shared by the cache builder and the trainer."""
from __future__ import annotations

from contextlib import contextmanager

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, unit: str = "it",
                 completed: int = 0):
    """Yields ``advance(n, **fields)``; `fields` fill the description's {placeholders}
    (e.g. description="training {loss}")."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn())
    with progress:
        task = progress.add_task(description.format_map(_Blank()), total=total, completed=completed)

        def advance(n=1, **fields):
            update = {"description": description.format_map(_Blank(fields))} if fields else {}
            progress.update(task, advance=n, **update)

        yield advance


class _Blank(dict):
    def __missing__(self, key):
        return ""
