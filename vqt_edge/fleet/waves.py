"""A cap on how many clients a round starts at once (docs/fleet-security.md, "Load").

Flower's SuperNode starts a fresh ClientApp process for every message and gives it 30 s from the
task's claim to report in (`HEARTBEAT_DEFAULT_INTERVAL` in flwr 1.42's SuperExec state); a process
that misses it is killed and started again, forever. On a 2-core machine with many clients all
starting at once (each importing flwr and onnxruntime) that deadline is missed: Flower's restart
loop. `WaveGrid` sends a round's messages in waves of at most `cap` clients, each wave with the
round's full time-out, so no more than `cap` ClientApp processes start together. Everything else is
the wrapped Grid's.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class WaveGrid:
    """A Grid whose send_and_receive sends at most `cap` messages at a time (0: all at once)."""

    def __init__(self, grid: Grid, cap: int) -> None:
        self._grid, self.cap = grid, cap

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not self.cap or len(messages) <= self.cap:
            return self._grid.send_and_receive(messages, timeout=timeout)
        replies: list[Message] = []
        for start in range(0, len(messages), self.cap):
            replies += list(self._grid.send_and_receive(messages[start : start + self.cap], timeout=timeout))
        return replies
