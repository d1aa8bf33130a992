"""MLflow runs, logged in order on one background thread: the process's :class:`Tracker`.

Training never waits for the store. MLflow's GIL-bound start waits until training is under way
(:meth:`Tracker.release`), so it overlaps it; whatever waits for the thread releases it first.
A run's tasks record what the store failed to take; :func:`child_run` then raises
:class:`TrackingError` listing it, after the outputs were written to disk.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from omegaconf import DictConfig

from l2sweep.base import compat, signals
from l2sweep.base.cache import CACHE
from l2sweep.tracking import store

log = logging.getLogger(__name__)

#: Set by the sweep's launching process (l2sweep.tracking.sweep); read by every job of the sweep.
PARENT_ENV = "L2SWEEP_PARENT_RUN_ID"
#: Identifies the sweep even with tracking off (history.json files carry it).
SWEEP_ENV = "L2SWEEP_SWEEP_ID"
#: Tag with the reason a run did not finish.
REASON_TAG = "l2sweep.failure_reason"
#: What a run's creation is called in "not logged" messages.
THE_RUN = "the run"
#: Tags of where a run runs: host, process id and the process's start (Linux: boot id and start
#: time, so that a reused pid is not taken for the run's process). See :func:`close_orphans`.
HOST_TAG, PID_TAG, START_TAG = "l2sweep.host", "l2sweep.pid", "l2sweep.process_start"
#: The start of the reason :func:`close_orphans` tags.
DIED = "process died"


class TrackingError(RuntimeError):
    """The tracking store failed during a run; the message lists what was not logged."""


class Tracker:
    """One thread, one queue: every MLflow call of this process, in order (see :func:`tracker`)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="l2sweep-tracking")
        self._go = threading.Event()
        self._abandoned = False
        self._started: dict[str, Future] = {}
        #: The experiment id of each store started (a task's result, read on the thread).
        self.experiments: dict[str, str] = {}
        #: Parent runs this process opened and has not ended yet: (store, their creation).
        self.parents: list[tuple[str, Future]] = []

    def submit(self, task: Callable[..., Any], *args: Any) -> Future:
        """Queues ``task(*args)`` after everything queued before it."""
        return self._executor.submit(task, *args)

    def release(self) -> None:
        """Lets the queue run: training is under way, or something waits for it."""
        self._go.set()

    def abandon(self) -> bool:
        """Drops everything queued if MLflow's start has not begun: no run exists, so none can be
        left RUNNING, and an interrupted process need not start MLflow to end its runs KILLED.
        Returns whether the queue is (now) abandoned; nothing can be queued after."""
        if not self._abandoned and not self._go.is_set():
            self._abandoned = True
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._go.set()
        return self._abandoned

    def wait(self, future: Optional[Future] = None) -> Any:
        """Waits for ``future`` (default: everything queued so far); returns its result."""
        self.release()
        return (future or self.submit(lambda: None)).result()

    def start(self, cfg: DictConfig) -> Future:
        """Queues MLflow's start for ``cfg``'s store (once per store), run after :meth:`release`."""
        uri = store.tracking_uri(cfg)
        if uri not in self._started:
            self._started[uri] = self.submit(self._start, cfg, uri)
        return self._started[uri]

    def _start(self, cfg: DictConfig, uri: str) -> None:
        # Gives up once the main thread is gone: an exit must not wait for a start never released.
        while not self._go.wait(0.5):
            if not threading.main_thread().is_alive():
                return
        if self._abandoned:
            return
        store.hide_credentials(uri)
        self.experiments[uri] = store.ensure_store(cfg)
        # ~0.5M long-lived objects (TensorFlow, MLflow ...): frozen, full collections skip them.
        gc.freeze()

    def start_error(self, cfg: DictConfig) -> Optional[BaseException]:
        """The exception MLflow's start failed with, once it has ended (else None)."""
        started = self._started.get(store.tracking_uri(cfg))
        return started.exception() if started is not None and started.done() else None


