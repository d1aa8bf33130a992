"""Progress bars where a person watches: on a terminal a bar, elsewhere (logs, CI, pipes) nothing
but the stages' own log lines. One place decides, for downloads and for ``evaluate``."""

from __future__ import annotations

import sys
from typing import IO, Any, Iterable, Optional

from tqdm import tqdm


def on_terminal(stream: Optional[IO[str]] = None) -> bool:
    """Whether ``stream`` (default stderr, where bars and logs go) is a terminal."""
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def bar(items: Iterable[Any], desc: str, unit: str, stream: Optional[IO[str]] = None) -> tqdm:
    """``items`` with a bar on ``stream`` when it is a terminal (:func:`on_terminal`)."""
    stream = stream or sys.stderr
    return tqdm(items, desc=desc, unit=unit, file=stream, disable=not on_terminal(stream),
                leave=False, dynamic_ncols=True)


def byte_writer(out: IO[bytes], total: Optional[int], desc: str,
                stream: Optional[IO[str]] = None) -> Any:
    """``out`` whose writes advance a bytes bar (``total`` bytes, None if unknown) when ``stream``
    is a terminal; a context manager, as tqdm's ``wrapattr``."""
    stream = stream or sys.stderr
    return tqdm.wrapattr(out, "write", total=total, desc=desc, file=stream, unit="B",
                         unit_scale=True, unit_divisor=1024, leave=False, dynamic_ncols=True,
                         disable=not on_terminal(stream))
