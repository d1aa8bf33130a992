"""MLflow tracking: the store, the sweep's parent run, one child run per job.

Layout (see ../shared/docs/interface.md): one experiment; each sweep is a parent run created
by :class:`SweepCallback` in the launching process; each lambda is a child run started by the
job itself (in this process or in a launcher's worker) with ``parent_run_id`` read from the
environment, so children on any launcher attach to the same parent.

A child run's artifacts (figures, histograms, the MLflow model) and its end are logged by one
background thread while the next job of the sweep trains, where the jobs run in the process
that opened the parent (Hydra's basic launcher); the entry point waits for that thread before
it closes the parent. All calls go through ``MlflowClient`` with explicit run ids: MLflow's
fluent active run is per thread.

With the embedded sqlite store and Hydra's basic launcher, MLflow's start is deferred too:
importing MLflow and its SQLAlchemy store (~2 s, holding the GIL) would otherwise come before
any training. :class:`SweepCallback` queues the parent run's creation on that thread, which
starts once the first epoch has trained (:func:`release_deferred_start`) and so overlaps the
first job's training; the first job's run, its params and input follow in order, and its
first epochs' metrics wait in :class:`l2sweep.engine.callbacks.MlflowRunLogger` until the run exists.
Preflight has checked what can be known without MLflow (folders writable, disk space); a store
that fails only inside MLflow is reported at the end of the first job, its outputs kept.
"""

from __future__ import annotations

import concurrent.futures
import copy
import fcntl
import gc
import json
import logging
import os
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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
#: The deferred start (see the module docstring): the parent run's creation on the tracking
#: thread, and the event that lets it begin.
_deferred: dict[str, Any] = {"parent": None, "go": None}
#: Hydra's own launcher: the jobs run one after the other in the launching process.
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
#: Open while a job trains; closed from the end of a job that another job of this process
#: follows until that one trains (see :func:`child_run`: the finished run's artifacts wait).
_training = threading.Event()
_training.set()


class CallbackAbort(SystemExit):
    """Stops the run from a Hydra callback: the interpreter prints the message (one
    ``error:`` line) and exits with status 1.

    Hydra 1.3 turns an ``Exception`` raised in a callback into a warning and starts the jobs
    anyway (``hydra/_internal/callbacks.py``); a ``SystemExit`` passes through it, and the entry
    point's ``finally`` still closes the sweep's parent run. Raise it ``from`` the cause.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


def store_error(uri: str, error: BaseException) -> str:
    """One line on why the MLflow store at ``uri`` failed; for a server that does not answer,
    the reason and the settings that bound the wait (:data:`HTTP_DEFAULTS`)."""
    import re

    text = " ".join(str(error).split()) or type(error).__name__
    if not uri.startswith(("http://", "https://")) or "failed with exception" not in text:
        return f"MLflow store {uri}: {text}"  # not a connection failure (the server answered)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)|(Read timed out|timed out|Connection aborted"
                      r"|too many \d+ error responses)", text)
    reason = (match.group(1) or match.group(2)).strip() if match else "no answer"
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
    return (f"MLflow tracking server {uri} does not answer ({reason}; gave up after {retries} "
            f"retries of {timeout} s: MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT); "
            "start it, or set MLFLOW_TRACKING_URI / tracking.uri to a store that works")


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so ``finally`` blocks close runs as KILLED."""


#: Signals the handlers of :func:`install_signal_handlers` turn into exceptions.
_INTERRUPTS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}
#: Nesting depth of :func:`deferred_signals`, and the signal that arrived meanwhile.
_deferral = {"depth": 0, "pending": None}


def _interrupt(signum: int) -> BaseException:
    return _INTERRUPTS[signal.Signals(signum)](f"received signal {signum}")


