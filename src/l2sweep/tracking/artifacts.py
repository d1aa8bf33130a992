"""What a trained model's run gets besides its per-epoch metrics: params and inputs at the start,
config, model, histogram data and history at the end (on the tracking thread; figures: evaluate).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from l2sweep.base import compat, files
from l2sweep.base.config import flatten
from l2sweep.tracking import store
from l2sweep.tracking.runs import ChildRun

#: MLflow's limit on a param value's length.
MAX_PARAM_LENGTH = 6000
HYPERPARAMETERS = ("model.", "regularizer.", "train.", "data.")  #: logged as params (not paths.*, gate.*, ...)
SPLITS = (("train", "training"), ("val", "validation"), ("test", "test"))  #: inputs, MLflow context


def log_inputs(run: ChildRun, cfg: DictConfig, meta: dict[str, Any], example: Any, y_val: Any) -> None:
    """Logs the hyperparameters and dataset as params, the run's description and each split as input."""
    import mlflow
    from mlflow.entities import Param

    digest = content_digest(meta)
    params = {**{k: v for k, v in flatten(cfg).items() if k.startswith(HYPERPARAMETERS)},
              "dataset.name": cfg.dataset.name, "dataset.digest": digest}
    run.client.log_batch(run.run_id, params=[Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()])
    size = meta.get("splits", {}).get("train", {}).get("size")
    run.note = (f"{cfg.model.name} with {cfg.regularizer.name} strength {cfg.regularizer.strength}, "
                f"{cfg.train.epochs} epochs on {cfg.dataset.name} ({size} training images; data {digest}).")
    run.client.set_tag(run.run_id, "mlflow.note.content", run.note)
    with warnings.catch_warnings():
        # MLflow registers its local-path source twice ("" and "file" schemes) and warns, on
        # every run, that a local path matches both; either one is the same source.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        inputs = [compat.dataset_input(mlflow.data.from_numpy(
            example[:1], targets=y_val[:1], name=cfg.dataset.name, digest=content_digest(meta, split),
            source=str(meta.get("source", cfg.paths.prepared))), context) for split, context in SPLITS]
    for attempt in range(3):
        try:
            run.client.log_inputs(run.run_id, inputs)
            return
        except mlflow.exceptions.MlflowException as exc:
            # Two jobs inserting the same new dataset at once: the loser links it on a retry.
            if "unique constraint" not in str(exc).lower() or attempt == 2:
                raise


def content_digest(meta: dict[str, Any], split: str = "") -> Optional[str]:
    """A short digest of the prepared data (or one ``split``): the MLflow dataset's identity."""
    checksums = meta.get("checksums") or {}
    if not checksums:
        return None
    joined = "".join(f"{k}:{checksums[k]}" for k in sorted(checksums)) + (
        f"|{split}|{meta.get('val_fraction')}|{meta.get('seed')}|{meta.get('limit')}" if split else "")
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def log_outputs(run: ChildRun, model: Any, history: dict[str, Any], histograms: dict[str, Any],
                example: Any, hydra_dir: Optional[Path], job_config: Optional[DictConfig]) -> None:
    """Logs the Hydra config (credentials redacted), the MLflow model (unless None), the result,
    histograms and history.

    Args:
        hydra_dir: the Hydra job's output folder; its ``.hydra/`` is logged as ``hydra/``.
        job_config: logged as ``hydra/config.yaml`` instead (a fused sweep's λ).
    """
    with scratch_folder(run.out_dir.with_name(f"{run.out_dir.name}.artifacts")) as tmp:
        (tmp / "hydra").mkdir()
        if hydra_dir is not None and (hydra_dir / ".hydra").is_dir():
            for source in sorted((hydra_dir / ".hydra").glob("*.yaml")):
                (tmp / "hydra" / source.name).write_text(store.redact(source.read_text()))
        if job_config is not None:
            text = OmegaConf.to_yaml(job_config, resolve=True)
            (tmp / "hydra" / "config.yaml").write_text(store.redact(text))
        (tmp / "histograms").mkdir()
        for layer, data in histograms.items():
            (tmp / "histograms" / f"{layer}.json").write_text(json.dumps(data))
        (tmp / "history.json").write_text(json.dumps(history, indent=2))
        run.client.log_artifacts(run.run_id, str(tmp))
    if model is not None:
        log_mlflow_model(run, model, example, max(len(history["epochs"]) - 1, 0))
    final = ", ".join(f"{k} {history['metrics'][k][-1]:.4f}" for k in ("val_accuracy", "val_loss")
                      if history["metrics"].get(k))
    run.client.set_tag(run.run_id, "mlflow.note.content", f"{run.note} Result ({history['status']}): {final}.")


@contextmanager
def scratch_folder(place: Path) -> Iterator[Path]:
    """A fresh folder beside ``place`` (:func:`l2sweep.base.files.temp_name`: it names this process)
    for files on their way to MLflow, removed afterwards; the ones of processes that died (SIGKILL
    skips every ``finally``) are removed first, here and by the next sweep's preflight."""
    files.remove_stale_temp(place.parent)
    folder = files.temp_name(place)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def log_mlflow_model(run: ChildRun, model: Any, example: Any, step: int) -> None:
    """Logs ``model`` as the run's logged model, taking uint8 pixels (as ``example``; its schema
    rejects floats) and scaling them to [0, 1]; its metrics are epoch ``step``'s."""
    import keras
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    # A copy without its optimizer: the served model loads with plain Keras (weight_decay's
    # optimizer is l2sweep's own class).
    network = keras.models.clone_model(model)
    network.set_weights(model.get_weights())
    served = keras.Sequential([keras.Input(example.shape[1:], dtype="uint8"), keras.layers.Rescaling(1 / 255),
                               network])
    # A direct call, not predict(): the same output without building a tf.data pipeline.
    signature = infer_signature(example, keras.ops.convert_to_numpy(served(example, training=False)))
    # Requirements given, not inferred: inferring loads the model again in a fresh Python.
    requirements = [*mlflow.tensorflow.get_default_pip_requirements(), f"keras=={keras.__version__}"]
    # log_model writes to the global tracking URI (this thread is the process's only MLflow caller)
    # and, given no model, creates it in the default experiment: created here, in the run's.
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(run.client.tracking_uri)
    try:
        logged = run.client.create_logged_model(run.tracker.experiments[run.uri], name="model", source_run_id=
                                                run.run_id, params=run.client.get_run(run.run_id).data.params)
        mlflow.tensorflow.log_model(served, model_id=logged.model_id, run_id=run.run_id, step=step,
                                    signature=signature, input_example=example, pip_requirements=requirements)
    finally:
        mlflow.set_tracking_uri(previous)
