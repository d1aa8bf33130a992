"""l2sweep.render: per-run figures drawn by real helper processes, and what happens when one
cannot draw (not started, killed, a figure that fails)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlflow import MlflowClient

from conftest import model_cfg
from helpers import cli_env, make_project, sqlite_uri, tiny_arrays, wait_until
from l2sweep import render
from l2sweep.engine.callbacks import EpochStats, WeightHistograms
from l2sweep.engine.model import build_model, set_seeds
from l2sweep.render import Figure


@pytest.fixture(scope="module")
def trained(tiny_xy):
    """A real run's history and weight histograms (the conftest's tiny data, 2 epochs)."""
    cfg = model_cfg()
    (x, y), val = tiny_xy
    set_seeds(cfg.train.seed, cfg.train.deterministic)
    model, hists = build_model(cfg), WeightHistograms(cfg.tracking.histogram_bins)
    history = model.fit(x, y, validation_data=val, epochs=2, batch_size=cfg.train.batch_size,
                        callbacks=[EpochStats(), hists], verbose=0).history
    return {k: [float(v) for v in values] for k, values in history.items()}, hists.data


@pytest.fixture
def workers():
    """Helpers started for one test, and always stopped (waiting for their exit)."""
    render.stop_workers()
    yield render._workers
    procs = [w.proc for w in render._workers]
    render.stop_workers()
    for proc in procs:
        proc.wait(30)


def figures_of(trained, folder) -> list[Figure]:
    metrics, hists = trained
    out = [Figure("plot_curves", {"metrics": metrics, "title": "L2 = 0.01"}, str(folder / "curves.png"))]
    return out + [Figure("plot_histograms", {"hist_layer_data": data, "layer": layer, "title": layer},
                         str(folder / f"{layer}.png")) for layer, data in hists.items()]


def test_helpers_draw_the_same_files_as_this_process(trained, workers, tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    for figure in figures_of(trained, here):
        render.draw_here(figure)
    render.start_workers(2)
    assert len(workers) == 2 and all(w.alive for w in workers)
    drawing = render.draw(figures_of(trained, there))
    assert all(f is not None for f in drawing.futures)  # handed over, not drawn here
    drawing.wait()
    names = sorted(p.name for p in here.iterdir())
    assert names == sorted(p.name for p in there.iterdir()) == ["curves.png", "hidden.png", "output.png"]
    for name in names:  # Agg renders the same pixels; PNG metadata has no timestamp
        assert (there / name).read_bytes() == (here / name).read_bytes()
    assert {w.proc.pid for w in workers} != {os.getpid()}


def test_without_helpers_the_figures_are_drawn_when_waited_for(trained, workers, tmp_path):
    drawing = render.draw(figures_of(trained, tmp_path))
    assert drawing.futures == [None, None, None] and not list(tmp_path.iterdir())
    drawing.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "hidden.png", "output.png"]


def test_a_killed_helper_figures_are_drawn_here(trained, workers, tmp_path):
    render.start_workers(1)
    workers[0].proc.kill()
    workers[0].proc.wait(30)
    drawing = render.draw(figures_of(trained, tmp_path))
    drawing.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "hidden.png", "output.png"]
    assert not workers[0].alive


def test_a_helper_not_ready_in_time_is_left_out(trained, workers, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(render, "READY_TIMEOUT_S", 0.001)  # far less than its matplotlib import
    with caplog.at_level("WARNING", logger="l2sweep.render"):
        render.start_workers(2)
    assert workers == []  # killed, and the second one not tried
    assert "no helper process (the helper process was not ready within 0.001 s)" in caplog.text
    render.draw(figures_of(trained, tmp_path)).wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "hidden.png", "output.png"]


def test_a_figure_that_fails_raises_its_own_error(trained, workers, tmp_path):
    render.start_workers(1)
    metrics, hists = trained
    bad = Figure("plot_histograms", {"hist_layer_data": hists, "layer": "conv9", "title": "t"},
                 str(tmp_path / "conv9.png"))
    drawing = render.draw([bad])
    with pytest.raises(KeyError, match="'conv9'"):  # what plot_histograms raises, drawn here again
        drawing.wait()
    assert workers[0].alive  # the helper goes on with the next figure
    render.draw(figures_of(trained, tmp_path)).wait()
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_only_the_per_run_figures_are_drawn_by_name():
    with pytest.raises(ValueError, match="function='system' is not allowed: one of plot_curves, plot_histograms"):
        Figure("system", {}, "x.png")


def test_helpers_ignore_ctrl_c_and_end_when_the_sweep_closes_them(workers):
    render.start_workers(1)
    proc = workers[0].proc
    # Their own process group (a terminal's Ctrl-C reaches the sweep only), in the sweep's
    # session (the kernel's autogroups weigh a session against a session), below its priority.
    assert os.getpgid(proc.pid) == proc.pid and os.getsid(proc.pid) == os.getsid(0)
    assert os.getpriority(os.PRIO_PROCESS, proc.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + render.NICENESS)
    os.kill(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the sweep decides, not the helper
    time.sleep(0.5)
    assert proc.poll() is None
    render.stop_workers()
    assert proc.wait(30) == 0
    assert render._workers == []


_COUNT_DRAWN_HERE = """
import sys
import l2sweep.render as render
draw_here = render.draw_here
def counted(figure):
    with open("drawn-here.txt", "a") as f:
        f.write(figure.path + "\\n")
    draw_here(figure)
render.draw_here = counted
import l2sweep.train as train
sys.argv[1:] = ["-m", "tracking.figure_workers=%d"]
train.main()
"""


def _helpers_in(folder: Path) -> list[int]:
    """Live helper processes started from ``folder`` (their working directory)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"l2sweep.render" in (proc / "cmdline").read_bytes()
                    and os.readlink(proc / "cwd") == str(folder)):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("count", [2, 0])
def test_a_sweep_hands_its_figures_to_the_helpers_and_leaves_none_behind(tmp_path, count):
    root = make_project(tmp_path / "p", tiny_arrays(), sweep={"strengths": [0.001, 0.01]},
                        train={"epochs": 1})
    proc = subprocess.run([sys.executable, "-c", _COUNT_DRAWN_HERE % count], cwd=root, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    drawn_here = (root / "drawn-here.txt").read_text().split() if (root / "drawn-here.txt").exists() else []
    if count:  # helpers are ready within ~1 s, long before a job ends: ideally all of them
        assert len(drawn_here) < 6, drawn_here
    else:
        assert sorted(Path(p).name for p in drawn_here) == ["curves.png", "curves.png", "hidden.png",
                                                            "hidden.png", "output.png", "output.png"]
    client = MlflowClient(sqlite_uri(root))
    children = [r for r in client.search_runs([client.get_experiment_by_name("l2-sweep").experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    for child in children:
        paths = {a.path for folder in ("plots", "histograms")
                 for a in client.list_artifacts(child.info.run_id, folder)}
        assert {"plots/curves.png", "histograms/hidden.png", "histograms/output.png"} <= paths
    wait_until(lambda: not _helpers_in(root), 30, "the helper processes to end")
