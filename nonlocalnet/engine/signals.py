"""SIGINT and SIGTERM stop a run, always: the exception the signal raises may be swallowed where it lands (in an
at-fork handler while DataLoader workers start, Python prints "Exception ignored" and goes on), so the signal is
also recorded, and the training loops check the record at every step (:func:`check_interrupted`).

The CLI runs every command inside :func:`handled` and exits with 128 + the signal's number (130 for SIGINT, 143
for SIGTERM); what a run wrote before stays intact (checkpoints are written atomically). A signal that arrives
while a checkpoint is written (:func:`deferred`) stops the run once the file is complete: an exception raised
inside ``torch.save``'s archive writer would otherwise surface as the writer's own ``RuntimeError`` on the way
out, and the run would end as a crash instead of a stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals received while handled() is active, in order
_deferred_from: list[int] = []  # for each open deferred() block, how many signals had arrived when it began


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_status`` is the shell's status for it (128 + its number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_status = 128 + signum


def _handler(signum: int, frame: object) -> None:
    _received.append(signum)
    if _deferred_from and len(_received) == _deferred_from[0] + 1:
        return  # the first signal inside deferred(): raised when the block ends
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
    except Exception as e:
        # an error a stop signal caused where it landed (torch.save's writer replaces the KeyboardInterrupt with
        # its own RuntimeError) is the stop the user asked for, not a crash
        if _received:
            raise Interrupted(_received[0]) from e
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()


def check_interrupted() -> None:
    """Raises :class:`Interrupted` when a stop signal arrived (also one whose exception was swallowed); a
    training loop calls it at every step, before starting its data loader, and before writing a checkpoint."""
    if _received:
        raise Interrupted(_received[0])


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block, the first stop signal is recorded and raised as :class:`Interrupted` only when the block
    ends, so the work inside (writing a checkpoint) completes; a second signal raises at once, for a user who
    insists. Blocks nest: the outermost one raises. Outside :func:`handled` signals keep their own handlers and
    this changes nothing."""
    _deferred_from.append(len(_received))
    try:
        yield
    finally:
        _deferred_from.pop()
    if not _deferred_from:
        check_interrupted()
