"""What the shared-table Properties (streamlearn/transport/paho_speedups.py) save, side by side.

    python benchmarks/paho_properties.py [--repeats 5] [--n 20000]

Runs the transport figures of ``streamlearn bench throughput --sections profile``
(``streamlearn.bench.stages.transport_costs``: the agent's MqttTransport draining
``n`` queued QoS 1 readings with manual acks, then publishing ``n`` QoS 1 predictions;
CPU of this process, paho's network thread included, per message) against a private
Mosquitto, alternately with paho's own ``Properties`` and with the patch, and prints
the medians and the within-repeat ratios. About 10 s a run. First it times what paho
does per PUBLISH and per PUBACK it reads, ``Properties(...)`` then ``unpack`` of an
empty property block, both ways (best of 5 x 20,000).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import timeit
from pathlib import Path

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamlearn.bench.stages import transport_costs
from streamlearn.transport import paho_speedups
from streamlearn.transport.broker import MosquittoProcess

KEYS = ("receive_ack_us_per_msg", "publish_us_per_msg")


def one_run(port: int, workdir: Path, n: int, patched: bool) -> dict[str, float]:
    install = paho_speedups.install
    if not patched:
        paho_speedups.uninstall()
        paho_speedups.install = lambda: False  # type: ignore[assignment]  # MqttTransport installs it
    try:
        out = transport_costs(port, workdir, n)
    finally:
        paho_speedups.install = install  # type: ignore[assignment]
    if out.get("received") != n or out.get("publish_dropped"):
        raise RuntimeError(f"incomplete run: {out}")
    return {k: float(out[k]) for k in KEYS}


def per_object_us(patched: bool) -> float:
    """What paho spends on the properties of one packet it reads (us)."""
    was = paho_speedups.installed()
    paho_speedups.uninstall()
    if patched:
        paho_speedups.install()
    try:
        return min(timeit.repeat(lambda: Properties(PacketTypes.PUBLISH).unpack(b"\x00"),
                                 number=20_000, repeat=5)) / 20_000 * 1e6
    finally:
        paho_speedups.uninstall()
        if was:
            paho_speedups.install()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=20_000)
    args = ap.parse_args()
    print(f"Properties of one packet read: paho alone {per_object_us(False):.2f} us, "
          f"patched {per_object_us(True):.2f} us", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="streamlearn-paho-"))
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    try:
        with MosquittoProcess(workdir=workdir / "broker") as broker:
            for rep in range(args.repeats):
                for patched in (False, True) if rep % 2 == 0 else (True, False):
                    r = one_run(broker.port, workdir, args.n, patched)
                    runs[patched].append(r)
                    print(f"repeat {rep + 1} {'patched' if patched else 'paho alone'}: "
                          + ", ".join(f"{k} {v}" for k, v in r.items()), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nCPU us per message, medians of {args.repeats} repeats (patched / paho alone within each repeat)")
    for key in KEYS:
        alone = statistics.median(r[key] for r in runs[False])
        ours = statistics.median(r[key] for r in runs[True])
        ratio = statistics.median(p[key] / a[key] for p, a in zip(runs[True], runs[False]))
        print(f"  {key}: paho alone {alone:.1f}, patched {ours:.1f} (x{ratio:.2f})")


if __name__ == "__main__":
    main()
