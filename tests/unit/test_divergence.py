"""The divergence rule (StopOnDivergence): non-finite loss or cross-entropy, or an epoch's
training cross-entropy above twice that of a uniform guess; on synthetic logs, then on real
runs at learning rate 1e6 in both training loops."""

from __future__ import annotations

import math
from types import SimpleNamespace

import keras
import numpy as np
import pytest

from conftest import model_cfg
from l2sweep.engine.callbacks import StopOnDivergence
from l2sweep.engine.fit import fit

LN10 = math.log(10)


def watched(**kwargs) -> StopOnDivergence:
    """A StopOnDivergence on a stand-in model with 10 outputs, its fit begun."""
    stop = StopOnDivergence(**kwargs)
    stop.set_model(SimpleNamespace(stop_training=False, outputs=[SimpleNamespace(shape=(None, 10))]))
    stop.on_train_begin()
    return stop


def feed(stop: StopOnDivergence, epochs: list[dict], batches: tuple[dict, ...] = ()) -> None:
    """Epoch after epoch, each ``batches``' logs at its batch ends, then the epoch's own logs."""
    for epoch, logs in enumerate(epochs):
        stop.on_epoch_begin(epoch)
        for batch, batch_logs in enumerate(batches):
            stop.on_train_batch_end(batch, dict(batch_logs))
        stop.on_epoch_end(epoch, dict(logs))
        if stop.model.stop_training:
            return


#: Measured epoch logs (Fashion-MNIST, 50,000 images): Adam at 1e-3 and 1e-2 with λ=0.1, the
#: slowest to fit of λ in {1e-4, 1e-3, 1e-2, 0.1}; and learning rate 1e6, λ=1e-4.
SOUND_1E3 = [{"loss": l, "data_loss": d} for l, d in ((1.39, 0.779), (0.885, 0.691), (0.747, 0.592))]
SOUND_1E2 = [{"loss": l, "data_loss": d} for l, d in ((1.46, 0.962), (1.17, 0.863), (1.04, 0.801))]
EXPLODED = [{"loss": 6.34e13, "data_loss": 4.12e13}, {"loss": 8.1e8, "data_loss": 6.19e5}]


@pytest.mark.parametrize("curve", [SOUND_1E3, SOUND_1E2], ids=["lr=1e-3", "lr=1e-2"])
def test_a_learning_model_never_trips_the_rule(curve):
    stop = watched()
    feed(stop, curve, batches=({"loss": 2.4, "data_loss": 2.3},))
    assert not stop.diverged and not stop.model.stop_training and stop.reason == ""


def test_a_large_penalty_alone_is_not_divergence():
    """λ so large that the model stays at the uniform guess: a huge total loss, a cross-entropy of
    ln 10. Useless, but not exploded."""
    stop = watched()
    feed(stop, [{"loss": 1e6, "data_loss": LN10}] * 3)
    assert not stop.diverged


def test_exploded_updates_diverge_after_the_first_epoch():
    stop = watched()
    feed(stop, EXPLODED)
    assert stop.diverged and stop.model.stop_training
    assert (stop.diverged_epoch, stop.diverged_batch, stop.bad_key) == (0, None, "data_loss")
    assert stop.bad_value == 4.12e13
    assert stop.ceiling == pytest.approx(2 * LN10)
    assert stop.reason == "data_loss 4.12e+13 > 4.61 = 2 x ln 10"


def test_the_ceiling_waits_for_the_epoch_mean():
    """A batch's running mean above the ceiling does not stop; the epoch's does."""
    stop = watched()
    stop.on_epoch_begin(0)
    stop.on_train_batch_end(0, {"loss": 9.0, "data_loss": 9.0})
    assert not stop.diverged
    stop.on_epoch_end(0, {"loss": 4.7, "data_loss": 4.7})
    assert stop.diverged_epoch == 0 and stop.diverged_batch is None


@pytest.mark.parametrize("logs, key", [({"loss": math.nan, "data_loss": 2.0}, "loss"),
                                       ({"loss": 2.0, "data_loss": math.inf}, "data_loss"),
                                       ({"loss": math.inf, "data_loss": 2.0}, "loss")],
                         ids=["nan-loss", "inf-data-loss", "penalty-overflow"])
def test_a_non_finite_value_stops_at_the_batch(logs, key):
    stop = watched()
    feed(stop, [{"loss": 0.5, "data_loss": 0.4}] * 2, batches=({"loss": 0.6, "data_loss": 0.5}, logs))
    assert (stop.diverged_epoch, stop.diverged_batch, stop.bad_key) == (0, 1, key)
    assert not math.isfinite(stop.bad_value) and stop.reason.startswith(f"{key} ")


def test_without_a_cross_entropy_only_the_loss_counts():
    stop = watched()
    feed(stop, [{"loss": 100.0}, {"loss": math.nan}])
    assert stop.diverged_epoch == 1 and stop.bad_key == "loss"


def test_factor_and_classes():
    stop = watched(factor=3.0, num_classes=2)
    assert stop.ceiling == pytest.approx(3 * math.log(2))
    feed(stop, [{"loss": 2.0, "data_loss": 2.0}, {"loss": 2.1, "data_loss": 2.1}])
    assert stop.diverged_epoch == 1


def test_classes_come_from_the_model_output():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    stop = StopOnDivergence()
    stop.set_model(model)
    stop.on_train_begin()
    assert stop.ceiling == pytest.approx(2 * math.log(3))


def test_a_new_fit_starts_afresh():
    stop = watched()
    feed(stop, EXPLODED)
    stop.on_train_begin()
    assert not stop.diverged and stop.bad_key is None and stop.bad_value is None


@pytest.mark.parametrize("kwargs, named", [({"monitor": ""}, "monitor=''"), ({"data_monitor": 3}, "data_monitor=3"),
                                           ({"factor": 1.0}, "factor=1.0"), ({"factor": math.nan}, "factor=nan"),
                                           ({"num_classes": 1}, "num_classes=1"),
                                           ({"num_classes": 2.0}, "num_classes=2.0")])
def test_bad_arguments_are_echoed(kwargs, named):
    with pytest.raises(ValueError, match=f"^{named} is not allowed"):
        StopOnDivergence(**kwargs)


# --- real runs -----------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["keras", "compiled"])
def test_learning_rate_1e6_diverges_in_both_loops(tiny_arrays, loop):
    """The issue's run (loss ~1e15, accuracy at chance, the run FINISHED) on the tiny data:
    diverged in the first epoch, training stopped, in Keras fit and in the compiled loop."""
    x, y = tiny_arrays["x_train"], tiny_arrays["y_train"]
    xv, yv = tiny_arrays["x_test"], tiny_arrays["y_test"]
    cfg = model_cfg(f"train.loop={loop}", "train.learning_rate=1e6", "train.epochs=3",
                    "tracking.enabled=false")
    (trained,) = fit([cfg], x, y, xv, yv, [[]], loop)
    assert trained.diverged_epoch == 0 and len(trained.history["loss"]) == 1
    assert trained.history["data_loss"][0] > 2 * LN10 and np.isfinite(trained.history["loss"][0])
