"""The compact model's kinds under the default population policy: MLP and linear copies
(the default), MLP copies only, linear copies only.

    python benchmarks/model_variants.py [--streams sea,hyperplane,rbf,agrawal]

Runs the population policy three ways, and river's StandardScaler + linear model,
three seeds, 10,000 samples, through the same ``run_accuracy`` as ``streamlearn
bench accuracy`` (the benchmark builds every model as the default MLP; here a variant
rewrites the model and schedule sections of the config it parses); prints the mean
prequential error per stream. About 2 minutes on 2 cores. It shows what each kind
does alone on the linear concepts (sea, hyperplane) and on the others, and what
choosing between them costs.
"""

from __future__ import annotations

import argparse
from typing import Any

import streamlearn.config as config_module
from streamlearn.bench.accuracy import run_accuracy

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "MLP + linear (default)": ("mlp", {}),
    "MLP only": ("mlp", {"linear_copies": 0}),
    "linear only": ("linear", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="sea,hyperplane,rbf,agrawal")
    args = parser.parse_args()
    streams = args.streams.split(",")
    parse = config_module.parse_config
    rows: dict[str, dict[str, float]] = {s: {} for s in streams}
    for i, (variant, (kind, schedule)) in enumerate(VARIANTS.items()):

        def parse_as(data: dict[str, Any], kind: str = kind, schedule: dict[str, Any] = schedule) -> Any:
            for stream in data["streams"]:
                stream["model"] = {"kind": kind, "seed": stream["model"]["seed"]}
                stream["schedule"] = {**stream["schedule"], **schedule}
            return parse(data)

        config_module.parse_config = parse_as  # read when the benchmark builds each model
        try:
            report = run_accuracy(streams=streams, policies={"population": {"policy": "population"}},
                                  grid=(0.1,), river=i == 0)
        finally:
            config_module.parse_config = parse
        for stream in streams:
            table = report.summary["table"][stream]
            rows[stream][f"population, {variant}"] = table["population"]["error"]
            if i == 0:
                rows[stream]["river linear"] = table["river linear"]["error"]
    for stream, row in rows.items():
        print(stream, "  ".join(f"{name}: {value:.5g}" for name, value in row.items()))


if __name__ == "__main__":
    main()
