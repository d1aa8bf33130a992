"""Credentials in a store URI never reach an output, a log line, a tag or an artifact
(l2sweep.tracking.store.redact), and a redacted URI recorded in sweep.json is never connected to."""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import free_port
from l2sweep.tracking import artifacts, store, sweep
from l2sweep.tracking.runs import ChildRun

SERVER = "http://alice:s3cret-token@mlflow.example.org:5000"


@pytest.mark.parametrize("text, expected", [
    (SERVER, "http://***@mlflow.example.org:5000"),
    ("https://ghp_abc123@host/path?x=1", "https://***@host/path?x=1"),
    ("postgresql://user:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("postgresql+psycopg2://u:p@ss@db/m?sslmode=require&password=pw&x=1",
     "postgresql+psycopg2://***@db/m?sslmode=require&password=***&x=1"),
    ("mysql://db/m?user=u&passwd=pw", "mysql://db/m?user=u&passwd=***"),
    ("host=db user=u password=pw dbname=m", "host=db user=u password=*** dbname=m"),
    ("API request to http://u:t@h:5000/api/2.0/mlflow/runs/create failed with exception x",
     "API request to http://***@h:5000/api/2.0/mlflow/runs/create failed with exception x"),
    ("tracking:\n  uri: 'http://u:t@h:5000'\n", "tracking:\n  uri: 'http://***@h:5000'\n"),
    # nothing to hide: unchanged
    ("sqlite:////home/a@b/mlruns/mlflow.db", "sqlite:////home/a@b/mlruns/mlflow.db"),
    ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
    ("http://mlflow.example.org:5000/#/experiments/1?a=b", "http://mlflow.example.org:5000/#/experiments/1?a=b"),
    ("mlruns", "mlruns"),
    ("max_tokens=5", "max_tokens=5"),
])
def test_redact_masks_every_credential_and_nothing_else(text, expected):
    assert store.redact(text) == expected
    assert store.redact(expected) == expected  # idempotent: a redacted text stays as it is


def cfg(tmp_path: Path, uri: str = SERVER):
    return OmegaConf.create({
        "tracking": {"enabled": True, "uri": uri, "experiment": "l2-sweep"},
        "paths": {"models": str(tmp_path / "models")},
        "dataset": {"name": "d"}, "model": {"name": "mlp"}, "regularizer": {"name": "l2"}})


def test_sweep_json_records_the_store_without_credentials_and_evaluate_still_finds_it(
        tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    config = cfg(tmp_path)
    sweep.write_manifest(config, "parent-id")
    text = (tmp_path / "models" / "sweep.json").read_text()
    assert "s3cret" not in text and "alice" not in text
    recorded = json.loads(text)["tracking_uri"]
    assert recorded == "http://***@mlflow.example.org:5000"
    # evaluate: store.tracking_uri(cfg, recorded). The configured store, with its credentials:
    assert store.tracking_uri(config, recorded) == SERVER
    # the environment wins, as before:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:pw@mlflow.example.org:5000")
    assert store.tracking_uri(config, recorded) == "http://bob:pw@mlflow.example.org:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # a redacted URI of another store is never connected to: one line says what to set
    with pytest.raises(store.StoreError, match=r"^the sweep logged to the MLflow store "
                                               r"http://\*\*\*@mlflow.example.org:5000, recorded without "
                                               r"its credentials; set MLFLOW_TRACKING_URI"):
        store.tracking_uri(cfg(tmp_path, "sqlite:///mlruns/mlflow.db"), recorded)
    # a recorded URI without credentials (or an old sweep.json with them) is used as recorded
    assert store.tracking_uri(config, "http://other:5000") == "http://other:5000"


def test_store_errors_and_the_server_check_leave_credentials_out(tmp_path):
    error = RuntimeError(f"API request to {SERVER}/api/2.0/mlflow/runs/create failed with exception "
                         "HTTPConnectionPool(host='mlflow.example.org', port=5000): Read timed out")
    message = store.store_error(SERVER, error)
    assert "s3cret" not in message and "http://***@mlflow.example.org:5000" in message

    port = free_port()
    with pytest.raises(store.StoreError) as info:
        store.check_server(f"http://alice:s3cret@127.0.0.1:{port}", timeout=2)
    assert str(info.value).startswith(f"MLflow tracking server http://***@127.0.0.1:{port} does not "
                                      "answer (Connection refused)")
    server = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:  # the user info is not taken for part of the host name (any answer will do: a 404 here)
        store.check_server(f"http://alice:s3cret@127.0.0.1:{port}", timeout=5)
    finally:
        server.shutdown()
        server.server_close()


class FakeClient:
    """Keeps what ``log_outputs`` logs: the artifact files' text, and the tags."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str = "") -> None:
        for path in Path(local_dir).rglob("*"):
            if path.is_file():
                self.files[str(Path(artifact_path) / path.relative_to(local_dir))] = path.read_text()

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.tags[key] = value


def logged(tmp_path: Path, hydra_dir=None, job_config=None) -> dict[str, str]:
    run = ChildRun(None, "l2-0.1", tmp_path / "models" / "l2-0.1", SERVER)
    run.client, run.run_id = FakeClient(), "run-id"
    history = {"status": "FINISHED", "epochs": [0], "metrics": {"val_loss": [0.5]}}
    artifacts.log_outputs(run, None, history, {"dense": {"bins": [0, 1]}}, None, hydra_dir, job_config)
    return run.client.files


def test_the_hydra_config_logged_as_an_artifact_is_redacted(tmp_path):
    hydra = tmp_path / "job" / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "config.yaml").write_text(f"tracking:\n  uri: {SERVER}\n")
    (hydra / "overrides.yaml").write_text(f"- tracking.uri={SERVER}\n- regularizer.strength=0.1\n")
    files = logged(tmp_path, hydra_dir=tmp_path / "job")
    assert files["hydra/config.yaml"] == "tracking:\n  uri: http://***@mlflow.example.org:5000\n"
    assert files["hydra/overrides.yaml"] == ("- tracking.uri=http://***@mlflow.example.org:5000\n"
                                             "- regularizer.strength=0.1\n")
    assert sorted(files) == ["histograms/dense.json", "history.json", "hydra/config.yaml",
                             "hydra/overrides.yaml"]
    fused = logged(tmp_path, job_config=OmegaConf.create({"tracking": {"uri": SERVER}}))
    assert fused["hydra/config.yaml"] == "tracking:\n  uri: http://***@mlflow.example.org:5000\n"


def test_mlflow_prints_no_run_links_for_a_store_with_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "")  # restored after the test
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    store.hide_credentials("http://mlflow.example.org:5000")
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
    store.hide_credentials(SERVER)  # MLflow would print "View run ... at: <the URI>"
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
