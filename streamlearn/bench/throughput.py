"""``bench throughput``: the agent against the echo ceiling, over a real Mosquitto, in one run.

Everything runs on 127.0.0.1 against a private Mosquitto with the shipped gateway
config, started here on a free port. The consumers are the agent
(``python -m streamlearn run -c CONFIG``, shipped defaults but for broker, ids and
store path) and the echo (:mod:`streamlearn.bench.echo`); the load is Mosquitto's
C clients (:mod:`streamlearn.bench.loadgen`), so the load generator costs little
of the 2 cores. Every process started here is stopped by its PID, every broker
session it leaves is deleted, every wait is bounded.

Sections (figures are medians over the repeats; echo and agent runs alternate,
and ratios are taken within a repeat):

``flood``    echo and agent each fed the same QoS 1 stream as fast as the broker
             accepts it: messages/s with a reply for every message; consumer, broker
             and load-generator CPU per message; peak RSS; the background load of
             the machine; for the agent, every message learned (store metrics) and
             committed (checkpoint position = last inbox row), checkpoint durations.
``latency``  publish -> reply received at 100, 1,000 and 5,000 msg/s (learning on),
             p50/p99/p99.9; plus one agent run with ``store.synchronous = "normal"`` and one
             with ``mqtt.network_loop = "thread"`` (paho's network thread, the default before).
``backlog``  100,000 readings queued by the broker for the stopped consumer's
             session; then it starts: time to the last reply, and for the agent the
             time until its inbox holds every reading.
``scale``    1, 100 and 1,000 devices with a model each: throughput, peak RSS,
             checkpoint durations and sizes.
``profile``  in-process per-stage costs (:mod:`streamlearn.bench.stages`).

CPU per message (``/proc/<pid>/stat``) is the figure least disturbed by other
load on a shared machine; wall-clock rates are not, so the background load
(cores busy with processes not started here) is recorded with every run.
"""

from __future__ import annotations

import abc
import ast
import os
import queue
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from streamlearn.bench import echo as echo_mod
from streamlearn.bench.loadgen import Collector, Feeder
from streamlearn.bench.procs import Child, StatusWatcher, drop_session
from streamlearn.bench.common import (
    STREAM,
    CpuMeter,
    agent_config,
    console,
    environment,
    fmt,
    latency_summary,
    make_messages,
    median,
    proc_cpu_seconds,
    proc_status,
    spread,
    verdict,
    write_agent_config,
    write_json,
)

TARGETS = {
    "throughput_ratio_min": 0.7,
    "latency_p99_ms_at_1000": 2.0,
    "peak_rss_mb_one_stream": 300.0,
    "rss_per_extra_model_kb": 64.0,
    "checkpoint_stall_ms": 5.0,
    "learner_cost_ratio_max": 0.25,
}


@dataclass
class Settings:
    """Counts of one benchmark run (``quick`` shrinks them for a smoke test)."""

    repeats: int = 3
    flood_n: int = 30_000
    flood_warmup: int = 2_000
    rates: tuple[int, ...] = (100, 1_000, 5_000)
    rate_seconds: dict[int, float] = field(default_factory=lambda: {100: 20.0, 1_000: 15.0, 5_000: 6.0})
    backlog_n: int = 100_000
    backlog_repeats: int = 3
    scale_devices: tuple[int, ...] = (1, 100, 1_000)
    scale_n: int = 20_000
    profile_n: int = 20_000
    latency_variant: bool = True  # also the agent with synchronous = "normal", and with network_loop = "thread" (one repeat each)
    run_timeout: float = 240.0

    @classmethod
    def quick(cls) -> Settings:
        return cls(repeats=1, flood_n=3_000, flood_warmup=300,
                   rate_seconds={100: 2.0, 1_000: 1.5, 5_000: 1.0}, backlog_n=5_000, backlog_repeats=1,
                   scale_n=3_000, profile_n=2_000, run_timeout=90.0, latency_variant=False)


# -- consumers: the agent and the echo ---------------------------------------------------


