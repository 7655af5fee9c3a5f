"""Performance benchmarks (issue 5): throughput, latency, footprint, learner cost.

Entry points (each prints a table, writes JSON and returns the results):

* :func:`run_throughput`: the agent against the echo ceiling over a private
  Mosquitto (flood, fixed-rate latency, backlog drain, 1/100/1,000 devices) and
  the per-stage profile;
* :func:`run_learner_bench`: offline per-sample cost of the fused learner
  against the naive torch loop (and deep-river when installed);
* :func:`run_profile`: only the in-process per-stage profile.

Imports are deferred so that importing this package stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_throughput(out_json: Path | None = Path("reports/bench-throughput.json"), quick: bool = False,
                   **kwargs: Any) -> dict[str, Any]:
    from streamlearn.bench.throughput import run_throughput as run

    return run(out_json=out_json, quick=quick, **kwargs)


def run_learner_bench(out_json: Path | None = Path("reports/bench-learner.json"), quick: bool = False,
                      **kwargs: Any) -> dict[str, Any]:
    from streamlearn.bench.learner import run_learner_bench as run

    return run(out_json=out_json, quick=quick, **kwargs)


def run_profile(out_json: Path | None = Path("reports/bench-profile.json"), quick: bool = False,
                **kwargs: Any) -> dict[str, Any]:
    from streamlearn.bench.stages import run_profile as run

    return run(out_json=out_json, quick=quick, **kwargs)


__all__ = ["run_learner_bench", "run_profile", "run_throughput"]