def tracker() -> Tracker:
    """This process's tracker (created on first use, kept in the per-process cache)."""
    return CACHE.get("tracker", None, Tracker)


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


class ChildRun:
    """A trained model's MLflow run: :meth:`log` queues work for it on the tracking thread.
    With tracking off (``tracker`` None) every method does nothing."""

    def __init__(self, tracker: Optional[Tracker], name: str = "", out_dir: Optional[Path] = None,
                 uri: str = "") -> None:
        self.tracker, self.name, self.out_dir, self.uri = tracker, name, out_dir, uri
        self.run_id: Optional[str] = None
        self.client: Any = None
        self.status, self.reason = "FINISHED", None
        self.note = ""  # the run's description (mlflow.note.content), once its params are logged
        self.monitor: Any = None  # MLflow's system-metrics monitor (tracking.system_metrics)
        #: What the store did not take, in order (ints: epochs whose metrics were not logged).
        self.unlogged: list[str | int] = []
        self.error: Optional[BaseException] = None
        self._last: Optional[Future] = None

    @property
    def enabled(self) -> bool:
        return self.tracker is not None

    def log(self, what: str | int, task: Callable[[], None], always: bool = False) -> None:
        """Queues ``task`` (logging ``what``; an int: an epoch's metrics); after a store failure in
        this run (unless ``always``) or without a run, skipped and ``what`` recorded as not logged."""
        if self.tracker is not None:
            self._last = self.tracker.submit(self._attempt, what, task, always)

    def _attempt(self, what: str | int, task: Callable[[], None], always: bool) -> None:
        if self.run_id is None and what != THE_RUN:  # it could not be created
            if not always:
                self.unlogged.append(what)
            return
        if self.error is not None and not always:  # the store failed already: don't wait on it again
            self.unlogged.append(what)
            return
        try:
            task()
        except Exception as exc:  # the outputs are on disk; the error says what is missing
            self.error = self.error or exc
            self.unlogged.append(what)
            log.warning("MLflow run %s: %s not logged (%s)", self.name, _describe([what]),
                        store.redact(str(exc)))

    def wait(self) -> None:
        """Waits until everything queued for this run has been tried."""
        if self._last is not None:
            self.tracker.wait(self._last)

    def fail(self, reason: str) -> None:
        self.status, self.reason = "FAILED", reason

    def message(self) -> str:
        """What was not logged, where the outputs are, and why (a :class:`TrackingError`'s text)."""
        kept = f"; its outputs are in {self.out_dir}" if self.out_dir and self.out_dir.is_dir() else ""
        why = store.store_error(self.uri, self.error) if self.error else "the store failed"
        return f"run {self.name}: not logged to MLflow: {_describe(self.unlogged)}{kept}. {why}"


def _describe(unlogged: list[str | int]) -> str:
    """``["the run", 3, 4, 5, "artifacts"]`` -> ``the run, metrics of epochs 3-5, artifacts``."""
    parts: list[str] = []
    epochs: list[int] = []
    for item in [*unlogged, None]:
        if isinstance(item, int):
            epochs.append(item)
            continue
        if epochs:
            span = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"
            parts.append(f"metrics of {span}")
            epochs = []
        if item is not None:
            parts.append(item)
    return ", ".join(parts)


@contextmanager
def child_run(cfg: DictConfig, tags: dict[str, str]) -> Iterator[ChildRun]:
    """A run for one trained model, under the sweep's parent run if any; always ended FINISHED,
    FAILED (reason tagged) or KILLED. TrackingError when the store failed to take part of it
    (after the body) or MLflow's start failed earlier in this process."""
    if not cfg.tracking.enabled:
        yield ChildRun(None)
        return
    uri, tracks = store.tracking_uri(cfg), tracker()
    start = tracks.start(cfg)
    if tracks.start_error(cfg) is not None:  # reported by the run it failed in: train no more
        raise TrackingError(store.store_error(uri, tracks.start_error(cfg)))
    run = ChildRun(tracks, cfg.run_name, Path(cfg.paths.models) / cfg.run_name, uri)
    run.log(THE_RUN, lambda: _create(run, cfg, tags, start))
    try:
        yield run
    except BaseException as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, signals.Terminated))
        run.status = "KILLED" if interrupted else "FAILED"
        run.reason = f"interrupted: {exc or type(exc).__name__}" if interrupted else f"{type(exc).__name__}: {exc}"
        if not (interrupted and tracks.abandon()):  # abandoned: MLflow never started, no run exists
            _end(run)
        raise
    _end(run)
    if run.unlogged:
        raise TrackingError(run.message())


