"""Per-run figures drawn in helper processes while training goes on.

matplotlib draws in Python (tick and text layout: ~0.1-0.2 s a figure here, three figures a
run) and holds the GIL all the while. Drawn on the tracking thread, that slows the training
loop of the next job (its Python between compiled calls waits for the GIL), and the last
run's figures stand between the end of training and the end of the sweep. With the embedded
store and Hydra's basic launcher the sweep starts ``tracking.figure_workers`` helper
processes (``python -m l2sweep.render``) on its tracking thread, after MLflow, while the
first job trains; each run's figures are handed to them when the run ends (or, when another
job follows, once that one trains: l2sweep.tracking.runs.child_run), and the tracking thread
only waits for the files before it logs them (bench/README.md has the figures).

Anything a helper cannot do (it did not start, died, or failed on a figure) is drawn in the
waiting thread with :mod:`l2sweep.reporting.plots`, as without helpers, so the result is the same
figure or the same error. Helpers ignore Ctrl-C (their own process group: the sweep decides)
and end when the sweep closes their input, or when the sweep's process is gone. They run at a
lower priority (:data:`NICENESS`) and in the sweep's session: on a machine with fewer free
cores than busy threads, the training thread comes first (Linux's autogroups would weigh a
new session as much as the whole sweep).

Example:
    >>> start_workers(2)
    >>> drawing = draw([Figure("plot_curves", {"metrics": m, "title": "L2 = 0.01"}, "curves.png")])
    >>> ...                      # training goes on
    >>> drawing.wait()           # curves.png exists
    >>> stop_workers()
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)

#: The figures a helper draws: functions of l2sweep.reporting.plots that take JSON values.
FIGURES = ("plot_curves", "plot_histograms")
#: A helper's first line.
READY = "ready\n"
#: How long a helper may take to say it is ready (it imports matplotlib: ~0.5 s here) before
#: it is killed and left out, so a wedged helper never holds up the sweep.
READY_TIMEOUT_S = 120.0
#: How much a helper lowers its priority (``os.nice``) before it imports matplotlib.
NICENESS = 10


@dataclass(frozen=True)
class Figure:
    """One figure to draw: ``save_figure(plots.<function>(**kwargs), path, tight=False)``."""

    function: str
    kwargs: dict[str, Any]
    path: str

    def __post_init__(self) -> None:
        if self.function not in FIGURES:
            raise ValueError(f"function={self.function!r} is not allowed: one of {', '.join(FIGURES)}")


def draw_here(figure: Figure) -> None:
    """Draws ``figure`` in this thread."""
    from l2sweep.reporting import plots

    plots.save_figure(getattr(plots, figure.function)(**figure.kwargs), figure.path, tight=False)


class WorkerGone(RuntimeError):
    """A helper could not draw a figure (not started, died, or the figure failed there)."""


class _Worker:
    """One helper process; replies come in the order of the requests."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "l2sweep.render"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            process_group=0, text=True, bufsize=1)
        self.pending: "queue.SimpleQueue[Future]" = queue.SimpleQueue()
        self.outstanding = 0
        self.lock = threading.Lock()
        # Its first line says it has imported matplotlib (so helpers start one at a time).
        readable, _, _ = select.select([self.proc.stdout], [], [], READY_TIMEOUT_S)
        if not readable:
            self.proc.kill()
            self.close()
            raise OSError(f"the helper process was not ready within {READY_TIMEOUT_S:g} s")
        self.alive = self.proc.stdout.readline() == READY
        if not self.alive:
            self.close()
            raise OSError(f"the helper process ended before it was ready (exit {self.proc.poll()})")
        threading.Thread(target=self._read, name="l2sweep-render-reader", daemon=True).start()

    def submit(self, figure: Figure) -> Future:
        future: Future = Future()
        with self.lock:
            if not self.alive:
                future.set_exception(WorkerGone("the helper process ended"))
                return future
            self.outstanding += 1
            self.pending.put(future)
            try:
                self.proc.stdin.write(json.dumps(asdict(figure)) + "\n")
                self.proc.stdin.flush()
            except (OSError, ValueError):  # it is gone: the reader fails what it had
                self.alive = False
        return future

    def _read(self) -> None:
        for line in self.proc.stdout:
            reply = json.loads(line)
            with self.lock:
                self.outstanding -= 1
            future = self.pending.get()
            if reply.get("error"):
                future.set_exception(WorkerGone(reply["error"]))
            else:
                future.set_result(None)
        with self.lock:
            self.alive = False
            while True:
                try:
                    future = self.pending.get_nowait()
                except queue.Empty:
                    break
                future.set_exception(WorkerGone(f"the helper process ended (exit {self.proc.poll()})"))

    def close(self) -> None:
        """Closes its input: it ends after the figures it was given (its exit, ~0.2 s of
        interpreter shutdown, is waited for on a daemon thread, not by the sweep)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        threading.Thread(target=self.proc.wait, name="l2sweep-render-exit", daemon=True).start()


#: The started helpers (see start_workers).
_workers: list[_Worker] = []


def start_workers(count: int) -> None:
    """Starts ``count`` helpers (none if 0, or if they run already), one after the other: each
    imports matplotlib (~0.5 s of one core) before the next starts. A helper that cannot be
    started is left out (its figures are drawn in the waiting thread)."""
    if _workers or count <= 0:
        return
    for _ in range(count):
        try:
            _workers.append(_Worker())
        except OSError as exc:
            log.warning("figures are drawn in this process: no helper process (%s)", exc)
            break


def stop_workers() -> None:
    """Lets the helpers end (after the figures they were given); it does not wait for them."""
    workers = list(_workers)
    _workers.clear()
    for worker in workers:
        worker.close()


class Drawing:
    """Figures being drawn; :meth:`wait` returns once each file exists."""

    def __init__(self, figures: list[Figure], futures: list[Optional[Future]]) -> None:
        self.figures, self.futures = figures, futures

    def wait(self) -> None:
        """Waits for the helpers' figures and draws here what they could not (raising the
        error a figure itself raises, as :func:`draw_here` would)."""
        for figure, future in zip(self.figures, self.futures):
            if future is not None:
                try:
                    future.result()
                    continue
                except WorkerGone as exc:
                    log.debug("drawing %s here: %s", figure.path, exc)
            draw_here(figure)


def draw(figures: list[Figure]) -> Drawing:
    """Hands ``figures`` to the helpers (the least busy first); without helpers they are
    drawn when :meth:`Drawing.wait` is called."""
    futures: list[Optional[Future]] = []
    for figure in figures:
        live = [w for w in _workers if w.alive]
        futures.append(min(live, key=lambda w: w.outstanding).submit(figure) if live else None)
    return Drawing(figures, futures)


# --- the helper process ----------------------------------------------------------------------


def _serve() -> None:
    """Draws each request line of stdin; one reply line each on the original stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(NICENESS)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not break the replies
    requests: "queue.SimpleQueue[Optional[str]]" = queue.SimpleQueue()

    def read() -> None:  # drains the pipe at once, so the sweep never waits to hand figures over
        for line in sys.stdin:
            requests.put(line)
        requests.put(None)

    threading.Thread(target=read, daemon=True).start()
    import l2sweep.reporting.plots  # noqa: F401  (imported before the first request)

    replies.write(READY)

    while (line := requests.get()) is not None:
        try:
            figure = Figure(**json.loads(line))
            if not os.path.isdir(os.path.dirname(figure.path)):  # the sweep dropped the run
                raise FileNotFoundError(f"{os.path.dirname(figure.path)} is gone")
            draw_here(figure)
            replies.write("{}\n")
        except Exception as exc:  # the waiting thread draws it again and gets the real error
            replies.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")


if __name__ == "__main__":
    _serve()
