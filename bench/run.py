"""Side-by-side benchmark of the sweep: the seeds' code, the pipeline (tracked and untracked)
and the fused sweep, on the same prepared data and lambda grid, in one run.

Run (from the repository root):
    make bench                                # CI-sized: 10,000 images x 3 epochs, 3 reps (minutes)
    make bench BENCH_ARGS=--full              # the default data: 50,000 images x 10 epochs
    python -m bench.run --reps 5 --variants a,b,d --scaling none

Variants (each a fresh process, timed from spawn to exit, interleaved rep by rep):
    a  the seeds' code as they wrote it (bench/seeds.py): plain Keras loop, default fit
    b  ``python -m l2sweep.train -m`` with full MLflow tracking (what ``dvc repro`` runs)
    c  the same with ``tracking.enabled=false``
    d  the fused sweep: ``python -m l2sweep.train -m train.fused=true`` with full tracking
    r  the train stage with the default replicates (``sweep.seeds``: 3 per λ, a job per λ
       trains its seeds at once), full tracking
    q  15 models: 3 λ x 5 seeds in one fused job, full tracking
    k  5-fold cross-validation of the 3 λ (``data.folds=5``): 15 runs at once, then the chosen λ
       retrained on the whole pool, full tracking
    s  the same 15 runs one after another (``train.fused=false``), then the same retraining

Targets (at full size, ``--full``): a/b >= 4.5 (the train stage with tracking against the
seeds' code), b/c <= 1.08 (what tracking costs), a/r >= 3 (the replicated default against the
seeds' single-seed sweep), q/b <= 2.5 (15 models against the single-seed 3 λ) and s/k >= 2
(a 5-fold cross-validation one run after another against its runs at once);
``results.json``'s ``targets`` says whether each is met.

Writes ``bench/results.json`` and ``bench/scaling.png`` (``--full``: ``results-full.json``,
``scaling-full.png``; ``--out``/``--plot`` to choose) and prints a summary.
See bench/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
FULL_TRAIN = 50_000
GRID = [0.0001, 0.001, 0.01]
#: train.seed of every timed run (the seed noise adds --noise-seeds).
SEED = 42
VARIANTS = {
    "a": "seeds' code: plain Keras loop over lambda, default fit, batch 32, no tracking",
    "b": "train stage (python -m l2sweep.train -m), full MLflow tracking",
    "c": "train stage, tracking.enabled=false",
    "d": "fused sweep (train.fused=true), full MLflow tracking",
    "r": "train stage with the default replicates (sweep.seeds: 3 per lambda), full MLflow tracking",
    "q": "15 models: 3 lambdas x 5 seeds in one fused job, full MLflow tracking",
    "k": "5-fold cross-validation of 3 lambdas: 15 runs at once, then the refit, full MLflow tracking",
    "s": "the same 15 cross-validation runs one after another, then the refit, full MLflow tracking",
}
REPLICATES = {"r": [SEED, SEED + 1, SEED + 2], "q": [SEED + i for i in range(5)]}
CLI_ARGS = {"b": [], "c": ["tracking.enabled=false"], "d": ["train.fused=true"],
            "r": ["sweep.seeds=[%s]" % ",".join(map(str, REPLICATES["r"]))],
            "q": ["train.fused=true", "sweep.seeds=[%s]" % ",".join(map(str, REPLICATES["q"]))],
            "k": ["data.folds=5", "train.fused=true"], "s": ["data.folds=5", "train.fused=false"]}
#: Runs each cross-validation variant trains (3 lambdas x 5 folds; the refit is extra).
FOLDS = 5
#: Ratios reported (numerator / denominator, by median wall time).
RATIOS = [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d"), ("a", "r"),
          ("r", "b"), ("q", "b"), ("s", "k"), ("k", "b")]
#: The targets, on median wall-time ratios at full size (FULL_TRAIN images x FULL_EPOCHS):
#: ratio -> (">=" or "<=", bound).
TARGETS = {"a/b": (">=", 4.5), "b/c": ("<=", 1.08), "a/r": (">=", 3.0), "q/b": ("<=", 2.5),
           "s/k": (">=", 2.0)}
FULL_EPOCHS = 10


# --- processes ----------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment every variant gets: no user MLflow/l2sweep settings, the venv first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "L2SWEEP_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def measure(cmd: list[str], cwd: Path, log_file: Path) -> dict[str, Any]:
    """Runs ``cmd``; returns wall seconds (spawn to exit), peak RSS (MB), the exit code, and
    where its output starts in ``log_file`` and when it was spawned (for :func:`phases`)."""
    with open(log_file, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        offset = log.tell()
        spawned, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        # wait4 gives this child's own rusage (ru_maxrss: its peak resident set, KiB on Linux).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode,
            "log_offset": offset, "spawned": spawned}


#: A job's log lines as the train stage writes them: "[time][logger][LEVEL] - job 2/3 name: ...".
_JOB_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]\S* - job (\d+)/\S+ (.*)$")


def phases(log_text: str, spawned: float, wall: float) -> Optional[dict[str, Any]]:
    """Where a sweep's wall time went, from its log's timestamps (ms): ``start_s`` (spawn to the
    first job's first line: Python, TensorFlow's and Hydra's imports), ``jobs_s`` (each job, its
    first line to its last result line, ``...: val_loss``), ``between_s`` (from each job's end
    to the next one's start: Hydra, the job's set-up), ``after_s`` (the last result line to the
    exit: the last run's artifacts, the sweep's end). None without job lines."""
    jobs: dict[int, list[float]] = {}
    for line in log_text.splitlines():
        m = _JOB_LINE.match(line)
        if not m:
            continue
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        times = jobs.setdefault(int(m.group(3)), [t, t])
        if ": val_loss " in m.group(4):
            times[1] = t
    if not jobs:
        return None
    spans = [jobs[n] for n in sorted(jobs)]
    return {"start_s": spans[0][0] - spawned, "jobs_s": [end - start for start, end in spans],
            "between_s": sum(nxt[0] - cur[1] for cur, nxt in zip(spans, spans[1:])),
            "after_s": spawned + wall - spans[-1][1]}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


# --- data and scratch projects ------------------------------------------------------------


def subset(prepared: Path, out: Path, n_train: int, seed: int = 0) -> Path:
    """A prepared-data folder with ``n_train`` training images (stratified, as ``data.limit``)
    and the same validation and test splits; ``prepared`` itself when it has exactly that many."""
    from l2sweep.base.data import apply_limit, load_meta, load_split, save_prepared

    x, y = load_split(prepared, "train")
    if n_train >= len(y):
        return prepared
    keep = apply_limit(y, n_train, seed)
    meta = dict(load_meta(prepared), limit=n_train)
    splits = {"train": (x[keep], y[keep]), "val": load_split(prepared, "val"),
              "test": load_split(prepared, "test")}
    return save_prepared(out, splits, meta)


def make_project(root: Path, prepared: Path, grid: list[float], epochs: int, seed: int) -> Path:
    """A scratch project (params.yaml, its own models/, outputs/, MLflow store) on ``prepared``."""
    root.mkdir(parents=True, exist_ok=True)
    params = {"train": {"epochs": epochs, "batch_size": 32, "seed": seed},
              "sweep": {"strengths": grid}, "paths": {"prepared": str(prepared)}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    # Create the store untimed: its one-time schema set-up is not a per-sweep cost.
    (root / "mlruns").mkdir(exist_ok=True)
    subprocess.run(python("-c", "import mlflow; mlflow.MlflowClient('sqlite:///mlruns/mlflow.db')"
                          ".search_experiments()"), cwd=root, env=child_env(), check=True,
                   capture_output=True)
    return root


def pipeline_results(root: Path, seed: int = SEED) -> dict[str, Any]:
    """Per-lambda final validation metrics and epoch times from ``models/*/history.json``
    (of the runs with ``seed``, where a sweep trained replicates)."""
    out = {}
    for path in sorted((root / "models").glob("*/history.json")):
        h = json.loads(path.read_text())
        if h.get("seed", seed) != seed or h.get("refit"):  # (a cross-validation: the last fold's)
            continue
        m = h["metrics"]
        out[repr(float(h["strength"]))] = {
            "status": h["status"], "val_accuracy": m["val_accuracy"][-1], "val_loss": m["val_loss"][-1],
            "val_data_loss": m.get("val_data_loss", [None])[-1], "epoch_time": m.get("epoch_time", [])}
    return out


