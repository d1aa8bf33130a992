"""MLflow tracking: the store, the sweep's parent run, one child run per job.

Layout (see ../shared/docs/interface.md): one experiment; each sweep is a parent run created
by :class:`SweepCallback` in the launching process; each lambda is a child run started by the
job itself (in this process or in a launcher's worker) with ``parent_run_id`` read from the
environment, so children on any launcher attach to the same parent.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: Set by the sweep's launching process; read by every job of the sweep.
PARENT_ENV = "L2SWEEP_PARENT_RUN_ID"
#: Identifies the sweep even with tracking off (history.json files carry it).
SWEEP_ENV = "L2SWEEP_SWEEP_ID"
#: Number of jobs in the sweep, for progress lines ("job 2/3").
JOBS_ENV = "L2SWEEP_JOBS"
#: Tag with the reason a run did not finish.
REASON_TAG = "l2sweep.failure_reason"
MANIFEST = "sweep.json"
#: (tracking URI, run id) of the parent run this process opened and has not closed yet.
_open_parent: Optional[tuple[str, str]] = None


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so ``finally`` blocks close runs as KILLED."""


def install_sigterm_handler() -> None:
    """Turns SIGTERM into :class:`Terminated` (the default handler would skip cleanup)."""

    def _raise(signum: int, frame: Any) -> None:
        raise Terminated(f"received signal {signum}")

    signal.signal(signal.SIGTERM, _raise)


#: The user's MLFLOW_TRACKING_URI, read once: ``mlflow.set_tracking_uri`` writes that variable
#: itself, so reading it later would return whatever store this process used last.
_ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(cfg: DictConfig) -> str:
    """The tracking URI: the ``MLFLOW_TRACKING_URI`` environment variable wins over ``tracking.uri``."""
    return _ENV_TRACKING_URI or cfg.tracking.uri


