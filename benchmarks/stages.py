"""Per-stage profile of the agent's message path (in-process; starts its own Mosquitto for paho costs).

    python benchmarks/stages.py            # reports/bench-profile.json
    python benchmarks/stages.py --quick
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamlearn.bench.stages import run_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("reports/bench-profile.json"))
    parser.add_argument("-n", type=int, default=None, help="messages per stage run (default 20000)")
    args = parser.parse_args()
    run_profile(out_json=args.out, quick=args.quick, n=args.n)


if __name__ == "__main__":
    main()
