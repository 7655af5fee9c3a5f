"""Population-policy variants on the streams where the default is weakest (README, accuracy).

    python benchmarks/population_variants.py [--streams sea,hyperplane,rbf,agrawal]

Runs the default population policy and three variants (switch margin 0.1, scoring
by loss instead of error rate, a slower average alpha 0.005) against the fixed
rates 0.03, 0.1 and 0.3, three seeds, 10,000 samples, through the same
``run_accuracy`` as ``streamlearn bench accuracy``; prints the mean error per stream.
About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse

from streamlearn.bench.accuracy import run_accuracy

VARIANTS = {
    "population": {"policy": "population"},
    "margin 0.1": {"policy": "population", "margin": 0.1},
    "by loss": {"policy": "population", "by_error": False},
    "alpha 0.005": {"policy": "population", "alpha": 0.005},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="sea,hyperplane,rbf,agrawal")
    args = parser.parse_args()
    streams = args.streams.split(",")
    report = run_accuracy(streams=streams, policies=VARIANTS, grid=(0.03, 0.1, 0.3), river=False)
    for stream in streams:
        row = report.summary["table"][stream]
        print(stream, "  ".join(f"{name}: {v['error']:.5g}" for name, v in row.items()))


if __name__ == "__main__":
    main()
