"""The `train` stage: the seeds' experiment, one MLflow-tracked run per lambda.

Run (from the repository root; params.yaml is layered over conf/, the command line wins):
    python -m l2sweep.train -m                                  # sweep params.yaml's sweep.strengths
    python -m l2sweep.train -m regularizer.strength=0.1,1.0     # an ad-hoc grid
    python -m l2sweep.train regularizer=l1 regularizer.strength=0.01   # one run
    python -m l2sweep.train -m hydra/launcher=joblib            # jobs in parallel processes

Each run writes ``<paths.models>/<run_name>/{model.keras,history.json}`` and an MLflow child
run under the sweep's parent run (see l2sweep.tracking).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from l2sweep import tracking
from l2sweep.config import CONF_DIR, ConfigError, flatten, validate
from l2sweep.sweep import launch_argv

log = logging.getLogger(__name__)


def load_training_data(cfg: DictConfig):
    """The prepared train and validation splits as float32 images in [0, 1] and int labels."""
    from l2sweep.data import load_split, to_float

    x_train, y_train = load_split(cfg.paths.prepared, "train")
    x_val, y_val = load_split(cfg.paths.prepared, "val")
    return (to_float(x_train), y_train), (to_float(x_val), y_val)


def _job_label(cfg: DictConfig) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        num = HydraConfig.get().job.num
    except ValueError:  # not running under Hydra (tests call train() directly)
        return cfg.run_name
    total = os.environ.get(tracking.JOBS_ENV)
    return f"job {num + 1}/{total or '?'} {cfg.run_name}"


def _hydra_output_dir() -> Optional[Path]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def write_run_outputs(out_dir: Path, model: Any, history: dict[str, Any]) -> None:
    """Atomically replaces ``out_dir`` with ``model.keras`` (unless None) and ``history.json``."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if model is not None:
            model.save(tmp / "model.keras")
        (tmp / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def log_run_artifacts(run: tracking.ChildRun, model: Any, history: dict[str, Any],
                      histograms: dict[str, Any], example: Any) -> None:
    """Logs curves, weight histograms, the Hydra config and the MLflow model of one run."""
    import mlflow

    from l2sweep.plots import plot_curves, plot_histograms, save_figure

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        save_figure(plot_curves(history["metrics"], history["run_name"]), tmp / "plots" / "curves.png")
        for layer, data in histograms.items():
            (tmp / "histograms").mkdir(exist_ok=True)
            (tmp / "histograms" / f"{layer}.json").write_text(json.dumps(data))
            save_figure(plot_histograms(data, layer, f"{history['run_name']}: {layer} weights"),
                        tmp / "histograms" / f"{layer}.png")
        (tmp / "history.json").write_text(json.dumps(history, indent=2))
        mlflow.log_artifacts(str(tmp))
    hydra_dir = _hydra_output_dir()
    if hydra_dir is not None and (hydra_dir / ".hydra").is_dir():
        mlflow.log_artifacts(str(hydra_dir / ".hydra"), "hydra")
    if model is None:
        return
    import keras
    from mlflow.models import infer_signature

    signature = infer_signature(example, model.predict(example, verbose=0))
    # MLflow predicts on the input example with Keras' default progress bar: keep it quiet.
    keras.utils.disable_interactive_logging()
    try:
        with tempfile.TemporaryDirectory() as tmp_dir:
            # An MLflow model (MLmodel, signature, input example) as the run's `model/`
            # artifact: `mlflow.pyfunc.load_model("runs:/<id>/model")` serves it. (A second copy
            # as an MLflow 3 LoggedModel named "model" would shadow this path in list_artifacts.)
            mlflow.tensorflow.save_model(model, f"{tmp_dir}/model", signature=signature,
                                         input_example=example)
            mlflow.log_artifacts(f"{tmp_dir}/model", "model")
    finally:
        keras.utils.enable_interactive_logging()


def _history_record(cfg: DictConfig, keras_history: dict[str, list], run: tracking.ChildRun,
                    diverged_epoch: Optional[int]) -> dict[str, Any]:
    metrics = {k: [float(v) for v in values] for k, values in keras_history.items()}
    n_epochs = len(next(iter(metrics.values()), []))
    return {
        "run_name": cfg.run_name,
        "regularizer": cfg.regularizer.name,
        "strength": float(cfg.regularizer.strength),
        "model": cfg.model.name,
        "status": "FAILED" if diverged_epoch is not None else "FINISHED",
        "diverged_epoch": diverged_epoch,
        "mlflow_run_id": run.run_id,
        "sweep_id": os.environ.get(tracking.SWEEP_ENV),
        "epochs": list(range(n_epochs)),
        "metrics": metrics,
    }


def train(cfg: DictConfig) -> dict[str, float]:
    """Trains one model for ``cfg.regularizer`` and records it on disk and in MLflow.

    Args:
        cfg: the composed config (see l2sweep.config.Config).

    Returns:
        The final epoch's metrics (``loss``, ``val_loss``, ``val_accuracy``, ...); empty values
        are NaN when the run diverged.
    """
    validate(cfg)
    import mlflow

    from l2sweep.data import load_meta
    from l2sweep.callbacks import EpochStats, MlflowEpochLogger, StopOnDivergence, WeightHistograms
    from l2sweep.model import build_model, set_seeds

    (x_train, y_train), (x_val, y_val) = load_training_data(cfg)
    meta = load_meta(cfg.paths.prepared)
    set_seeds(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg)
    label = _job_label(cfg)
    log.info("%s: %s, %d epochs on %d images (%d validation)", label, cfg.model.name,
             cfg.train.epochs, len(x_train), len(x_val))

    tags = {"dataset": cfg.dataset.name, "regularizer": cfg.regularizer.name,
            "l2sweep.kind": "run", "dvc.stage": os.environ.get("DVC_STAGE", "")}
    stats, histograms, divergence = EpochStats(), WeightHistograms(cfg.tracking.histogram_bins), StopOnDivergence()
    with tracking.child_run(cfg, {k: v for k, v in tags.items() if v}) as run:
        callbacks = [stats, histograms, divergence]
        if run.run_id:
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(cfg).items()})
            mlflow.log_input(
                mlflow.data.from_numpy(x_val[:1], targets=y_val[:1], name=cfg.dataset.name,
                                       source=str(meta.get("source", cfg.paths.prepared)),
                                       digest=_content_digest(meta)),
                context="training")
            callbacks.append(MlflowEpochLogger(run.client, run.run_id))
        keras_history = model.fit(
            x_train, y_train, validation_data=(x_val, y_val), epochs=cfg.train.epochs,
            batch_size=cfg.train.batch_size, shuffle=True, callbacks=callbacks,
            verbose=1 if sys.stdout.isatty() else 2).history
        diverged = divergence.diverged_epoch
        if diverged is not None:
            run.fail(f"diverged at epoch {diverged}")
            log.warning("%s: diverged at epoch %d; no model written", label, diverged)
        history = _history_record(cfg, keras_history, run, diverged)
        # Disk first: if the tracking server is gone, the results still exist.
        write_run_outputs(Path(cfg.paths.models) / cfg.run_name,
                          model if diverged is None else None, history)
        if run.run_id:
            log_run_artifacts(run, model if diverged is None else None, history,
                              histograms.data, x_val[:5])
    final = {k: v[-1] if v else math.nan for k, v in history["metrics"].items()}
    log.info("%s: val_loss %.4f val_accuracy %.4f", label, final.get("val_loss", math.nan),
             final.get("val_accuracy", math.nan))
    return final


def _content_digest(meta: dict[str, Any]) -> Optional[str]:
    checksums = meta.get("checksums") or {}
    if not checksums:
        return None
    import hashlib

    joined = "".join(f"{k}:{checksums[k]}" for k in sorted(checksums))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    # The return value is the objective for optimising sweepers (Optuna): validation loss.
    val_loss = train(cfg).get("val_loss", math.inf)
    return val_loss if math.isfinite(val_loss) else math.inf


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: layers params.yaml, fills in the lambda grid, runs the Hydra app."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args = launch_argv(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    tracking.install_sigterm_handler()
    sys.argv = [sys.argv[0], *args]
    status, reason = "FAILED", "the sweep stopped with an error"
    try:
        _hydra_main()
        status, reason = "FINISHED", None
    except (KeyboardInterrupt, tracking.Terminated):
        status, reason = "KILLED", "interrupted"
        raise SystemExit(130) from None
    finally:
        tracking.close_parent(status, reason)


if __name__ == "__main__":
    main()
