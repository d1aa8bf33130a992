"""Variant (a) of the benchmark: the seeds' code as they wrote it, on the prepared data.

A plain Keras loop over lambda (``shared/seeds/003``: ``for l2v in l2_values``), the model
and ``compile``/``fit`` calls copied verbatim: default ``fit`` (no XLA on CPU, one step per
call, progress output), batch 32, no seeding, no tracking. The only additions are around it:
loading the prepared split (``x / 255`` in float32, as the pipeline feeds it), and timing each ``fit`` from outside
and writing its history to ``--out`` so the benchmark can put the results side by side.

Run:
    python -m bench.seeds --prepared data/prepared --epochs 10 --grid 0.0001 0.001 0.01 --out a.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", required=True, help="folder with train.npz and val.npz")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--grid", type=float, nargs="+", default=[0.0001, 0.001, 0.01])
    parser.add_argument("--out", required=True, help="JSON file for the histories and timings")
    args = parser.parse_args(argv)

    from tensorflow import keras
    from tensorflow.keras import layers, models, regularizers

    # float32 like the pipeline's input (plain ``x / 255.0`` would be float64: slower, and
    # not what is being compared here).
    with np.load(f"{args.prepared}/train.npz") as f:
        x_train, y_train = f["x"].astype(np.float32) / np.float32(255.0), f["y"]
    with np.load(f"{args.prepared}/val.npz") as f:
        x_val, y_val = f["x"].astype(np.float32) / np.float32(255.0), f["y"]

    runs = []
    l2_values = args.grid
    # --- the seeds' code (shared/seeds/003 and 001), unchanged but for the epochs -----------
    for l2v in l2_values:
        model = models.Sequential([
            layers.Flatten(input_shape=(28, 28)),
            layers.Dense(128, activation="relu",
                         kernel_regularizer=regularizers.l2(l2v)),
            layers.Dense(10, activation="softmax")
        ])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        start = time.perf_counter()
        history = model.fit(x_train, y_train, epochs=args.epochs, batch_size=32,
                            validation_data=(x_val, y_val))
        # -------------------------------------------------------------------------------------
        runs.append({"strength": l2v, "fit_seconds": time.perf_counter() - start,
                     "history": {k: [float(v) for v in vs] for k, vs in history.history.items()}})
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"keras": keras.__version__, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
