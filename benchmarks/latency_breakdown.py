"""Where the publish-to-prediction time goes at a fixed rate: in front of the agent or elsewhere.

    python benchmarks/latency_breakdown.py [--rate 1000] [--seconds 15] [--repeats 2] [store.key=value ...]

Runs the agent as ``streamlearn bench throughput`` does (its own Mosquitto on a free
port, C load generator, replies collected by mosquitto_sub), at one fixed rate, and
prints per run the end-to-end latency (publish to prediction received) beside the
wait in front of the agent's thread: the ``latency_ms`` each prediction carries, from
paho's callback handing the reading over to the agent's thread starting on it; and the
agent process's CPU per message, whole and split by thread (the agent's loop runs on
the main thread; the busiest other one is paho's network thread). Store
settings that differ from the shipped defaults can be given as ``key=value`` (for
example ``synchronous=normal``, ``checkpoint_every_messages=1000000``), agent settings
as ``agent.key=value`` (``agent.micro_batch_backlog=32``), MQTT settings as
``mqtt.key=value`` (``mqtt.network_loop=agent``). About 40 s a run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import orjson

from streamlearn.bench.common import parse_settings
from streamlearn.bench.throughput import Settings, bench_context, latency_runs


def in_agent_waits(workdir: Path) -> np.ndarray:
    """``latency_ms`` of the timed readings' predictions (warm-up ones left out)."""
    replies = sorted(workdir.glob("agent*-replies.txt"))[-1]
    out = []
    with open(replies, "rb") as fh:
        for line in fh:
            _, _, payload = line.partition(b" ")
            if b'"latency_ms"' not in payload:
                continue
            body = orjson.loads(payload)
            if "w|" not in str(body.get("id")):  # the warm-up boot ids end in "w"
                out.append(float(body["latency_ms"]))
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("store", nargs="*", help="store settings as key=value, agent settings as agent.key=value")
    args = ap.parse_args()
    store = parse_settings(args.store)
    settings = Settings(repeats=1, rates=(args.rate,), rate_seconds={args.rate: args.seconds},
                        latency_variant=False)
    for run in range(args.repeats):
        workdir = Path(tempfile.mkdtemp(prefix="streamlearn-latency-"))
        try:
            with bench_context(workdir, settings) as ctx:
                r = latency_runs(ctx, "agent", **store)[0]
                waits = in_agent_waits(workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        e2e = r["latency"]
        print(f"run {run + 1}: {args.rate} msg/s, {e2e['n']} readings; publish to prediction p50 {e2e['p50_ms']} "
              f"p99 {e2e['p99_ms']} p99.9 {e2e['p99_9_ms']} ms; wait in front of the agent's thread p50 "
              f"{np.percentile(waits, 50):.3f} p99 {np.percentile(waits, 99):.3f} p99.9 "
              f"{np.percentile(waits, 99.9):.3f} ms; agent CPU {r['cpu_us_per_msg']} us/msg (its loop's thread "
              f"{r['main_thread_cpu_us_per_msg']}, the busiest others {r['other_threads_cpu_us_per_msg']})")


if __name__ == "__main__":
    main()
