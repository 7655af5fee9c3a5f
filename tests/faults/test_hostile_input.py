"""Fault 7: hostile input at volume: a fixed corpus of bad payloads plus Hypothesis-generated ones."""

from __future__ import annotations

import collections
import gc
import os
import shutil
import tempfile
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from streamlearn.config import parse_config
from streamlearn.sim import SensorSimulator, SimMessage
from streamlearn.transport.broker import MosquittoProcess
from tests.faults.checker import check_store, connect_ro, handled_count
from tests.faults.harness import Agent, Sensors, Watch, agent_config, wait_until, write_config
from tests.faults.report import FaultReport

pytestmark = pytest.mark.faults

TOTAL = 100_000  # messages published, good and bad
BAD_SHARE = 0.10
HYPOTHESIS_EXAMPLES = 2_000
# good readings held back and published later, out of sequence order: late, not bad. They must be
# learned: Mosquitto 2.0.11 itself delivers readings out of order after a reconnect under
# back-pressure (test_network.py), so dead-lettering them would lose readings the broker handed us
OUT_OF_ORDER = 300
DUPLICATE_SEQ = 300  # an earlier reading's (boot, seq) again, with other values
# the first 80% are published as fast as the broker takes them (volume); the last 20% at a rate
# the agent keeps up with, to the hostile and (good readings only) a clean agent at the same moments
FLOOD_SHARE = 0.8
# the paced rate: 1/FLOOD_TO_PACED of the rate the hostile agent handled the flood at, within
# [RATE_MIN, RATE_MAX]. A reading that arrives alone costs the agent ~4x its share of a flood's
# work (cold caches, a commit of its own: ~1 ms vs ~0.2 ms on the agent's thread, see
# benchmarks/steady_rate_cost.py, plus ~0.5 ms on paho's), and two agents, their brokers, the
# publisher and the watchers share the two cores. At a fixed 500/s they saturated the machine on
# its slow afternoons: the p99s measured the queue of a saturated machine (20-139 ms, ratios
# x0.66-x2.01 between runs) instead of the agents' handling (at 250/s on a normal afternoon:
# p99 1.44 vs 1.44 ms, x1.00)
FLOOD_TO_PACED = 20.0
RATE_MIN, RATE_MAX = 150.0, 250.0  # 20,000 messages: 80 to 133 s
PACED_BLOCK = 2_000  # messages per block of the figures by block
PACE_SLIP_S = 0.02  # the publisher this far behind the pace goes on from now instead of catching up
WARM_UP = 5_000  # good readings the clean agent learns before the timed part
P99_FACTOR = 1.2
HEAVY_COPIES = 3  # copies of the 200 KB and 1 MB payloads (each kind of the rest: ~220)
DEVICES = 3
SEED = 13
FEATURES = ["t_in", "t_out", "flow", "load"]


def _stream() -> dict[str, Any]:
    return {"timestamp_field": "ts"}


