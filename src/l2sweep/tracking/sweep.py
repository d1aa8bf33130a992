"""The sweep: a Hydra callback owning the parent MLflow run, ``<paths.models>/sweep.json`` and
the best-λ tags.

Jobs in other processes get the parent's id in the pickled callback (``on_job_start`` sets it).
``on_multirun_end`` writes the manifest and ends the parent (FAILED if a child did not finish);
if the multirun dies instead, :func:`finish` (the entry point's ``finally``) ends it. A process
killed with SIGKILL ends nothing: the next sweep on its host ends its runs FAILED
(:func:`l2sweep.tracking.runs.close_orphans`) before it opens its own parent run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from l2sweep.base import files, outputs
from l2sweep.base.config import sweep_grid
from l2sweep.base.grid import compared_kinds
from l2sweep.reporting import summaries
from l2sweep.tracking import store
from l2sweep.tracking.runs import (PARENT_ENV, REASON_TAG, SWEEP_ENV, close_orphans, git_tags,
                                   process_tags, tracker)

log = logging.getLogger(__name__)

MANIFEST = "sweep.json"


class SweepCallback(Callback):
    """Hydra callback: the sweep's parent run, manifest and best-λ tags (module docstring)."""

    def __init__(self) -> None:
        #: Environment the jobs need: the sweep id and (with tracking on) the parent run id.
        self.job_env: dict[str, str] = {}
        self.parent: Optional[Future] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_ENV] = uuid.uuid4().hex
        os.environ.pop(PARENT_ENV, None)
        self.job_env = {SWEEP_ENV: os.environ[SWEEP_ENV]}
        if config.tracking.enabled:
            # A copy: Hydra goes on with its own config while the thread reads this one.
            config = copy.deepcopy(config)
            start = tracker().start(config)
            self.parent = tracker().submit(_create_parent, config, start, time.strftime("%Y%m%d-%H%M%S"))
            tracker().parents.append((store.tracking_uri(config), self.parent))

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for a job in another process: it needs the parent's id now.
        if self.parent is not None:
            self.job_env[PARENT_ENV] = tracker().wait(self.parent)
        return {"job_env": self.job_env, "parent": None}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.update(self.job_env)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = _result(self.parent)
        manifest = write_manifest(config, parent)
        if outputs.in_dvc_stage():  # DVC keeps models/ while the stage runs (persist): its job
            remove_other_sweeps(Path(config.paths.models), manifest)
        statuses = {r["status"] for r in manifest["runs"]}
        ok = bool(manifest["runs"]) and statuses <= {"FINISHED"}
        if parent is not None:
            uri = store.tracking_uri(config)
            if manifest["best"]:
                tracker().wait(tracker().submit(_try, "tag the best λ", tag_best, uri, parent, manifest["best"]))
            finish("FINISHED" if ok else "FAILED", None if ok else "a child run did not finish")


def _result(parent: Optional[Future]) -> Optional[str]:
    """The parent run's id; None with tracking off or when its creation failed."""
    if parent is None:
        return None
    tracker().release()
    return None if parent.exception() is not None else parent.result()


def _create_parent(config: DictConfig, start: Future, started: str) -> str:
    """Creates the parent run ``sweep-<regularizer>-<started>`` and logs the grid (on the thread);
    StoreError when MLflow's start or the creation failed."""
    uri = store.tracking_uri(config)
    try:
        start.result()
        return _parent_run(config, uri, started)
    except Exception as exc:
        raise store.StoreError(store.store_error(uri, exc)) from exc


