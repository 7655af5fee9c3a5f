"""The compact model's kind under the default population policy: MLP (the default) or linear.

    python benchmarks/model_variants.py [--streams sea,hyperplane,rbf,agrawal]

Runs the population policy with ``model.kind = "mlp"`` (hidden [32, 32]) and with
``model.kind = "linear"``, and river's StandardScaler + linear model, three seeds,
10,000 samples, through the same ``run_accuracy`` as ``streamlearn bench accuracy``
(the benchmark builds every model as an MLP; here a variant rewrites the model
section of the config it parses); prints the mean prequential error per stream.
About 4 minutes on 2 cores. It shows where the MLP's shortfall against river's
linear models on the linear concepts (sea, hyperplane) comes from, and what a
linear model costs on the others.
"""

from __future__ import annotations

import argparse
from typing import Any

import streamlearn.config as config_module
from streamlearn.bench.accuracy import run_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="sea,hyperplane,rbf,agrawal")
    args = parser.parse_args()
    streams = args.streams.split(",")
    parse = config_module.parse_config
    rows: dict[str, dict[str, float]] = {s: {} for s in streams}
    for kind in ("mlp", "linear"):

        def parse_as(data: dict[str, Any], kind: str = kind) -> Any:
            for stream in data["streams"]:
                stream["model"] = {"kind": kind, "seed": stream["model"]["seed"]}
            return parse(data)

        config_module.parse_config = parse_as  # read when the benchmark builds each model
        try:
            report = run_accuracy(streams=streams, policies={"population": {"policy": "population"}},
                                  grid=(0.1,), river=kind == "mlp")
        finally:
            config_module.parse_config = parse
        for stream in streams:
            table = report.summary["table"][stream]
            rows[stream][f"population, {kind}"] = table["population"]["error"]
            if kind == "mlp":
                rows[stream]["river linear"] = table["river linear"]["error"]
    for stream, row in rows.items():
        print(stream, "  ".join(f"{name}: {value:.5g}" for name, value in row.items()))


if __name__ == "__main__":
    main()