def seeds_results(path: Path) -> dict[str, Any]:
    out = {}
    for run in json.loads(path.read_text())["runs"]:
        h, epochs = run["history"], len(run["history"]["loss"])
        out[repr(float(run["strength"]))] = {
            "status": "FINISHED", "val_accuracy": h["val_accuracy"][-1], "val_loss": h["val_loss"][-1],
            "val_data_loss": None, "epoch_time": [run["fit_seconds"] / epochs] * epochs}
    return out


def run_variant(variant: str, work: Path, prepared: Path, grid: list[float], epochs: int,
                seed: int = SEED, tag: str = "") -> dict[str, Any]:
    """One timed run of ``variant`` on ``prepared`` x ``grid`` x ``epochs``."""
    name = f"{variant}-{len(grid)}x{tag or prepared.name}-s{seed}"
    root = work / name
    if variant == "a":
        root.mkdir(parents=True, exist_ok=True)
        out = root / "seeds.json"
        result = measure(python("-m", "bench.seeds", "--prepared", str(prepared), "--epochs", str(epochs),
                                "--grid", *map(repr, grid), "--out", str(out)), REPO, root / "log.txt")
        per_lambda = seeds_results(out) if result["rc"] == 0 else {}
    else:
        if not (root / "params.yaml").exists():
            make_project(root, prepared, grid, epochs, seed)
        result = measure(python("-m", "l2sweep.train", "-m", *CLI_ARGS[variant]), root, root / "log.txt")
        per_lambda = pipeline_results(root, seed) if result["rc"] == 0 else {}
        with open(root / "log.txt", encoding="utf-8", errors="replace") as log:
            log.seek(result["log_offset"])
            result["phases"] = phases(log.read(), result["spawned"], result["wall_s"])
    for key in ("log_offset", "spawned"):
        result.pop(key)
    if result["rc"] != 0:
        raise RuntimeError(f"variant {variant} failed (exit {result['rc']}); see {root / 'log.txt'}")
    # Seconds of training per model and epoch, validation included: an epoch of a job that
    # trains several models at once (fused: the grid; replicates: the seeds) divided among them.
    seeds = len(REPLICATES.get(variant, [seed])) * (FOLDS if variant in ("k", "s") else 1)
    together = (len(grid) if variant in ("d", "q", "k") else 1) * (1 if variant == "s" else seeds)
    epoch_times = [t / together for r in per_lambda.values() for t in r["epoch_time"]]
    result.update(per_lambda=per_lambda, models=len(grid) * seeds,
                  epoch_s=statistics.median(epoch_times) if epoch_times else None,
                  all_in_s_per_lambda_epoch=result["wall_s"] / (len(grid) * seeds * epochs))
    for r in per_lambda.values():
        r.pop("epoch_time")
    print(f"  {variant}: {result['wall_s']:7.1f} s  peak {result['peak_rss_mb']:6.0f} MB  "
          f"({len(grid)} lambdas x {epochs} epochs, {prepared.name})", flush=True)
    return result


