"""The sweep on a real SLURM cluster: `hydra/launcher=slurm` through the scheduler, end to end.

One module-scoped one-node cluster from Debian's packages (`make test` installs them as root):
munged, MariaDB + slurmdbd (job accounting: submitit reads job states with `sacct`, and a job
that ends without a result, e.g. one cancelled with `scancel`, is only seen there), slurmctld
and slurmd as root, everything in one temp folder on free loopback ports. Beside it the team's
store, a real `mlflow server` (`make server`, sqlite backend). Where it cannot run (not root,
packages missing) every test here skips with the reason.

The data are tiny, 2 epochs, and the MLflow model copy is off (tested in test_train).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest
import requests
import yaml

from helpers import (EPOCHS, GRID, cli_env, copy_project, free_port, make_project, make_server,
                     pipeline_copy, run_cli, wait_until)
from l2sweep.tracking.runs import REASON_TAG

pytestmark = pytest.mark.slow

PARTITION = "cpu"
#: What a job asks for on this one small node; `mem_gb` stays under any CI machine's memory.
RESOURCES = (f"hydra.launcher.partition={PARTITION}", "hydra.launcher.cpus_per_task=1",
             "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10")
FAST = ("tracking.log_model=false",)
METRICS = ("loss", "val_loss", "val_data_loss", "penalty", "weight_norm/hidden")
#: States of a job that has not ended yet.
ACTIVE = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED", "RESIZING"}
#: Debian's binaries the cluster needs (packages slurm-wlm, slurmdbd, munge, mariadb-server).
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "slurmdbd", "sacctmgr", "sbatch", "sacct",
            "scancel", "sinfo", "mariadbd", "mariadb-install-db")


# --- the cluster ------------------------------------------------------------------------------


@dataclass
class Cluster:
    """A running one-node cluster: its folder and its config (``SLURM_CONF``)."""

    home: Path
    conf: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The test's CLI environment pointed at this cluster."""
        return cli_env(SLURM_CONF=str(self.conf), **extra)

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def sacct(self, job: str) -> dict[str, dict[str, str]]:
        """Job id (``12_0``; steps left out) -> its accounting record (State, NodeList, ...), once
        every job of ``job`` has ended (a sweep has its result a moment before SLURM ends the job)."""
        fields = "JobID,JobName,State,ExitCode,NodeList,Partition,Submit,Start,End"
        names, records = fields.split(","), {}

        def ended() -> bool:
            out = self.run("sacct", "-X", "--parsable2", "--noheader", "-o", fields, "-j", job)
            rows = [line.split("|") for line in out.splitlines()]
            records.update((row[0], dict(zip(names, row))) for row in rows)
            return bool(records) and not any(r["State"] in ACTIVE for r in records.values())

        wait_until(ended, 30, f"the end of SLURM job {job}")
        return records


