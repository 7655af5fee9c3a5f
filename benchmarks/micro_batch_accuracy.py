"""What learning in micro-batches costs in accuracy (README, Known shortfalls).

    python benchmarks/micro_batch_accuracy.py [--streams friedman_abrupt,hyperplane,sea,rbf]
                                              [--sizes 8,32] [--policy population] [--seeds 3]

Under a backlog the agent learns ``micro_batch_size`` readings per step, each
prediction coming from the model before its micro-batch (``agent.micro_batch``).
This runs each stream of ``streamlearn bench accuracy`` through the agent's
:class:`streamlearn.stream.Slot` strictly (predict, learn, one reading at a time)
and entirely in micro-batches (``Slot.predict_many`` then ``Slot.learn_many``, as
``StreamRunner.handle_many``), 10,000 readings, and prints the mean prequential
error of each with its ratio to strict. The agent micro-batches only while it is
behind, so this is the cost while a backlog lasts, not over a whole run.
About 2.5 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from streamlearn.bench.accuracy import SlotModel, predicted_class, samples, stream_specs


def _error(task: str, y: float, prediction: Any) -> float:
    if task == "regression":
        return abs(y - float(prediction))
    return float(predicted_class(task, prediction) != int(y))


def prequential_error(job: tuple[str, int, int, str]) -> tuple[str, int, int, float]:
    """Mean error of one stream and seed, strictly (``size`` 1) or in micro-batches of ``size``."""
    name, seed, size, policy = job
    spec = stream_specs(10_000)[name]
    n_features = len(next(iter(samples(spec, seed)))[0])
    slot = SlotModel(spec, n_features, {"policy": policy}, 0.1, seed).slot
    errors: list[float] = []
    batch: list[tuple[np.ndarray, float]] = []

    def learn_batch() -> None:
        X = np.stack([x for x, _ in batch])
        ys = [y for _, y in batch]
        predictions = list(slot.predict_many(X))
        errors.extend(_error(spec.task, y, p) for y, p in zip(ys, predictions))
        slot.learn_many(X, ys, predictions)
        batch.clear()

    for values, y in samples(spec, seed):
        x = slot.features_for("d", values)
        if size == 1:
            prediction = slot.predict(x)
            errors.append(_error(spec.task, y, prediction))
            slot.learn(x, y, prediction)
            continue
        batch.append((x, y))
        if len(batch) == size:
            learn_batch()
    if batch:
        learn_batch()
    return name, seed, size, float(np.mean(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="friedman_abrupt,hyperplane,sea,rbf")
    parser.add_argument("--sizes", default="8,32")
    parser.add_argument("--policy", default="population")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    streams = args.streams.split(",")
    sizes = [1] + [int(s) for s in args.sizes.split(",")]
    jobs = [(s, seed, size, args.policy) for s in streams for seed in range(args.seeds) for size in sizes]
    started = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(prequential_error, jobs))
    by: dict[tuple[str, int], list[float]] = {}
    for name, _, size, error in results:
        by.setdefault((name, size), []).append(error)
    print(f"policy {args.policy}, {args.seeds} seeds, 10,000 readings; mean prequential error (ratio to strict)")
    for name in streams:
        strict = statistics.mean(by[(name, 1)])
        cells = [f"strict {strict:.4g}"] + [
            f"micro-batch {size}: {statistics.mean(by[(name, size)]):.4g} (x{statistics.mean(by[(name, size)]) / strict:.2f})"
            for size in sizes[1:]]
        print(f"{name:16s} " + "   ".join(cells))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
