"""A rich progress bar with rate, ETA and live figures (loss, bpd) on the main process only."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress


class Progress:
    """``with rt.progress(total) as bar: bar.update(1, loss=0.3)``; a no-op when disabled."""

    def __init__(self, total: int, *, initial: int = 0, description: str = "", enabled: bool = True,
                 unit: str = "step"):
        self.enabled = enabled
        self.total = total
        self._fields = ""
        if enabled:
            self._p = _RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[speed_text]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._unit = unit
            self._task = self._p.add_task(description, total=total, completed=initial, info="", speed_text="")

    def __enter__(self):
        if self.enabled:
            self._p.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._p.stop()

    def update(self, advance: int = 1, **fields) -> None:
        if not self.enabled:
            return
        info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        task = self._p.tasks[self._task]
        speed = task.speed
        speed_text = f"{speed:.2f} {self._unit}/s" if speed else ""
        kw = {"info": info} if fields else {}
        self._p.update(self._task, advance=advance, speed_text=speed_text, **kw)
