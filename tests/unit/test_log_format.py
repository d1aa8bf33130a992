"""The console's pieces: one log format in every stage, the short epoch line, which start-up
lines of TensorFlow are dropped."""

from __future__ import annotations

import yaml

from l2sweep.base import cli
from l2sweep.base.config import CONF_DIR


def test_hydra_logs_in_the_stages_format():
    hydra = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["hydra"]
    for section in ("job_logging", "hydra_logging"):
        assert hydra[section]["formatters"]["simple"]["format"] == cli.LOG_FORMAT, section
    assert set(cli.QUIET_LOGGERS) <= set(hydra["job_logging"]["loggers"])


def test_tensorflow_notices_are_recognized_and_nothing_else():
    noise = ["WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
             "I0000 00:00:1796630903.680716   28494 port.cc:153] oneDNN custom operations are on. You may",
             "E0000 00:00:1.0 cuda_dnn.cc:8579] Unable to register cuDNN factory: Attempting to register"]
    assert all(cli.TF_STARTUP_NOISE.search(line) for line in noise)
    assert not cli.TF_STARTUP_NOISE.search("ImportError: libcudart.so.12: cannot open shared object file")


def test_epoch_line_is_short(capsys):
    from l2sweep.engine.callbacks import EpochLine

    line = EpochLine("l2-0.0001")
    line.set_params({"epochs": 10})
    logs = {"loss": 0.47, "accuracy": 0.9, "val_loss": 0.29, "val_accuracy": 0.89, "epoch_time": 1.25,
            **{f"weight_norm/layer{i}": 1.0 for i in range(10)}}
    line.on_epoch_end(9, logs)
    out = capsys.readouterr().out
    assert out == ("l2-0.0001 Epoch 10/10 - loss 0.4700 - accuracy 0.9000 - val_loss 0.2900 - "
                   "val_accuracy 0.8900 - 1.2s\n")
