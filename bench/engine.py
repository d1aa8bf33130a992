"""Seconds per epoch of the compiled training engine (``l2sweep.engine.compiled.CompiledMLP``) alone.

    python -m bench.engine --k 3                 # the fused 3-lambda model, TensorFlow's threads
    python -m bench.engine --k 1 --threads 1     # one model on one thread (the sequential default)
    python -m bench.engine --k 3 --orders 3      # 3 seeds of one λ: each model its own batches
    python -m bench.engine --k 15 --orders 5     # 3 λ x 5 seeds: each seed's 3 λ share an order
    PYTHONPATH=/tmp/old/src python -m bench.engine --k 3   # another version (a git worktree)

Random images (uint8, as prepared, or ``--pixels float32``) and labels (shape of the default
data); K models of the project's MLP (``build_model``, l2 with λ = 0.001 or none), batch 32, a
fresh shuffled order per epoch. The first call (tracing and XLA compilation) is
reported apart from the steady epochs. For A/B comparisons run both versions one after the
other, several times, on an otherwise idle machine: the printed loss must be the same.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional

import numpy as np


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--k", type=int, default=3, help="models trained as one (lambdas), default 3")
    p.add_argument("--epochs", type=int, default=3, help="steady epochs timed after the first, default 3")
    p.add_argument("--n", type=int, default=50_000, help="training images, default 50,000")
    p.add_argument("--threads", type=int, help="TF_NUM_INTRAOP_THREADS (default: TensorFlow's)")
    p.add_argument("--penalty", choices=["l2", "none"], default="l2")
    p.add_argument("--orders", type=int, default=1,
                   help="batch orders (seeds), each shared by k/orders consecutive models (default 1)")
    p.add_argument("--pixels", choices=["uint8", "float32"], default="uint8",
                   help="images as prepared (uint8, scaled in the step: the pipeline's) or as floats")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(args.threads)

    import tensorflow as tf

    from l2sweep.base.config import compose_config
    from l2sweep.base.data import to_float
    from l2sweep.engine.compiled import CompiledMLP
    from l2sweep.engine.model import build_model, set_seeds

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.n, 784), dtype=np.uint8)
    x = tf.constant(x if args.pixels == "uint8" else to_float(x))
    y = tf.constant(rng.integers(0, 10, args.n).astype(np.int64))
    cfg = compose_config([f"regularizer={args.penalty}", "regularizer.strength=0.001"], with_params=False)
    set_seeds(0)
    groups = args.orders
    engine = CompiledMLP.for_views([build_model(cfg) for _ in range(args.k)], groups)
    def batches() -> list[np.ndarray]:
        order = rng.permutation(args.n)
        return [order[i:i + 32] for i in range(0, args.n, 32)]

    epochs = [[batches() for _ in range(groups)] for _ in range(args.epochs + 1)]

    times = []
    for batches in epochs:
        start = time.perf_counter()
        logs = engine.train_epoch(x, y, batches)
        times.append(time.perf_counter() - start)
    print(json.dumps({"k": args.k, "orders": args.orders, "threads": args.threads or "default",
                      "penalty": args.penalty, "pixels": args.pixels,
                      "first_s": round(times[0], 3), "epoch_s": [round(t, 3) for t in times[1:]],
                      "loss": [float(v) for v in logs["loss"]]}))


if __name__ == "__main__":
    main()