class Consumer(abc.ABC):
    kind = ""
    reply_filter = ""
    status_topic = ""
    client_id = ""

    def __init__(self, ctx: Context, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.child: Child | None = None
        self.startup_s: float | None = None
        self.t_started = 0.0

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def start(self, timeout: float = 60.0) -> Consumer:
        """Start the process and wait until it says ``online`` (it has subscribed)."""
        self.t_started = time.monotonic()
        self.child = child = self._spawn()
        deadline = self.t_started + timeout
        while True:
            try:
                online = self.ctx.watcher.wait_online(self.status_topic, self.t_started, 0.5)
                break
            except TimeoutError:
                if child.proc.poll() is not None or time.monotonic() > deadline:
                    child.stop()
                    self.child = None
                    raise RuntimeError(f"{self.name} (pid {child.pid}) did not come online: "
                                       f"exit code {child.proc.returncode}; {self._log_tail()}") from None
        self.startup_s = round(online - self.t_started, 3)
        return self

    def _log_tail(self) -> str:
        path = getattr(self, "log_path", None)
        if path is None or not Path(path).exists():
            return "no log"
        return Path(path).read_text(errors="replace")[-500:]

    @abc.abstractmethod
    def _spawn(self) -> Child: ...

    def snapshot(self) -> dict[str, Any]:
        st = proc_status(self.pid)
        return {"cpu_s": proc_cpu_seconds(self.pid), "vmhwm_kb": st.get("VmHWM"), "vmrss_kb": st.get("VmRSS")}

    @abc.abstractmethod
    def stop(self) -> dict[str, Any]: ...


class AgentConsumer(Consumer):
    kind = "agent"

    def __init__(self, ctx: Context, name: str, store: Path | None = None, **store_overrides: Any) -> None:
        super().__init__(ctx, name)
        self.gateway = name
        self.client_id = f"streamlearn-{name}"
        self.store = store or ctx.workdir / f"{name}.db"
        self.reply_filter = f"streamlearn/{name}/{STREAM}/+/prediction"
        self.status_topic = f"streamlearn/{name}/status"
        self.config_path = write_agent_config(
            ctx.workdir / f"{name}.toml",
            agent_config(self.store, ctx.port, self.gateway, self.client_id, **store_overrides),
        )
        self.log_path = ctx.workdir / f"{name}.log"

    def _spawn(self) -> Child:
        return Child([sys.executable, "-m", "streamlearn", "run", "-c", str(self.config_path),
                      "--log-level", "info"], log_path=self.log_path)

    def stop(self, keep_session: bool = False) -> dict[str, Any]:
        assert self.child is not None
        snap = self.snapshot()
        code = self.child.stop(timeout=60.0)
        self.child = None
        if not keep_session:
            drop_session(self.ctx.port, self.client_id)
        return {"exit_code": code, "peak": snap, "status": self._status_from_log()}

    def _status_from_log(self) -> dict[str, Any] | None:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        found = None
        for line in text.splitlines():
            if "stopped: {" in line:
                try:
                    found = ast.literal_eval(line.split("stopped: ", 1)[1])
                except (ValueError, SyntaxError):
                    pass
        return found

    def wait_inbox(self, n: int, timeout: float) -> float | None:
        """Wall time when the inbox holds ``n`` rows (read-only polling), or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                conn = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=1.0)
                try:
                    last = conn.execute("SELECT max(seq) FROM inbox").fetchone()[0] or 0
                finally:
                    conn.close()
                if last >= n:
                    return time.time()
            except sqlite3.Error:
                pass
            if self.child is None or self.child.proc.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    def store_figures(self) -> dict[str, Any]:
        """Learned/committed counts and checkpoint durations, read-only from the store."""
        conn = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True)
        try:
            learned = conn.execute(
                "SELECT messages, labelled, learned, skipped, batched FROM metrics WHERE stream = ?"
                " ORDER BY id DESC LIMIT 1",
                (STREAM,)).fetchone()
            last_seq = conn.execute("SELECT max(seq) FROM inbox").fetchone()[0] or 0
            cps = conn.execute("SELECT position, duration_ms, slots_written, bytes_written, reason"
                               " FROM checkpoints ORDER BY id").fetchall()
            models = conn.execute("SELECT count(*) FROM current_models WHERE stream = ?", (STREAM,)).fetchone()[0]
        finally:
            conn.close()
        # the pauses while messages flow: the one-step checkpoints at the end of a replay (before
        # any new message) and at shutdown (after the last one) hold up nothing
        durations = sorted(c[1] for c in cps if c[4] == "interval")
        return {
            "messages": learned[0] if learned else 0,
            "learned": learned[2] if learned else 0,
            "skipped": learned[3] if learned else 0,
            "micro_batched": learned[4] if learned else 0,  # learned in micro-batches under the backlog
            "inbox_last_seq": last_seq,
            "checkpoint_position": cps[-1][0] if cps else 0,
            "models": models,
            "checkpoints": len(cps),
            "checkpoint_ms_max": round(durations[-1], 3) if durations else None,  # longest step incl. COMMIT
            "checkpoint_ms_median": round(durations[len(durations) // 2], 3) if durations else None,
            "checkpoint_bytes_max": max((c[3] for c in cps), default=None),
        }


class EchoConsumer(Consumer):
    kind = "echo"

    def __init__(self, ctx: Context, name: str, persistent: bool = False) -> None:
        super().__init__(ctx, name)
        self.persistent = persistent
        self.client_id = f"bench-{name}"
        self.reply_filter = echo_mod.reply_filter(name)
        self.status_topic = echo_mod.status_topic(name)

    def _spawn(self) -> Child:
        args = [sys.executable, "-m", "streamlearn.bench.echo", "--port", str(self.ctx.port), "--name", self.name,
                "--max-seconds", "1800"]
        if self.persistent:
            args.append("--persistent")
        return Child(args)

    def stop(self, keep_session: bool = False) -> dict[str, Any]:
        assert self.child is not None
        snap = self.snapshot()
        child, self.child = self.child, None
        code = child.stop()
        counters = None
        try:
            line = child.lines.get(timeout=5)
            counters = orjson.loads(line) if line.startswith("{") else None
        except queue.Empty:
            pass
        if self.persistent and not keep_session:
            drop_session(self.ctx.port, self.client_id)
        return {"exit_code": code, "peak": snap, "status": counters}


# -- the context and the runs ----------------------------------------------------------


@dataclass
class Context:
    port: int
    workdir: Path
    watcher: StatusWatcher
    broker_pid: int
    settings: Settings
    counter: int = 0

    def name(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}{self.counter}"


def _make(ctx: Context, kind: str, **kw: Any) -> Consumer:
    name = ctx.name(kind)
    return AgentConsumer(ctx, name, **kw) if kind == "agent" else EchoConsumer(ctx, name, **kw)


def _collector(ctx: Context, consumer: Consumer) -> Collector:
    """mosquitto_sub on the consumer's replies and its (retained) status, once subscribed."""
    coll = Collector(ctx.port, consumer.name, [consumer.reply_filter, consumer.status_topic],
                     ctx.workdir / f"{consumer.name}-replies.txt")
    if not coll.wait_lines(1, 15):  # the retained status arrives right after the SUBACK
        coll.stop()
        raise TimeoutError("the reply collector did not subscribe")
    return coll


def _payloads(n: int, devices: int, boot: str, seed: int = 0) -> list[bytes]:
    return [p for _, p in make_messages(n, devices, boot=boot, seed=seed)]


def _rates(recv: np.ndarray, t0: float) -> dict[str, Any]:
    got = np.sort(recv[~np.isnan(recv)])
    out: dict[str, Any] = {"replies": int(len(got))}
    if len(got):
        elapsed = float(got[-1]) - t0
        out["elapsed_s"] = round(elapsed, 4)
        out["msgs_per_s"] = round(len(got) / elapsed, 1) if elapsed > 0 else None
        lo, hi = int(0.1 * len(got)), int(0.9 * len(got)) - 1
        if hi > lo and got[hi] > got[lo]:
            out["steady_msgs_per_s"] = round((hi - lo) / float(got[hi] - got[lo]), 1)
    return out


def flood_run(ctx: Context, kind: str, n: int, warmup: int, devices: int = 1, **overrides: Any) -> dict[str, Any]:
    """One consumer fed ``n`` readings as fast as the broker takes them (after a warm-up).

    ``overrides``: settings of the agent that differ from the shipped defaults (see
    :func:`streamlearn.bench.common.agent_config`)."""
    consumer = _make(ctx, kind, **overrides).start()
    coll = feeder = None
    timeout = ctx.settings.run_timeout
    try:
        coll = _collector(ctx, consumer)
        feeder = Feeder(ctx.port, consumer.name)
        feeder.feed(_payloads(warmup, devices, consumer.name + "w", seed=1))
        warm_ok = coll.wait_replies(warmup, timeout)
        payloads = _payloads(n, devices, consumer.name)
        meter = CpuMeter({"consumer": consumer.pid, "broker": ctx.broker_pid, "feeder": feeder.pid,
                          "collector": coll.pid, "bench": os.getpid()})
        t0, thread = feeder.feed_background(payloads)
        complete = coll.wait_replies(warmup + n, timeout)
        cpu = meter.stop()
        thread.join(timeout=30)
    finally:
        if feeder is not None:
            feeder.close(30)
        if coll is not None:
            coll.stop()
        stopped = consumer.stop()
    recv, dup = coll.receive_times(consumer.name, n)
    rates = _rates(recv, t0)
    out: dict[str, Any] = {
        "kind": kind, "devices": devices, "n": n, "startup_s": consumer.startup_s,
        "complete": bool(complete and rates["replies"] == n), "missing": n - rates["replies"], "duplicates": dup,
        **rates, "warmup_complete": warm_ok,
        "cpu_us_per_msg": _us(cpu["cpu_s"]["consumer"], n),
        "broker_cpu_us_per_msg": _us(cpu["cpu_s"]["broker"], n),
        "loadgen_cpu_us_per_msg": _us((cpu["cpu_s"]["feeder"] or 0) + (cpu["cpu_s"]["collector"] or 0), n),
        "cpu": cpu,
        "vmhwm_kb": stopped["peak"].get("vmhwm_kb"), "vmrss_kb": stopped["peak"].get("vmrss_kb"),
        "consumer_status": _short_status(stopped.get("status")),
    }
    if kind == "agent":
        assert isinstance(consumer, AgentConsumer)
        figs = consumer.store_figures()
        total = n + warmup
        out["store"] = figs
        out["all_learned"] = figs["learned"] == total
        out["all_committed"] = figs["checkpoint_position"] >= figs["inbox_last_seq"] == total
    return out


def _us(seconds: float | None, n: int) -> float | None:
    return None if seconds is None or n <= 0 else round(seconds / n * 1e6, 1)


def _short_status(status: dict[str, Any] | None) -> dict[str, Any] | None:
    if not status:
        return status
    keep = ("received", "redeliveries", "dead_letters", "processed", "checkpoints", "internal_errors",
            "replied", "errors", "publish_failed")
    out = {k: status[k] for k in keep if k in status}
    transport = status.get("transport")
    if isinstance(transport, dict):
        out["publish_dropped"] = transport.get("publish_dropped")
        out["published"] = transport.get("published")
    return out


def latency_runs(ctx: Context, kind: str, label: str | None = None, **store: Any) -> list[dict[str, Any]]:
    """One consumer, the fixed rates in turn (each after a short warm-up at its rate).

    ``store``: store settings of the agent that differ from the shipped defaults
    (a what-if variant, reported under ``label``).
    """
    consumer = _make(ctx, kind, **store).start()
    out = []
    coll = feeder = None
    try:
        coll = _collector(ctx, consumer)
        feeder = Feeder(ctx.port, consumer.name)
        expected = 0
        for rate in ctx.settings.rates:
            n = max(1, int(rate * ctx.settings.rate_seconds[rate]))
            warm = min(n, max(50, rate // 2))
            deadline = time.monotonic() + ctx.settings.run_timeout
            boot = f"{consumer.name}r{rate}"
            feeder.feed_paced(_payloads(warm, 1, boot + "w", seed=1), rate, deadline)
            expected += warm
            coll.wait_replies(expected, 60)
            meter = CpuMeter({"consumer": consumer.pid, "broker": ctx.broker_pid, "feeder": feeder.pid,
                              "collector": coll.pid, "bench": os.getpid()}, threads_of="consumer")
            sent = feeder.feed_paced(_payloads(n, 1, boot), rate, deadline)
            expected += n
            complete = coll.wait_replies(expected, 60, idle=10)
            cpu = meter.stop()
            recv, dup = coll.receive_times(boot, n)
            ok = ~np.isnan(recv) & ~np.isnan(sent)
            span = float(np.nanmax(sent) - np.nanmin(sent))
            out.append({
                "kind": label or kind, "rate": rate, "n": n, "complete": bool(complete and ok.all()),
                "missing": int(n - ok.sum()), "duplicates": dup,
                "achieved_rate": round((n - 1) / span, 1) if span > 0 else None,
                "latency": latency_summary(recv[ok] - sent[ok]),
                "cpu_us_per_msg": _us(cpu["cpu_s"]["consumer"], n),
                # the consumer's main thread (the agent's loop) and its others (paho's first)
                "main_thread_cpu_us_per_msg": _us(cpu["threads_cpu_s"]["main"], n),
                "other_threads_cpu_us_per_msg": [_us(v, n) for v in cpu["threads_cpu_s"]["others"][:2]],
                "cpu": cpu,
            })
    finally:
        if feeder is not None:
            feeder.close(30)
        if coll is not None:
            coll.stop()
        stopped = consumer.stop()
    figs = consumer.store_figures() if isinstance(consumer, AgentConsumer) else None
    for r in out:
        r["vmhwm_kb"] = stopped["peak"].get("vmhwm_kb")
        if figs is not None:
            r["store"] = figs
    return out


def backlog_run(ctx: Context, kind: str, n: int) -> dict[str, Any]:
    """``n`` readings queued at the broker while the consumer is down; then it starts."""
    consumer = _make(ctx, kind, **({"persistent": True} if kind == "echo" else {}))
    consumer.start()
    consumer.stop(keep_session=True)  # the broker now queues for its session
    coll = _collector(ctx, consumer)
    stopped: dict[str, Any] = {}
    try:
        feeder = Feeder(ctx.port, consumer.name, track_acks=True)
        t_pub = time.monotonic()
        feeder.feed(_payloads(n, 1, consumer.name))
        queued = feeder.wait_acked(n, ctx.settings.run_timeout)  # the broker holds them all for the session
        publish_s = time.monotonic() - t_pub
        feeder.close(30)
        time.sleep(0.5)
        t_start = time.time()
        meter = CpuMeter({"broker": ctx.broker_pid, "collector": coll.pid, "bench": os.getpid()})
        consumer.start()
        meter.pids["consumer"] = consumer.pid
        meter._own0["consumer"] = 0.0  # a fresh process
        caught_up = None
        if isinstance(consumer, AgentConsumer):  # every reading stored (and processed in the same step)
            caught_up = consumer.wait_inbox(n, ctx.settings.run_timeout * 2)
        complete = coll.wait_replies(n, ctx.settings.run_timeout * 2, idle=10 if caught_up else 30)
        cpu = meter.stop()
        stopped = consumer.stop()
    finally:
        coll.stop()
        if consumer.child is not None:
            stopped = consumer.stop()
    recv, dup = coll.receive_times(consumer.name, n)
    got = np.sort(recv[~np.isnan(recv)])
    first, last = (float(got[0]), float(got[-1])) if len(got) else (None, None)
    out: dict[str, Any] = {
        "kind": kind, "n": n, "complete": bool(complete and len(got) == n), "missing": n - len(got),
        "duplicates": dup, "publish_s": round(publish_s, 3), "all_queued": queued,
        "inbox_caught_up_s": round(caught_up - t_start, 3) if caught_up else None,
        "startup_s": consumer.startup_s,
        "time_to_first_reply_s": round(first - t_start, 3) if first else None,
        "drain_s": round(last - t_start, 3) if last else None,
        "drain_msgs_per_s": round(len(got) / (last - first), 1) if first and last and last > first else None,
        "vmhwm_kb": stopped.get("peak", {}).get("vmhwm_kb"),
        "consumer_status": _short_status(stopped.get("status")),
        "cpu": cpu,
        "cpu_us_per_msg": _us(cpu["cpu_s"].get("consumer"), n),
    }
    if kind == "agent":
        assert isinstance(consumer, AgentConsumer)
        figs = consumer.store_figures()
        out["store"] = figs
        out["all_learned"] = figs["learned"] == n
    return out


# -- summary -----------------------------------------------------------------------------


def _med(runs: list[dict[str, Any]], key: str, **match: Any) -> float | None:
    return median([_dig(r, key) for r in runs if all(r.get(k) == v for k, v in match.items())])


def _dig(d: dict[str, Any], dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    flood = results.get("flood", [])
    echo_runs = [r for r in flood if r["kind"] == "echo"]
    agent_runs = [r for r in flood if r["kind"] == "agent"]
    s["echo_msgs_per_s"] = median([r["msgs_per_s"] for r in echo_runs if r.get("complete")])
    s["agent_msgs_per_s"] = median([r["msgs_per_s"] for r in agent_runs if r.get("complete")])
    s["echo_msgs_per_s_runs"] = spread([r["msgs_per_s"] for r in echo_runs])
    s["agent_msgs_per_s_runs"] = spread([r["msgs_per_s"] for r in agent_runs])
    by_rep = {r.get("repeat"): r for r in echo_runs}
    pairs = [a["msgs_per_s"] / by_rep[a.get("repeat")]["msgs_per_s"] for a in agent_runs
             if a.get("complete") and a.get("repeat") in by_rep and by_rep[a.get("repeat")].get("complete")
             and a.get("msgs_per_s") and by_rep[a.get("repeat")].get("msgs_per_s")]
    s["throughput_ratio_per_repeat"] = spread(pairs)
    s["throughput_ratio"] = round(median(pairs), 3) if pairs else None
    s["agent_all_learned_and_committed"] = bool(agent_runs) and all(
        r.get("complete") and r.get("all_learned") and r.get("all_committed") for r in agent_runs)
    # the agent's metrics say how much of the flood it learned in micro-batches (a backlog)
    shares = [r["store"]["micro_batched"] / max(1, r["store"]["learned"]) for r in agent_runs
              if r.get("store") and r["store"].get("micro_batched") is not None]
    s["agent_micro_batched_share"] = round(median(shares), 3) if shares else None
    s["agent_cpu_us_per_msg"] = _med(agent_runs, "cpu_us_per_msg")
    s["echo_cpu_us_per_msg"] = _med(echo_runs, "cpu_us_per_msg")
    # throughput per core of consumer CPU: what the ratio tends to when both are CPU-bound; less noisy
    cpu_pairs = [by_rep[a.get("repeat")]["cpu_us_per_msg"] / a["cpu_us_per_msg"] for a in agent_runs
                 if a.get("repeat") in by_rep and a.get("cpu_us_per_msg") and by_rep[a.get("repeat")].get("cpu_us_per_msg")]
    s["cpu_ratio_echo_over_agent"] = round(median(cpu_pairs), 3) if cpu_pairs else None
    s["broker_cpu_us_per_msg_agent"] = _med(agent_runs, "broker_cpu_us_per_msg")
    s["broker_cpu_us_per_msg_echo"] = _med(echo_runs, "broker_cpu_us_per_msg")
    s["agent_peak_rss_mb"] = _mb(_med(agent_runs, "vmhwm_kb"))
    s["echo_peak_rss_mb"] = _mb(_med(echo_runs, "vmhwm_kb"))
    s["agent_startup_s"] = _med(agent_runs, "startup_s")
    lat = results.get("latency", [])
    s["latency"] = {}
    for kind in ("echo", "agent", "agent_sync_normal", "agent_network_thread"):
        for rate in sorted({r["rate"] for r in lat}):
            runs = [r for r in lat if r["kind"] == kind and r["rate"] == rate]
            if runs:
                s["latency"][f"{kind}@{rate}"] = {
                    k: median([_dig(r, f"latency.{k}") for r in runs]) for k in ("p50_ms", "p99_ms", "p99_9_ms", "max_ms")
                } | {"complete": all(r.get("complete") for r in runs),
                     "p99_ms_runs": spread([_dig(r, "latency.p99_ms") for r in runs])}
    backlog = results.get("backlog", [])
    for kind in ("echo", "agent"):
        runs = [r for r in backlog if r["kind"] == kind]
        if runs:
            s[f"backlog_{kind}_drain_s"] = median([r.get("drain_s") for r in runs])
            s[f"backlog_{kind}_msgs_per_s"] = median([r.get("drain_msgs_per_s") for r in runs])
            s[f"backlog_{kind}_inbox_caught_up_s"] = median([r.get("inbox_caught_up_s") for r in runs])
            s[f"backlog_{kind}_missing_replies"] = median([r.get("missing") for r in runs])
            s[f"backlog_{kind}_publish_dropped"] = median([_dig(r, "consumer_status.publish_dropped") for r in runs])
            s[f"backlog_{kind}_complete"] = all(r.get("complete") for r in runs)
            s[f"backlog_{kind}_peak_rss_mb"] = _mb(median([r.get("vmhwm_kb") for r in runs]))
    scale = results.get("scale", [])
    s["scale"] = {}
    for d in sorted({r["devices"] for r in scale}):
        runs = [r for r in scale if r["devices"] == d]
        s["scale"][d] = {
            "msgs_per_s": median([r["msgs_per_s"] for r in runs if r.get("complete")]),
            "peak_rss_mb": _mb(median([r.get("vmhwm_kb") for r in runs])),
            "rss_mb": _mb(median([r.get("vmrss_kb") for r in runs])),
            "cpu_us_per_msg": median([r.get("cpu_us_per_msg") for r in runs]),
            "checkpoint_ms_max": max((_dig(r, "store.checkpoint_ms_max") or 0 for r in runs), default=None),
            "checkpoint_bytes_max": max((_dig(r, "store.checkpoint_bytes_max") or 0 for r in runs), default=None),
            "complete": all(r.get("complete") and r.get("all_learned") for r in runs),
        }
    devs = sorted(s["scale"])
    if len(devs) >= 2 and s["scale"][devs[0]]["peak_rss_mb"] and s["scale"][devs[-1]]["peak_rss_mb"]:
        extra = devs[-1] - devs[0]
        s["rss_per_extra_model_kb"] = round(
            (s["scale"][devs[-1]]["peak_rss_mb"] - s["scale"][devs[0]]["peak_rss_mb"]) * 1024 / extra, 1)
    one_model = agent_runs + [r for r in scale if r["devices"] == 1] + [r for r in backlog if r["kind"] == "agent"] \
        + [r for r in lat if r["kind"] == "agent"]
    cps = [_dig(r, "store.checkpoint_ms_max") for r in one_model]
    s["checkpoint_ms_max_recorded"] = max((c for c in cps if c is not None), default=None)
    s["background_load_cores"] = median([_dig(r, "cpu.other_cores") for r in flood])
    s["loadgen_cpu_us_per_msg"] = _med(flood, "loadgen_cpu_us_per_msg")
    prof = results.get("profile") or {}
    s["checkpoint_stall_ms_measured"] = _dig(prof, "checkpoint.1.stall_ms_max")
    s["checkpoint_stall_ms_measured_100_models"] = _dig(prof, "checkpoint.100.stall_ms_max")
    s["checkpoint_stall_ms_measured_1000_models"] = _dig(prof, "checkpoint.1000.stall_ms_max")
    for k in ("100", "1000"):
        s[f"checkpoint_pause_ms_p99_{k}_models"] = _dig(prof, f"checkpoint.{k}.pause_ms_p99")
        s[f"checkpoint_step_ms_steady_{k}_models"] = _dig(prof, f"checkpoint_steady.{k}.step_ms_with_checkpoint_max")
        s[f"checkpoint_models_steady_{k}_models"] = _dig(prof, f"checkpoint_steady.{k}.models_written_median")
    return s


def _mb(kb: float | None) -> float | None:
    return None if kb is None else round(kb / 1024.0, 1)


def targets(summary: dict[str, Any], learner: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each target of issue 5 with the measured figure and whether it is met."""
    t = TARGETS
    rows = []

    def add(name: str, target: str, measured: Any, ok: bool | None, note: str = "") -> None:
        rows.append({"target": name, "goal": target, "measured": measured, "met": ok, "note": note})

    ratio = summary.get("throughput_ratio")
    add("throughput vs echo ceiling (QoS 1, all learned + committed)", f">= {t['throughput_ratio_min']}x",
        ratio, None if ratio is None else ratio >= t["throughput_ratio_min"] and summary.get(
            "agent_all_learned_and_committed", False),
        f"agent {fmt(summary.get('agent_msgs_per_s'))} / echo {fmt(summary.get('echo_msgs_per_s'))} msg/s; "
        f"per CPU-second {fmt(summary.get('cpu_ratio_echo_over_agent'))}; share learned in micro-batches "
        f"{fmt(summary.get('agent_micro_batched_share'))}")
    if learner:
        r = learner.get("summary", {}).get("strict_ratio_sgd")
        match = learner.get("summary", {}).get("sgd_predictions_match_1e5")
        add("learner per-sample cost vs naive torch (strict, same results)", f"<= {t['learner_cost_ratio_max']}x",
            r, None if r is None else (r <= t["learner_cost_ratio_max"] and bool(match)),
            f"fused {fmt(learner['summary'].get('fused_strict_us_sgd'))} us, torch "
            f"{fmt(learner['summary'].get('torch_strict_us_sgd'))} us; SGD match 1e-5: {fmt(match)}")
    p99 = _dig(summary, "latency.agent@1000.p99_ms")
    add("latency p99 at 1,000 msg/s", f"<= {t['latency_p99_ms_at_1000']} ms", p99,
        None if p99 is None else p99 <= t["latency_p99_ms_at_1000"],
        f"echo p99 {fmt(_dig(summary, 'latency.echo@1000.p99_ms'))} ms")
    rss = summary.get("agent_peak_rss_mb")
    add("peak RSS, one stream", f"<= {t['peak_rss_mb_one_stream']:g} MB", rss,
        None if rss is None else rss <= t["peak_rss_mb_one_stream"])
    per = summary.get("rss_per_extra_model_kb")
    add("RSS per extra per-device model", f"<= {t['rss_per_extra_model_kb']:g} KB", per,
        None if per is None else per <= t["rss_per_extra_model_kb"], "from the scale runs (peak RSS)")
    stall = summary.get("checkpoint_stall_ms_measured")
    rec = summary.get("checkpoint_ms_max_recorded")
    worst = max((x for x in (stall, rec) if x is not None), default=None)
    add("checkpoint stall, one model", f"<= {t['checkpoint_stall_ms']:g} ms", worst,
        None if worst is None else worst <= t["checkpoint_stall_ms"],
        f"longest recorded while messages flowed (a step with its batch's COMMIT and fsync) {fmt(rec)}; "
        f"in-process longest pause {fmt(stall)}")
    for k in ("100", "1000"):
        steady = summary.get(f"checkpoint_step_ms_steady_{k}_models")
        stall_k = summary.get(f"checkpoint_stall_ms_measured_{k}_models")
        if steady is not None:
            add(f"checkpoint stall, {int(k):,} per-device models", f"<= {t['checkpoint_stall_ms']:g} ms", steady,
                steady <= t["checkpoint_stall_ms"],
                "in process, readings one at a time round-robin: the longest agent step with checkpoint work "
                f"(message, checkpoint step, COMMIT), {fmt(summary.get(f'checkpoint_models_steady_{k}_models'))} "
                f"models a checkpoint; every changed model at once, back to back (at shutdown, after a replay): "
                f"longest pause {fmt(stall_k)} ms")
    return rows


def print_report(results: dict[str, Any]) -> None:
    from rich.table import Table

    c = console()
    s = results["summary"]
    table = Table(title="streamlearn throughput benchmark (medians; ratios within a repeat)")
    for col in ("figure", "echo ceiling", "agent", "note"):
        table.add_column(col, justify="left" if col in ("figure", "note") else "right")
    table.add_row("msg/s, flood, QoS 1, reply for every message", fmt(s.get("echo_msgs_per_s")),
                  fmt(s.get("agent_msgs_per_s")), f"ratio {fmt(s.get('throughput_ratio'))} "
                  f"(per repeat {s.get('throughput_ratio_per_repeat')})")
    table.add_row("CPU us per message (consumer process)", fmt(s.get("echo_cpu_us_per_msg")),
                  fmt(s.get("agent_cpu_us_per_msg")),
                  f"echo/agent CPU ratio {fmt(s.get('cpu_ratio_echo_over_agent'))}; broker "
                  f"{fmt(s.get('broker_cpu_us_per_msg_echo'))} / {fmt(s.get('broker_cpu_us_per_msg_agent'))}")
    table.add_row("peak RSS MB (VmHWM)", fmt(s.get("echo_peak_rss_mb")), fmt(s.get("agent_peak_rss_mb")),
                  f"agent start-up {fmt(s.get('agent_startup_s'))} s")
    table.add_row("background load during flood runs (cores busy with other work)", "",
                  fmt(s.get("background_load_cores")),
                  f"load generator (C clients) {fmt(s.get('loadgen_cpu_us_per_msg'))} us/msg")
    for rate in sorted({int(k.split("@")[1]) for k in s.get("latency", {})}):
        e, a = s["latency"].get(f"echo@{rate}", {}), s["latency"].get(f"agent@{rate}", {})
        v = s["latency"].get(f"agent_sync_normal@{rate}")
        n = s["latency"].get(f"agent_network_thread@{rate}")
        table.add_row(f"latency at {rate:,} msg/s p50 / p99 / p99.9 ms",
                      " / ".join(fmt(e.get(k)) for k in ("p50_ms", "p99_ms", "p99_9_ms")),
                      " / ".join(fmt(a.get(k)) for k in ("p50_ms", "p99_ms", "p99_9_ms")),
                      f"max {fmt(e.get('max_ms'))} / {fmt(a.get('max_ms'))} ms"
                      + ("" if a.get("complete", True) and e.get("complete", True) else "; INCOMPLETE")
                      + ("" if v is None else "; agent with synchronous=normal: "
                         + " / ".join(fmt(v.get(k)) for k in ("p50_ms", "p99_ms", "p99_9_ms")))
                      + ("" if n is None else "; with network_loop=thread: "
                         + " / ".join(fmt(n.get(k)) for k in ("p50_ms", "p99_ms", "p99_9_ms"))))
    if "backlog_agent_drain_s" in s or "backlog_echo_drain_s" in s:
        table.add_row(f"backlog of {fmt(results['settings']['backlog_n'])}: drain s (msg/s)",
                      f"{fmt(s.get('backlog_echo_drain_s'))} ({fmt(s.get('backlog_echo_msgs_per_s'))})",
                      f"{fmt(s.get('backlog_agent_drain_s'))} ({fmt(s.get('backlog_agent_msgs_per_s'))})",
                      f"start to last reply; agent inbox caught up {fmt(s.get('backlog_agent_inbox_caught_up_s'))} s; "
                      f"missing replies echo {fmt(s.get('backlog_echo_missing_replies'))} / agent "
                      f"{fmt(s.get('backlog_agent_missing_replies'))} (agent publish_dropped "
                      f"{fmt(s.get('backlog_agent_publish_dropped'))})")
    for d, v in s.get("scale", {}).items():
        table.add_row(f"{d:,} device(s): msg/s, peak RSS MB, ckpt max ms", "",
                      f"{fmt(v['msgs_per_s'])}, {fmt(v['peak_rss_mb'])}, {fmt(v['checkpoint_ms_max'])}",
                      f"CPU {fmt(v['cpu_us_per_msg'])} us/msg" + ("" if v["complete"] else "; INCOMPLETE"))
    c.print(table)
    tt = Table(title="targets of issue 5")
    for col in ("target", "goal", "measured", "met", "note"):
        tt.add_column(col)
    for r in results["targets"]:
        tt.add_row(r["target"], r["goal"], fmt(r["measured"]), verdict(r["met"]), r["note"])
    c.print(tt)
    prof = results.get("profile")
    if prof:
        from streamlearn.bench.stages import print_profile

        print_profile(prof)


def _run_sections(ctx: Context, results: dict[str, Any], sections: tuple[str, ...], quick: bool) -> None:
    settings, workdir = ctx.settings, ctx.workdir
    say = console().print
    if "flood" in sections:
        results["flood"] = []
        for rep in range(settings.repeats):
            kinds = ("echo", "agent") if rep % 2 == 0 else ("agent", "echo")
            pair = {}
            for kind in kinds:
                say(f"flood {kind} repeat {rep + 1}/{settings.repeats} ...")
                pair[kind] = _guard(results, f"flood {kind}",
                                    lambda k=kind: flood_run(ctx, k, settings.flood_n, settings.flood_warmup))
                if pair[kind]:
                    pair[kind]["repeat"] = rep
            results["flood"] += [pair[k] for k in ("echo", "agent") if pair.get(k)]
    if "latency" in sections:
        results["latency"] = []
        for rep in range(settings.repeats):
            for kind in (("echo", "agent") if rep % 2 == 0 else ("agent", "echo")):
                say(f"latency {kind} repeat {rep + 1}/{settings.repeats} ...")
                results["latency"] += _guard(results, f"latency {kind}", lambda k=kind: latency_runs(ctx, k)) or []
        if settings.latency_variant:
            say("latency agent with store.synchronous = normal ...")
            results["latency"] += _guard(results, "latency agent sync=normal", lambda: latency_runs(
                ctx, "agent", label="agent_sync_normal", synchronous="normal")) or []
            say("latency agent with mqtt.network_loop = thread ...")
            results["latency"] += _guard(results, "latency agent network_loop=thread", lambda: latency_runs(
                ctx, "agent", label="agent_network_thread", **{"mqtt.network_loop": "thread"})) or []
    if "backlog" in sections:
        results["backlog"] = []
        for rep in range(settings.backlog_repeats):
            for kind in ("echo", "agent"):
                say(f"backlog {kind} repeat {rep + 1}/{settings.backlog_repeats} ...")
                r = _guard(results, f"backlog {kind}", lambda k=kind: backlog_run(ctx, k, settings.backlog_n))
                if r:
                    results["backlog"].append(r)
    if "scale" in sections:
        results["scale"] = []
        for rep in range(settings.repeats):
            for d in settings.scale_devices:
                say(f"scale {d} devices repeat {rep + 1}/{settings.repeats} ...")
                r = _guard(results, f"scale {d}", lambda d=d: flood_run(
                    ctx, "agent", settings.scale_n, max(settings.flood_warmup, 2 * d), devices=d))
                if r:
                    results["scale"].append(r)
    if "profile" in sections:
        say("in-process stage profile ...")
        from streamlearn.bench.stages import run_profile

        results["profile"] = _guard(results, "profile", lambda: run_profile(
            out_json=None, quick=quick, port=ctx.port, workdir=workdir / "profile", n=settings.profile_n,
            print_table=False))


# -- entry point -------------------------------------------------------------------------


def run_throughput(out_json: Path | None = Path("reports/bench-throughput.json"), quick: bool = False,
                   sections: tuple[str, ...] = ("flood", "latency", "backlog", "scale", "profile"),
                   repeats: int | None = None, keep_workdir: bool = False,
                   learner_json: Path | None = None) -> dict[str, Any]:
    """Run the throughput benchmark; print the tables, write ``out_json``, return the results.

    ``quick`` shrinks every count and runs one repeat (a smoke test, about a
    minute). ``learner_json``: a ``bench learner`` result to include in the targets.
    """
    settings = Settings.quick() if quick else Settings()
    if repeats is not None:
        settings.repeats = repeats
        settings.backlog_repeats = min(settings.backlog_repeats, repeats)
    workdir = Path(tempfile.mkdtemp(prefix="streamlearn-bench-"))
    results: dict[str, Any] = {
        "benchmark": "throughput", "quick": quick, "environment": environment(),
        "settings": {k: v for k, v in settings.__dict__.items()}, "targets_goal": TARGETS, "errors": [],
    }
    started = time.monotonic()
    say = console().print
    try:
        with bench_context(workdir, settings) as ctx:
            _run_sections(ctx, results, sections, quick)
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["summary"] = summarise(results)
    learner = None
    if learner_json is not None and Path(learner_json).exists():
        learner = orjson.loads(Path(learner_json).read_bytes())
    results["targets"] = targets(results["summary"], learner)
    write_json(out_json, results)
    print_report(results)
    if results["errors"]:
        say(f"[red]{len(results['errors'])} run(s) failed[/red]: {results['errors']}")
    if out_json is not None:
        say(f"wrote {out_json} ({results['elapsed_s']} s)")
    return results


@contextmanager
def bench_context(workdir: Path, settings: Settings | None = None) -> Iterator[Context]:
    """A private Mosquitto (shipped gateway config, free port) and a status watcher; stopped on exit."""
    from streamlearn.transport.broker import MosquittoProcess

    broker = MosquittoProcess(workdir=workdir / "broker").start()
    try:
        watcher = StatusWatcher(broker.port)
        try:
            assert broker.proc is not None
            yield Context(broker.port, workdir, watcher, broker.proc.pid, settings or Settings.quick())
        finally:
            watcher.close()
    finally:
        broker.stop()


def _guard(results: dict[str, Any], what: str, fn: Any) -> Any:
    """Run one benchmark run; a failure is recorded and the benchmark goes on."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - report and continue with the other runs
        results["errors"].append(f"{what}: {type(exc).__name__}: {exc}")
        return None
