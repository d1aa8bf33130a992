"""What a process killed with SIGKILL (or a machine that went down) leaves behind is cleaned by the
next sweep on the same host: its RUNNING runs end FAILED ("process died"), its temp folders go.
Runs of live processes and of other hosts are left alone. A real sqlite store; the real CLI killed
with SIGKILL: tests/e2e/test_killed_sweep.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from mlflow import MlflowClient

from l2sweep.tracking import artifacts, runs
from l2sweep.tracking.runs import HOST_TAG, PID_TAG, REASON_TAG, START_TAG


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_of_dead_processes_on_this_host_end_failed_and_no_others(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("l2-sweep", (tmp_path / "artifacts").as_uri())
    host, me, gone = socket.gethostname(), os.getpid(), dead_pid()
    mine = runs.process_start(me)
    where = {
        "dead": {HOST_TAG: host, PID_TAG: str(gone)},
        "live": runs.process_tags(),
        "reused pid": {HOST_TAG: host, PID_TAG: str(me), START_TAG: "another-boot/1"},
        "other host": {HOST_TAG: host + "-not", PID_TAG: str(gone)},
        "untagged": {},
    }
    ids = {name: client.create_run(experiment, run_name=name, tags=tags).info.run_id
           for name, tags in where.items()}
    finished = client.create_run(experiment, run_name="finished", tags=where["dead"]).info.run_id
    client.set_terminated(finished, "FINISHED")

    closed = runs.close_orphans(client, experiment)

    expected = ["dead", "reused pid"] if mine else ["dead"]  # without /proc a reused pid looks alive
    assert sorted(closed) == expected
    for name, run_id in ids.items():
        run = client.get_run(run_id)
        assert run.info.status == ("FAILED" if name in expected else "RUNNING"), name
        if name in expected:
            assert run.data.tags[REASON_TAG] == (f"process died: pid {where[name][PID_TAG]} on {host} "
                                                 "ended without closing the run")
    assert client.get_run(finished).info.status == "FINISHED"
    assert runs.close_orphans(client, experiment) == []  # once only


def test_process_tags_say_where_a_run_runs():
    tags = runs.process_tags()
    assert tags[HOST_TAG] == socket.gethostname() and tags[PID_TAG] == str(os.getpid())
    assert not runs.process_gone(os.getpid(), tags.get(START_TAG))
    assert runs.process_gone(dead_pid(), None)
    if START_TAG in tags:  # Linux: the pid of a process started at another time is not this one
        assert runs.process_gone(os.getpid(), "another-boot/1")


def test_scratch_folders_of_dead_processes_are_removed(tmp_path):
    models = tmp_path / "models"
    stale = models / f".l2-0.1.artifacts.tmp-{dead_pid()}-ab12cd34"
    live = models / f".l2-0.2.artifacts.tmp-{os.getpid()}-ab12cd34"  # a running job's
    for folder in (stale, live):
        (folder / "histograms").mkdir(parents=True)
    with artifacts.scratch_folder(models / "l2-0.1.artifacts") as scratch:
        assert scratch.parent == models and scratch.name.startswith(f".l2-0.1.artifacts.tmp-{os.getpid()}-")
        assert not stale.exists() and live.exists()
    assert sorted(p.name for p in models.iterdir()) == [live.name]  # its own is gone too
