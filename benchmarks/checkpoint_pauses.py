"""How long checkpoints hold up message handling, in process: the figures of the stall target.

    python benchmarks/checkpoint_pauses.py [--runs 3] [--models 100,1000] [--readings 10000]

Three parts, each run ``--runs`` times (the disk's speed moves from run to run here):

0. Steady: ``streamlearn.bench.stages.checkpoint_pauses_steady``, readings round-robin
   over ``models`` devices one at a time through the real Agent and store, for ten
   checkpoint intervals after ``checkpoint_replay_max`` readings: the pauses the
   checkpoints recorded, the longest of the agent's steps with a checkpoint step in
   them and without, and the models and bytes each checkpoint wrote; side by side,
   the shipped setting (an interval's checkpoint leaves models behind) and every
   changed model every interval (``checkpoint_models_max`` above the model count).

1. Many changed models: ``streamlearn.bench.stages.checkpoint_stalls`` (what
   ``streamlearn bench throughput --sections profile`` prints), a checkpoint of
   ``models`` changed per-device models written in steps by the agent's own code
   over a real SQLite store, 5 times; the longest pause (begin, or one step with
   its COMMIT) per checkpoint, and the p99 of every pause.
2. A store that has been running long: the real Agent over a MemoryTransport, one
   model, the shipped ``inbox_retention`` (100,000): that many readings handed over
   in batches of 512, then ``readings`` more one at a time (each its own batch, as
   at a steady rate), so that, as on any gateway after its first 100,000 readings,
   every checkpoint finds a whole interval of rows past the retention. Prints the
   ``duration_ms`` those checkpoints recorded (their longest step).

About 80 s a run.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
from pathlib import Path
from typing import Any

from streamlearn.bench.common import make_messages
from streamlearn.bench.stages import _make_agent, checkpoint_pauses_steady, checkpoint_stalls


def long_running_store(workdir: Path, readings: int) -> dict[str, Any]:
    store_path = workdir / "long.db"
    agent, transport = _make_agent(store_path)  # the benchmarks' agent: shipped defaults, one stream
    cfg = agent.config
    retention = cfg.store.inbox_retention
    messages = make_messages(retention + readings, 1, boot="long")
    for i in range(0, retention, 512):
        for topic, payload in messages[i:min(i + 512, retention)]:
            transport.inject(topic, payload)
        agent.step(timeout=0.0)
        agent.commit_group()
    for topic, payload in messages[retention:]:
        transport.inject(topic, payload)
        agent.step(timeout=0.0)
    agent.commit_group()
    agent.store.close()
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT position, duration_ms FROM checkpoints WHERE reason = 'interval'"
                            " ORDER BY id").fetchall()
    finally:
        conn.close()
    past = sorted(d for position, d in rows if position > retention + cfg.store.checkpoint_every_messages)
    return {"checkpoints": len(past), "median_ms": round(statistics.median(past), 3) if past else None,
            "max_ms": round(max(past), 3) if past else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", default="100,1000", help="comma-separated counts of changed models")
    ap.add_argument("--readings", type=int, default=10_000, help="handed over one at a time, after the first"
                    " inbox_retention in batches")
    args = ap.parse_args()
    counts = [int(m) for m in args.models.split(",") if m]
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="streamlearn-ckp-") as tmp:
            workdir = Path(tmp)
            parts = []
            for models in counts:
                for leave in (True, False):
                    r = checkpoint_pauses_steady(workdir, models, leave_behind=leave)
                    print(f"run {run}: steady, {models} models, {'leaving models behind' if leave else 'every model'}:"
                          f" {r['checkpoints']} checkpoints of {r['models_written_median']} models /"
                          f" {r['bytes_written_median'] / 1e6:.2f} MB (median), recorded pause median"
                          f" {r['pause_ms_median']} max {r['pause_ms_max']} ms; agent steps with a checkpoint step"
                          f" p99 {r['step_ms_with_checkpoint_p99']} max {r['step_ms_with_checkpoint_max']} ms,"
                          f" without p99 {r['step_ms_without_p99']} max {r['step_ms_without_max']} ms;"
                          f" {r['steps_over_5ms']} of {r['steps']} steps over 5 ms; writer held off"
                          f" {r['writer_busy']} times; a restart replays at most {r['replay_rows_max']} rows",
                          flush=True)
            for models in counts:
                r = checkpoint_stalls(workdir, models)
                parts.append(f"{models} models: longest pause median {r['stall_ms_median']} max {r['stall_ms_max']}"
                             f" ms, every pause p99 {r['pause_ms_p99']} ms")
            r = long_running_store(workdir, args.readings)
            parts.append(f"inbox past its retention: {r['checkpoints']} checkpoints, longest step median"
                         f" {r['median_ms']} max {r['max_ms']} ms")
        print(f"run {run}: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