# --- summaries ----------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def phase_medians(rs: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Median of each :func:`phases` entry over repetitions (``jobs_s`` job by job)."""
    ps = [r["phases"] for r in rs if r.get("phases")]
    if not ps:
        return None
    out = {k: statistics.median(p[k] for p in ps) for k in ("start_s", "between_s", "after_s")}
    out["jobs_s"] = [statistics.median(js) for js in zip(*(p["jobs_s"] for p in ps))]
    return out


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out = {}
    for v, rs in runs.items():
        lambdas = sorted(rs[0]["per_lambda"], key=float)
        out[v] = {
            "what": VARIANTS[v],
            "wall_s": spread([r["wall_s"] for r in rs]),
            "peak_rss_mb": spread([r["peak_rss_mb"] for r in rs]),
            "epoch_s": spread([r["epoch_s"] for r in rs]),
            "all_in_s_per_lambda_epoch": spread([r["all_in_s_per_lambda_epoch"] for r in rs]),
            "per_lambda": {lam: {k: statistics.median([r["per_lambda"][lam][k] for r in rs])
                                 for k in ("val_accuracy", "val_loss")}
                           | {"val_accuracy_runs": [r["per_lambda"][lam]["val_accuracy"] for r in rs],
                              "status": [r["per_lambda"][lam]["status"] for r in rs]}
                           for lam in lambdas},
        }
        ph = phase_medians(rs)
        if ph is not None:
            out[v]["phases"] = ph
    return out