def _sqlite_path(uri: str) -> Optional[Path]:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def get_client(cfg: DictConfig):
    """An ``MlflowClient`` for the configured store."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(cfg))


def ensure_store(cfg: DictConfig) -> str:
    """Creates the store (schema, WAL journal) and the experiment once; returns its id.

    Call it in the launching process before any job starts: parallel first-time schema
    creation races (MLflow #4123).
    """
    import mlflow

    uri = tracking_uri(cfg)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    client = get_client(cfg)
    if db is not None:
        # WAL lets readers (the UI) and parallel jobs' writers proceed without "database is
        # locked"; the journal mode is stored in the database file, so once is enough.
        with sqlite3.connect(db, timeout=30) as con:
            con.execute("PRAGMA journal_mode=WAL")
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(cfg.tracking.experiment)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our look-up and create.
        return client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def git_tags() -> dict[str, str]:
    """The git commit and whether the work tree has uncommitted changes (empty outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(bool(dirty.strip())).lower()}


def _sweep_grid(config: DictConfig) -> str:
    """The swept overrides as the user gave them, e.g. ``regularizer.strength=0.0001,0.001``."""
    overrides = OmegaConf.select(config, "hydra.overrides.task", default=[]) or []
    swept = [o for o in overrides if "," in o.split("=", 1)[-1] or "(" in o]
    return " ".join(swept) or "(single run)"


class SweepCallback(Callback):
    """Hydra callback owning the sweep's parent MLflow run and the sweep manifest.

    ``on_multirun_start`` (launching process) creates the store, the experiment and the
    parent run, and exports its id in ``L2SWEEP_PARENT_RUN_ID`` for the jobs.
    ``on_multirun_end`` ends the parent (FAILED if any child did not finish) and writes
    ``<paths.models>/sweep.json``. If the multirun dies instead, :func:`close_parent` (called
    by the entry point's ``finally``) ends the parent with the right status.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_ENV] = uuid.uuid4().hex
        os.environ.pop(PARENT_ENV, None)
        if not config.tracking.enabled:
            return
        experiment_id = ensure_store(config)
        client = get_client(config)
        tags = {**git_tags(), "l2sweep.kind": "sweep", "l2sweep.sweep_id": os.environ[SWEEP_ENV],
                "dataset": config.dataset.name, "model": config.model.name,
                "regularizer": config.regularizer.name}
        if os.environ.get("DVC_STAGE"):  # set by `dvc repro` for the stage's command
            tags["dvc.stage"] = os.environ["DVC_STAGE"]
        name = f"sweep-{config.regularizer.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        client.log_batch(run.info.run_id, params=_params({
            "grid": _sweep_grid(config), "sweep.strengths": list(config.sweep.strengths),
            "dataset.name": config.dataset.name, "model.name": config.model.name,
            "regularizer.name": config.regularizer.name, "train.epochs": config.train.epochs}))
        os.environ[PARENT_ENV] = run.info.run_id
        global _open_parent
        _open_parent = (tracking_uri(config), run.info.run_id)
        log.info("MLflow sweep run %s (%s) in %s", name, run.info.run_id, tracking_uri(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        manifest = write_manifest(config)
        statuses = {r["status"] for r in manifest["runs"]}
        ok = bool(manifest["runs"]) and statuses <= {"FINISHED"}
        close_parent("FINISHED" if ok else "FAILED", None if ok else "a child run did not finish")


def _params(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def close_parent(status: str, reason: Optional[str] = None) -> None:
    """Ends the sweep's parent run if this process opened it and it is still RUNNING."""
    global _open_parent
    if _open_parent is None:
        return
    from mlflow import MlflowClient

    uri, parent = _open_parent
    _open_parent = None
    os.environ.pop(PARENT_ENV, None)
    client = MlflowClient(tracking_uri=uri)
    try:
        if client.get_run(parent).info.status != "RUNNING":
            return
        if reason:
            client.set_tag(parent, REASON_TAG, reason)
        client.set_terminated(parent, status)
    except Exception as exc:  # the store may be the thing that failed; say so, don't mask
        log.error("could not close the sweep's MLflow run %s: %s", parent, exc)


def write_manifest(cfg: DictConfig) -> dict[str, Any]:
    """Writes ``<paths.models>/sweep.json`` from the histories this sweep wrote."""
    models = Path(cfg.paths.models)
    sweep_id = os.environ.get(SWEEP_ENV)
    runs = []
    for history_file in sorted(models.glob("*/history.json")):
        history = json.loads(history_file.read_text())
        if sweep_id and history.get("sweep_id") not in (sweep_id, None):
            continue
        runs.append({key: history.get(key) for key in
                     ("run_name", "strength", "status", "mlflow_run_id", "diverged_epoch")}
                    | {"dir": history_file.parent.name})
    runs.sort(key=lambda r: (r["strength"] is None, r["strength"]))
    manifest = {
        "sweep_id": sweep_id,
        "parent_run_id": os.environ.get(PARENT_ENV),
        "experiment": cfg.tracking.experiment,
        "tracking_uri": tracking_uri(cfg) if cfg.tracking.enabled else None,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "regularizer": cfg.regularizer.name,
        "strengths": [r["strength"] for r in runs],
        "runs": runs,
    }
    models.mkdir(parents=True, exist_ok=True)
    tmp = models / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(models / MANIFEST)
    return manifest


class ChildRun:
    """Handle on a job's MLflow run; :meth:`fail` ends it FAILED without raising."""

    def __init__(self, run_id: Optional[str], client: Any) -> None:
        self.run_id, self.client = run_id, client
        self.status, self.reason = "FINISHED", None

    def fail(self, reason: str) -> None:
        self.status, self.reason = "FAILED", reason


@contextmanager
def child_run(cfg: DictConfig, tags: Optional[dict[str, str]] = None) -> Iterator[ChildRun]:
    """Starts the job's run (nested under the sweep's parent, if any) and always ends it.

    The status is FINISHED, FAILED (an exception or :meth:`ChildRun.fail`, the reason tagged)
    or KILLED (Ctrl-C / SIGTERM). With ``tracking.enabled=false`` it yields a handle with no
    run, so callers need no second code path.
    """
    if not cfg.tracking.enabled:
        yield ChildRun(None, None)
        return
    import mlflow

    # An inherited MLFLOW_RUN_ID would make start_run resume that run instead (MLflow #15713).
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    experiment_id = ensure_store(cfg)
    all_tags = {**git_tags(), **(tags or {})}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=cfg.run_name,
                           parent_run_id=os.environ.get(PARENT_ENV), tags=all_tags)
    handle = ChildRun(run.info.run_id, get_client(cfg))
    try:
        yield handle
    except (KeyboardInterrupt, Terminated) as exc:
        handle.status, handle.reason = "KILLED", f"interrupted: {exc or type(exc).__name__}"
        raise
    except BaseException as exc:
        handle.status, handle.reason = "FAILED", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        try:
            if handle.reason:
                mlflow.set_tag(REASON_TAG, handle.reason[:5000])
        finally:
            mlflow.end_run(handle.status)
