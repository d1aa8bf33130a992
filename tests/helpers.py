"""Helpers for tests that run the real CLI in a throwaway project (a temp dir with its own
params.yaml, data, models, outputs and MLflow store), plus small process utilities.

Import them as ``from helpers import ...`` (``tests/`` is on sys.path, as for conftest).
"""

from __future__ import annotations

import os
import shutil
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import yaml

from conftest import make_images, write_idx_dir
from l2sweep.reporting.summaries import MISSING_CELL

REPO = Path(__file__).resolve().parents[1]
#: The grid and length of the tiny CLI sweeps.
GRID = [0.001, 0.01, 0.1]
EPOCHS = 2


def cli_env(**extra: str) -> dict[str, str]:
    """This environment without MLFLOW_*/L2SWEEP_* variables (the user's must not leak into
    a test), the venv's bin first on PATH, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "L2SWEEP_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def tiny_arrays(n_train: int = 400, n_test: int = 100) -> dict[str, np.ndarray]:
    """``x_train y_train x_test y_test`` of a tiny learnable dataset (see conftest.make_images)."""
    x_train, y_train = make_images(n_train, seed=0)
    x_test, y_test = make_images(n_test, seed=1)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_project_params(root: Path, idx_dir: Path, **sections: dict) -> Path:
    """A params.yaml in ``root`` for the tiny dataset; ``sections`` update its sections."""
    params = {
        "dataset": {"name": "idx_dir", "path": str(idx_dir)},
        "train": {"epochs": EPOCHS},
        "sweep": {"strengths": GRID},
    }
    for key, value in sections.items():
        params.setdefault(key, {}).update(value)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_cli(root: Path, module: str, *args: str, check: bool = True, env: Optional[dict] = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in ``root`` with :func:`cli_env` (or ``env``)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def make_project(root: Path, arrays: Optional[dict[str, np.ndarray]] = None, **sections: dict) -> Path:
    """A throwaway project in ``root``: tiny IDX data, params.yaml (``sections`` layered), and
    the ``prepare`` stage run. Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    idx_dir = write_idx_dir(root / "raw_tiny", arrays or tiny_arrays())
    write_project_params(root, idx_dir, **sections)
    run_cli(root, "l2sweep.prepare")
    return root


def copy_project(prepared: Path, dest: Path, **params: dict) -> Path:
    """``prepared``'s params and data in ``dest``; ``params`` update params.yaml's sections."""
    shutil.copytree(prepared / "data", dest / "data")
    values = yaml.safe_load((prepared / "params.yaml").read_text())
    for key, value in params.items():
        values.setdefault(key, {}).update(value)
    (dest / "params.yaml").write_text(yaml.safe_dump(values))
    return dest


def sqlite_uri(root: Path) -> str:
    """The project's embedded MLflow store (``tracking.uri``'s default, made absolute)."""
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               proc: Optional[subprocess.Popen] = None, log: Optional[Path] = None) -> None:
    """Polls ``predicate`` until true; fails naming ``what`` (with ``log``'s tail) on timeout
    or when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    state = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None \
        else f"not ready after {timeout:.0f}s"
    raise AssertionError(f"{what} {state}\n{tail}")


def stop_process_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Ends a process started with ``start_new_session=True`` and every child it forked
    (servers fork workers): SIGTERM to its group, SIGKILL if it lingers."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            break
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.5)  # the leader is gone; its workers get a moment, then SIGKILL
    if proc.poll() is None:
        proc.wait(5)


@contextmanager
def make_server(target: str, log: Path, timeout: float, **variables: str) -> Iterator[str]:
    """Runs ``make <target>`` (``ui`` or ``server``) on a free loopback port with one worker and
    the given Makefile ``variables`` until the block ends; yields its URL once it is healthy."""
    import requests

    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "-o", "install", target, f"PORT={port}", "WORKERS=1",
             *(f"{k}={v}" for k, v in variables.items())],
            cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(f"{url}/health", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_until(healthy, timeout, f"make {target}", proc, log)
        yield url
    finally:
        stop_process_group(proc)


# --- reading the report ----------------------------------------------------------------


def parse_cell(cell: str) -> float | None:
    cell = cell.strip()
    if cell == MISSING_CELL:
        return None
    number = float(re.sub(r"[^0-9eE+.\-]", "", cell))
    return number / 100 if cell.endswith("%") or cell.endswith("pt") else number


def table_rows(markdown: str) -> dict[str, list[str]]:
    """λ -> cells of the Summary table."""
    section = markdown.split("## Summary", 1)[1].split("##", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[2:]}


def plots_repo(repo: Path) -> Path:
    """A scratch git + DVC repository at ``repo`` with this project's dvc.yaml, params.yaml and
    plot templates (.dvc/plots, .dvc/config): where `dvc plots show` draws plot files written
    into its ``plots/``. Returns ``repo``."""
    env = cli_env(DVC_NO_ANALYTICS="1")
    repo.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], cwd=repo, check=True, env=env)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / ".dvc/plots", repo / ".dvc/plots", dirs_exist_ok=True)
    shutil.copy(REPO / ".dvc/config", repo / ".dvc/config")
    return repo


def pipeline_copy(root: Path, **sections: dict) -> Path:
    """This project's pipeline (dvc.yaml, params.yaml, conf/, src/) in ``root`` on the tiny IDX
    data under ``data/raw/tiny``; ``sections`` update params.yaml's sections. Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    for name in ("conf", "src"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    write_idx_dir(root / "data" / "raw" / "tiny", tiny_arrays())
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["dataset"] = {"name": "idx_dir", "path": "data/raw/tiny"}
    for key, value in sections.items():
        params[key] = {**params[key], **value} if isinstance(params.get(key), dict) else value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@contextmanager
def chromium(*arguments: str) -> Iterator["object"]:
    """Headless Chromium through Debian's chromedriver (paths given: no driver download), with
    extra command-line ``arguments``; skips the test when either is not installed."""
    import pytest

    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("chromium / chromedriver not installed (Debian: apt-get install chromium "
                    "chromium-driver; `make test` does it as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000", *arguments):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()
