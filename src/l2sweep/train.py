"""The `train` stage: the seeds' experiment, one MLflow-tracked run per lambda.

Run (from the repository root; params.yaml is layered over conf/, the command line wins):
    python -m l2sweep.train -m                                  # sweep params.yaml's sweep.strengths
    python -m l2sweep.train -m regularizer.strength=0.1,1.0     # an ad-hoc grid
    python -m l2sweep.train regularizer=l1 regularizer.strength=0.01   # one run
    python -m l2sweep.train -m hydra/launcher=joblib            # jobs in parallel processes
    python -m l2sweep.train -m hydra/sweeper=lambda_search      # Optuna search over lambda

Each run writes ``<paths.models>/<run_name>/{model.keras,history.json}`` and an MLflow child
run under the sweep's parent run (see l2sweep.tracking.runs).

How one lambda trains is ``train.loop``: for the MLP by default the compiled loop (the fused
engine of l2sweep.engine.compiled with one model: the same initial weights, batches, Adam and metrics as
Keras ``fit``, a whole epoch per XLA call, compiled once per process), for the CNN Keras
``Model.fit``; ``train.loop=keras`` forces ``fit`` (tests/test_fused.py shows all three equal).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from l2sweep.base import cli
from l2sweep.tracking import runs as tracking
from l2sweep.base.config import CONF_DIR, FUSABLE_MODELS, flatten, validate
from l2sweep.preflight import preflight
from l2sweep.train_cli import launch_argv

log = logging.getLogger(__name__)


#: The last splits :func:`load_training_data` read: (folder, file stamps) -> the arrays.
_LOADED: dict[tuple, Any] = {}


def load_training_data(cfg: DictConfig):
    """The prepared train and validation splits: uint8 images as prepared and int labels.

    The model sees them as :func:`~l2sweep.base.data.to_float` makes them: the compiled loop scales
    them inside its step, Keras' ``fit`` gets a float copy. The jobs of a sweep in one process
    share one read (the arrays are read-only); a split file that changed in between (size or
    modification time) is read again.
    """
    from l2sweep.base.data import load_split

    folder = Path(cfg.paths.prepared).resolve()
    stamps = []
    for split in ("train", "val"):
        try:
            st = (folder / f"{split}.npz").stat()
            stamps.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append(None)  # load_split says what is missing
    key = (str(folder), tuple(stamps))
    if key not in _LOADED:
        _LOADED.clear()
        loaded = []
        for split in ("train", "val"):
            x, y = load_split(folder, split)
            x.flags.writeable = y.flags.writeable = False
            loaded.append((x, y))
        _LOADED[key] = tuple(loaded)
    return _LOADED[key]


def configure_threads(cfg: DictConfig) -> None:
    """Sets TensorFlow's intra-op threads for this process and its launcher's workers.

    ``train.threads``, or when null: 1 for the compiled loop of one model (the seeds' GEMMs are
    too small to split: on 2 cores one thread trains ~10 % faster and leaves the other core
    to parallel jobs; bench/README.md), else TensorFlow's default (every core). An explicit
    ``TF_NUM_INTRAOP_THREADS`` in the environment wins over the null default. It takes effect
    only before TensorFlow starts, so entry points call it first.
    """
    threads = cfg.train.threads
    if threads is None:
        if cfg.train.fused or training_loop(cfg) != "compiled":
            return
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    else:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(int(threads))


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


def _temp_dir(out_dir: Path) -> Path:
    """``.<name>.tmp-<pid>-<random>`` next to ``out_dir``: the pid lets the next sweep remove it
    if this process is killed (l2sweep.preflight.remove_stale_temp)."""
    return out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_run_outputs(out_dir: Path, model: Any, history: dict[str, Any]) -> None:
    """Atomically replaces ``out_dir`` with ``model.keras`` (unless None) and ``history.json``.

    Both are written into a temp folder that then takes ``out_dir``'s place, so an interrupted
    run leaves the previous folder (or none), never half a model. Two processes writing the
    same run: the last one wins.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir(out_dir)
    tmp.mkdir()  # not mkdtemp: the folder gets the umask's permissions, not 0700
    old = _temp_dir(out_dir)
    try:
        if model is not None:
            model.save(tmp / "model.keras")
        (tmp / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        for _ in range(5):
            try:
                out_dir.rename(old)  # out of the way; removed below
            except FileNotFoundError:
                pass
            try:
                tmp.rename(out_dir)
                break
            except OSError as exc:  # another writer put its folder there in between
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(old, ignore_errors=True)
        else:
            raise OSError(errno.EEXIST, f"{out_dir}: another process keeps replacing it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def draw_run_figures(history: dict[str, Any], histograms: dict[str, Any]) -> tuple[Any, Any]:
    """Starts drawing a run's figures (``plots/curves.png``, ``histograms/<layer>.png``) into a
    new temp folder, by the helper processes when the sweep started them (l2sweep.render).

    Returns:
        (the folder, a ``tempfile.TemporaryDirectory`` removed when dropped or cleaned up;
        the :class:`l2sweep.render.Drawing` to wait for).
    """
    from l2sweep.render import Figure, draw

    folder = tempfile.TemporaryDirectory(prefix="l2sweep-artifacts-")
    tmp = Path(folder.name)
    (tmp / "plots").mkdir()
    (tmp / "histograms").mkdir()
    figures = [Figure("plot_curves", {"metrics": history["metrics"], "title": history["run_name"]},
                      str(tmp / "plots" / "curves.png"))]
    figures += [Figure("plot_histograms", {"hist_layer_data": data, "layer": layer,
                                           "title": f"{history['run_name']}: {layer} weights"},
                       str(tmp / "histograms" / f"{layer}.png")) for layer, data in histograms.items()]
    return folder, draw(figures)


def log_run_artifacts(run: tracking.ChildRun, model: Any, history: dict[str, Any],
                      histograms: dict[str, Any], example: Any, hydra_dir: Optional[Path] = None,
                      job_config: Optional[DictConfig] = None, figures: Optional[tuple[Any, Any]] = None) -> None:
    """Logs curves, weight histograms, the Hydra config and the MLflow model of one run.

    It may run in the background thread while the next job trains (l2sweep.tracking.runs.child_run),
    so it takes everything as arguments and uses only the client with ``run.run_id``.

    Args:
        run: the run to log to.
        model: the trained Keras model, or None to log no MLflow model.
        history: the run's ``history.json`` content.
        histograms: :class:`l2sweep.engine.callbacks.WeightHistograms` data.
        example: a few validation images (the MLflow model's input example).
        hydra_dir: the Hydra job's output folder; its ``.hydra/`` is logged as ``hydra/``.
        job_config: logged as ``hydra/config.yaml`` instead (a fused sweep's lambda).
        figures: :func:`draw_run_figures` of ``history`` and ``histograms``, started earlier;
            None to draw them here.
    """
    folder, drawing = figures or draw_run_figures(history, histograms)
    try:
        client, run_id = run.client, run.run_id
        if hydra_dir is not None and (hydra_dir / ".hydra").is_dir():
            client.log_artifacts(run_id, str(hydra_dir / ".hydra"), "hydra")
        if job_config is not None:
            client.log_text(run_id, OmegaConf.to_yaml(job_config), "hydra/config.yaml")
        if model is not None:  # while the helpers draw the figures
            log_mlflow_model(client, run_id, model, example)
        tmp = Path(folder.name)
        for layer, data in histograms.items():
            (tmp / "histograms" / f"{layer}.json").write_text(json.dumps(data))
        (tmp / "history.json").write_text(json.dumps(history, indent=2))
        drawing.wait()
        client.log_artifacts(run_id, str(tmp))
    finally:
        folder.cleanup()


def log_mlflow_model(client: Any, run_id: str, model: Any, example: Any) -> None:
    """Logs ``model`` as the run's ``model/`` artifact: an MLflow model (MLmodel, signature,
    input ``example``) that ``mlflow.pyfunc.load_model("runs:/<id>/model")`` serves."""
    import keras
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    # A direct call, not predict(): the same output without building a tf.data pipeline.
    signature = infer_signature(example, keras.ops.convert_to_numpy(model(example, training=False)))
    with tempfile.TemporaryDirectory() as tmp_dir:
        # (A second copy as an MLflow 3 LoggedModel named "model" would shadow this path in
        # list_artifacts.) Requirements given, not inferred: inference loads the model again
        # in a fresh Python (~5 s per run; bench/README.md).
        mlflow.tensorflow.save_model(model, f"{tmp_dir}/model", signature=signature,
                                     input_example=example,
                                     pip_requirements=[*mlflow.tensorflow.get_default_pip_requirements(),
                                                       f"keras=={keras.__version__}"])
        client.log_artifacts(run_id, f"{tmp_dir}/model", "model")


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
        cfg: the composed config (see l2sweep.base.config.Config).

    Returns:
        The final epoch's metrics (``loss``, ``val_loss``, ``val_accuracy``, ...); empty values
        are NaN when the run diverged.
    """
    validate(cfg)
    from l2sweep.base.data import load_meta, to_float

    (x_train, y_train), (x_val, y_val) = load_training_data(cfg)
    meta = load_meta(cfg.paths.prepared)
    example = to_float(x_val[:5])  # the MLflow model's input example
    label = _job_label(cfg)
    log.info("%s: %s, %d epochs on %d images (%d validation)", label, cfg.model.name,
             cfg.train.epochs, len(x_train), len(x_val))
    fit = _fit_compiled if training_loop(cfg) == "compiled" else _fit_keras
    with tracking.child_run(cfg, run_tags(cfg)) as run:
        callbacks = run_callbacks(run, cfg, meta, example, y_val)
        with tracking.deferred_signals():
            model, history, diverged, histograms = fit(cfg, x_train, y_train, x_val, y_val,
                                                       callbacks, label)
        return finish_run(cfg, run, model, history, diverged, histograms, example, label)


def run_callbacks(run: tracking.ChildRun, cfg: DictConfig, meta: dict[str, Any], example: Any,
                  y_val: Any) -> list:
    """The Keras callbacks a lambda's training gets from its run: ``StopOnSignal`` first, then,
    with tracking on, the deferred MLflow start's trigger and ``MlflowRunLogger``, after the
    run's params and input are queued (:func:`log_run_inputs`)."""
    from l2sweep.engine.callbacks import MlflowRunLogger, StopOnSignal, start_deferred_tracking

    callbacks = [StopOnSignal()]
    if run.enabled:
        run.call("params and input", functools.partial(log_run_inputs, run, cfg, meta, example, y_val))
        callbacks += [start_deferred_tracking(), MlflowRunLogger(run)]
    return callbacks


def training_loop(cfg: DictConfig) -> str:
    """``compiled`` or ``keras``: what ``train.loop`` picks for ``cfg.model`` (``auto``: the
    compiled loop for the models l2sweep.engine.compiled can vectorize, else Keras ``fit``)."""
    if cfg.train.loop == "compiled" or (cfg.train.loop == "auto" and cfg.model.name in FUSABLE_MODELS):
        return "compiled"  # validate() refused compiled for a model it cannot run
    return "keras"


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


def _fit_keras(cfg: DictConfig, x_train, y_train, x_val, y_val, callbacks: list, label: str):
    """Keras ``Model.fit``: returns (model, history, diverged epoch or None, histogram data)."""
    from l2sweep.engine.callbacks import EpochStats, StopOnDivergence, WeightHistograms
    from l2sweep.base.data import to_float
    from l2sweep.engine.model import build_model, set_seeds

    x_train, x_val = to_float(x_train), to_float(x_val)
    set_seeds(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg)
    histograms, divergence = WeightHistograms(cfg.tracking.histogram_bins), StopOnDivergence()
    stop, *loggers = callbacks
    history = model.fit(
        x_train, y_train, validation_data=(x_val, y_val), epochs=cfg.train.epochs,
        batch_size=cfg.train.batch_size, validation_batch_size=cfg.train.validation_batch_size,
        shuffle=True, callbacks=[stop, EpochStats(), histograms, divergence, *loggers],
        verbose=_verbose()).history
    return model, history, divergence.diverged_epoch, histograms.data


def _fit_compiled(cfg: DictConfig, x_train, y_train, x_val, y_val, callbacks: list, label: str):
    """The compiled loop (l2sweep.engine.compiled with one model): the same model, initial weights,
    batches and Adam as ``fit``, an epoch per compiled call; same return as :func:`_fit_keras`."""
    from l2sweep.engine.compiled import fit_fused

    (model,), (result,) = fit_fused([cfg], x_train, y_train, x_val, y_val, label=label,
                                    callbacks=[callbacks], verbose=_verbose())
    return model, result.history, result.diverged_epoch, result.histograms


def run_tags(cfg: DictConfig, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The tags of a lambda's child run (empty values left out)."""
    tags = {"dataset": cfg.dataset.name, "regularizer": cfg.regularizer.name,
            "l2sweep.kind": "run", "dvc.stage": os.environ.get("DVC_STAGE", ""), **(extra or {})}
    return {k: v for k, v in tags.items() if v}


def log_run_inputs(run: tracking.ChildRun, cfg: DictConfig, meta: dict[str, Any], example: Any,
                   y_val: Any) -> None:
    """Logs the resolved config as params and the dataset as input of ``run`` (its schema from
    ``example``, validation images as the model sees them, and the first labels of ``y_val``)."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag, Param
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    run.client.log_batch(run.run_id, params=[Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()])
    with warnings.catch_warnings():
        # MLflow registers its local-path source twice ("" and "file" schemes) and warns, on
        # every run, that a local path matches both; either one is the same source.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_numpy(example[:1], targets=y_val[:1], name=cfg.dataset.name,
                                         source=str(meta.get("source", cfg.paths.prepared)),
                                         digest=_content_digest(meta))
    for attempt in range(3):
        try:
            run.client.log_inputs(run.run_id, [DatasetInput(
                dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])
            return
        except mlflow.exceptions.MlflowException as exc:
            # Two jobs logging the same new dataset at once (parallel launchers, two sweeps):
            # both look it up, both insert, one loses on the store's unique key. Once it exists,
            # a second attempt links it instead.
            if "unique constraint" not in str(exc).lower() or attempt == 2:
                raise


def finish_run(cfg: DictConfig, run: tracking.ChildRun, model: Any, keras_history: dict[str, list],
               diverged: Optional[int], histograms: dict[str, Any], example: Any, label: str,
               job_config: Optional[DictConfig] = None) -> dict[str, float]:
    """Records a trained lambda: status, ``history.json`` + ``model.keras``, MLflow artifacts.

    Shared by the sequential (:func:`train`) and the fused (l2sweep.engine.compiled) sweep. The outputs
    on disk are written here; the artifacts are handed to ``run`` (:meth:`ChildRun.defer`),
    which logs them when the run ends (l2sweep.tracking.runs.child_run).

    Args:
        cfg: the lambda's config.
        run: its child run (``run.run_id`` None with tracking off).
        model: the trained Keras model (not written when the run diverged).
        keras_history: metric name -> one value per epoch (``History.history``).
        diverged: the epoch the loss became NaN/inf, else None.
        histograms: :class:`l2sweep.engine.callbacks.WeightHistograms` data.
        example: a few validation images (the MLflow model's input example).
        label: prefix of the log lines.
        job_config: logged as ``hydra/config.yaml`` instead of the Hydra job's (fused sweep).

    Returns:
        The final epoch's metrics (NaN where the run diverged).
    """
    if diverged is not None:
        run.fail(f"diverged at epoch {diverged}")
        log.warning("%s: diverged at epoch %d; no model written", label, diverged)
    history = _history_record(cfg, keras_history, run, diverged)
    # Disk first: if the tracking server is gone, the results still exist.
    write_run_outputs(Path(cfg.paths.models) / cfg.run_name,
                      model if diverged is None else None, history)
    if run.run_id:  # logged when the run ends: in the background while the next job trains
        run.defer("artifacts (curves, histograms, history, config, model)", functools.partial(
            log_run_artifacts, run, model if diverged is None and cfg.tracking.log_model else None,
            history, histograms, example, hydra_dir=_hydra_output_dir(), job_config=job_config,
            # Now, unless the logging waits for the next job's training (then, there).
            figures=None if run.held else draw_run_figures(history, histograms)))
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


def objective(final: dict[str, float]) -> float:
    """What optimising sweepers (Optuna) minimise: the final validation cross-entropy
    (``val_data_loss``; ``val_loss`` adds lambda's own penalty, so it would favour small
    lambdas), else ``val_loss`` (the rule of l2sweep.reporting.report); inf for a diverged run."""
    from l2sweep.reporting.report import BEST_BY

    for key in BEST_BY:
        value = final.get(key)
        if value is not None:
            return value if math.isfinite(value) else math.inf
    return math.inf


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    # The return value is the objective for optimising sweepers (Optuna): see objective().
    if cfg.train.fused:  # every lambda of sweep.strengths in this one job (l2sweep.engine.compiled)
        from l2sweep.engine.compiled import train_fused

        finals = train_fused(cfg).values()
        val_loss = min((objective(f) for f in finals), default=math.inf)
    else:
        val_loss = objective(train(cfg))
    return val_loss if math.isfinite(val_loss) else math.inf


def _before_training(cfg: DictConfig) -> None:
    preflight(cfg)
    configure_threads(cfg)


_PRINT_ONLY_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i",
                     "--shell-completion", "-sc"}


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: layers params.yaml, fills in the lambda grid, runs the Hydra app.

    A failure ends in one ``error:`` line and a non-zero status (see l2sweep.base.cli); add
    ``--verbose`` or set ``HYDRA_FULL_ERROR=1`` for the traceback. The sweep's parent run is
    ended FINISHED, FAILED (with the error as reason) or KILLED whatever happens.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = cli.wants_traceback(args)
    args = cli.strip_verbose(args)
    # Flags that only print (help, config, info) need no writable outputs or store.
    runs = not any(a.split("=", 1)[0] in _PRINT_ONLY_FLAGS for a in args)
    try:
        hydra_args = launch_argv(args, check=_before_training if runs else None)
    except Exception as exc:  # bad input: nothing has been written
        raise SystemExit(cli.report(exc, args, verbose=verbose)) from None
    saved = sys.argv, os.environ.get("HYDRA_FULL_ERROR"), tracking.install_signal_handlers()
    sys.argv = [sys.argv[0], *hydra_args]
    # Hydra would print its own traceback and exit 1: let the error reach cli.report instead.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    status, reason, error = "FAILED", "the sweep stopped with an error", None
    try:
        _hydra_main()
        tracking.raise_after_sweep()
        status, reason = "FINISHED", None
    except (Exception, KeyboardInterrupt, tracking.Terminated) as exc:
        interrupted = not isinstance(exc, Exception)
        status = "KILLED" if interrupted else "FAILED"
        reason = f"interrupted by {cli.signal_of(exc).name}" if interrupted else cli.describe(exc, args)
        error = exc
        if verbose:
            raise
    finally:
        sys.argv = saved[0]
        if saved[1] is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved[1]
        try:  # no run left RUNNING: wait for the background thread to end the last ones
            with tracking.deferred_signals():
                tracking.finish_background()
        except (KeyboardInterrupt, tracking.Terminated):
            pass  # it arrived while they were being ended; they are, so nothing is left to stop
        finally:
            from l2sweep.render import stop_workers

            stop_workers()
            for signum, handler in saved[2].items():
                signal.signal(signum, handler)
            tracking.close_parent(status, reason)
    if error is not None:  # reported last, after the parent run's own log lines
        raise SystemExit(cli.report(error, args))


if __name__ == "__main__":
    cli.exit_fast(main)
