"""What one reading costs the agent's thread when readings arrive one at a time, back to back
and with the thread idle between them.

    python benchmarks/steady_rate_cost.py [--readings 3000] [--gaps 0 1 2 5] [--repeats 3]

The real Agent over a MemoryTransport and a real SQLite store (shipped settings), as
``benchmarks/stages.py`` runs it: each reading is taken as a batch of its own and
committed before the next one is injected, as at a steady rate below the agent's
capacity. Between readings the thread sleeps ``gap`` ms. Prints the thread's CPU time
(``time.thread_time``) per reading, median of the repeats, for each gap side by side
in one run, and the ratio to the back-to-back figure. paho's network thread is not
in these figures (``benchmarks/latency_breakdown.py`` prints the whole process's CPU
per message at a fixed rate over MQTT). About 2 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from streamlearn.bench.common import make_messages
from streamlearn.bench.stages import _make_agent, _warm


def one_run(workdir: Path, readings: int, gap_s: float, seed: int) -> float:
    """Thread CPU (us) per reading, each reading alone in its batch and commit."""
    agent, transport = _make_agent(workdir / "s.db")
    try:
        _warm(agent, transport, devices=3, n=1000)
        messages = make_messages(readings, 3, boot=f"steady{seed}", seed=seed)
        processed0 = agent.counters["processed"]
        cpu0 = time.thread_time()
        for topic, payload in messages:
            transport.inject(topic, payload)
            agent.step(timeout=0.0)
            agent.commit_group()
            if gap_s:
                time.sleep(gap_s)
        cpu = time.thread_time() - cpu0
        assert agent.counters["processed"] - processed0 == readings, agent.counters
        return cpu / readings * 1e6
    finally:
        agent.store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=3000, help="timed readings per run (default 3000)")
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.0, 1.0, 2.0, 5.0],
                        help="idle time between readings, ms (default 0 1 2 5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per gap, interleaved (default 3)")
    args = parser.parse_args()
    results: dict[float, list[float]] = {g: [] for g in args.gaps}
    for rep in range(args.repeats):
        for gap in args.gaps:  # interleaved: the machine's load of the same minutes falls on every gap
            workdir = Path(tempfile.mkdtemp(prefix="streamlearn-steady-"))
            try:
                results[gap].append(one_run(workdir, args.readings, gap / 1000.0, seed=rep))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            print(f"repeat {rep + 1} gap {gap:g} ms: {results[gap][-1]:.0f} us/reading", flush=True)
    base = statistics.median(results[args.gaps[0]])
    print(f"\n{'gap ms':>7} {'thread CPU us/reading':>22} {'ratio':>6}   runs")
    for gap in args.gaps:
        med = statistics.median(results[gap])
        print(f"{gap:7g} {med:22.0f} {med / base:6.2f}   {', '.join(f'{v:.0f}' for v in results[gap])}")


if __name__ == "__main__":
    main()
