"""What a trained model's run gets besides its per-epoch metrics: params and dataset input at
the start; the Hydra config, the MLflow model, the weight-histogram data and the history at the
end. Each function runs on the tracking thread (l2sweep.tracking.runs) with a created run.

The per-run figures (curves, histograms) are drawn and logged by ``evaluate``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from l2sweep.base import compat
from l2sweep.base.config import flatten
from l2sweep.tracking.runs import ChildRun

#: MLflow's limit on a param value's length.
MAX_PARAM_LENGTH = 6000


def log_inputs(run: ChildRun, cfg: DictConfig, meta: dict[str, Any], example: Any, y_val: Any) -> None:
    """Logs the resolved config as params and the dataset as the run's training input (its
    schema from ``example``, validation images as the model sees them, and labels ``y_val``)."""
    import mlflow
    from mlflow.entities import Param

    run.client.log_batch(run.run_id, params=[Param(k, str(v)[:MAX_PARAM_LENGTH])
                                             for k, v in flatten(cfg).items()])
    with warnings.catch_warnings():
        # MLflow registers its local-path source twice ("" and "file" schemes) and warns, on
        # every run, that a local path matches both; either one is the same source.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_numpy(example[:1], targets=y_val[:1], name=cfg.dataset.name,
                                         source=str(meta.get("source", cfg.paths.prepared)),
                                         digest=content_digest(meta))
    for attempt in range(3):
        try:
            run.client.log_inputs(run.run_id, [compat.dataset_input(dataset, "training")])
            return
        except mlflow.exceptions.MlflowException as exc:
            # Two jobs logging the same new dataset at once (parallel launchers, two sweeps):
            # both look it up, both insert, one loses on the store's unique key. Once it exists,
            # a second attempt links it instead.
            if "unique constraint" not in str(exc).lower() or attempt == 2:
                raise


def content_digest(meta: dict[str, Any]) -> Optional[str]:
    """A short digest of the prepared data's checksums (the MLflow dataset's identity)."""
    checksums = meta.get("checksums") or {}
    if not checksums:
        return None
    joined = "".join(f"{k}:{checksums[k]}" for k in sorted(checksums))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def log_outputs(run: ChildRun, model: Any, history: dict[str, Any], histograms: dict[str, Any],
                example: Any, hydra_dir: Optional[Path], job_config: Optional[DictConfig]) -> None:
    """Logs the run's Hydra config (``hydra/``), MLflow model (``model/``, unless ``model`` is
    None), weight-histogram data (``histograms/<layer>.json``) and ``history.json``.

    Args:
        hydra_dir: the Hydra job's output folder; its ``.hydra/`` is logged as ``hydra/``.
        job_config: logged as ``hydra/config.yaml`` instead (a fused sweep's λ).
    """
    if hydra_dir is not None and (hydra_dir / ".hydra").is_dir():
        run.client.log_artifacts(run.run_id, str(hydra_dir / ".hydra"), "hydra")
    if job_config is not None:
        run.client.log_text(run.run_id, OmegaConf.to_yaml(job_config, resolve=True), "hydra/config.yaml")
    if model is not None:
        log_mlflow_model(run, model, example)
    with tempfile.TemporaryDirectory(prefix="l2sweep-artifacts-") as tmp:
        (Path(tmp) / "histograms").mkdir()
        for layer, data in histograms.items():
            (Path(tmp) / "histograms" / f"{layer}.json").write_text(json.dumps(data))
        (Path(tmp) / "history.json").write_text(json.dumps(history, indent=2))
        run.client.log_artifacts(run.run_id, tmp)


def log_mlflow_model(run: ChildRun, model: Any, example: Any) -> None:
    """Logs ``model`` as the run's ``model/`` artifact: an MLflow model (MLmodel, signature,
    input ``example``) that ``mlflow.pyfunc.load_model("runs:/<id>/model")`` serves."""
    import keras
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    # A direct call, not predict(): the same output without building a tf.data pipeline.
    signature = infer_signature(example, keras.ops.convert_to_numpy(model(example, training=False)))
    with tempfile.TemporaryDirectory() as tmp:
        # Requirements given, not inferred: inferring loads the model again in a fresh Python.
        requirements = [*mlflow.tensorflow.get_default_pip_requirements(), f"keras=={keras.__version__}"]
        mlflow.tensorflow.save_model(model, f"{tmp}/model", signature=signature, input_example=example,
                                     pip_requirements=requirements)
        run.client.log_artifacts(run.run_id, f"{tmp}/model", "model")
