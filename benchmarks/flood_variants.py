"""The agent's flood throughput under settings that differ, side by side in one run.

    python benchmarks/flood_variants.py [--repeats 3] [--n 30000] VARIANT [VARIANT ...]

A VARIANT is a comma-separated list of settings that differ from the shipped
configuration, store settings as ``key=value``, agent settings as
``agent.key=value`` and MQTT settings as ``mqtt.key=value`` (``""`` is the
shipped configuration), for example::

    python benchmarks/flood_variants.py agent.micro_batch_size_max=8 agent.micro_batch_size_max=32

Each repeat runs every variant in turn through the flood of ``streamlearn bench
throughput`` (its own Mosquitto on a free port, the C load generator, ``n`` QoS 1
readings as fast as the broker takes them after a 2,000-reading warm-up; every
reading answered, learned and committed, or the run fails). Prints per variant the
medians over the repeats of messages/s, of the agent process's CPU per message and
of the longest pause a checkpoint recorded (its step's time in the agent's loop, as
the one-model stall target is judged in a flood), and each one's ratio to the first
variant within each repeat. About 20 s a run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from streamlearn.bench.common import parse_settings
from streamlearn.bench.throughput import Settings, bench_context, flood_run

KEYS = ("msgs_per_s", "cpu_us_per_msg", "checkpoint_ms_max")


def one_run(overrides: dict[str, Any], n: int) -> dict[str, float]:
    settings = Settings(repeats=1)
    workdir = Path(tempfile.mkdtemp(prefix="streamlearn-variants-"))
    try:
        with bench_context(workdir, settings) as ctx:
            r = flood_run(ctx, "agent", n, settings.flood_warmup, **overrides)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not (r["complete"] and r["all_learned"] and r["all_committed"]):
        raise RuntimeError(f"{overrides}: the flood did not complete: {r}")
    return {"msgs_per_s": float(r["msgs_per_s"]), "cpu_us_per_msg": float(r["cpu_us_per_msg"]),
            "checkpoint_ms_max": float(r["store"]["checkpoint_ms_max"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("variants", nargs="+", help='settings as key=value,agent.key=value ("" = shipped)')
    args = ap.parse_args()
    variants = [parse_settings([p for p in v.split(",") if p.strip()]) for v in args.variants]
    runs: list[list[dict[str, float]]] = [[] for _ in variants]
    for rep in range(args.repeats):
        for i, overrides in enumerate(variants):
            r = one_run(overrides, args.n)
            runs[i].append(r)
            print(f"repeat {rep + 1} {args.variants[i] or 'shipped'}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)
    print(f"\nmedians of {args.repeats} repeats (ratio to the first variant within each repeat, median)")
    for i, name in enumerate(args.variants):
        cells = []
        for key in KEYS:
            value = statistics.median(r[key] for r in runs[i])
            ratio = statistics.median(r[key] / b[key] for r, b in zip(runs[i], runs[0]))
            cells.append(f"{key} {value:.4g} (x{ratio:.2f})")
        print(f"  {name or 'shipped'}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