class Corpus:
    """Bad payloads, each tagged with its kind."""

    def __init__(self, template: dict[str, Any], rng: random.Random) -> None:
        self.t = template
        self.rng = rng
        self.n = 0

    def body(self, **changes: Any) -> dict[str, Any]:
        """A valid reading body with its own id (boot 'bad': it never collides with a good reading)."""
        self.n += 1
        b = dict(self.t)
        b["boot"] = "bad"
        b["seq"] = self.n
        b["ts"] = round(time.time(), 3)
        b.update(changes)
        return b

    def raw(self, feature_text: bytes, field: str = "t_in") -> bytes:
        """A body whose ``field`` is the literal bytes given (not representable by a JSON encoder)."""
        b = self.body(**{field: 0.0})
        text = orjson.dumps(b)
        return text.replace(f'"{field}":0.0'.encode(), f'"{field}":'.encode() + feature_text, 1)

    def fixed(self, heavy: bool) -> list[tuple[str, bytes]]:
        """One of each kind of the fixed corpus (the kinds of 200 KB and more only when ``heavy``)."""
        good = orjson.dumps(self.body())
        items = [
            ("truncated_json", good[: len(good) // 2]),
            ("not_json_text", b"hello, world"),
            ("trailing_comma", good[:-1] + b",}"),
            ("nan", self.raw(b"NaN")),
            ("infinity", self.raw(b"Infinity")),
            ("minus_infinity", self.raw(b"-Infinity")),
            ("1e400", self.raw(b"1e400")),
            ("5000_digit_integer", self.raw(b"1" * 5000)),
            ("nesting_1000_deep", self.raw(b"[" * 1000 + b"1" + b"]" * 1000)),
            ("nesting_10_deep", self.raw(b"[" * 10 + b"1" + b"]" * 10)),
            ("invalid_utf8", orjson.dumps(self.body()).replace(b'"bad"', b'"b\xffd"', 1)),
            ("bom", b"\xef\xbb\xbf" + orjson.dumps(self.body())),
            ("nul_byte", orjson.dumps(self.body()).replace(b'"bad"', b'"b\x00d"', 1)),
            ("duplicate_key", orjson.dumps(self.body())[:-1] + b',"t_in":1.0}'),
            ("bool_for_number", orjson.dumps(self.body(t_in=True))),
            ("string_for_number", orjson.dumps(self.body(flow="3.5"))),
            ("null_for_number", orjson.dumps(self.body(load=None))),
            ("list_for_number", orjson.dumps(self.body(t_out=[1.0]))),
            ("missing_feature", orjson.dumps({k: v for k, v in self.body().items() if k != "flow"})),
            ("missing_id", orjson.dumps({k: v for k, v in self.body().items() if k != "seq"})),
            ("missing_timestamp", orjson.dumps({k: v for k, v in self.body().items() if k != "ts"})),
            ("extra_field", orjson.dumps(self.body(extra_field=1))),
            ("empty", b""),
            ("binary", bytes(self.rng.randrange(256) for _ in range(64)) + b"\x00\xff"),
            ("top_level_array", b"[1, 2, 3]"),
            ("top_level_number", b"42"),
            ("top_level_string", b'"reading"'),
            ("label_not_a_number", orjson.dumps(self.body(power="high"))),
            ("seq_not_an_integer", orjson.dumps(self.body(seq=1.5))),
            ("out_of_range", orjson.dumps(self.body(t_in=1e12))),
            ("timestamp_a_day_old", orjson.dumps(self.body(ts=round(time.time() - 86_400, 3)))),
            ("timestamp_a_day_ahead", orjson.dumps(self.body(ts=round(time.time() + 86_400, 3)))),
        ]
        if heavy:
            items += [
                ("nesting_100k_deep", self.raw(b"[" * 100_000 + b"]" * 100_000)),
                ("just_under_1mib", orjson.dumps(self.body(blob="x" * 1_000_000))),
            ]
        return items


def hypothesis_payloads(template: dict[str, Any], n: int) -> list[tuple[str, bytes]]:
    """``n`` payloads generated by Hypothesis, each bad by construction."""
    good = orjson.dumps({**template, "boot": "bad", "seq": 0, "ts": 0.0})
    ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
    not_numbers = st.one_of(st.text(max_size=8), st.booleans(), st.none(),
                            st.lists(ints, max_size=3), st.dictionaries(st.text(max_size=3), ints, max_size=2))
    json_values = st.recursive(st.one_of(st.none(), st.booleans(), ints, st.text(max_size=10),
                                         st.floats(allow_nan=False, allow_infinity=False)),
                               lambda inner: st.lists(inner, max_size=3), max_leaves=8)
    cases = st.one_of(
        st.tuples(st.just("gen_not_a_number"), st.sampled_from(FEATURES), not_numbers),
        st.tuples(st.just("gen_invalid_utf8"), st.binary(max_size=200)),
        st.tuples(st.just("gen_truncated"), st.integers(min_value=1, max_value=len(good) - 1)),
        st.tuples(st.just("gen_not_an_object"), json_values),
        st.tuples(st.just("gen_missing_field"), st.sampled_from([*FEATURES, "boot", "seq", "ts"])),
        st.tuples(st.just("gen_out_of_range"), st.sampled_from(FEATURES),
                  st.floats(min_value=1e10, max_value=1e300) | st.floats(min_value=-1e300, max_value=-1e10)),
    )
    out: list[tuple[str, bytes]] = []
    counter = [0]

    def make(case: tuple) -> tuple[str, bytes]:
        counter[0] += 1
        body = {**template, "boot": "gen", "seq": counter[0], "ts": round(time.time(), 3)}
        kind = case[0]
        if kind == "gen_not_a_number":
            body[case[1]] = case[2]
            return kind, orjson.dumps(body)
        if kind == "gen_invalid_utf8":
            return kind, b"\xff" + case[1]
        if kind == "gen_truncated":
            return kind, good[: case[1]]
        if kind == "gen_not_an_object":
            return kind, orjson.dumps(case[1])
        if kind == "gen_missing_field":
            body.pop(case[1])
            return kind, orjson.dumps(body)
        body[case[1]] = case[2]
        return kind, orjson.dumps(body)

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def collect(case: tuple) -> None:
        out.append(make(case))

    collect()
    return out


def build_stream(cfg_stream, total: int) -> tuple[list[SimMessage], list[SimMessage], dict[int, str]]:
    """The hostile stream (in publish order), its good readings, and the kind of each bad message."""
    rng = random.Random(SEED)
    n_bad = int(total * BAD_SHARE)
    n_good_sim = total - n_bad  # the held-back (late) readings among them
    sim = list(SensorSimulator(cfg_stream, devices=DEVICES, seed=SEED).messages(n_good_sim))
    template = {k: v for k, v in orjson.loads(sim[0].payload).items()}
    corpus = Corpus(template, rng)
    bad: list[tuple[str, bytes]] = []
    hyp = hypothesis_payloads(template, HYPOTHESIS_EXAMPLES)
    n_fixed = n_bad - DUPLICATE_SEQ - len(hyp)
    rounds = 0
    while len(bad) < n_fixed:
        bad.extend(corpus.fixed(heavy=rounds < HEAVY_COPIES))
        rounds += 1
    bad = bad[:n_fixed] + hyp
    # held-back readings: published ~60-200 messages after their place, after later readings of their device
    held = sorted(rng.sample(range(100, len(sim) - 400), OUT_OF_ORDER))
    held_set = set(held)
    late: dict[int, list[SimMessage]] = collections.defaultdict(list)
    for i in held:
        late[i + rng.randint(60, 200)].append(sim[i])
    dup_of = sorted(rng.sample([i for i in range(50, len(sim) - 400) if i not in held_set], DUPLICATE_SEQ))
    dups: dict[int, list[SimMessage]] = collections.defaultdict(list)
    for i in dup_of:
        body = orjson.loads(sim[i].payload)
        body["t_in"] = round(body["t_in"] + 1.5, 4)  # same (boot, seq), other content
        dups[i + rng.randint(1, 50)].append(SimMessage(sim[i].topic, orjson.dumps(body), "bad", sim[i].device, sim[i].seq))
    good = sim
    # spread the corpus over the stream
    slots = sorted(rng.sample(range(len(sim)), len(bad)))
    bad_at: dict[int, list[tuple[str, bytes]]] = collections.defaultdict(list)
    for s, item in zip(slots, rng.sample(bad, len(bad))):
        bad_at[s].append(item)
    stream: list[SimMessage] = []
    kinds: dict[int, str] = {}
    for i, m in enumerate(sim):
        for kind, payload in bad_at.get(i, []):
            dev = f"dev{rng.randrange(DEVICES):03d}"
            kinds[len(stream)] = kind
            stream.append(SimMessage(f"sensors/{dev}/boiler", payload, "bad", dev, -1))
        if i not in held_set:
            stream.append(m)
        for d in dups.get(i, []):
            kinds[len(stream)] = "duplicate_seq"
            stream.append(d)
        for lm in late.get(i, []):
            stream.append(lm)
    return stream, good, kinds


def _publish_10mb(port: int) -> str:
    """Publish a 10 MB payload on a reading topic with a client of its own; what did the broker do?"""
    result: dict[str, Any] = {}
    done = __import__("threading").Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="hostile-10mb",
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.on_publish = lambda c, u, mid, rc, p: (result.update(puback=str(rc)), done.set())
    client.on_disconnect = lambda c, u, f, rc, p: (result.update(disconnect=str(rc)), done.set())
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish("sensors/dev000/boiler", b"{" + b" " * 10_000_000 + b"}", qos=1)
        result["rc"] = int(info.rc)
        done.wait(15)
    finally:
        client.disconnect()
        client.loop_stop()
    return ", ".join(f"{k}={v}" for k, v in sorted(result.items()))


class Apart:
    """Keeps the two timed agents from competing with each other and with the test for a core.

    On two cores, with both agents, their brokers and this process's publisher and watchers
    woken within ~0.1 ms of each other for every reading, the handling times measured the
    scheduler rather than the agents (``perf sched`` with the agent's own network loop: the
    agent published to second was woken onto the core where the first was handling its
    reading and ran first; the first, runnable, waited 0.5-0.9 ms although the other core
    went idle: Linux does not move a task that ran within the last 0.5 ms. 20-27% of the
    hostile agent's good readings were preempted, 15-17% of the clean one's, and the test
    process's threads, which do ~10% more for the hostile run, preempted the hostile agent
    twice as often as the clean one; p99 ratios x1.1 to x2.2 between runs).

    So each agent runs on a core of its own with its broker (the two alternate, they never
    run at once), the two swap cores every ``PACED_BLOCK`` messages (a core that is busier
    with the rest of the machine weighs on both alike), and this process's threads run at
    niceness 10 while timing, so that they do not preempt the agents. With that, 1-1.4% of
    good readings were preempted and the p99s were 0.24-0.32 ms for both, x0.99-1.12.
    Where the OS allows neither (not Linux, one core), the test runs as before and says so.
    """

    NICE = 10

    def __init__(self, hostile: Run, clean: Run) -> None:
        self.runs = (hostile, clean)
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cpus = cpus[:2] if len(cpus) >= 2 else []
        self.pinned = bool(self.cpus)
        self.niced = self._nice(self.NICE)

    @staticmethod
    def _pin(pid: int, cpu: int) -> bool:
        """Every thread of process ``pid`` on ``cpu`` (threads it makes later inherit it)."""
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), {cpu})
        except OSError:  # (a thread that ended meanwhile, a process that died: the test says so)
            return False
        return True

    @staticmethod
    def _nice(value: int) -> bool:
        """The niceness of every thread of this process (the publisher, the watchers)."""
        try:
            for tid in os.listdir("/proc/self/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except (OSError, AttributeError):
            return False
        return True

    def block(self, n: int) -> None:
        """Block ``n`` of the paced phase begins: agent ``n % 2`` takes the first core."""
        if not self.pinned:
            return
        first = n % 2
        self.pinned = all(self._pin(pid, self.cpus[first if k == 0 else 1 - first])
                          for k, run in enumerate(self.runs) for pid in (run.agent.pid, run.broker.proc.pid))

    def close(self) -> None:
        """Back to niceness 0 (raising it needs no privilege, lowering it does: else logged)."""
        if self.niced and not self._nice(0):
            print(f"could not set this process's niceness back from {self.NICE} to 0")


def _store_dir(tmp: Path) -> Path:
    """Where a run keeps its store: on tmpfs when there is one, so the handling times compare the
    agent's work on good and bad input, not the disk's fsync latency (which varies 2x run to run here)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix=f"streamlearn-faults-{tmp.name}-", dir=shm))
    return tmp


class Run:
    """One agent with a broker and a store of its own, fed by the test."""

    def __init__(self, tmp: Path, name: str) -> None:
        tmp.mkdir()
        self.tmp = tmp
        # a broker of its own: the other run's agent session would otherwise make the broker
        # queue (and persist) this run's readings for it
        self.broker = MosquittoProcess(workdir=tmp / "broker").start()
        self.store_dir = _store_dir(tmp)
        self.db = self.store_dir / "s.db"
        data = agent_config(self.db, self.broker.port, f"hostile-{name}", **_stream())
        data["store"]["checkpoint_every_messages"] = 1000
        data["store"]["inbox_retention"] = TOTAL + 10_000
        self.agent = Agent(write_config(tmp / "agent.toml", data), tmp / "agent.log")
        self.watch = Watch(self.broker.port, f"hostile-watch-{name}")
        self.sensors = Sensors(self.broker.port, f"hostile-sensors-{name}", window=200)
        self.sent = 0
        self.alive_throughout = True
        self.paced_ids: dict[tuple[str, str], int] = {}  # good reading -> its paced block
        self.exit_code: int | None = None

    def start(self) -> None:
        self.agent.start()
        self.agent.wait_log(r"connected \(session present", 30)

    def publish(self, items: list[tuple[int, SimMessage]], block: int | None = None) -> None:
        """Publish (stream index, message) pairs as fast as the window allows; ``block``: the part
        of the paced phase a good reading's handling time is reported under."""
        for i, m in items:
            if block is not None and m.kind == "reading":
                self.paced_ids[(m.device, f"b0|{m.seq}")] = block
            self.sensors.publish(i, m)
            self.sent += 1
            if self.sent % 5000 == 0 and not self.agent.alive():
                self.alive_throughout = False
                raise AssertionError(f"the agent died:\n{self.agent.log()[-2000:]}")

    def wait_handled(self, timeout: float) -> bool:
        """Every message sent so far stored as a reading or a dead letter (False at the timeout:
        a message the agent drops silently is never counted)."""
        assert self.sensors.flush(120)
        target = self.sent - len(self.sensors.refused)
        return wait_until(lambda: handled_count(self.db) >= target or not self.agent.alive(), timeout, interval=0.1)

    def finish(self) -> None:
        self.alive_throughout = self.alive_throughout and self.agent.alive()
        self.exit_code = self.agent.terminate() if self.agent.alive() else self.agent.wait_exit(5)

    def close(self) -> None:
        self.agent.stop_quietly()
        self.sensors.close()
        self.watch.close()
        self.broker.stop()
        if self.store_dir != self.tmp:  # keep the store with the test's other files, off the tmpfs
            for f in self.store_dir.iterdir():
                shutil.move(str(f), self.tmp / f.name)
            self.store_dir.rmdir()
            self.db = self.tmp / "s.db"

    def latencies(self) -> dict[int, np.ndarray]:
        """Handling times (ms) of the paced good readings, by block."""
        out: dict[int, list[float]] = collections.defaultdict(list)
        for _, b in self.watch.predictions:
            block = self.paced_ids.get((b.get("device"), b.get("id")))
            if block is not None and "latency_ms" in b:
                out[block].append(float(b["latency_ms"]))
        return {k: np.array(v) for k, v in out.items()}


def test_hostile_input_at_volume(mosquitto, tmp_path: Path, report: FaultReport) -> None:
    """100,000 messages, 10% bad (a fixed corpus of 34 kinds, 2,000 Hypothesis-generated
    payloads, reused sequence numbers, timestamps a day off, extra fields, a 10 MB payload;
    plus 300 good readings published late, out of sequence order): 0 crashes, dead letters =
    bad messages exactly, 0 bad readings reach the learner, every good reading (the late ones
    included) learned once; the last 20,000 are published at 1/20 of the rate the hostile agent
    handled the flood at (150-250/s), and at the same moments their good readings to a clean
    agent: the good readings' p99 handling time (receipt to prediction, in the agent) is at
    most 1.2x the clean agent's."""
    cfg = parse_config(agent_config(tmp_path / "x.db", mosquitto.port, "x", **_stream()))
    t_build = time.monotonic()
    stream, good, kinds = build_stream(cfg.streams[0], TOTAL)
    build_s = time.monotonic() - t_build
    bad = [m for m in stream if m.kind == "bad"]
    n_flood = int(len(stream) * FLOOD_SHARE)
    ten_mb = _publish_10mb(mosquitto.port)

    hostile, clean = Run(tmp_path / "hostile", "hostile"), Run(tmp_path / "clean", "clean")
    try:
        hostile.start()
        clean.start()
        # volume: the first 80% as fast as the broker takes them
        t_flood = time.monotonic()
        hostile.publish(list(enumerate(stream[:n_flood])))
        caught_up = hostile.wait_handled(300)
        flood_rate = n_flood / (time.monotonic() - t_flood)
        rate = min(RATE_MAX, max(RATE_MIN, flood_rate / FLOOD_TO_PACED))
        # the clean agent learns the flood's last good readings first: both are warm when timed
        warm = [(i, m) for i, m in enumerate(stream[:n_flood]) if m.kind == "reading"][-WARM_UP:]
        clean.publish(warm)
        clean.wait_handled(120)
        # handling time: the last 20% at the paced rate, to both agents at once: the hostile agent
        # gets every message, a clean one gets the same good readings at the same moments (without
        # the bad messages), so both see the machine's background load of the same seconds
        # Which agent gets a good reading first alternates: the one published to second wakes (its
        # broker, then it) while the first is handling the reading, and on two cores that preempts
        # it. Always first, the hostile agent had 4.7% of its good readings preempted for ~0.6 ms
        # (0.7% of the clean agent's) and a p99 x2.5 the clean agent's with the agent's own network
        # loop; the other way round, the clean agent had the slow ones (p99 0.94 against 0.47 ms)
        # Each agent has a core of its own, swapped every block (Apart)
        # The pace is kept even when this process falls behind it (a stall of 267 ms in one
        # .ci/run, its own garbage collection or the machine): catching up would publish a burst,
        # in which each agent's readings wait for one another, the hostile one's for the bad
        # messages among them too (that block's p99 ratio was x32). So no burst: the schedule
        # moves on, and the test's own collector waits until the timed part is over
        apart = Apart(hostile, clean)
        gc_was_enabled = gc.isenabled()
        gc.disable()
        slips, slipped_s = 0, 0.0
        try:
            t0 = time.perf_counter()
            good_seen = 0
            for i in range(n_flood, len(stream)):
                block = (i - n_flood) // PACED_BLOCK
                if (i - n_flood) % PACED_BLOCK == 0:
                    apart.block(block)
                delay = t0 + (i - n_flood) / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -PACE_SLIP_S:
                    t0 -= delay  # behind the pace: go on at the pace from now
                    slips += 1
                    slipped_s -= delay
                m = stream[i]
                if m.kind != "reading":
                    hostile.publish([(i, m)], block=block)
                    continue
                good_seen += 1
                for run in (hostile, clean) if good_seen % 2 else (clean, hostile):
                    run.publish([(i, m)], block=block)
        finally:
            apart.close()
            if gc_was_enabled:
                gc.enable()
        clean.wait_handled(60)
        caught_up = hostile.wait_handled(180) and caught_up
        hostile.finish()
        clean.finish()
    finally:
        hostile.close()
        clean.close()
    by_block_h, by_block_c = hostile.latencies(), clean.latencies()
    lat_h = np.concatenate(list(by_block_h.values())) if by_block_h else np.array([])
    lat_c = np.concatenate(list(by_block_c.values())) if by_block_c else np.array([])
    # by block of 2,000 messages, for the report: how evenly the two agents fared over the minute
    block_ratios = [float(np.percentile(by_block_h[k], 99) / np.percentile(by_block_c[k], 99))
                    for k in sorted(set(by_block_h) & set(by_block_c)) if by_block_h[k].size and by_block_c[k].size]
    median_ratio = float(np.median(block_ratios)) if block_ratios else float("nan")

    db = hostile.db
    result = check_store(db, good, bad)
    conn = connect_ro(db)
    try:
        dead_rows = conn.execute("SELECT topic, payload_size, payload, reason FROM dead_letter").fetchall()
    finally:
        conn.close()
    # which bad messages became dead letters? match (topic, size, first 4 KiB) as multisets
    pool = collections.Counter((t, int(n), bytes(p)) for t, n, p, _ in dead_rows)
    delivered = [i for i, m in enumerate(stream) if m.kind == "bad" and i not in hostile.sensors.refused]
    caught: collections.Counter[str] = collections.Counter()
    missed: collections.Counter[str] = collections.Counter()
    for i in delivered:
        m = stream[i]
        key = (m.topic, len(m.payload), m.payload[:4096])
        if pool[key] > 0:
            pool[key] -= 1
            caught[kinds[i]] += 1
        else:
            missed[kinds[i]] += 1
    reasons = collections.Counter(r for *_, r in dead_rows)
    p99_h = float(np.percentile(lat_h, 99)) if lat_h.size else float("nan")
    p99_c = float(np.percentile(lat_c, 99)) if lat_c.size else float("nan")
    status = hostile.agent.final_status() or {}
    report.add(
        messages=len(stream), bad_messages=len(bad), good_readings=len(good),
        hypothesis_payloads=sum(1 for k in kinds.values() if k.startswith("gen_")),
        published=len(good), lost=result.lost, twice=result.twice, once=result.once,
        bad_delivered_to_agent=len(delivered), dead_letters=len(dead_rows), dead_letters_on_topic=len(hostile.watch.dead_letters),
        bad_in_inbox=result.bad_stored, missed_by_kind=dict(missed), caught_by_kind=dict(sorted(caught.items())),
        reasons=dict(reasons.most_common()), ten_mb_payload=ten_mb,
        p99_ms_hostile=round(p99_h, 3), p99_ms_clean=round(p99_c, 3), p99_ratio=round(p99_h / p99_c, 3) if p99_c else None,
        p99_ratio_per_block=[round(r, 3) for r in block_ratios], p99_ratio_median_block=round(median_ratio, 3),
        p50_ms_hostile=round(float(np.median(lat_h)), 3) if lat_h.size else None,
        p50_ms_clean=round(float(np.median(lat_c)), 3) if lat_c.size else None,
        latency_samples_hostile=int(lat_h.size), latency_samples_clean=int(lat_c.size),
        stores_on_tmpfs=str(hostile.store_dir).startswith("/dev/shm"),
        agents_on_cores_of_their_own=apart.pinned, test_process_niced=apart.niced,
        publisher_fell_behind=slips, publisher_behind_s=round(slipped_s, 3),
        flood_rate=round(flood_rate), paced_rate=round(rate, 1),
        build_s=round(build_s, 1), internal_errors=status.get("internal_errors"),
        callback_errors=(status.get("transport") or {}).get("callback_errors"), check=result.summary(),
    )
    report.expect("the agent handled every message it was sent (stored or dead-lettered)",
                  caught_up, f"{handled_count(db)} handled of {len(stream) - len(hostile.sensors.refused)}")
    report.expect("0 crashes: the agent ran throughout and stopped cleanly",
                  hostile.alive_throughout and hostile.exit_code == 0 and status.get("internal_errors") == 0
                  and (status.get("transport") or {}).get("callback_errors") == 0,
                  f"alive={hostile.alive_throughout} exit={hostile.exit_code} status={status}")
    report.expect("the dead-letter count equals the bad count exactly", len(dead_rows) == len(delivered),
                  f"{len(dead_rows)} dead letters for {len(delivered)} bad messages delivered; not dead-lettered by kind: {dict(missed)}")
    report.expect("every bad message became a dead letter", not missed, dict(missed))
    report.expect("0 bad readings reach the learner", result.bad_stored == 0 and result.digest_ok,
                  f"{result.bad_stored} bad messages stored as readings (and learned); examples {result.examples.get('bad_stored')}")
    report.expect("every good reading learned once", result.lost == 0 and result.twice == 0, result.summary())
    # both agents timed over the same seconds: the machine's background load, which moved p99 by 2x
    # and more from minute to minute when the two took turns, falls on both alike
    ratio = p99_h / p99_c if p99_c else float("inf")
    report.expect(f"good-message p99 handling time within {P99_FACTOR}x of the clean agent's", ratio <= P99_FACTOR,
                  f"p99 {p99_h:.3f} ms hostile vs {p99_c:.3f} ms clean: x{ratio:.2f} "
                  f"({lat_h.size} and {lat_c.size} readings; by block {[round(r, 2) for r in block_ratios]})")
    report.expect("the 10 MB payload never reached the agent", "too_large" not in reasons or reasons["too_large"] <= sum(
        1 for k in kinds.values() if k in ("nesting_100k_deep", "just_under_1mib")), ten_mb)
    report.headline = (f"{len(dead_rows)}/{len(delivered)} bad dead-lettered, {result.bad_stored} bad learned; "
                       f"good readings' p99 x{ratio:.2f} of a clean agent's, timed side by side")
    report.verify()
