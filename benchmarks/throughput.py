"""Throughput, latency, backlog, scale and per-stage profile of the agent against the echo ceiling.

    python benchmarks/throughput.py                    # full run (15-20 min), reports/bench-throughput.json
    python benchmarks/throughput.py --quick            # smoke test (about 1.5 min)
    python benchmarks/throughput.py --sections flood,latency --repeats 5
    python benchmarks/throughput.py --learner-json reports/bench-learner.json   # add the learner target row
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamlearn.bench.throughput import run_throughput

SECTIONS = ("flood", "latency", "backlog", "scale", "profile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one repeat")
    parser.add_argument("--out", type=Path, default=Path("reports/bench-throughput.json"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--learner-json", type=Path, default=None)
    parser.add_argument("--keep-workdir", action="store_true", help="keep stores, configs, logs and reply files")
    args = parser.parse_args()
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {sorted(unknown)}")
    run_throughput(out_json=args.out, quick=args.quick, sections=sections, repeats=args.repeats,
                   keep_workdir=args.keep_workdir, learner_json=args.learner_json)


if __name__ == "__main__":
    main()
