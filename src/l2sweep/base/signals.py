"""SIGINT and SIGTERM as exceptions, raised where stopping is safe.

Entry points call :func:`install_handlers`; training runs inside :func:`deferred` and polls
:func:`raise_if_signalled` between steps, so ``finally`` blocks close MLflow runs as KILLED.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Iterator


class Terminated(BaseException):
    """Raised on SIGTERM so ``finally`` blocks run (the default handler skips them)."""


INTERRUPTS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}


class _Deferral:
    """Nesting depth of :func:`deferred`, and the signal that arrived meanwhile."""

    depth = 0
    pending: Any = None


def _interrupt(signum: int) -> BaseException:
    return INTERRUPTS[signal.Signals(signum)](f"received signal {signum}")


def _handle(signum: int, frame: Any) -> None:
    if _Deferral.depth:
        _Deferral.pending = signum
        return
    raise _interrupt(signum)


def install_handlers() -> dict[int, Any]:
    """Turns SIGTERM into :class:`Terminated` and SIGINT into ``KeyboardInterrupt``, raised at
    once or at the next safe point inside :func:`deferred`; returns the previous handlers."""
    return {sig: signal.signal(sig, _handle) for sig in INTERRUPTS}


def restore_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def raise_if_signalled() -> None:
    """Raises the exception of a signal that arrived inside :func:`deferred`."""
    signum, _Deferral.pending = _Deferral.pending, None
    if signum is not None:
        raise _interrupt(signum)


@contextmanager
def deferred() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM are recorded instead of raised; leaving raises a pending one.

    Raised at an arbitrary bytecode inside ``Model.fit``, the exception has crashed the process
    in glibc; raised between two steps it unwinds like any callback error.
    """
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
    raise_if_signalled()


def signal_of(error: BaseException) -> signal.Signals:
    """The signal behind an interruption: SIGINT for KeyboardInterrupt, else SIGTERM."""
    return signal.SIGINT if isinstance(error, KeyboardInterrupt) else signal.SIGTERM