def _create(run: ChildRun, cfg: DictConfig, tags: dict[str, str], start: Future) -> None:
    """Creates the run (on the thread, after MLflow's start, whose failure is this run's)."""
    start.result()
    from mlflow.tracking.context import registry
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = store.get_client(cfg)
    all_tags = {**git_tags(), **process_tags(), **tags, MLFLOW_RUN_NAME: cfg.run_name}
    if os.environ.get(PARENT_ENV):
        all_tags[MLFLOW_PARENT_RUN_ID] = os.environ[PARENT_ENV]
    created = client.create_run(run.tracker.experiments[run.uri], run_name=cfg.run_name,
                                tags=registry.resolve_tags(all_tags))
    run.client, run.run_id = client, created.info.run_id
    if cfg.tracking.system_metrics:  # MLflow's own thread samples and logs them
        run.monitor = compat.start_system_metrics(run.run_id, client.tracking_uri)


def _end(run: ChildRun) -> None:
    """Queues the run's end and waits for it: Ctrl-C meanwhile is kept until it is ended."""
    def end() -> None:
        if run.unlogged and run.status == "FINISHED":
            run.fail(f"tracking failed; not logged: {_describe(run.unlogged)}")
        if run.monitor is not None:
            run.monitor.finish()
        if run.reason:
            run.client.set_tag(run.run_id, REASON_TAG, store.redact(run.reason)[:5000])
        run.client.set_terminated(run.run_id, run.status)

    with signals.deferred():
        status = run.status
        run.log(f"the run's end (status {status})", end, always=True)
        run.wait()


def process_tags() -> dict[str, str]:
    """Where this process runs (:data:`HOST_TAG`, :data:`PID_TAG`, :data:`START_TAG`), for its runs."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    start = process_start(os.getpid())
    if start:
        tags[START_TAG] = start
    return tags


def process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started: ``<boot id>/<clock ticks since boot>`` (Linux ``/proc``), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}/{stat.rsplit(')', 1)[1].split()[19]}"  # field 22; the name before ")" may hold spaces


def process_gone(pid: int, start: Optional[str]) -> bool:
    """Process ``pid`` of this host has ended, or its pid now names a process started at another
    time than ``start`` (where both are known: without ``/proc`` a reused pid looks alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        pass
    now = process_start(pid)
    return bool(start) and now is not None and now != start


def close_orphans(client: Any, experiment_id: str) -> list[str]:
    """Ends FAILED (reason :data:`DIED`) the runs of ``experiment_id`` left RUNNING by a process of
    this host that is gone (killed with SIGKILL, or the machine went down); returns their names.

    Runs of other hosts, of live processes, and runs without :data:`PID_TAG` are left alone.
    """
    host = socket.gethostname()
    closed = []
    for run in client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and "
                                  f"tags.`{HOST_TAG}` = '{host}'", max_results=1000):
        pid = run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or int(pid) <= 0:  # os.kill(0, ...) would signal our own group
            continue
        if not process_gone(int(pid), run.data.tags.get(START_TAG)):
            continue
        client.set_tag(run.info.run_id, REASON_TAG,
                       f"{DIED}: pid {pid} on {host} ended without closing the run")
        client.set_terminated(run.info.run_id, "FAILED")
        closed.append(run.info.run_name)
    if closed:
        log.warning("MLflow runs left RUNNING by a process that died, now FAILED: %s", ", ".join(closed))
    return closed
