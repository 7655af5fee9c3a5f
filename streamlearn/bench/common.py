"""Shared pieces of the benchmarks: the benchmark stream, process figures, reporting.

Nothing here imports torch, paho or the agent; the benchmark modules do.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

N_FEATURES = 8
FEATURES = [f"f{i}" for i in range(N_FEATURES)]
TOPIC = "sensors/bench"  # one topic: the device id is a payload field (one publisher process feeds it)
STREAM = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the benchmark stream ----------------------------------------------------------


def device_name(i: int) -> str:
    return f"d{i:04d}"


def make_messages(n: int, devices: int = 1, boot: str = "b0", seed: int = 0,
                  start: int = 0) -> list[tuple[str, bytes]]:
    """``n`` readings ``(topic, payload)``, round-robin over ``devices``.

    Each payload (about 200 bytes of JSON) holds the device id, 8 features, a
    regression target ``y`` (a fixed smooth function of the features plus noise)
    and an id ``boot``/``seq``; ``seq`` runs from ``start`` over all devices, so
    ``boot|seq`` is unique within one call.

    >>> topic, payload = make_messages(1, boot="x")[0]
    >>> topic, sorted(orjson.loads(payload))[:4]
    ('sensors/bench', ['boot', 'device', 'f0', 'f1'])
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_FEATURES)) * 3.0 + 20.0
    z = (X - 20.0) / 3.0
    y = 10.0 + 3.0 * np.tanh(z[:, 0]) - z[:, 1] ** 2 + 0.5 * z[:, 2] * z[:, 3] + rng.normal(0, 0.1, size=n)
    names = [device_name(d) for d in range(devices)]
    out = []
    for i in range(n):
        body: dict[str, Any] = {"boot": boot, "seq": start + i, "device": names[i % devices]}
        for j, f in enumerate(FEATURES):
            body[f] = round(float(X[i, j]), 4)
        body["y"] = round(float(y[i]), 4)
        out.append((TOPIC, orjson.dumps(body)))
    return out


