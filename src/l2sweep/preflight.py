"""Checks before training starts: inputs present, outputs writable, disk space, store usable.

``python -m l2sweep.train`` runs :func:`preflight` on the validated config of the first job,
before Hydra starts (a Hydra callback cannot stop a run: Hydra turns its errors into
warnings). A problem that can be known up front then costs one ``error:`` line instead of a
half-finished sweep.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import closing
from pathlib import Path
from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: Free space a sweep wants on the disks of ``paths.models`` and the MLflow store (a run of
#: the seeds' MLP writes about 5 MB: model, MLflow model, figures).
MIN_FREE_BYTES = 100 * 2**20
#: Temp folders of :func:`l2sweep.train.write_run_outputs`: ``.<run>.tmp-<pid>-<random>``.
TEMP_DIR = re.compile(r"^\..+\.tmp-(\d+)-[^.]+$")


class PreflightError(RuntimeError):
    """Something outside the configuration (disk, permissions, store) stops the run from starting."""


def check_writable(folder: Path, what: str) -> None:
    """Creates and deletes a file in ``folder``, or in the nearest existing folder above it
    (nothing is left behind; permission bits say little when running as root).

    Raises:
        PreflightError: naming the folder, what was to be written there and the OS's reason.
    """
    existing = next(p for p in (folder, *folder.parents, Path.cwd()) if p.exists())
    if not existing.is_dir():
        raise PreflightError(f"{folder}: cannot write {what} there ({existing} is a file, not a folder)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".l2sweep-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PreflightError(f"{folder}: cannot write {what} there ({exc.strerror or exc})") from exc


def check_free_space(folder: Path, what: str, minimum: int | None = None) -> None:
    """Raises PreflightError when the disk holding ``folder`` has less than ``minimum`` bytes free."""
    minimum = MIN_FREE_BYTES if minimum is None else minimum
    free = shutil.disk_usage(next(p for p in (folder, *folder.parents, Path.cwd()) if p.is_dir())).free
    if free < minimum:
        raise PreflightError(f"{folder}: only {free / 2**20:.0f} MB free on the disk for {what}; "
                             f"a sweep needs at least {minimum / 2**20:.0f} MB. Free some space or "
                             "point the setting at another disk")


def check_prepared(cfg: DictConfig) -> None:
    """The splits ``train`` reads load and hold valid images and labels (a second or so for
    the full dataset; a corrupt file then fails here, not in every job).

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    from l2sweep.base.data import load_meta, load_split

    for split in ("train", "val"):
        load_split(cfg.paths.prepared, split)
    load_meta(cfg.paths.prepared)


def remove_stale_temp(models: Path) -> list[Path]:
    """Deletes temp folders that killed runs left in ``models`` (their process is gone)."""
    removed = []
    for path in models.glob(".*.tmp-*"):
        match = TEMP_DIR.match(path.name)
        if not match or not path.is_dir() or _alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d temp folder(s) left by an interrupted run in %s", len(removed), models)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _local_path(uri: str) -> Path | None:
    """The folder of a local store or artifact URI (``sqlite:///``, ``file://`` or a path)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" not in uri and ":" not in uri.split("/", 1)[0]:
        return Path(uri)
    return None


def check_server(uri: str, timeout: float = 10.0) -> None:
    """A tracking server answers on ``uri`` (any HTTP answer will do; MLflow's client would
    otherwise retry for minutes before saying it is not there)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        reason = getattr(reason, "strerror", None) or reason  # "Connection refused", not "[Errno 111] ..."
        raise PreflightError(f"MLflow tracking server {uri} does not answer ({reason}); start it, "
                             "or set tracking.uri / MLFLOW_TRACKING_URI to a store that works") from exc


def check_store(cfg: DictConfig) -> None:
    """The MLflow store can be written (local) or answers (a server), and so can its artifacts.

    For the embedded sqlite store only what needs no MLflow is checked here (the folder is
    writable, the disk has room, an existing database opens): importing MLflow and its
    SQLAlchemy store costs ~2 s before any training, so the sweep does that on its tracking
    thread while the first job trains (l2sweep.tracking.runs), and checks the store's artifact root
    there (single runs and other launchers: before training, when the run is created).
    """
    from l2sweep.tracking import runs as tracking

    uri = tracking.tracking_uri(cfg)
    folder = _local_path(uri)
    if folder is not None:
        check_writable(folder, f"the MLflow store ({uri})")
        check_free_space(folder, f"the MLflow store ({uri})")
        if uri.startswith("sqlite:///"):
            check_sqlite(uri)
            return
    elif uri.startswith(("http://", "https://")):
        check_server(uri)
    try:
        experiment_id = tracking.ensure_store(cfg)
        location = tracking.get_client(cfg).get_experiment(experiment_id).artifact_location
    except Exception as exc:  # MLflow raises many kinds; all mean the same here
        raise PreflightError(tracking.store_error(uri, exc)) from exc
    check_artifact_root(uri, location)


def check_sqlite(uri: str) -> None:
    """An existing sqlite store is a database sqlite can read (no MLflow needed: ~1 ms).

    Raises:
        PreflightError: naming the store and sqlite's reason (e.g. "file is not a database").
    """
    import sqlite3

    db = Path(uri[len("sqlite:///"):])
    if not db.is_file():
        return  # created on first use
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as con:
            con.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as exc:
        from l2sweep.tracking import runs as tracking

        raise PreflightError(tracking.store_error(uri, exc)) from exc


def check_artifact_root(uri: str, location: str | None) -> None:
    """The artifact root of the store at ``uri`` can be written, where it is a local folder."""
    artifacts = _local_path(location or "")
    if artifacts is not None and artifacts != _local_path(uri):
        check_writable(artifacts, f"MLflow artifacts ({location})")
        check_free_space(artifacts, f"MLflow artifacts ({location})")


def preflight(cfg: DictConfig) -> None:
    """Every check, cheapest first.

    Raises:
        DataError: the prepared splits are missing.
        PreflightError: an output folder or the store cannot be written, a disk is nearly
            full, or the tracking server does not answer.
    """
    check_prepared(cfg)
    models = Path(cfg.paths.models)
    check_writable(models, "the trained models (paths.models)")
    check_free_space(models, "the trained models (paths.models)")
    if models.is_dir():
        remove_stale_temp(models)
    if cfg.tracking.enabled:
        check_store(cfg)