def ratios(summary: dict[str, Any]) -> dict[str, float]:
    med = {v: s["wall_s"]["median"] for v, s in summary.items()}
    return {f"{x}/{y}": med[x] / med[y] for x, y in RATIOS if x in med and y in med}


def check_targets(measured: dict[str, float], full_size: bool) -> dict[str, Any]:
    """Each target of :data:`TARGETS` against its ratio in ``measured`` (:func:`ratios`):
    ``met`` is True or False at full size, None at other sizes (fixed costs weigh more
    there; the targets do not apply) or when a variant was not run."""
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = measured.get(key)
        met = None
        if full_size and value is not None:
            met = value >= bound if op == ">=" else value <= bound
        out[key] = {"target": f"{op} {bound}", "measured": value, "met": met}
    return out


def agreement(summary: dict[str, Any], noise: dict[str, Any]) -> dict[str, Any]:
    """Largest per-lambda difference of each variant's final val metrics from (b)'s (seed 42)
    and from the mean of (b)'s seeds; within the noise when the latter is at most the seeds'
    largest spread (a variant trained on another random draw, as the unseeded (a) is, lands
    anywhere in that spread around the mean, not necessarily near seed 42)."""
    if "b" not in summary:
        return {}
    ref = summary["b"]["per_lambda"]
    keys = ("val_accuracy", "val_loss")
    mean = {lam: {k: statistics.mean(noise["values"][lam][k]) for k in keys} for lam in ref} \
        if noise.get("values") else None
    out = {}
    for v, s in summary.items():
        if v == "b":
            continue
        diffs = {k: max(abs(s["per_lambda"][lam][k] - ref[lam][k]) for lam in ref) for k in keys}
        entry = dict(diffs)
        if mean is not None:
            entry["vs_seed_mean"] = {k: max(abs(s["per_lambda"][lam][k] - mean[lam][k]) for lam in ref)
                                     for k in keys}
        entry["within_noise"] = bool(noise) and all(
            (entry["vs_seed_mean"] if mean is not None else diffs)[k] <= noise["max_abs_diff"][k] for k in keys)
        out[f"{v}-b"] = entry
    return out


