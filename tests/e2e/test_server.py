"""Team mode: `make server` (a real `mlflow server` on 127.0.0.1 with a real PostgreSQL behind
it and proxied artifacts); the pipeline logs to it through MLFLOW_TRACKING_URI alone.

PostgreSQL is Debian's package (`make test` installs it as root), run as a throwaway cluster in
a temp dir on a loopback port. Where it cannot run, the same test runs the server on a sqlite
backend and says so in a warning.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest
import requests

from helpers import EPOCHS, GRID, cli_env, free_port, make_project, make_server, run_cli

REPO = Path(__file__).resolve().parents[2]
SWEEP = GRID[:2]
pytestmark = pytest.mark.slow


@dataclass
class Database:
    uri: str  # SQLAlchemy's, for MLflow (psycopg2 named: SQLAlchemy 2.1 defaults to psycopg 3)
    kind: str  # "postgresql" or "sqlite"
    dsn: str = ""  # libpq's, for psycopg2


def _pg_bin() -> Optional[Path]:
    """The folder of Debian's PostgreSQL server binaries (newest version), else initdb on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextmanager
def postgres_cluster() -> Iterator[tuple[Optional[str], str]]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with an empty ``mlflow`` database.

    Yields:
        (its URI, "") or (None, why PostgreSQL cannot run here).
    """
    bin_dir = _pg_bin()
    if bin_dir is None:
        yield None, "initdb not found (Debian: apt-get install postgresql; `make test` does it as root)"
        return
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            yield None, "running as root and there is no 'postgres' user to run the server as"
            return
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's tmp dir: that one is private to this user, the postgres user must reach it.
    home = Path(tempfile.mkdtemp(prefix="l2sweep-pg-"))
    if owner is not None:
        os.chown(home, owner.pw_uid, owner.pw_gid)
    data, port = home / "data", free_port()

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120, cwd=home)

    started = False
    try:
        init = pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        if init.returncode != 0:
            yield None, f"initdb failed: {init.stderr.strip()[-500:]}"
            return
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c fsync=off"
        start = pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(home / "server.log"),
                   "-o", options, "-w", "-t", "60", "start")
        started = start.returncode == 0
        if not started:
            log = (home / "server.log").read_text(errors="replace")[-500:] if (home / "server.log").exists() else ""
            yield None, f"pg_ctl start failed: {start.stderr.strip()[-300:]} {log}"
            return
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        con.close()
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow", ""  # libpq's form
    finally:
        if started:
            pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    with postgres_cluster() as (uri, why_not):
        if uri is None:
            warnings.warn(f"PostgreSQL cannot run here ({why_not}): the tracking-server test "
                          "runs on a sqlite backend instead", UserWarning)
            uri = f"sqlite:///{tmp_path_factory.mktemp('server-db') / 'mlflow.db'}"
            yield Database(uri, "sqlite")
        else:
            yield Database(uri.replace("postgresql://", "postgresql+psycopg2://", 1), "postgresql", uri)


@pytest.fixture(scope="module")
def server(database: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`make server` on a free loopback port, its artifacts in a temp folder."""
    home = tmp_path_factory.mktemp("server")
    artifacts, log = home / "artifacts", home / "server.log"
    with make_server("server", log, 180, SERVER_DB=database.uri, ARTIFACTS=str(artifacts)) as url:
        yield {"url": url, "artifacts": artifacts, "log": log, "database": database}


@pytest.fixture(scope="module")
def sweep(server: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny sweep whose only link to the server is MLFLOW_TRACKING_URI."""
    root = make_project(tmp_path_factory.mktemp("team"), sweep={"strengths": SWEEP})
    for stage in (("l2sweep.train", "-m", "tracking.log_model=false"), ("l2sweep.evaluate",)):
        run_cli(root, *stage, env=cli_env(MLFLOW_TRACKING_URI=server["url"]))
    assert not (root / "mlruns").exists()  # nothing went to the embedded store
    api = f"{server['url']}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "l2-sweep"},
                              timeout=10).json()["experiment"]
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]},
                         timeout=10).json()["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    return {"api": api, "experiment": experiment, "runs": by_name, "root": root, **server}


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_runs_are_on_the_server_as_parent_and_children(sweep):
    runs = sweep["runs"]
    parents = [r for r in runs.values() if "mlflow.parentRunId" not in _tags(r)]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    children = {name: r for name, r in runs.items() if "mlflow.parentRunId" in _tags(r)}
    assert sorted(children) == sorted(f"l2-{s}" for s in SWEEP)
    for run in children.values():
        assert run["info"]["status"] == "FINISHED"
        assert _tags(run)["mlflow.parentRunId"] == parents[0]["info"]["run_id"]
    assert _tags(parents[0])["best_run_name"] in children


def test_metric_histories_have_one_point_per_epoch(sweep):
    for name in (f"l2-{s}" for s in SWEEP):
        run_id = sweep["runs"][name]["info"]["run_id"]
        for key in ("loss", "val_loss", "val_data_loss", "penalty", "weight_norm/hidden"):
            history = requests.get(f"{sweep['api']}/metrics/get-history",
                                   params={"run_id": run_id, "metric_key": key}, timeout=10).json()
            assert sorted(m["step"] for m in history["metrics"]) == list(range(EPOCHS)), (name, key)


def test_artifacts_go_through_the_server(sweep):
    # Proxied artifacts: clients only know mlflow-artifacts:/ URIs; the server stores the files.
    assert sweep["experiment"]["artifact_location"].startswith("mlflow-artifacts:")
    run = sweep["runs"][f"l2-{SWEEP[0]}"]
    uri = run["info"]["artifact_uri"]
    assert uri.startswith("mlflow-artifacts:/"), uri
    path = uri[len("mlflow-artifacts:/"):].lstrip("/")
    response = requests.get(f"{sweep['url']}/api/2.0/mlflow-artifacts/artifacts/{path}/history.json",
                            timeout=10)
    assert response.ok, response.text[:500]
    history = response.json()
    val_loss = requests.get(f"{sweep['api']}/metrics/get-history",
                            params={"run_id": run["info"]["run_id"], "metric_key": "val_loss"},
                            timeout=10).json()["metrics"]
    assert [m["value"] for m in sorted(val_loss, key=lambda m: m["step"])] == \
        pytest.approx(history["metrics"]["val_loss"])
    assert (sweep["artifacts"] / path / "histograms" / "hidden.json").is_file()  # from train
    assert (sweep["artifacts"] / path / "plots" / "curves.png").is_file()  # from evaluate


def test_the_backend_holds_the_runs(sweep):
    database = sweep["database"]
    if database.kind != "postgresql":
        pytest.skip("PostgreSQL not available here; the server ran on sqlite (see the warning)")
    import psycopg2

    with psycopg2.connect(database.dsn) as con, con.cursor() as cur:
        cur.execute("SELECT name, status FROM runs")
        rows = dict(cur.fetchall())
    assert {f"l2-{s}" for s in SWEEP} <= set(rows) and set(rows.values()) == {"FINISHED"}