def _parent_run(config: DictConfig, uri: str, started: str) -> str:
    client = store.get_client(config)
    tags = {**git_tags(), **process_tags(), "l2sweep.kind": "sweep",
            "l2sweep.sweep_id": os.environ[SWEEP_ENV], "dataset": config.dataset.name,
            "model": config.model.name, "regularizer": sweep_kind(config)}
    if os.environ.get("DVC_STAGE"):  # set by `dvc repro` for the stage's command
        tags["dvc.stage"] = os.environ["DVC_STAGE"]
    if os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run` (workspace, --queue, --temp)
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    name = f"sweep-{sweep_kind(config).replace(',', '-')}-{started}"
    _try("close the runs of processes that died", close_orphans, client, tracker().experiments[uri])
    run = client.create_run(tracker().experiments[uri], run_name=name, tags=tags)
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
    client.log_batch(run.info.run_id, params=_params({
        "grid": _sweep_grid(config),
        "sweep.strengths": None if compared_kinds(config) else sweep_grid(config),
        "dataset.name": config.dataset.name, "model.name": config.model.name,
        "regularizer.name": sweep_kind(config), "train.epochs": config.train.epochs,
        "sweep.compare": compared_kinds(config) or None, "data.folds": config.data.folds,
        **{k.replace("/", "."): choices[k] for k in ("hydra/launcher", "hydra/sweeper") if k in choices}}))
    os.environ[PARENT_ENV] = run.info.run_id
    log.info("MLflow sweep run %s (%s) in %s", name, run.info.run_id, store.redact(uri))
    return run.info.run_id


def sweep_kind(config: DictConfig) -> str:
    """The regularizer a sweep studies: its kind, or the compared kinds (``l2,dropout,none``)."""
    return ",".join(compared_kinds(config)) or config.regularizer.name


def _try(what: str, task: Any, *args: Any) -> None:
    try:
        task(*args)
    except Exception as exc:  # the results are in sweep.json; the parent still gets ended
        log.warning("could not %s in the MLflow store: %s", what, store.redact(str(exc)))


def finish(status: str, reason: Optional[str] = None) -> None:
    """Ends the parent runs this process opened that are still RUNNING (the entry point's ``finally``)."""
    parents = tracker().parents
    if status == "KILLED" and tracker().abandon():  # interrupted before MLflow started: no run exists
        parents.clear()
        return
    while parents:
        uri, parent = parents.pop()
        os.environ.pop(PARENT_ENV, None)
        if _result(parent) is not None:
            tracker().wait(tracker().submit(_end_parent, uri, parent.result(), status, reason))


def _end_parent(uri: str, parent: str, status: str, reason: Optional[str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        if client.get_run(parent).info.status != "RUNNING":
            return
        if reason:
            client.set_tag(parent, REASON_TAG, store.redact(reason))
        client.set_terminated(parent, status)
    except Exception as exc:  # the store may be the thing that failed; say so, don't mask
        log.error("could not close the sweep's MLflow run %s: %s", parent, store.redact(str(exc)))


def _params(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items() if v is not None]


def _sweep_grid(config: DictConfig) -> str:
    """The swept overrides as given (``regularizer.strength=0.0001,0.001``) and a sweeper's space."""
    overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = [text for text, o in zip(overrides, parsed) if o.is_sweep_override()]
    keys = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    space = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    swept += [f"{k}={v}" for k, v in space.items() if k not in keys]
    return " ".join(swept) or "(single run)"


def best_run(histories: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The best λ by the report's rule (lowest mean validation cross-entropy over its seeds,
    :func:`summaries.summarize`), with ``run_name`` its best seed's run."""
    keys = ("strength", "seed", "regularizer", "fold", "refit")
    entries = {h["run_name"]: {**summaries.summarize_history(h), **{k: h.get(k) for k in keys},
                               "status": summaries.FINISHED if h.get("status") == "FINISHED" else "failed"}
               for h in histories if h.get("run_name")}
    return summaries.summarize(entries)["best"] if entries else None


def tag_best(uri: str, parent_run_id: str, best: dict[str, Any]) -> None:
    """Tags the best λ on the sweep's parent run (``evaluate`` sets the same tags); a sweep of one
    configuration (``best["single"]``) gets its run as ``best_run_name`` but no ``best_lambda``,
    a comparison of kinds its label as ``best_config`` (``dropout-0.1``)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    tags = {"best_run_name": best["run_name"], "best_by": best["by"],
            # beyond seed noise (every paired margin's interval excludes zero), or not
            "best_decided": "true" if best.get("decided") else "false"}
    metrics, found = [], "one configuration (%s, final %s %.4f): no λ to choose"
    label = best.get("lambda", summaries.format_strength(best["strength"]))
    if label != summaries.format_strength(best["strength"]):  # a comparison: the kind and its λ
        tags["best_config"] = label
        found = f"best configuration {label} (%s, final %s %.4f)"
    elif not best.get("single"):
        tags["best_lambda"] = summaries.format_strength(best["strength"])
        metrics.append(Metric("best_lambda", float(best["strength"]), int(time.time() * 1000), 0))
        found = f"best lambda {tags['best_lambda']} (%s, final %s %.4f)"
    MlflowClient(tracking_uri=uri).log_batch(parent_run_id, metrics=metrics,
                                             tags=[RunTag(k, v) for k, v in tags.items()])
    log.info(found, best["run_name"], best["by"], best["value"])


def register_champion(client: Any, name: str, run_id: Optional[str]) -> None:
    """Registers run ``run_id``'s logged model (if any) once as ``models:/<name>@champion``."""
    from mlflow.exceptions import MlflowException

    outputs = client.get_run(run_id).outputs if name and run_id else None
    model_ids = [o.model_id for o in outputs.model_outputs] if outputs else []
    if not model_ids:
        return
    with contextlib.suppress(MlflowException):  # it exists already
        client.create_registered_model(name)
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    source = client.get_logged_model(model_ids[-1]).artifact_location
    version = versions[0].version if versions else \
        client.create_model_version(name, source, run_id=run_id, model_id=model_ids[-1]).version
    client.set_registered_model_alias(name, "champion", version)
    log.info("registered model %s version %s (run %s), alias champion", name, version, run_id)


def write_manifest(cfg: DictConfig, parent_run_id: Optional[str]) -> dict[str, Any]:
    """Writes ``<paths.models>/sweep.json`` from the histories this sweep wrote."""
    models = Path(cfg.paths.models)
    sweep_id = os.environ.get(SWEEP_ENV)
    runs, histories = [], []
    for history_file in sorted(models.glob("*/history.json")):
        history = json.loads(history_file.read_text())
        if sweep_id and history.get("sweep_id") not in (sweep_id, None):
            continue
        histories.append(history)
        runs.append({key: history.get(key) for key in
                     ("run_name", "regularizer", "strength", "seed", "fold", "refit", "status",
                      "mlflow_run_id", "diverged_epoch")}
                    | {"dir": history_file.parent.name})
    runs.sort(key=lambda r: (str(r["regularizer"]), r["strength"] is None, r["strength"] or 0, r["run_name"]))
    manifest = {
        "sweep_id": sweep_id, "parent_run_id": parent_run_id,
        "experiment": cfg.tracking.experiment,
        "tracking_uri": store.redact(store.tracking_uri(cfg)) if cfg.tracking.enabled else None,
        "dataset": cfg.dataset.name, "model": cfg.model.name, "regularizer": sweep_kind(cfg),
        "strengths": [r["strength"] for r in runs], "runs": runs, "best": best_run(histories),
    }
    files.write_text(models / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def remove_other_sweeps(models: Path, manifest: dict[str, Any]) -> list[str]:
    """Deletes the run folders in ``models`` that the manifest does not list (λ of an earlier
    sweep's grid), so the DVC output holds this sweep alone; returns their names."""
    listed = {run["dir"] for run in manifest["runs"]}
    stale = [path for path in models.glob("*/history.json") if path.parent.name not in listed]
    for path in stale:
        shutil.rmtree(path.parent, ignore_errors=True)
    if stale:
        log.info("removed the runs of an earlier sweep from %s: %s", models,
                 ", ".join(sorted(p.parent.name for p in stale)))
    return [p.parent.name for p in stale]
