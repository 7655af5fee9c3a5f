"""What the linear copies of the default population cost per labelled reading.

    python benchmarks/slot_cost.py

One model slot as the agent runs it (8 features, the default population policy),
with ``linear_copies`` 0 and 5, side by side in one run: predict and learn, us per
sample, median of 5 runs of 5,000 samples after 1,000 warm-up samples. About 15 s.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from streamlearn.config import parse_config
from streamlearn.stream import Slot


def one_run(linear_copies: int, seed: int) -> tuple[float, float]:
    cfg = parse_config({"streams": [{
        "name": "s", "topic": "s/#", "features": [f"f{i}" for i in range(8)], "label": {"field": "y"},
        "schedule": {"linear_copies": linear_copies},
    }]}).streams[0]
    slot = Slot("d", cfg)
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(6000, 8)).tolist()
    ys = (rng.normal(size=6000) + np.asarray(values)[:, 0] * 2.0).tolist()
    for i in range(1000):
        x = slot.features_for("d", values[i])
        slot.learn(x, ys[i], slot.predict(x))
    predict = learn = 0.0
    for i in range(1000, 6000):
        x = slot.features_for("d", values[i])
        t0 = time.perf_counter()
        p = slot.predict(x)
        t1 = time.perf_counter()
        slot.learn(x, ys[i], p)
        learn += time.perf_counter() - t1
        predict += t1 - t0
    return predict / 5000 * 1e6, learn / 5000 * 1e6


def main() -> None:
    runs: dict[int, list[tuple[float, float]]] = {0: [], 5: []}
    for seed in range(5):
        for linear_copies in runs:  # alternating, so that both see the same machine
            runs[linear_copies].append(one_run(linear_copies, seed))
    for linear_copies, r in runs.items():
        print(f"linear_copies {linear_copies}: predict {statistics.median(p for p, _ in r):.1f} us, "
              f"learn {statistics.median(lr for _, lr in r):.1f} us per sample")


if __name__ == "__main__":
    main()
