"""Offline per-sample cost of the fused learner against the naive torch loop (and deep-river if installed).

    python benchmarks/learner.py            # full run (about 2 min), reports/bench-learner.json
    python benchmarks/learner.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamlearn.bench.learner import run_learner_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 samples, one repeat")
    parser.add_argument("--out", type=Path, default=Path("reports/bench-learner.json"))
    parser.add_argument("-n", type=int, default=None, help="samples per timed run (default 5000)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    args = parser.parse_args()
    run_learner_bench(out_json=args.out, quick=args.quick, n=args.n, repeats=args.repeats)


if __name__ == "__main__":
    main()