def learner_stream(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The offline learner benchmark stream: standardised 8-d inputs, a regression target."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    Y = 10 + 3 * np.tanh(X[:, 0]) - X[:, 1] ** 2 + 0.5 * X[:, 2] * X[:, 3] + rng.normal(0, 0.1, size=n)
    return X, Y.astype(np.float64)


def parse_settings(args: list[str]) -> dict[str, Any]:
    """``key=value`` texts (as benchmark scripts take them) as :func:`agent_config` overrides:
    numbers as numbers, ``true``/``false`` as booleans, anything else as text."""
    out: dict[str, Any] = {}
    for arg in args:
        key, _, text = arg.partition("=")
        value: Any = {"true": True, "false": False}.get(text.strip(), text.strip())
        for cast in (int, float):
            try:
                value = cast(text)
                break
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def agent_config(store: Path, port: int, gateway: str, client_id: str, **overrides: Any) -> dict[str, Any]:
    """The agent config of the benchmarks: shipped defaults, one 8-32-32-1 regression stream.

    Only what a benchmark must set differs from the defaults: broker, client id,
    gateway (unique per run, so topics of runs never mix) and the store path.
    ``overrides``: settings of a what-if variant, store settings by name, agent and MQTT
    settings as ``agent.<name>`` (``agent.micro_batch_backlog``) and ``mqtt.<name>``
    (``mqtt.network_loop``).
    """
    agent: dict[str, Any] = {"gateway": gateway}
    mqtt: dict[str, Any] = {"host": "127.0.0.1", "port": port, "client_id": client_id}
    store_keys: dict[str, Any] = {}
    for key, value in overrides.items():
        if key.startswith("agent."):
            agent[key.removeprefix("agent.")] = value
        elif key.startswith("mqtt."):
            mqtt[key.removeprefix("mqtt.")] = value
        else:
            store_keys[key] = value
    return {
        "agent": agent,
        "mqtt": mqtt,
        "store": {"path": str(store), **store_keys},
        "streams": [{
            "name": STREAM,
            "topic": TOPIC,
            "device": {"field": "device"},
            "features": list(FEATURES),
            "task": "regression",
            "label": {"source": "payload", "field": "y"},
            "id_fields": ["boot", "seq"],
            "sequence_field": "seq",
            "model": {"kind": "mlp", "hidden": [32, 32]},
            "optimizer": {"name": "sgd", "lr": 0.01},
        }],
    }


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for :func:`agent_config` (tables, arrays of tables, inline values).

    >>> print(to_toml({"a": {"x": 1}, "s": [{"n": "b", "d": {"f": "x"}, "model": {"k": [1, 2]}}]}).strip())
    [a]
    x = 1
    <BLANKLINE>
    [[s]]
    n = "b"
    d = { f = "x" }
    <BLANKLINE>
    [s.model]
    k = [1, 2]
    """
    lines: list[str] = []

    def table(header: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        lines.append(header)
        subs: list[tuple[str, dict[str, Any]]] = []
        for k, v in body.items():
            if isinstance(v, dict) and k in ("model", "optimizer", "schedule"):
                subs.append((k, v))
            else:
                lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
        return subs

    for key, value in data.items():
        if isinstance(value, list):
            for item in value:
                subs = table(f"[[{key}]]", item)
                for sk, sv in subs:
                    table(f"[{key}.{sk}]", sv)
        else:
            table(f"[{key}]", value)
    return "\n".join(lines)


def write_agent_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(to_toml(data))
    return path


# -- process figures ---------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB ({} when it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _stat_cpu_seconds(path: str) -> float | None:
    """utime + stime (seconds) from a /proc ``stat`` file (None when it is gone)."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (seconds), from /proc/<pid>/stat."""
    return _stat_cpu_seconds(f"/proc/{pid}/stat")


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime of each thread of a process (seconds), by thread id ({} when it is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    out = {int(tid): _stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat") for tid in tids}
    return {tid: s for tid, s in out.items() if s is not None}  # (a thread that ended meanwhile)


def system_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            parts = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return (0.0, 0.0)
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)  # idle + iowait
    total = sum(parts[:8])  # guest time is already counted in user
    return ((total - idle) / CLK_TCK, total / CLK_TCK)


class CpuMeter:
    """CPU used by named processes and by everything else on the machine over an interval.

    ``other_cores`` is the background load (other users of this shared box) in
    cores: it says how much of the 2 cores the measured processes did not have.
    ``threads_of``: the name of one process whose CPU is also split by thread (its
    main thread, then the others, busiest first).
    """

    def __init__(self, pids: dict[str, int], threads_of: str | None = None) -> None:
        self.pids = pids
        self.threads_of = threads_of
        self._t0 = time.monotonic()
        self._sys0 = system_cpu_seconds()[0]
        self._own0 = {k: proc_cpu_seconds(p) for k, p in pids.items()}
        self._threads0 = thread_cpu_seconds(pids[threads_of]) if threads_of else {}

    def stop(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self._t0)
        busy = system_cpu_seconds()[0] - self._sys0
        own = {}
        for k, p in self.pids.items():
            a, b = self._own0.get(k), proc_cpu_seconds(p)
            own[k] = None if a is None or b is None else b - a
        ours = sum(v for v in own.values() if v is not None)
        threads: dict[str, Any] = {}
        if self.threads_of:
            pid = self.pids[self.threads_of]
            used = {tid: s - self._threads0.get(tid, 0.0) for tid, s in thread_cpu_seconds(pid).items()}
            threads = {"main": round(used.pop(pid, 0.0), 3),
                       "others": sorted((round(v, 3) for v in used.values() if v > 0), reverse=True)}
        return {
            "elapsed_s": round(elapsed, 3),
            "threads_cpu_s": threads,
            "machine_busy_cores": round(busy / elapsed, 2),
            "cores": {k: (None if v is None else round(v / elapsed, 2)) for k, v in own.items()},
            "other_cores": round(max(0.0, busy - ours) / elapsed, 2),
            "cpu_s": {k: (None if v is None else round(v, 3)) for k, v in own.items()},
        }


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# -- statistics ----------------------------------------------------------------------


def percentile(sorted_values: list[float] | np.ndarray, q: float) -> float | None:
    """The q-th percentile (0-100) of sorted values, nearest rank."""
    n = len(sorted_values)
    if n == 0:
        return None
    k = max(0, min(n - 1, math.ceil(q / 100.0 * n) - 1))
    return float(sorted_values[k])


def latency_summary(latencies_s: list[float] | np.ndarray) -> dict[str, float | int | None]:
    """p50/p90/p99/p99.9/max in milliseconds."""
    arr = np.sort(np.asarray(latencies_s, dtype=np.float64)) * 1000.0
    return {
        "n": int(len(arr)),
        "p50_ms": _r(percentile(arr, 50)),
        "p90_ms": _r(percentile(arr, 90)),
        "p99_ms": _r(percentile(arr, 99)),
        "p99_9_ms": _r(percentile(arr, 99.9)),
        "max_ms": _r(float(arr[-1]) if len(arr) else None),
    }


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def median(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def spread(values: list[Any]) -> list[float]:
    """The values, rounded, for the JSON (so a reader sees the noise)."""
    return [round(float(v), 4) for v in values if v is not None]


# -- reporting -------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """What the figures were measured on."""
    root = Path(__file__).resolve().parents[2]
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "label": os.environ.get("STREAMLEARN_BENCH_LABEL"),
        "code_root": str(root),
        "commit": commit,
        "working_tree_modified": dirty,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
        "numpy": np.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                                  | orjson.OPT_NON_STR_KEYS))


def fmt(value: Any, nd: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{nd}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("[green]met[/green]" if ok else "[red]missed[/red]")


def console() -> Any:
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=160)
