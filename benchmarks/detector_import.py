"""How long building the default drift detectors takes in a fresh process, against importing
river.drift in full (its package init imports every detector, KSWIN's scipy.stats among them).

    python benchmarks/detector_import.py [--repeats 3]

Each repeat runs in a new interpreter, so nothing is imported yet; prints both times per
repeat and their medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

PROBE = """
import time
t = time.perf_counter()
from streamlearn.monitors import RiverDetector
detectors = [RiverDetector(name) for name in ("page_hinkley", "hddm_a", "adwin")]
own = time.perf_counter() - t
import river.drift
river.drift.KSWIN
print(own, time.perf_counter() - t)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    own, full = [], []
    for rep in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
        a, b = (float(v) for v in out.stdout.split())
        own.append(a)
        full.append(b)
        print(f"repeat {rep + 1}: default detectors {a:.2f} s; then river.drift in full {b:.2f} s in all")
    print(f"median: default detectors {statistics.median(own):.2f} s, "
          f"with river.drift's package init {statistics.median(full):.2f} s")


if __name__ == "__main__":
    main()