def install_signal_handlers() -> dict[int, Any]:
    """Turns SIGTERM into :class:`Terminated` (the default handler would skip cleanup) and
    SIGINT into ``KeyboardInterrupt``, raised at once, or at the next safe point inside
    :func:`deferred_signals`.

    Returns:
        The previous handlers, for ``signal.signal`` to restore.
    """

    def _handle(signum: int, frame: Any) -> None:
        if _deferral["depth"]:
            _deferral["pending"] = signum
            return
        raise _interrupt(signum)

    return {sig: signal.signal(sig, _handle) for sig in _INTERRUPTS}


def raise_if_signalled() -> None:
    """Raises the exception of a signal that arrived inside :func:`deferred_signals`."""
    signum, _deferral["pending"] = _deferral["pending"], None
    if signum is not None:
        raise _interrupt(signum)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM are recorded instead of raised; code polls
    :func:`raise_if_signalled` at points where stopping is safe (Keras:
    :class:`l2sweep.engine.callbacks.StopOnSignal`), and leaving the block raises a pending one.

    Why: an exception raised at an arbitrary bytecode inside ``Model.fit`` (in tf.data's or
    Keras' own bookkeeping) has crashed the process in glibc (``free(): invalid next size``)
    instead of unwinding; raised between two training steps it unwinds like any callback error.
    """
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
    raise_if_signalled()


#: MLflow's HTTP client defaults (7 retries with exponential back-off, 120 s timeout) let an
#: unreachable tracking server hang a run for minutes. These give up in seconds (nothing
#: listening: ~3 s; a host that never answers: ~35 s); set the variables to change them.
#: Exported, so launcher workers and jobs on other machines (sbatch exports the environment)
#: get them too.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
for _name, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


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
    uri = tracking_uri(cfg)
    db = _sqlite_path(uri)
    if db is None:
        return _ensure_experiment(cfg)
    db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow's tracking store creates the schema unlocked when it finds none, so two sweeps
    # starting at once against a new database fail with "table ... already exists": one
    # process at a time (a lock on the database's folder: no lock file to leave behind).
    folder = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        # WAL lets readers (the UI) and parallel jobs' writers proceed without "database is
        # locked"; the journal mode is stored in the database file, so once is enough.
        with sqlite3.connect(db, timeout=30) as con:
            con.execute("PRAGMA journal_mode=WAL")
        return _ensure_experiment(cfg)
    finally:
        os.close(folder)  # releases the lock


def _ensure_experiment(cfg: DictConfig) -> str:
    import mlflow

    client = get_client(cfg)
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
    """The swept overrides as the user gave them, e.g. ``regularizer.strength=0.0001,0.001``,
    or a search sweeper's space (``hydra.sweeper.params``) that the command line does not set."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = [text for text, o in zip(overrides, parsed) if o.is_sweep_override()]
    keys = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    space = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    swept += [f"{k}={v}" for k, v in space.items() if k not in keys]
    return " ".join(swept) or "(single run)"


class SweepCallback(Callback):
    """Hydra callback owning the sweep's parent MLflow run and the sweep manifest.

    ``on_multirun_start`` (launching process) creates the store, the experiment and the
    parent run, and exports its id in ``L2SWEEP_PARENT_RUN_ID`` for the jobs.
    ``on_job_start`` sets that variable again in the job's process: launchers hand a job this
    callback object as pickled with the job (joblib's workers, submitit's jobs on a cluster),
    so a job attaches to the parent even where the launching environment does not reach.
    ``on_multirun_end`` writes ``<paths.models>/sweep.json``, tags the best lambda on the
    parent (``best_lambda``: lowest final validation cross-entropy, any sweeper) and ends it
    (FAILED if any child did not finish). If the multirun dies instead, :func:`close_parent`
    (called by the entry point's ``finally``) ends the parent with the right status.
    """

    def __init__(self) -> None:
        #: Environment the jobs need: the sweep id and (with tracking on) the parent run id.
        self.job_env: dict[str, str] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_ENV] = uuid.uuid4().hex
        os.environ.pop(PARENT_ENV, None)
        self.job_env = {SWEEP_ENV: os.environ[SWEEP_ENV]}
        if not config.tracking.enabled:
            return
        if (OmegaConf.select(config, "hydra.launcher._target_") == BASIC_LAUNCHER
                and _sqlite_path(tracking_uri(config)) is not None):
            # The jobs run here, after this: MLflow starts on the tracking thread while the
            # first one trains (module docstring). A copy: Hydra goes on with its own config.
            go = _deferred["go"] = threading.Event()
            _deferred["parent"] = _executor().submit(self._deferred_start, copy.deepcopy(config), go,
                                                     time.strftime("%Y%m%d-%H%M%S"))
            return
        try:
            self._start_parent(config, time.strftime("%Y%m%d-%H%M%S"))
        except Exception as exc:  # no parent run: stop before any job trains
            raise CallbackAbort(store_error(tracking_uri(config), exc)) from exc

    def _deferred_start(self, config: DictConfig, go: threading.Event, started: str) -> None:
        from l2sweep.render import start_workers

        go.wait()
        self._start_parent(config, started)
        _freeze_heap()
        # Then the processes that will draw the runs' figures (l2sweep.render), on the free core.
        start_workers(config.tracking.figure_workers)

    def _start_parent(self, config: DictConfig, started: str) -> None:
        """Creates the parent run named ``sweep-<regularizer>-<started>``, logs the grid."""
        from l2sweep.preflight import check_artifact_root

        experiment_id = ensure_store(config)
        client = get_client(config)
        check_artifact_root(tracking_uri(config), client.get_experiment(experiment_id).artifact_location)
        tags = {**git_tags(), "l2sweep.kind": "sweep", "l2sweep.sweep_id": os.environ[SWEEP_ENV],
                "dataset": config.dataset.name, "model": config.model.name,
                "regularizer": config.regularizer.name}
        if os.environ.get("DVC_STAGE"):  # set by `dvc repro` for the stage's command
            tags["dvc.stage"] = os.environ["DVC_STAGE"]
        name = f"sweep-{config.regularizer.name}-{started}"
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        global _open_parent
        _open_parent = (tracking_uri(config), run.info.run_id)
        choices = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
        client.log_batch(run.info.run_id, params=_params({
            "grid": _sweep_grid(config), "sweep.strengths": list(config.sweep.strengths),
            "dataset.name": config.dataset.name, "model.name": config.model.name,
            "regularizer.name": config.regularizer.name, "train.epochs": config.train.epochs,
            **{k.replace("/", "."): choices[k] for k in ("hydra/launcher", "hydra/sweeper") if k in choices}}))
        os.environ[PARENT_ENV] = run.info.run_id
        self.job_env[PARENT_ENV] = run.info.run_id
        log.info("MLflow sweep run %s (%s) in %s", name, run.info.run_id, tracking_uri(config))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.update(self.job_env)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # The last runs' artifacts may still be in the background; Hydra turns an exception
        # raised here into a warning, so a tracking failure waits for raise_after_sweep().
        failed = [h for h in finish_background() if h.unlogged]
        if failed:
            _after_sweep["error"] = tracking_failure(failed)
        manifest = write_manifest(config)
        if _open_parent is not None and manifest["best"]:
            try:
                tag_best(tracking_uri(config), _open_parent[1], manifest["best"])
            except Exception as exc:  # the results are in sweep.json; the parent still gets closed
                log.warning("could not tag the best lambda on the sweep's MLflow run: %s", exc)
        statuses = {r["status"] for r in manifest["runs"]}
        ok = bool(manifest["runs"]) and statuses <= {"FINISHED"} and not failed
        close_parent("FINISHED" if ok else "FAILED", None if ok else "a child run did not finish")