def seed_noise(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-lambda spread (max - min) of (b)'s final val metrics over ``runs`` ({seed:
    per_lambda}, two seeds or more): the run-to-run noise that speed must stay within."""
    seeds = sorted(runs)
    lambdas = runs[seeds[0]]
    per = {lam: {k: max(r[lam][k] for r in runs.values()) - min(r[lam][k] for r in runs.values())
                 for k in ("val_accuracy", "val_loss")} for lam in lambdas}
    return {"seeds": seeds, "variant": "b", "per_lambda": per,
            "values": {lam: {k: [runs[s][lam][k] for s in seeds] for k in ("val_accuracy", "val_loss")}
                       for lam in lambdas},
            "max_abs_diff": {k: max(p[k] for p in per.values()) for k in ("val_accuracy", "val_loss")}}


# --- tracking overhead vs sweep length ----------------------------------------------------


def tracking_overhead(work: Path, data: Path, epochs_list: list[int], reps: int,
                      known: dict[int, dict[str, list[float]]]) -> dict[str, Any]:
    """(b) and (c) at several epoch counts: what tracking costs per sweep and per epoch.

    Fits ``b - c = fixed + per_epoch * epochs`` and ``c = c0 + c_epoch * epochs`` by least
    squares over the medians, and solves for the sweep length from which b/c meets its
    target (``TARGETS["b/c"]``).
    ``known``: wall times already measured (epochs -> {"b": [s, ...], "c": [s, ...]}), not run again.
    """
    rows = []
    for epochs in epochs_list:
        walls: dict[str, list[float]] = known.get(epochs) or {"b": [], "c": []}
        for rep in range(0 if epochs in known else reps):
            for v in ("b", "c") if rep % 2 == 0 else ("c", "b"):
                walls[v].append(run_variant(v, work, data, GRID, epochs, tag=f"e{epochs}-r{rep}")["wall_s"])
        medians = {v: statistics.median(w) for v, w in walls.items()}
        rows.append({"epochs": epochs, "wall_s": medians, "runs": walls,
                     "overhead_s": medians["b"] - medians["c"], "b/c": medians["b"] / medians["c"]})
    out: dict[str, Any] = {"grid": GRID, "rows": rows}
    if len({r["epochs"] for r in rows}) >= 2:
        out["fit"] = fit_overhead(rows, len(GRID), target=TARGETS["b/c"][1])
    return out


def fit_overhead(rows: list[dict[str, Any]], n_lambdas: int,
                 target: float = TARGETS["b/c"][1]) -> dict[str, Any]:
    """Least-squares lines through ``rows`` (each ``epochs``, ``wall_s`` {"b", "c"}):
    ``b - c = fixed + per_epoch * epochs`` and ``c = c0 + c_epoch * epochs``; and the epochs
    from which b/c <= ``target`` (None: never, tracking grows as fast as the rest; 0: always).
    """
    e = np.asarray([r["epochs"] for r in rows], float)
    c = np.asarray([r["wall_s"]["c"] for r in rows], float)
    per_epoch, fixed = np.polyfit(e, np.asarray([r["wall_s"]["b"] for r in rows], float) - c, 1)
    c_epoch, c0 = np.polyfit(e, c, 1)
    # (fixed + per_epoch E) <= (target - 1)(c0 + c_epoch E)  <=>  E >= (fixed - m c0) / (m c_epoch - per_epoch)
    margin = target - 1.0
    slack = margin * c_epoch - per_epoch
    needed = (fixed - margin * c0) / slack if slack > 0 else None
    return {"target": target, "fixed_s": float(fixed), "per_epoch_s": float(per_epoch),
            "per_lambda_epoch_s": float(per_epoch) / n_lambdas,
            "untracked_fixed_s": float(c0), "untracked_per_epoch_s": float(c_epoch),
            f"epochs_for_{target}": None if needed is None else max(float(needed), 0.0)}


# --- dvc repro with nothing to do ---------------------------------------------------------

_NOOP = ("import json, sys, time; from dvc.cli import main; t = time.perf_counter(); "
         "rc = main(['repro']); print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, "
         "'tensorflow_imported': 'tensorflow' in sys.modules}))")


def dvc_noop(work: Path, n_train: int, reps: int) -> dict[str, Any]:
    """Times ``dvc repro`` in a scratch copy of the pipeline once everything is up to date."""
    root = work / "dvc"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for rel in ("dvc.yaml", "conf", "src/l2sweep"):
        src, dst = REPO / rel, root / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    if (REPO / ".dvc" / "plots").is_dir():
        shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc-plots")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.setdefault("data", {})["limit"] = n_train
    params.setdefault("train", {})["epochs"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data" / "raw").mkdir(parents=True)
    log = root / "log.txt"
    env = child_env()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    if (root / ".dvc-plots").is_dir():
        shutil.move(root / ".dvc-plots", root / ".dvc" / "plots")
    first = measure(["dvc", "repro"], root, log)
    if first["rc"] != 0:
        raise RuntimeError(f"dvc repro failed in {root}; see {log}")
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        proc = subprocess.run(python("-c", _NOOP), cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        with open(log, "a") as f:
            f.write(proc.stdout + proc.stderr)
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append({"wall_s": wall, **report,
                     "ran_a_stage": "Running stage" in proc.stdout + proc.stderr})
    return {"first_repro_s": first["wall_s"], "noop_wall_s": spread([r["wall_s"] for r in runs]),
            "tensorflow_imported": any(r["tensorflow_imported"] for r in runs),
            "ran_a_stage": any(r["ran_a_stage"] for r in runs), "runs": runs,
            "note": f"a scratch copy of dvc.yaml/params.yaml/conf/src on {n_train} images, 1 epoch"}


# --- plot ---------------------------------------------------------------------------------


def scaling_title(results: dict[str, Any]) -> str:
    s, d = results["settings"], results["device"]
    return (f"{s['epochs']} epochs, batch 32; left: {s['train_images']:,} images, right: 3 λ "
            f"({d.get('name') or d.get('cpu') or platform.machine()}, {d.get('cpu_count')} cores)")


def plot_scaling(scaling: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, xlabel in ((axes[0], "grid", "lambdas in the grid"),
                            (axes[1], "data", "training images")):
        rows = scaling.get(key, [])
        for v in sorted({v for r in rows for v in r["wall_s"]}):
            pts = [(r["x"], r["wall_s"][v]) for r in rows if v in r["wall_s"]]
            ax.plot(*zip(*pts), marker="o", color=f"C{'abcd'.index(v)}",
                    label=f"({v}) {VARIANTS[v].split(':')[0].split(' (')[0]}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("sweep wall time (s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------


def device_info() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version()}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            info["gpu"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def log_grid(k: int) -> list[float]:
    """A k-point grid: the project's default for 3, else log-spaced over 1e-5..1e-1."""
    if k == len(GRID):
        return list(GRID)
    return [float(f"{v:.3g}") for v in np.logspace(-5, -1, k)]


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--full", action="store_true",
                   help="the default data: 50,000 images x 10 epochs (defaults to 2 reps)")
    p.add_argument("--train-size", type=int, help="training images (default 10,000; --full 50,000)")
    p.add_argument("--epochs", type=int, help="epochs (default 3; --full 10)")
    p.add_argument("--reps", type=int, help="repetitions of the main comparison (default 3; --full 2)")
    p.add_argument("--variants", default="a,b,c,d,r,q,k,s", help="which of a,b,c,d,r,q,k,s (default all)")
    p.add_argument("--scaling", default="grid,data", help="grid,data | grid | data | none")
    p.add_argument("--scaling-variants", help="variants of the scaling runs (default a,b,d; --full b,d)")
    p.add_argument("--noise-seeds", default="43",
                   help="further train.seed values of (b) for the seed noise, e.g. 43,44,45 (default 43)")
    p.add_argument("--no-dvc", action="store_true", help="skip timing dvc repro")
    p.add_argument("--overhead-epochs", default="",
                   help="epoch counts at which to time (b) and (c) again, e.g. 10,20,40: tracking's "
                        "fixed and per-epoch cost (default: none)")
    p.add_argument("--prepared", default=str(REPO / "data" / "prepared"),
                   help="prepared data with 50,000 training images (python -m l2sweep.prepare)")
    p.add_argument("--out", help="results file (default bench/results.json; --full: bench/results-full.json)")
    p.add_argument("--plot", help="scaling figure (default: next to --out, results -> scaling)")
    p.add_argument("--work", help="scratch folder (default: a temp folder, removed at the end)")
    p.add_argument("--device-name", default="", help="recorded with the results (e.g. nvidia-h100)")
    args = p.parse_args(argv)

    n_train = args.train_size or (FULL_TRAIN if args.full else 10_000)
    epochs = args.epochs or (FULL_EPOCHS if args.full else 3)
    reps = args.reps or (2 if args.full else 3)
    variants = [v for v in args.variants.split(",") if v]
    scale_variants = (args.scaling_variants or ("b,d" if args.full else "a,b,d")).split(",")
    scaling_kinds = [] if args.scaling == "none" else args.scaling.split(",")
    for v in variants + scale_variants:
        if v not in VARIANTS:
            p.error(f"variant {v!r} is not one of {', '.join(VARIANTS)}")
    try:
        noise_seeds = [int(x) for x in args.noise_seeds.split(",") if x]
    except ValueError:
        noise_seeds = []
    if not noise_seeds or SEED in noise_seeds:
        p.error(f"--noise-seeds={args.noise_seeds!r}: comma-separated integers other than {SEED} expected")
    out = Path(args.out or REPO / "bench" / ("results-full.json" if args.full else "results.json"))
    plot = Path(args.plot) if args.plot else out.with_name(out.stem.replace("results", "scaling") + ".png")
    prepared = Path(args.prepared)
    if not (prepared / "train.npz").is_file():
        p.error(f"{prepared}: no prepared data; run `python -m l2sweep.prepare` first")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="l2sweep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "device": device_info() | ({"name": args.device_name} if args.device_name else {}),
        "settings": {"train_images": n_train, "val_images": None, "epochs": epochs, "batch_size": 32,
                     "grid": GRID, "reps": reps, "full": args.full, "variants": VARIANTS,
                     "load_average_start": os.getloadavg()},
    }
    try:
        data = work / "data"
        main_data = subset(prepared, data / f"n{n_train}", n_train)
        from l2sweep.base.data import load_split

        results["settings"]["val_images"] = int(len(load_split(prepared, "val")[1]))
        print(f"bench: {n_train} images x {epochs} epochs x {len(GRID)} lambdas, {reps} reps, "
              f"variants {','.join(variants)}; scratch in {work}", flush=True)

        runs: dict[str, list] = {v: [] for v in variants}
        for rep in range(reps):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            print(f"rep {rep + 1}/{reps}: {' '.join(order)}", flush=True)
            for v in order:
                runs[v].append(run_variant(v, work, main_data, GRID, epochs))
        summary = summarize(runs)
        results["variants"] = summary
        results["ratios"] = ratios(summary)
        results["targets"] = check_targets(results["ratios"], n_train == FULL_TRAIN and epochs == FULL_EPOCHS)

        noise = {}
        if "b" in summary:
            by_seed = {SEED: summary["b"]["per_lambda"]}
            for seed in noise_seeds:
                print(f"seed noise: (b) with train.seed={seed}", flush=True)
                by_seed[seed] = run_variant("b", work, main_data, GRID, epochs, seed=seed)["per_lambda"]
            noise = seed_noise(by_seed)
        results["seed_noise"] = noise
        results["agreement"] = agreement(summary, noise)

        scaling: dict[str, list] = {}
        if "grid" in scaling_kinds:
            print("scaling: grid size", flush=True)
            rows = []
            for k in (3, 6, 12):
                walls = {}
                for v in scale_variants:
                    if k == 3 and v in summary:
                        walls[v] = summary[v]["wall_s"]["median"]
                    else:
                        walls[v] = run_variant(v, work, main_data, log_grid(k), epochs)["wall_s"]
                rows.append({"x": k, "grid": log_grid(k), "wall_s": walls})
            scaling["grid"] = rows
        if "data" in scaling_kinds:
            print("scaling: data size", flush=True)
            rows = []
            for frac in (0.1, 0.5, 1.0):
                n = int(FULL_TRAIN * frac)
                walls = {}
                for v in scale_variants:
                    if n == n_train and v in summary:
                        walls[v] = summary[v]["wall_s"]["median"]
                    else:
                        walls[v] = run_variant(v, work, subset(prepared, data / f"n{n}", n), GRID,
                                               epochs, tag=f"n{n}")["wall_s"]
                rows.append({"x": n, "fraction": frac, "wall_s": walls})
            scaling["data"] = rows
        for rows in scaling.values():
            for row in rows:
                w = row["wall_s"]
                row["ratios"] = {f"{x}/{y}": w[x] / w[y] for x, y in RATIOS if x in w and y in w}
        results["scaling"] = scaling

        overhead_epochs = [int(e) for e in args.overhead_epochs.split(",") if e]
        if overhead_epochs:
            print(f"tracking overhead: (b) and (c) at {overhead_epochs} epochs", flush=True)
            known = ({epochs: {v: list(summary[v]["wall_s"]["runs"]) for v in ("b", "c")}}
                     if {"b", "c"} <= set(summary) else {})
            results["tracking_overhead"] = tracking_overhead(work, main_data, overhead_epochs, reps, known)

        if not args.no_dvc:
            print("dvc repro with nothing to do", flush=True)
            results["dvc_repro_noop"] = dvc_noop(work, min(n_train, 2000), reps=3)
    finally:
        results["settings"]["load_average_end"] = os.getloadavg()
        results["settings"]["bench_seconds"] = time.time() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        if results.get("scaling"):
            plot_scaling(results["scaling"], plot, scaling_title(results))
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(results)
    print(f"wrote {out}")