def missing_requirements() -> Optional[str]:
    """Why the cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (the daemons run as root; munged needs /etc/munge and /run/munge)"
    missing = [b for b in BINARIES if shutil.which(b, path=f"{os.environ.get('PATH', '')}:/usr/sbin")
               is None]
    if missing:
        return (f"missing {', '.join(missing)} (Debian: apt-get install slurm-wlm slurmdbd munge "
                "mariadb-server; `make test` does it as root)")
    for user in ("munge", "mysql"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no '{user}' user (created by Debian's packages)"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin") or name


def stop_all(pids: list[int], timeout: float = 15) -> None:
    """SIGTERM to each of our daemons at once (each takes seconds to shut down), then SIGKILL to
    any still there after ``timeout``."""
    def alive(pid: int) -> bool:  # a zombie (our own child, not yet reaped) counts as gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
        except (OSError, IndexError):
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in filter(alive, pids):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(map(alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)


def _pid_of(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _munge_works() -> bool:
    encode = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    return encode.returncode == 0 and subprocess.run(
        ["unmunge"], input=encode.stdout, capture_output=True, timeout=10).returncode == 0


def start_munge() -> Optional[int]:
    """munged on its default socket, as user munge (slurm's auth/munge finds it there), unless
    one answers already. Returns the pid of the one started here, else None."""
    if _munge_works():
        return None
    key = Path("/etc/munge/munge.key")  # Debian's package creates it; the recipe's fallback
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    munge_user = pwd.getpwnam("munge")
    for folder in ("/etc/munge", "/var/lib/munge", "/var/log/munge", "/run/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        for path in (Path(folder), *Path(folder).iterdir()):
            os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
    pid_file = Path("/run/munge/munged.pid")
    subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged"), f"--pid-file={pid_file}"],
                   check=True, capture_output=True, timeout=30)
    wait_until(lambda: _munge_works() and _pid_of(pid_file) is not None, 15, "munged")
    return _pid_of(pid_file)


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@contextmanager
def slurm_cluster() -> Iterator[Cluster]:
    """Starts munged, MariaDB, slurmdbd, slurmctld and slurmd (one node: this host with its real
    CPUs and memory, one partition); stops every daemon it started by its pid."""
    # Not under pytest's tmp dir: that one is private to root, the mysql user must reach its folder.
    home = Path(tempfile.mkdtemp(prefix="l2sweep-slurm-"))
    home.chmod(0o755)
    etc, db = home / "etc", home / "mysql"
    for folder in (etc, home / "state", home / "spool", db):
        folder.mkdir()
    mysql = pwd.getpwnam("mysql")
    os.chown(db, mysql.pw_uid, mysql.pw_gid)
    host = socket.gethostname().split(".")[0]
    db_port, dbd_port, ctld_port, d_port = (free_port() for _ in range(4))
    conf = etc / "slurm.conf"
    env = cli_env(SLURM_CONF=str(conf))
    cluster = Cluster(home, conf)
    daemons: list[int] = []  # stopped together at the end, after the jobs
    children: list[subprocess.Popen] = []  # those daemons this process started in the foreground
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        stack.callback(lambda: (stop_all(daemons), [child.wait(30) for child in children]))
        munged = start_munge()
        if munged is not None:
            daemons.append(munged)

        # Job accounting: MariaDB (throwaway, no grant tables, loopback only) behind slurmdbd.
        subprocess.run([_sbin("mariadb-install-db"), "--no-defaults", f"--datadir={db / 'data'}",
                        "--user=mysql", "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True, timeout=120, cwd=home)
        mariadb = subprocess.Popen(
            [_sbin("mariadbd"), "--no-defaults", f"--datadir={db / 'data'}", "--user=mysql",
             "--bind-address=127.0.0.1", f"--port={db_port}", f"--socket={db / 'mysql.sock'}",
             f"--pid-file={db / 'mysql.pid'}", f"--log-error={db / 'error.log'}",
             "--skip-grant-tables", "--skip-log-bin", "--innodb-buffer-pool-size=32M",
             "--innodb-flush-log-at-trx-commit=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=home)
        children.append(mariadb)
        daemons.append(mariadb.pid)
        wait_until(lambda: _listening(db_port), 60, "mariadbd", mariadb, db / "error.log")

        node = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True,
                              check=True, timeout=30, env=env).stdout.splitlines()[0]
        common = "AuthType=auth/munge\nSlurmUser=root\n"
        _write(etc / "slurmdbd.conf", common + f"""\
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
PidFile={home / 'slurmdbd.pid'}
LogFile={home / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=root
StorageLoc=slurm_acct_db
""", 0o600)  # slurmdbd refuses a config others can read
        _write(conf, common + f"""\
ClusterName=l2sweep
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmdUser=root
StateSaveLocation={home / 'state'}
SlurmdSpoolDir={home / 'spool'}
SlurmctldPidFile={home / 'slurmctld.pid'}
SlurmdPidFile={home / 'slurmd.pid'}
SlurmctldLogFile={home / 'slurmctld.log'}
SlurmdLogFile={home / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
KillWait=10
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={PARTITION} Nodes={node.split()[0].split('=')[1]} Default=YES MaxTime=INFINITE State=UP
""")
        for daemon in ("slurmdbd", "slurmctld", "slurmd"):  # each forks into the background
            subprocess.run([_sbin(daemon)], env=env, check=True, capture_output=True, timeout=60)
            pid_file = home / f"{daemon}.pid"
            wait_until(lambda: _pid_of(pid_file) is not None, 30, daemon, log=home / f"{daemon}.log")
            daemons.append(_pid_of(pid_file))
            if daemon == "slurmdbd":  # the cluster must be known to accounting before slurmctld starts
                wait_until(lambda: subprocess.run(
                    ["sacctmgr", "-i", "add", "cluster", "l2sweep"], env=env, capture_output=True,
                    timeout=30).returncode == 0, 30, "slurmdbd", log=home / "slurmdbd.log")
        stack.callback(cancel_all, cluster)  # runs first: no job outlives the cluster
        wait_until(lambda: cluster.run("sinfo", "-h", "-o", "%t", check=False).strip() == "idle",
                   60, "the node", log=home / "slurmd.log")
        yield cluster


def cancel_all(cluster: Cluster) -> None:
    """Cancels this cluster's jobs and waits until their processes are gone (slurmd ends them)."""
    cluster.run("scancel", "--user=root", check=False)
    wait_until(lambda: not cluster.run("squeue", "-h", check=False).strip(), 60, "the jobs' end")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    why_not = missing_requirements()
    if why_not:
        pytest.skip(f"SLURM test cluster: {why_not}")
    with slurm_cluster() as running:
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The team's store: `make server` (sqlite backend, proxied artifacts) on 127.0.0.1."""
    home = tmp_path_factory.mktemp("slurm-server")
    with make_server("server", home / "server.log", 180, SERVER_DB=f"sqlite:///{home / 'mlflow.db'}",
                     ARTIFACTS=str(home / "artifacts")) as url:
        yield url


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared tiny project (3 λ, 2 epochs); each test sweeps in its own copy."""
    return make_project(tmp_path_factory.mktemp("slurm") / "template")


# --- reading the server ---------------------------------------------------------------------


class Store:
    """The runs of the ``l2-sweep`` experiment on the server, through its REST API."""

    def __init__(self, url: str) -> None:
        self.url, self.api = url, f"{url}/api/2.0/mlflow"

    def get(self, endpoint: str, **params) -> dict:
        response = requests.get(f"{self.api}/{endpoint}", params=params, timeout=10)
        response.raise_for_status()
        return response.json()

    def search(self) -> list[dict]:
        """Every run of the experiment (none before the first sweep created it)."""
        try:
            experiment = self.get("experiments/get-by-name", experiment_name="l2-sweep")["experiment"]
        except requests.HTTPError:
            return []
        return requests.post(f"{self.api}/runs/search", timeout=10, json={
            "experiment_ids": [experiment["experiment_id"]], "max_results": 1000}).json().get("runs", [])

    def runs(self, parent: str) -> tuple[list[dict], dict[str, dict]]:
        """([the parent run], {child name: child}) of the sweep whose parent run id is ``parent``."""
        found = self.search()
        parents = [r for r in found if r["info"]["run_id"] == parent]
        children = {r["info"]["run_name"]: r for r in found if tags(r).get("mlflow.parentRunId") == parent}
        return parents, children

    def history(self, run: dict, key: str) -> list[dict]:
        found = self.get("metrics/get-history", run_id=run["info"]["run_id"], metric_key=key)
        return found.get("metrics", [])  # none logged yet: no key

    def artifacts(self, run: dict, path: str = "") -> list[str]:
        listed = self.get("artifacts/list", run_id=run["info"]["run_id"], path=path)
        return [f["path"] for f in listed.get("files", [])]


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def manifest(root: Path) -> dict:
    return json.loads((root / "models" / "sweep.json").read_text())


def job_ids(root: Path) -> list[str]:
    """The SLURM job ids of the project's sweep (`12_0`: array 12, task 0; `13`: a job alone),
    from submitit's folders: one per job, with the job's pickle and logs."""
    folder = root / "outputs" / "sweep" / ".submitit"
    return sorted(p.name for p in folder.iterdir() if (p / f"{p.name}_submitted.pkl").exists())


def sweep_cli(root: Path, cluster: Cluster, server: str, *args: str,
              check: bool = True) -> subprocess.CompletedProcess:
    """``python -m l2sweep.train -m hydra/launcher=slurm`` on this cluster, logging to ``server``."""
    return run_cli(root, "l2sweep.train", "-m", "hydra/launcher=slurm", *RESOURCES, *args,
                   check=check, env=cluster.env(MLFLOW_TRACKING_URI=server))


# --- the sweep through the scheduler ---------------------------------------------------------


def test_a_sweep_runs_as_a_slurm_job_array(cluster, server, prepared, tmp_path):
    root = copy_project(prepared, tmp_path / "p")
    start = time.time()
    proc = sweep_cli(root, cluster, server, *FAST)
    wall = time.time() - start
    log = proc.stdout + proc.stderr
    assert "Submitit 'slurm' sweep output dir" in log, log[-3000:]

    # The scheduler ran them: one job array, a task per λ, COMPLETED on this node's partition.
    ids = job_ids(root)
    assert len(ids) == len(GRID) and len({i.split("_")[0] for i in ids}) == 1, ids
    records = cluster.sacct(ids[0].split("_")[0])
    assert sorted(records) == ids, records
    assert {(r["State"], r["Partition"]) for r in records.values()} == {("COMPLETED", PARTITION)}

    # The team's server: one FINISHED parent, three FINISHED children, every epoch, artifacts.
    store = Store(server)
    parents, children = store.runs(manifest(root)["parent_run_id"])
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in parents[0]["data"]["params"]}["hydra.launcher"] == "slurm"
    assert sorted(children) == sorted(f"l2-{s}" for s in GRID)
    for name, child in children.items():
        assert child["info"]["status"] == "FINISHED", name
        for key in METRICS:
            assert sorted(m["step"] for m in store.history(child, key)) == list(range(EPOCHS)), (name, key)
        assert {"history.json", "histograms"} <= {p.split("/")[-1] for p in store.artifacts(child)}, name
        assert "histograms/hidden.json" in store.artifacts(child, "histograms"), name
    assert {r["run_name"] for r in manifest(root)["runs"]} == set(children)
    assert sorted(p.name for p in (root / "models").iterdir() if p.is_dir()) == sorted(children)

    run_cli(root, "l2sweep.evaluate", env=cluster.env(MLFLOW_TRACKING_URI=server))
    evaluation = json.loads((root / "reports" / "evaluation.json").read_text())
    assert {r["status"] for r in evaluation["runs"].values()} == {"finished"}
    assert len(evaluation["runs"]) == len(GRID)

    # Figures for README "Scaling out": submit -> first epoch, each job's start-up and wrap-up.
    figures = timings(root, records, store, children)
    print(f"\nSLURM, {len(GRID)} λ x {EPOCHS} epochs: {wall:.1f} s submit to result; first epoch "
          f"{figures['first_epoch']:.1f} s after submission; per job: queued {figures['queued']}, "
          f"start to first epoch {figures['startup']}, last epoch to end {figures['wrapup']} s")


def timings(root: Path, records: dict[str, dict], store: Store, children: dict[str, dict]) -> dict:
    """Seconds: submission to the first epoch logged; per job (sorted) submission to start,
    start to its first epoch logged (Python, TensorFlow, the data, the first epoch) and its last
    epoch to its end (artifacts, result), from sacct's times (to the second) and the metrics'
    timestamps."""
    def seconds(stamp: str) -> float:
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))

    run_of_job = {yaml.safe_load((d / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"]: d.name
                  for d in (root / "outputs" / "sweep").iterdir() if (d / ".hydra").is_dir()}
    queued, startup, wrapup, firsts = [], [], [], []
    for job, record in records.items():
        epochs = sorted(m["timestamp"] / 1000 for m in store.history(children[run_of_job[job]], "loss"))
        firsts.append(epochs[0])
        queued.append(seconds(record["Start"]) - seconds(record["Submit"]))
        startup.append(epochs[0] - seconds(record["Start"]))
        wrapup.append(seconds(record["End"]) - epochs[-1])
    submitted = min(seconds(r["Submit"]) for r in records.values())
    return {"first_epoch": min(firsts) - submitted,
            **{k: [round(v, 1) for v in sorted(values)] for k, values in
               (("queued", queued), ("startup", startup), ("wrapup", wrapup))}}


# --- what a cluster user meets when things go wrong -----------------------------------------


def parent_id(output: str) -> str:
    """The sweep's parent run id, from the launching process's log line."""
    found = re.search(r"MLflow sweep run \S+ \((\w+)\)", output)
    assert found, output[-3000:]
    return found.group(1)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line a failed command ends with."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, (proc.returncode, proc.stderr[-3000:])
    assert proc.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in proc.stderr
    return errors[0]


def test_a_job_that_fails_on_the_node_names_its_lambda_and_log(cluster, server, prepared, tmp_path):
    grid = GRID[:2]
    root = copy_project(prepared, tmp_path / "p", sweep={"strengths": grid})
    # The second job's node limits the size of a file (as a quota would): its model cannot be saved.
    setup = "hydra.launcher.setup=['[ \"$SLURM_ARRAY_TASK_ID\" != 1 ] || ulimit -f 64']"
    proc = sweep_cli(root, cluster, server, *FAST, setup, check=False)
    error = error_line(proc)
    bad = f"l2-{grid[1]}"
    match = re.fullmatch(rf"error: job 2/2 {bad} \(regularizer.strength={grid[1]}\) failed on "
                         rf"{socket.gethostname()}: \[Errno 27\] File too large; its log: (\S+)", error)
    assert match, error
    log = Path(match.group(1))
    assert log.parent.parent == root / "outputs" / "sweep" / ".submitit" and log.parent.name in job_ids(root)
    assert "Traceback" in log.read_text() and "File too large" in log.read_text()  # the node's traceback

    parents, children = Store(server).runs(parent_id(proc.stdout + proc.stderr))
    assert parents[0]["info"]["status"] == "FAILED"
    assert tags(parents[0])[REASON_TAG] == error.removeprefix("error: ")
    assert children[f"l2-{grid[0]}"]["info"]["status"] == "FINISHED"
    assert children[bad]["info"]["status"] == "FAILED"
    assert tags(children[bad])[REASON_TAG] == "OSError: [Errno 27] File too large"
    assert sorted(p.name for p in (root / "models").iterdir()) == [f"l2-{grid[0]}"]  # no half model


def test_scancel_kills_the_run_and_leaves_no_model(cluster, server, prepared, tmp_path):
    # Keras' loop: the compiled one computes every epoch's batch order before the first one.
    root = copy_project(prepared, tmp_path / "p", sweep={"strengths": GRID[:1]},
                        train={"epochs": 1000, "loop": "keras"})
    cmd = [sys.executable, "-m", "l2sweep.train", "-m", "hydra/launcher=slurm", *RESOURCES, *FAST]
    sweep = subprocess.Popen(cmd, cwd=root, env=cluster.env(MLFLOW_TRACKING_URI=server),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    store = Store(server)

    def training() -> bool:  # this sweep's run is the only child run RUNNING on the server
        return any(store.history(r, "loss") for r in store.search()
                   if r["info"]["status"] == "RUNNING" and "mlflow.parentRunId" in tags(r))

    try:
        wait_until(training, 120, "the job's first epoch", sweep)
        (job,) = job_ids(root)
        cluster.run("scancel", job)
        out, err = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:  # the test failed: leave nothing running for the next one
            os.killpg(sweep.pid, signal.SIGKILL)
            cancel_all(cluster)
    proc = subprocess.CompletedProcess(cmd, sweep.returncode, out, err)
    log = root / "outputs" / "sweep" / ".submitit" / job / f"{job}_0_log.out"
    assert error_line(proc) == f"error: job {job} ended CANCELLED by 0 without a result; its log: {log}"
    assert cluster.sacct(job)[job]["State"].startswith("CANCELLED")

    parents, children = store.runs(parent_id(out + err))
    assert parents[0]["info"]["status"] == "FAILED"
    run = children[f"l2-{GRID[0]}"]
    assert run["info"]["status"] == "KILLED" and tags(run)[REASON_TAG].startswith("interrupted")
    assert store.history(run, "loss")  # the epochs before the cancel
    assert not (root / "models").exists() or not any((root / "models").iterdir())  # no partial model


def test_an_unreachable_server_stops_the_sweep_before_any_job_is_submitted(cluster, prepared, tmp_path):
    root = copy_project(prepared, tmp_path / "p")
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = sweep_cli(root, cluster, url, check=False)
    assert time.monotonic() - start < 30
    assert error_line(proc).startswith(f"error: MLflow tracking server {url} does not answer")
    assert not (root / "outputs").exists()  # no submitit folder: nothing was submitted
    assert not cluster.run("squeue", "-h").strip()


# --- DVC, and the fused sweep ----------------------------------------------------------------


def test_dvc_repro_runs_the_fused_sweep_as_one_slurm_job(cluster, server, tmp_path):
    """The launcher chosen in params.yaml, as README "Scaling out" says; `dvc repro` unchanged.
    With `train.fused: true` the whole grid is one job on one node."""
    root = pipeline_copy(tmp_path / "repo", train={"epochs": EPOCHS, "fused": True},
                         sweep={"strengths": GRID, "seeds": None}, tracking={"log_model": False},
                         **{"hydra/launcher": "slurm", "hydra": {"launcher": {
                             "partition": PARTITION, "cpus_per_task": 1, "mem_gb": 1}}})
    env = cluster.env(MLFLOW_TRACKING_URI=server, DVC_NO_ANALYTICS="1")

    def dvc(*args: str) -> str:
        proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"dvc {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc("init", "-q")
    assert "Submitit 'slurm' sweep output dir" in dvc("repro", "train")
    (job,) = job_ids(root)
    assert "_" not in job and cluster.sacct(job)[job]["State"] == "COMPLETED"  # one job, no array

    parents, children = Store(server).runs(manifest(root)["parent_run_id"])
    logged = {p["key"]: p["value"] for p in parents[0]["data"]["params"]}
    assert parents[0]["info"]["status"] == "FINISHED" and logged["hydra.launcher"] == "slurm"
    assert tags(parents[0])["dvc.stage"] == "train"
    assert sorted(children) == sorted(f"l2-{s}" for s in GRID)
    for name, child in children.items():
        assert child["info"]["status"] == "FINISHED" and tags(child)["l2sweep.fused"] == "true", name
        assert sorted(m["step"] for m in Store(server).history(child, "val_loss")) == list(range(EPOCHS))
    assert sorted(p.name for p in (root / "models").iterdir() if p.is_dir()) == sorted(children)
    # The launcher is no param of the stage: back to the default one, nothing is stale.
    params = yaml.safe_load((root / "params.yaml").read_text())
    del params["hydra/launcher"], params["hydra"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "up to date" in dvc("status", "train")
