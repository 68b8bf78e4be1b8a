"""The CLI's progress bars: the library reports `Progress` events (vqt_edge/progress.py), the CLI draws them."""

from __future__ import annotations

import sys
from typing import Any

import click

from vqt_edge.progress import Progress


class ClickBars:
    """The CLI's progress callback: one click progress bar per task on stderr, closed when the task
    is done, a new task starts, or the `with` block ends (an interrupted or failed run)."""

    def __init__(self) -> None:
        self.task: str | None = None
        self.bar: Any = None

    def __call__(self, event: Progress) -> None:
        if event.task != self.task:
            self.close()
            self.task = event.task
            self.bar = click.progressbar(
                length=event.total, label=event.task, file=sys.stderr, item_show_func=lambda info: info
            )
            self.bar.__enter__()
        self.bar.update(event.done - self.bar.pos, event.info)
        if event.done >= event.total:
            self.close()

    def __enter__(self) -> ClickBars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # an interrupted or failed run: end the bar's line before the message

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
        self.task = self.bar = None
