"""Output files: atomic writes (:func:`write_text`, :func:`replace_folder`), writable and
free-space checks, and removal of the temp folders a killed process left."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

#: Free space a sweep wants for ``paths.models`` and the MLflow store (an MLP run writes ~5 MB).
MIN_FREE_BYTES = 100 * 2**20
_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[^.]+$")


class OutputError(RuntimeError):
    """An output folder cannot be written, or the disk holding it is nearly full."""


def temp_name(path: Path) -> Path:
    """``.<name>.tmp-<pid>-<random8>`` next to ``path`` (the pid tells a dead writer's leftovers
    from a live one's)."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_text(path: Path, text: str | bytes) -> None:
    """Writes ``text`` (UTF-8; bytes as they are) to ``path`` atomically, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8") if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def replace_folder(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """Fills a fresh temp folder next to ``out_dir`` with ``fill(tmp)``, then swaps it into
    ``out_dir``'s place: a failing ``fill`` leaves the previous folder; a swap that fails keeps
    the new content as ``<out_dir>.new-<time>`` and raises :class:`OutputError` naming both.
    The last writer wins."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = temp_name(out_dir), temp_name(out_dir)
    tmp.mkdir()  # not mkdtemp: the folder gets the umask's permissions, not 0700
    try:
        fill(tmp)
        try:
            _swap(tmp, out_dir, old)
        except OSError as exc:  # the new outputs are complete: keep them where the error says
            kept = out_dir.with_name(f"{out_dir.name}.new-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                tmp.rename(kept)
            except OSError:
                kept = tmp
            raise OutputError(f"{out_dir}: could not replace it ({exc.strerror or exc}); the new "
                              f"outputs are kept in {kept}, the previous ones are in place") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _swap(tmp: Path, out_dir: Path, old: Path) -> None:
    for _ in range(5):
        try:
            out_dir.rename(old)  # out of the way; removed by the caller
        except FileNotFoundError:
            pass
        try:
            tmp.rename(out_dir)
            return
        except OSError as exc:  # another writer put its folder there in between
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                if old.exists() and not out_dir.exists():
                    old.rename(out_dir)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
    raise OSError(errno.EEXIST, f"{out_dir}: another process keeps replacing it")


def remove_stale_temp(folder: Path) -> list[Path]:
    """Deletes the :func:`temp_name` folders in ``folder`` whose process is gone; returns them."""
    removed = []
    for path in folder.glob(".*.tmp-*"):
        match = _TEMP_NAME.match(path.name)
        if not match or not path.is_dir() or _alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d temp folder(s) left by an interrupted run in %s", len(removed), folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_writable(folder: Path, what: str) -> None:
    """Raises OutputError unless a file can be created in ``folder`` (or the nearest existing
    folder above it); tried for real, as permission bits say little when running as root."""
    existing = next(p for p in (folder, *folder.parents, Path.cwd()) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{folder}: cannot write {what} there ({existing} is a file, not a folder)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".l2sweep-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write {what} there ({exc.strerror or exc})") from exc


def check_free_space(folder: Path, what: str, minimum: int | None = None) -> None:
    """Raises OutputError when the disk holding ``folder`` has less than ``minimum`` bytes free
    (default :data:`MIN_FREE_BYTES`)."""
    minimum = MIN_FREE_BYTES if minimum is None else minimum
    free = shutil.disk_usage(next(p for p in (folder, *folder.parents, Path.cwd()) if p.is_dir())).free
    if free < minimum:
        raise OutputError(f"{folder}: only {free / 2**20:.0f} MB free on the disk for {what}; "
                          f"a sweep needs at least {minimum / 2**20:.0f} MB. Free some space or "
                          "point the setting at another disk")
