"""SIGINT and SIGTERM stop a run, always: the exception the signal raises may be swallowed where it lands (in an
at-fork handler while DataLoader workers start, Python prints "Exception ignored" and goes on), so the signal is
also recorded, and the training loops check the record at every step (:func:`check_interrupted`).

The CLI runs every command inside :func:`handled` and exits with 128 + the signal's number (130 for SIGINT, 143
for SIGTERM); what a run wrote before stays intact (checkpoints are written atomically).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals received while handled() is active, in order


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_status`` is the shell's status for it (128 + its number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_status = 128 + signum


def _handler(signum: int, frame: object) -> None:
    _received.append(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` and are recorded for
    :func:`check_interrupted`; the previous handlers come back after it. Outside the main thread (where Python
    cannot set handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handler) for signum in STOP_SIGNALS}
    _received.clear()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()


def check_interrupted() -> None:
    """Raises :class:`Interrupted` when a stop signal arrived (also one whose exception was swallowed); a
    training loop calls it at every step, before starting its data loader, and before writing a checkpoint."""
    if _received:
        raise Interrupted(_received[0])