def _params(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def close_parent(status: str, reason: Optional[str] = None) -> None:
    """Ends the sweep's parent run if this process opened it and it is still RUNNING."""
    global _open_parent
    if _open_parent is None:
        _deferred.update(parent=None, go=None)
        return
    from mlflow import MlflowClient

    uri, parent = _open_parent
    _open_parent = None
    _deferred.update(parent=None, go=None)
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


def best_run(histories: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The finished run with the lowest final validation cross-entropy (else val_loss), as
    ``{"run_name", "strength", "by", "value"}``; the rule of the report (l2sweep.reporting.report)."""
    from l2sweep.reporting import report

    entries = {h["run_name"]: {**report.summarize_history(h), "strength": h.get("strength"),
                               "status": report.FINISHED if h.get("status") == "FINISHED" else "failed"}
               for h in histories if h.get("run_name")}
    return report.pick_best(entries)


def tag_best(uri: str, parent_run_id: str, best: dict[str, Any]) -> None:
    """Tags the best lambda on the sweep's parent run (the tags ``evaluate`` sets too)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from l2sweep.reporting.report import format_strength

    tags = {"best_lambda": format_strength(best["strength"]), "best_run_name": best["run_name"],
            "best_by": best["by"]}
    MlflowClient(tracking_uri=uri).log_batch(
        parent_run_id, metrics=[Metric("best_lambda", float(best["strength"]), int(time.time() * 1000), 0)],
        tags=[RunTag(k, v) for k, v in tags.items()])
    log.info("best lambda %s (%s, final %s %.4f)", tags["best_lambda"], best["run_name"],
             best["by"], best["value"])


def write_manifest(cfg: DictConfig) -> dict[str, Any]:
    """Writes ``<paths.models>/sweep.json`` from the histories this sweep wrote."""
    models = Path(cfg.paths.models)
    sweep_id = os.environ.get(SWEEP_ENV)
    runs, histories = [], []
    for history_file in sorted(models.glob("*/history.json")):
        history = json.loads(history_file.read_text())
        if sweep_id and history.get("sweep_id") not in (sweep_id, None):
            continue
        histories.append(history)
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
        "best": best_run(histories),
    }
    models.mkdir(parents=True, exist_ok=True)
    tmp = models / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(models / MANIFEST)
    return manifest


class TrackingError(RuntimeError):
    """The tracking store failed during a run; the message lists what was not logged."""


class ChildRun:
    """Handle on a job's MLflow run; :meth:`fail` ends it FAILED without raising.

    :meth:`not_logged` records what the store failed to take; :func:`child_run` then raises
    :class:`TrackingError` listing it, after the caller wrote the run's outputs to disk.
    :meth:`defer` queues the logging that ends the run (its artifacts), which runs in the
    background while the next job of the sweep trains (see :func:`child_run`).
    """

    def __init__(self, run_id: Optional[str], client: Any, name: str = "", out_dir: Optional[Path] = None,
                 uri: str = "") -> None:
        self._run_id, self._client = run_id, client
        #: Whether tracking is on (the run exists or is being created).
        self.enabled = run_id is not None
        #: The run's creation on the tracking thread (deferred start), else None.
        self.created: Optional[Future] = None
        self._queued: list[Future] = []  # what call() queued after it
        self.name, self.out_dir, self.uri = name, out_dir, uri
        self.status, self.reason = "FINISHED", None
        self.unlogged: list[str] = []
        self.tracking_error: Optional[str] = None
        self.tracking_exc: Optional[BaseException] = None
        self.deferred: list[tuple[str, Callable[[], None]]] = []
        #: Whether its deferred logging waits for the next job's training (:func:`child_run`).
        self.held = False

    @property
    def run_id(self) -> Optional[str]:
        """The run's id (waits for a deferred creation; None if tracking is off or it failed)."""
        self._wait_created()
        return self._run_id

    @property
    def client(self) -> Any:
        self._wait_created()
        return self._client

    def _wait_created(self) -> None:
        if self.created is not None and not self.created.done():
            _wake_tracking_thread()
            self.created.result()  # _create_child records failures instead of raising

    def ready(self) -> bool:
        """Whether the run's creation, and what :meth:`call` queued after it, are over (always,
        unless the creation is deferred and still going on)."""
        return self.created is None or all(f.done() for f in (self.created, *self._queued))

    def wait(self) -> None:
        """Waits for a deferred creation and what :meth:`call` queued after it (letting the
        deferred start begin, if it has not)."""
        if not self.ready():  # never from the tracking thread: it would wait for itself
            _wake_tracking_thread()
            for future in (self.created, *self._queued):
                future.result()  # the queued functions record failures instead of raising

    def call(self, what: str, log_it: Callable[[], None]) -> None:
        """Runs ``log_it`` (which logs ``what``) now, or after a deferred creation on the
        tracking thread, where a failure is recorded as :meth:`not_logged`."""

        def queued() -> None:
            if self._run_id is None or self.tracking_error is not None:
                self.not_logged(what)
                return
            try:
                log_it()
            except Exception as exc:
                self.not_logged(what, exc)

        if self.created is None:
            log_it()
        else:
            self.queue(queued)

    def queue(self, log_it: Callable[[], None]) -> None:
        """Runs ``log_it`` now, or, when the run is created on the tracking thread (deferred
        start), there after everything queued before it; ``log_it`` records its own failures
        (a queued exception would surface in :meth:`wait`)."""
        if self.created is None:
            log_it()
        else:
            self._queued.append(_executor().submit(log_it))

    def fail(self, reason: str) -> None:
        self.status, self.reason = "FAILED", reason

    def not_logged(self, what: str, error: Optional[BaseException] = None) -> None:
        """Records that ``what`` (e.g. "metrics of epochs 1-2") did not reach the store
        (``error``: why; None when it was skipped because the store had failed already)."""
        self.unlogged.append(what)
        if self.tracking_error is None and error is not None:
            self.tracking_exc = error
            self.tracking_error = " ".join(str(error).split()) or type(error).__name__
        log.warning("MLflow run %s: %s not logged (%s)", self._run_id or self.name, what, self.tracking_error)

    def defer(self, what: str, log_it: Callable[[], None]) -> None:
        """Queues ``log_it`` (which logs ``what``) for the end of the run. It must not depend
        on the job's global state (Hydra's job config, the active directory): by the time it
        runs, the next job may have started. A failure is recorded as :meth:`not_logged`."""
        self.deferred.append((what, log_it))

    def message(self) -> str:
        """What was not logged, and where the outputs are (one clause of a TrackingError)."""
        kept = f"; its outputs are in {self.out_dir}" if self.out_dir and self.out_dir.is_dir() else ""
        return f"run {self.name}: not logged to MLflow: {', '.join(self.unlogged)}{kept}"


def tracking_failure(runs: list[ChildRun]) -> TrackingError:
    """One error for the runs that did not log everything (the first store error says why)."""
    first = next((r for r in runs if r.tracking_exc is not None), None)
    why = store_error(first.uri, first.tracking_exc) if first else "the store failed"
    return TrackingError(f"{'; '.join(r.message() for r in runs)}. {why}")


#: Runs the background thread is finishing (oldest first), and its executor.
_background: dict[str, Any] = {"executor": None, "pending": []}
#: A tracking failure found after the sweep's last job (see :meth:`SweepCallback.on_multirun_end`).
_after_sweep: dict[str, Optional[TrackingError]] = {"error": None}


def _executor():
    """The tracking thread (one, so that what is queued runs in order)."""
    if _background["executor"] is None:
        from concurrent.futures import ThreadPoolExecutor

        _background["executor"] = ThreadPoolExecutor(1, thread_name_prefix="l2sweep-tracking")
    return _background["executor"]


def release_deferred_start() -> None:
    """Lets the deferred MLflow start begin (called once training is under way, and by anything
    that waits for it)."""
    go = _deferred["go"]
    if go is not None:
        go.set()


def _freeze_heap() -> None:
    """Moves every object now alive to the collector's permanent generation (``gc.freeze``):
    once MLflow has started, TensorFlow's, Keras', MLflow's and SQLAlchemy's (~0.5M here),
    nearly all of them alive until the exit. Otherwise every full collection walks them again,
    0.1-0.25 s here each time, holding the GIL: between jobs (Hydra's set-up allocates enough
    to set one off), or beside the training loop. The jobs' own garbage is collected as before.
    """
    gc.freeze()


def training_under_way() -> None:
    """Lets the tracking thread log what it holds for the next job's training (the previous
    run's artifacts, :func:`child_run`): called as each epoch begins, and by anything that
    waits for that thread."""
    _training.set()


def _wake_tracking_thread() -> None:
    """Before this thread waits for the tracking thread: nothing there may wait for it."""
    release_deferred_start()
    training_under_way()


def _another_job_follows() -> bool:
    """Whether this process runs another job of the sweep after the current one (Hydra's job
    number against the sweep's job count; False when either is unknown: a search sweeper, a
    direct call)."""
    total = os.environ.get(JOBS_ENV, "")
    try:
        from hydra.core.hydra_config import HydraConfig

        num = HydraConfig.get().job.num
    except ValueError:
        return False
    return total.isdigit() and num + 1 < int(total)


def _in_background_allowed() -> bool:
    """Whether a finished run's artifacts may be logged while the next job trains.

    Only where the jobs run in the process that opened the sweep's parent run (Hydra's basic
    launcher): its entry point waits for them (:func:`finish_background`) before it closes the
    parent and exits. A launcher's worker process, or a direct call, logs them at once.
    """
    return _open_parent is not None or _deferred["parent"] is not None


def finish_background() -> list[ChildRun]:
    """Waits until the background thread has ended every run handed to it; returns them."""
    _wake_tracking_thread()
    parent = _deferred["parent"]
    if parent is not None:  # a deferred start that failed is reported by the first job's run
        concurrent.futures.wait([parent])
    done = []
    pending = _background["pending"]
    while pending:
        handle, future = pending[0]
        future.result()  # _finish_run records failures instead of raising
        pending.pop(0)  # only now: an interrupted wait leaves it for the next call
        done.append(handle)
    return done


def raise_after_sweep() -> None:
    """Raises the tracking failure the last job's background logging left, if any."""
    error, _after_sweep["error"] = _after_sweep["error"], None
    if error is not None:
        raise error


def _finish_held_run(handle: ChildRun) -> None:
    """:func:`_finish_run` once the next job trains, something waits for it, or the
    interpreter is exiting (no job came, and nothing waited: it must not hang the exit)."""
    while not _training.wait(0.5) and threading.main_thread().is_alive():
        pass
    _finish_run(handle)


def _finish_run(handle: ChildRun) -> None:
    """Runs the deferred logging of a run, then ends it; records failures, never raises."""
    for what, log_it in handle.deferred:
        if handle.tracking_error is not None:  # the store failed already: don't wait on it again
            handle.not_logged(what)
            continue
        try:
            log_it()
        except Exception as exc:  # the outputs are on disk; the error says what is missing
            handle.not_logged(what, exc)
    handle.deferred = []
    _end_child(handle)


@contextmanager
def child_run(cfg: DictConfig, tags: Optional[dict[str, str]] = None) -> Iterator[ChildRun]:
    """Starts the job's run (nested under the sweep's parent, if any) and always ends it.

    The status is FINISHED, FAILED (an exception or :meth:`ChildRun.fail`, the reason tagged)
    or KILLED (Ctrl-C / SIGTERM). With ``tracking.enabled=false`` it yields a handle with no
    run, so callers need no second code path.

    After a body that finished, the run's deferred logging (:meth:`ChildRun.defer`: figures,
    MLflow model) and its end go to a background thread when the sweep's jobs run in this
    process, so they overlap the next job's training (the one-thread training loop leaves a
    core free); :func:`finish_background` waits for them (the entry point does before it
    closes the sweep). Elsewhere they run before this returns. When another job of the sweep
    follows (``handle.held``), they wait until that job trains (its first epoch begins:
    :func:`training_under_way`), so that the end of this job and the start of the next
    (Hydra's job set-up, building the model: Python) have the GIL and the second core to
    themselves; the figures are then handed to the helpers there too (bench/README.md).

    Raises:
        TrackingError: if the store failed to take something (:meth:`ChildRun.not_logged`)
            in this run (when it is ended here) or in an earlier one the background thread
            ended meanwhile: the message lists what, and where the outputs are.
    """
    if not cfg.tracking.enabled:
        yield ChildRun(None, None)
        return
    handle = ChildRun(None, None, cfg.run_name, Path(cfg.paths.models) / cfg.run_name, tracking_uri(cfg))
    handle.enabled = True
    handle.held = _in_background_allowed() and _another_job_follows()
    parent = _deferred["parent"]
    if parent is not None and parent.done() and parent.exception() is not None:
        # The deferred start failed during an earlier job (which reports it): train no more.
        raise TrackingError(store_error(handle.uri, parent.exception()))
    if parent is not None:  # after the parent's creation, on the tracking thread
        handle.created = _executor().submit(_create_child, handle, cfg, tags, True)
    else:
        _create_child(handle, cfg, tags)
    try:
        yield handle
    except (KeyboardInterrupt, Terminated) as exc:
        handle.status, handle.reason = "KILLED", f"interrupted: {str(exc) or type(exc).__name__}"
        with deferred_signals():  # a second Ctrl-C while a deferred creation finishes: after it
            handle.wait()
            _end_child(handle)
        raise
    except BaseException as exc:
        handle.status, handle.reason = "FAILED", f"{type(exc).__name__}: {exc}"
        handle.wait()
        _end_child(handle)
        raise
    handle.wait()
    failed = [h for h in finish_background() if h.unlogged]
    if handle.run_id is not None and _in_background_allowed():
        if handle.held:
            _training.clear()
        _background["pending"].append(
            (handle, _executor().submit(_finish_held_run if handle.held else _finish_run, handle)))
    else:  # here, or the run could not be created: say so now, not after the next job
        _finish_run(handle)
        failed += [handle] if handle.unlogged else []
    if failed:
        raise tracking_failure(failed)


def _create_child(handle: ChildRun, cfg: DictConfig, tags: Optional[dict[str, str]],
                  deferred: bool = False) -> None:
    """Creates the job's run (nested under the sweep's parent, if any) into ``handle``.

    Raises the store's error, unless ``deferred`` (on the tracking thread, while the job
    trains): then the failure is recorded on ``handle`` (:meth:`ChildRun.not_logged`).
    """
    try:
        if deferred:
            _deferred["parent"].result()  # done (queued first); its failure is this run's
        from mlflow.tracking.context import registry
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        experiment_id = ensure_store(cfg)
        client = get_client(cfg)
        if not deferred:  # (the deferred start checked it with the parent)
            from l2sweep.preflight import check_artifact_root

            check_artifact_root(handle.uri, client.get_experiment(experiment_id).artifact_location)
        # The client API, not mlflow.start_run: the fluent active run is per thread, and the
        # background thread ends this run while this thread starts the next.
        all_tags = {**git_tags(), **(tags or {}), MLFLOW_RUN_NAME: cfg.run_name}
        if os.environ.get(PARENT_ENV):
            all_tags[MLFLOW_PARENT_RUN_ID] = os.environ[PARENT_ENV]
        run = client.create_run(experiment_id, run_name=cfg.run_name, tags=registry.resolve_tags(all_tags))
        handle._client, handle._run_id = client, run.info.run_id
    except Exception as exc:
        if not deferred:
            raise
        handle.not_logged("the run", exc)


def _end_child(handle: ChildRun) -> None:
    """Tags the reason and ends the run; a store that fails here is recorded, not raised, so
    the job's own error (if any) is the one the user sees."""
    if handle.run_id is None:  # a deferred creation that failed: there is no run to end
        return
    if handle.unlogged and handle.status == "FINISHED":
        handle.fail(f"tracking failed; not logged: {', '.join(handle.unlogged)}")
    if handle.reason and handle.tracking_error is None:  # a store that failed once: one try
        try:
            handle.client.set_tag(handle.run_id, REASON_TAG, handle.reason[:5000])
        except Exception as exc:
            handle.not_logged("the failure reason", exc)
    try:
        handle.client.set_terminated(handle.run_id, handle.status)
    except Exception as exc:
        handle.not_logged(f"the run's end (status {handle.status})", exc)
