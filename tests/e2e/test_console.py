"""What `dvc repro`'s train stage prints when its output is not a terminal: one log format, a
short line per epoch instead of Keras' 14-metric one, no TensorFlow start-up notices (they come
back with --verbose). Runs the real CLI on a tiny sweep."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import make_project, run_cli

pytestmark = pytest.mark.slow
SWEEP, EPOCHS = [0.001, 0.1], 2
#: l2sweep.base.cli.LOG_FORMAT as written: ``[date time,ms][logger][LEVEL] - message``.
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]\[[\w.]+\]\[[A-Z]+\] - ")
EPOCH_LINE = re.compile(r"^l2-[\d.]+ Epoch \d+/\d+ - loss [\d.]+ - accuracy [\d.]+ - val_loss [\d.]+ - "
                        r"val_accuracy [\d.]+ - [\d.]+s$")
#: What a log line of another format starts with (MLflow's own `2026/12/07 08:08:30 INFO`, absl's
#: `I0000 00:00:...`, Hydra's default `[...][HYDRA]`, a bare `INFO name:`).
OTHER_LOG = re.compile(r"^(\d{4}/\d\d/\d\d |[IWEF]\d{4} |\[[^\]]*\]\[HYDRA\]|(INFO|WARNING|ERROR) \S+: )")
NOTICES = ("absl::InitializeLog", "oneDNN", "port.cc")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("console"), sweep={"strengths": SWEEP},
                        train={"epochs": EPOCHS})


def test_sweep_output_is_short_plain_and_in_one_format(project):
    proc = run_cli(project, "l2sweep.train", "-m", "tracking.log_model=false")
    lines = (proc.stdout + proc.stderr).splitlines()
    epoch_lines = [line for line in lines if EPOCH_LINE.match(line)]
    assert len(epoch_lines) == len(SWEEP) * EPOCHS, "\n".join(lines)
    assert all(len(line) < 120 for line in epoch_lines), epoch_lines
    assert not [line for line in lines if "ms/step" in line or re.match(r"^Epoch \d+/\d+$", line)]
    assert not [line for line in lines if any(n in line for n in NOTICES)], "\n".join(lines)
    assert not [line for line in lines if OTHER_LOG.match(line)], "\n".join(lines)
    quiet = re.compile(r"^\[[^\]]*\]\[(mlflow|alembic|sqlalchemy)[\w.]*\]\[INFO\]")  # (a fresh store)
    assert not [line for line in lines if quiet.match(line)], "\n".join(lines)
    assert "\r" not in proc.stdout + proc.stderr and "\x1b[" not in proc.stdout + proc.stderr
    logged = [line for line in lines if LOG_LINE.match(line)]
    assert any("Launching 2 jobs" in line for line in logged)  # Hydra's own lines, same format
    assert any("job 2/2 l2-0.1" in line for line in logged)


def test_verbose_brings_tensorflow_notices_and_mlflows_info_lines_back(project):
    """A fresh store: MLflow and its migrations log INFO lines as they create it (a store the
    sweep above created without one of them showing)."""
    proc = run_cli(project, "l2sweep.train", "-m", "--verbose", "train.epochs=1", "tracking.log_model=false",
                   f"tracking.uri=sqlite:///{project / 'verbose.db'}", "regularizer.strength=0.1")
    assert "oneDNN" in proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    assert re.search(r"\]\[(alembic|mlflow)[\w.]*\]\[INFO\] - ", output), output[-3000:]
    assert "[sqlalchemy.engine" not in output  # its echo of every SQL statement stays off
    # The run's log is this sweep's alone (the sweep above wrote the same file first).
    log = (project / "outputs" / "sweep" / "l2-0.1" / "train.log").read_text()
    assert "job 1/1 l2-0.1" in log and "job 2/2" not in log
