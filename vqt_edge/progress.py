"""Progress of long phases (the frozen K/V pass, each epoch) as plain events, not terminal output.

The trainer and tune report `Progress` events to a callback. A library caller (vqt_edge/api.py)
gets them through its own callback, or by default as DEBUG records of the `vqt_edge` logger; the
CLI passes `ClickBars`, which draws click's progress bars on stderr. So a notebook or a service that
trains through the API sees no terminal output it did not ask for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("vqt_edge")


@dataclass(frozen=True)
class Progress:
    """`done` of `total` units of `task` (images of the frozen pass, steps of an epoch)."""

    task: str  # "frozen pass (K/V to RAM)", "epoch 3/10", ...
    done: int
    total: int
    info: str = ""  # e.g. the running loss and accuracy of the epoch


OnProgress = Callable[[Progress], None]


def log_progress(event: Progress) -> None:
    """The library default: one DEBUG record per event on the `vqt_edge` logger."""
    log.debug("%s: %d/%d %s", event.task, event.done, event.total, event.info)


class Counter:
    """Turns "n more done" calls (what the frozen pass reports per batch) into Progress events."""

    def __init__(self, on_progress: OnProgress, task: str, total: int) -> None:
        self.on_progress, self.task, self.total, self.done = on_progress, task, total, 0
        on_progress(Progress(task, 0, total))

    def __call__(self, n: int) -> None:
        self.done += n
        self.on_progress(Progress(self.task, self.done, self.total))