def print_summary(results: dict[str, Any]) -> None:
    s, variants = results["settings"], results.get("variants", {})
    print(f"\n{s['train_images']} training images, {s['epochs']} epochs, grid {s['grid']}, "
          f"{s['reps']} reps (median [min-max])")
    print(f"{'':3}{'wall s':>22} {'s/λ-epoch':>10} {'peak MB':>8}   what")
    for v, r in variants.items():
        w = r["wall_s"]
        print(f"({v}) {w['median']:8.1f} [{w['min']:.1f}-{w['max']:.1f}]".ljust(28)
              + f"{r['epoch_s']['median']:>8.2f} {r['peak_rss_mb']['median']:>8.0f}   {r['what']}")
    print("ratios: " + "  ".join(f"{k} {v:.2f}" for k, v in results.get("ratios", {}).items()))
    for k, t in results.get("targets", {}).items():
        verdict = {True: "met", False: "NOT met", None: "applies at full size only"}[t["met"]]
        measured = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        print(f"target {k} {t['target']}: {measured} ({verdict})")
    lambdas = next(iter(variants.values()))["per_lambda"] if variants else {}
    print("final val accuracy / val loss per λ:")
    for lam in lambdas:
        print(f"  λ={lam:<8}" + "  ".join(
            f"({v}) {r['per_lambda'][lam]['val_accuracy']:.4f}/{r['per_lambda'][lam]['val_loss']:.4f}"
            for v, r in variants.items()))
    ph = {v: r["phases"] for v, r in variants.items() if "phases" in r}
    if "b" in ph and "c" in ph:
        b, c = ph["b"], ph["c"]
        print("(b) - (c) by phase, s (medians): start {:+.2f}, jobs {}, between jobs {:+.2f}, after the "
              "last {:+.2f}".format(b["start_s"] - c["start_s"],
                                    " ".join(f"{x - y:+.2f}" for x, y in zip(b["jobs_s"], c["jobs_s"])),
                                    b["between_s"] - c["between_s"], b["after_s"] - c["after_s"]))
    noise = results.get("seed_noise")
    if noise:
        print(f"seed noise (b, seeds {noise['seeds']}): max spread val_accuracy "
              f"{noise['max_abs_diff']['val_accuracy']:.4f}, val_loss {noise['max_abs_diff']['val_loss']:.4f}")
    for k, a in results.get("agreement", {}).items():
        to_mean = a.get("vs_seed_mean")
        print(f"  {k}: max |Δ| val_accuracy {a['val_accuracy']:.4f}, val_loss {a['val_loss']:.4f}"
              + (f"; from the seeds' mean {to_mean['val_accuracy']:.4f}, {to_mean['val_loss']:.4f}"
                 if to_mean else "") + f"; within noise: {a['within_noise']}")
    for kind, rows in results.get("scaling", {}).items():
        print(f"scaling ({kind}): " + "; ".join(
            f"{r['x']}: " + " ".join(f"{v} {t:.0f}s" for v, t in r["wall_s"].items()) for r in rows))
    overhead = results.get("tracking_overhead")
    if overhead:
        print("tracking overhead (b - c): " + "; ".join(
            f"{r['epochs']} epochs {r['overhead_s']:.1f} s (b/c {r['b/c']:.3f})" for r in overhead["rows"]))
        fit = overhead.get("fit")
        if fit:
            needed = fit[f"epochs_for_{fit['target']}"]
            print(f"  fit: {fit['fixed_s']:.2f} s per sweep + {fit['per_lambda_epoch_s'] * 1000:.0f} ms per "
                  f"λ-epoch; b/c <= {fit['target']} from "
                  f"{'never' if needed is None else f'{needed:.0f} epochs'}")
    dvc = results.get("dvc_repro_noop")
    if dvc:
        print(f"dvc repro, nothing to do: {dvc['noop_wall_s']['median']:.2f} s "
              f"(TensorFlow imported: {dvc['tensorflow_imported']}, a stage ran: {dvc['ran_a_stage']})")


if __name__ == "__main__":
    main()
