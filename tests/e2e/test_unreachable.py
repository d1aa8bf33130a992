"""A tracking server that is not there fails the run in seconds, with one clear line.

MLflow's own HTTP defaults (7 retries with back-off, 120 s timeout) would keep a sweep waiting
for minutes; l2sweep.tracking.store sets shorter ones unless the user set theirs.
"""

from __future__ import annotations

import socket
import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from helpers import cli_env, free_port, make_project, run_cli
from l2sweep.tracking import store as tracking


def test_http_defaults_are_set_unless_the_user_set_them(monkeypatch):
    for name in tracking.HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    tracking.apply_http_defaults()
    import os

    assert [os.environ[k] for k in tracking.HTTP_DEFAULTS] == \
        ["7", *list(tracking.HTTP_DEFAULTS.values())[1:]]


def test_nothing_listening_fails_within_seconds(monkeypatch):
    for name, value in tracking.HTTP_DEFAULTS.items():  # the defaults, whatever this shell set
        monkeypatch.setenv(name, value)
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(MlflowException, match="Connection refused") as failure:
        MlflowClient(url).get_experiment_by_name("l2-sweep")
    assert time.monotonic() - start < 10
    message = tracking.store_error(url, failure.value)
    assert message.startswith(f"MLflow tracking server {url} does not answer (Connection refused; "
                              "gave up after 2 retries of 10 s"), message


def test_a_server_that_never_answers_fails_after_the_timeout(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    with socket.socket() as silent:  # accepts connections (kernel backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        client = MlflowClient(f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(MlflowException, match="timed out"):
            client.get_experiment_by_name("l2-sweep")
        assert time.monotonic() - start < 8


@pytest.mark.slow
def test_a_sweep_against_a_dead_server_stops_before_training(tmp_path):
    root = make_project(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run_cli(root, "l2sweep.train", "-m", check=False, env=cli_env(MLFLOW_TRACKING_URI=url))
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith(f"error: MLflow tracking server {url} does not answer"), errors[0]
    assert "Traceback" not in proc.stderr
    assert elapsed < 30, f"took {elapsed:.0f}s"
    assert not list(root.glob("models/*/history.json")) and not (root / "outputs" / "sweep").exists()
