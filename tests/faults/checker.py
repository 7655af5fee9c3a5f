"""A Jepsen-like checker: what happened to every published reading, read from the store.

The simulator stamps every reading with (device, boot id, sequence number). After
a fault test the checker opens the agent's SQLite file read-only and decides, for
each published reading, whether it was

* **lost**: not in the inbox (the broker handed it over and it was acked, or it
  never arrived), or stored but never learned;
* **learned once**; or
* **learned twice**: stored twice, or learned twice from one row (a replay after
  a checkpoint that already held it).

The inbox says what was stored: a published reading with no inbox row is lost
(the broker handed it over and it was acked, or it never arrived); one with two
rows is stored twice. What was learned is in the stream's counters in
``stream_state`` (``learned_count`` and ``learned_digest``, the sum mod 2**64 of
the payload hashes of every learned reading), which the agent writes in the same
transaction as the models. Two comparisons use them:

* end to end, against the published good readings: a correct count and digest
  mean every one was learned exactly once (a wrong set with the same count and
  the same 64-bit sum is vanishingly unlikely);
* against the inbox (every stored row must be learned once): a difference there
  is a learning error, a row replayed twice or skipped. Where it is one or two
  readings the checker names them (it looks the digest difference up among the
  published hashes); otherwise it reports how many it cannot attribute.

It also checks the latest checkpoint: every model blob loads with safetensors
and holds only finite numbers, the JSON state parses, and the counters written
with it match the inbox rows up to its position (learned exactly once at every
checkpoint, not just at the end).
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from safetensors.numpy import load as load_tensors

from streamlearn.dedupe import payload_hash
from streamlearn.sim import SimMessage

DIGEST_MOD = 1 << 64
Key = tuple[str, str, int]  # (device, boot, seq)


def connect_ro(db: Path) -> Any:
    """A read-only connection to the store (through a helper when it lives in another mount namespace)."""
    for outside, (inside, helper) in _REMOTE.items():
        if str(db).startswith(outside):
            return helper.connect(inside + str(db)[len(outside):])
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


# -- stores in another mount namespace -----------------------------------------------------
#
# SQLite resolves symbolic links in a database path, so a store on a file system mounted in
# another mount namespace cannot be opened through /proc/<pid>/root/... (that magic link
# resolves to "/"). A small helper process started inside the namespace runs the checker's
# read-only queries instead and sends the rows back as JSON lines.

_HELPER_SCRIPT = r"""
import base64, json, sqlite3, sys
conns = {}
def enc(v):
    return {"$b": base64.b64encode(bytes(v)).decode()} if isinstance(v, (bytes, memoryview)) else v
for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["op"] == "open":
            c = sqlite3.connect("file:" + req["db"] + "?mode=ro", uri=True, timeout=10)
            c.execute("PRAGMA busy_timeout=10000")
            conns[len(conns) + 1] = c
            out = {"id": len(conns)}
        elif req["op"] == "query":
            rows = conns[req["id"]].execute(req["sql"], req["params"]).fetchall()
            out = {"rows": [[enc(v) for v in r] for r in rows]}
        else:
            conns.pop(req["id"]).close()
            out = {}
    except sqlite3.Error as exc:
        out = {"error": str(exc), "type": type(exc).__name__}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


class _RemoteCursor:
    def __init__(self, rows: list[list[Any]]) -> None:
        self._rows = [tuple(self._dec(v) for v in r) for r in rows]

    @staticmethod
    def _dec(v: Any) -> Any:
        if isinstance(v, dict) and "$b" in v:
            import base64

            return base64.b64decode(v["$b"])
        return v

    def fetchone(self) -> tuple | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[tuple]:
        return list(self._rows)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._rows)


class _RemoteConnection:
    def __init__(self, helper: SqlHelper, conn_id: int) -> None:
        self._helper = helper
        self._id = conn_id

    def execute(self, sql: str, params: tuple | list = ()) -> _RemoteCursor:
        return _RemoteCursor(self._helper.call({"op": "query", "id": self._id, "sql": sql, "params": list(params)})["rows"])

    def close(self) -> None:
        self._helper.call({"op": "close", "id": self._id})


class SqlHelper:
    """Runs read-only SQLite queries inside another mount namespace (``prefix`` enters it)."""

    def __init__(self, prefix: list[str]) -> None:
        import json
        import subprocess
        import sys
        import threading

        self._json = json
        self._lock = threading.Lock()
        self.proc = subprocess.Popen([*prefix, sys.executable, "-u", "-c", _HELPER_SCRIPT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(self._json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise sqlite3.OperationalError("the namespace SQL helper exited")
        reply = self._json.loads(line)
        if "error" in reply:
            raise getattr(sqlite3, reply["type"], sqlite3.Error)(reply["error"])
        return reply

    def connect(self, db: str) -> _RemoteConnection:
        return _RemoteConnection(self, self.call({"op": "open", "db": db})["id"])

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


_REMOTE: dict[str, tuple[str, SqlHelper]] = {}


def register_remote(outside: Path, inside: Path, helper: SqlHelper) -> None:
    """Send queries for stores under ``outside`` to ``helper``, as paths under ``inside``."""
    _REMOTE[str(outside)] = (str(inside), helper)


def unregister_remote(outside: Path) -> None:
    _REMOTE.pop(str(outside), None)


def integrity(db: Path) -> str:
    conn = connect_ro(db)
    try:
        return "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check").fetchall())
    finally:
        conn.close()


def key_of(msg: SimMessage) -> Key:
    body = orjson.loads(msg.payload)
    return (msg.device, str(body["boot"]), int(body["seq"]))


def _key_from_row(msg_key: str | None, device: str, payload: bytes) -> Key | None:
    if msg_key:
        parts = msg_key.split("|")
        if len(parts) >= 4:
            try:
                return (parts[1], parts[2], int(parts[3]))
            except ValueError:
                return None
    try:
        body = orjson.loads(payload)
        return (device, str(body["boot"]), int(body["seq"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def stream_counters(db: Path, stream: str = "boiler") -> dict[str, int]:
    """``learned_count`` and friends as of the latest checkpoint (empty before the first)."""
    try:
        conn = connect_ro(db)
    except sqlite3.Error:
        return {}
    try:
        row = conn.execute("SELECT state FROM stream_state WHERE stream = ?", (stream,)).fetchone()
    except sqlite3.Error:
        return {}
    finally:
        conn.close()
    return orjson.loads(row[0]).get("counters", {}) if row else {}


@dataclass
class CheckResult:
    published: int
    lost: int
    twice: int
    once: int
    lost_before_store: int
    stored_twice: int
    not_learned: int
    learned_twice: int
    unexplained: int
    learned_count: int
    expected_learned: int
    digest_ok: bool
    bad_stored: int
    unknown_stored: int
    altered: int
    integrity: str
    inbox_rows: int
    inbox_pruned: bool
    examples: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def exactly_once(self) -> bool:
        return self.lost == 0 and self.twice == 0 and self.unexplained == 0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["examples"] = {k: v[:5] for k, v in self.examples.items() if v}
        return out


def _solve(diff: int, count_diff: int, hashes: dict[int, Key]) -> tuple[list[Key], list[Key]] | None:
    """Readings (learned extra, not learned) explaining a digest/count difference of 1-2 readings."""
    if count_diff == 1 and diff in hashes:
        return [hashes[diff]], []
    if count_diff == -1 and (-diff) % DIGEST_MOD in hashes:
        return [], [hashes[(-diff) % DIGEST_MOD]]
    if count_diff in (0, 2, -2):
        for h, k in hashes.items():
            if count_diff == 0:  # one extra (h), one missing (h2): h - h2 = diff
                other = (h - diff) % DIGEST_MOD
                if other in hashes and other != h:
                    return [k], [hashes[other]]
            elif count_diff == 2:
                other = (diff - h) % DIGEST_MOD
                if other in hashes:
                    return [k, hashes[other]], []
            else:
                other = (-diff - h) % DIGEST_MOD
                if other in hashes:
                    return [], [k, hashes[other]]
    return None


def check_store(
    db: Path,
    good: list[SimMessage],
    bad: Iterable[SimMessage] = (),
    stream: str = "boiler",
    every_row_learns: bool = True,
) -> CheckResult:
    """Classify every published good reading as lost / learned once / learned twice.

    ``good`` are the readings that must be learned (each has a target); ``bad``
    the messages that must not reach the inbox or the learner.
    """
    good_hash = {key_of(m): payload_hash(m.topic, m.payload) % DIGEST_MOD for m in good}
    bad_hashes = {payload_hash(m.topic, m.payload) % DIGEST_MOD for m in bad}
    integrity_text = integrity(db)
    conn = connect_ro(db)
    try:
        rows = conn.execute(
            "SELECT seq, device, msg_key, payload_hash, payload FROM inbox WHERE stream = ? AND kind = 'reading'",
            (stream,),
        ).fetchall()
        min_seq = conn.execute("SELECT min(seq) FROM inbox").fetchone()[0]
        row = conn.execute("SELECT state FROM stream_state WHERE stream = ?", (stream,)).fetchone()
    finally:
        conn.close()
    counters = orjson.loads(row[0]).get("counters", {}) if row else {}

    stored: Counter[Key] = Counter()
    altered: list[Any] = []
    bad_stored: list[Any] = []
    unknown: list[Any] = []
    for seq, device, msg_key, phash, payload in rows:
        h = int(phash) % DIGEST_MOD
        if h in bad_hashes:
            bad_stored.append((seq, bytes(payload[:80]).decode("utf-8", "replace")))
            continue
        k = _key_from_row(msg_key, device, bytes(payload))
        if k is None or k not in good_hash:
            unknown.append((seq, bytes(payload[:80]).decode("utf-8", "replace")))
            continue
        if good_hash[k] != h:
            altered.append((seq, k))
            continue
        stored[k] += 1

    missing = [k for k in good_hash if stored[k] == 0]
    dup_rows = [k for k, n in stored.items() if n > 1]
    stored_twice = sum(stored[k] - 1 for k in dup_rows)

    expected_count = len(good_hash)
    expected_digest = sum(good_hash.values()) % DIGEST_MOD
    learned_count = int(counters.get("learned_count", 0))
    learned_digest = int(counters.get("learned_digest", 0)) % DIGEST_MOD
    # end to end: exactly the published good readings were learned, each once
    digest_ok = learned_digest == expected_digest and learned_count == expected_count

    # learning against storage: every stored row (good, duplicate, bad or unknown) is learned once,
    # so what the counters say beyond the inbox is a learning error (a reading replayed twice, or skipped)
    row_hashes = [int(r[3]) % DIGEST_MOD for r in rows]
    inbox_count = len(row_hashes)
    inbox_digest = sum(row_hashes) % DIGEST_MOD
    learned_extra: list[Key] = []
    not_learned: list[Key] = []
    unexplained = 0
    if every_row_learns and (learned_count, learned_digest) != (inbox_count, inbox_digest):
        lookup = {h: k for k, h in good_hash.items()}
        count_diff = learned_count - inbox_count
        diff = (learned_digest - inbox_digest) % DIGEST_MOD
        solved = _solve(diff, count_diff, lookup)
        if solved is not None:
            learned_extra, not_learned = solved
        else:
            unexplained = max(1, abs(count_diff))
            if count_diff > 0:
                learned_extra = [("?", "?", -1)] * count_diff
            elif count_diff < 0:
                not_learned = [("?", "?", -1)] * (-count_diff)

    missing_set = set(missing)
    not_learned_only = [k for k in not_learned if k not in missing_set]
    lost = len(missing) + len(not_learned_only)
    twice_keys = set(dup_rows) | {k for k in learned_extra if k[2] >= 0}
    twice = len(twice_keys) + sum(1 for k in learned_extra if k[2] < 0)
    once = len(good_hash) - lost - twice
    return CheckResult(
        published=len(good_hash),
        lost=lost,
        twice=twice,
        once=once,
        lost_before_store=len(missing),
        stored_twice=stored_twice,
        not_learned=len(not_learned_only),
        learned_twice=len(learned_extra),
        unexplained=unexplained,
        learned_count=learned_count,
        expected_learned=expected_count,
        digest_ok=digest_ok,
        bad_stored=len(bad_stored),
        unknown_stored=len(unknown),
        altered=len(altered),
        integrity=integrity_text,
        inbox_rows=len(rows),
        inbox_pruned=bool(min_seq and min_seq > 1),
        examples={
            "lost": [list(k) for k in missing[:5]] + [list(k) for k in not_learned_only[:5]],
            "twice": [list(k) for k in list(twice_keys)[:5]],
            "bad_stored": bad_stored[:5],
            "unknown_stored": unknown[:5],
            "altered": altered[:5],
        },
    )


@dataclass
class CheckpointCheck:
    """The latest checkpoint: does it load, is it finite, does it agree with the inbox?"""

    checkpoint_id: int | None
    position: int
    loads: bool
    finite: bool
    consistent: bool
    models: int
    rows_after: int
    inbox_max_seq: int
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def _finite_json(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_json(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_json(v) for v in value)
    return True


def check_checkpoint(db: Path, stream: str = "boiler", every_row_learns: bool = True) -> CheckpointCheck:
    """Load the latest checkpoint the way a restart would, read-only, and check it.

    With ``every_row_learns`` (every inbox reading of the stream carries its
    target), the stream's ``learned_count``/``learned_digest`` saved with the
    checkpoint must equal the count/sum of the inbox rows up to its position.
    """
    problems: list[str] = []
    conn = connect_ro(db)
    try:
        cp = conn.execute("SELECT id, position FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
        inbox_max = conn.execute("SELECT coalesce(max(seq), 0) FROM inbox").fetchone()[0]
        if cp is None:
            return CheckpointCheck(None, 0, True, True, True, 0, inbox_max, inbox_max)
        cp_id, position = int(cp[0]), int(cp[1])
        loads, finite, n_models = True, True, 0
        for s, key, tensors, state in conn.execute("SELECT stream, model_key, tensors, state FROM current_models"):
            n_models += 1
            try:
                arrays = load_tensors(bytes(tensors))
                parsed = orjson.loads(state)
            except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
                loads = False
                problems.append(f"model {s}/{key} does not load: {exc}")
                continue
            for name, arr in arrays.items():
                if not np.all(np.isfinite(arr)):
                    finite = False
                    problems.append(f"model {s}/{key} tensor {name} holds non-finite values")
            if not _finite_json(parsed):
                finite = False
                problems.append(f"model {s}/{key} JSON state holds non-finite numbers")
        row = conn.execute("SELECT state FROM stream_state WHERE stream = ?", (stream,)).fetchone()
        consistent = True
        pruned = conn.execute("SELECT coalesce(min(seq), 1) FROM inbox").fetchone()[0] > 1
        if pruned:
            problems.append("inbox pruned behind the checkpoint: counters not compared")
        if row is not None and every_row_learns and not pruned:
            try:
                counters = orjson.loads(row[0]).get("counters", {})
            except orjson.JSONDecodeError as exc:
                loads = False
                problems.append(f"stream_state of {stream} does not parse: {exc}")
                counters = {}
            n, total = 0, 0
            for (h,) in conn.execute(
                "SELECT payload_hash FROM inbox WHERE stream = ? AND kind = 'reading' AND seq <= ?", (stream, position)
            ):
                n += 1
                total = (total + int(h)) % DIGEST_MOD
            if int(counters.get("learned_count", -1)) != n or int(counters.get("learned_digest", -1)) % DIGEST_MOD != total:
                consistent = False
                problems.append(
                    f"checkpoint {cp_id} at position {position}: learned_count {counters.get('learned_count')} "
                    f"but {n} inbox readings up to the position (digest {'equal' if int(counters.get('learned_digest', -1)) % DIGEST_MOD == total else 'differs'})"
                )
        rows_after = conn.execute("SELECT count(*) FROM inbox WHERE seq > ?", (position,)).fetchone()[0]
    finally:
        conn.close()
    return CheckpointCheck(cp_id, position, loads, finite, consistent, n_models, rows_after, inbox_max, problems)


def dead_letter_counts(db: Path) -> Counter[str]:
    conn = connect_ro(db)
    try:
        return Counter(r for (r,) in conn.execute("SELECT reason FROM dead_letter"))
    finally:
        conn.close()


def dead_letter_hashes(db: Path) -> list[tuple[str, int, bytes]]:
    """(topic, payload_size, stored head) of every dead letter."""
    conn = connect_ro(db)
    try:
        return [(t, int(n), bytes(p)) for t, n, p in conn.execute("SELECT topic, payload_size, payload FROM dead_letter")]
    finally:
        conn.close()


def _ro_count(db: Path, sql: str) -> int:
    """One integer from the store, read-only; 0 when the store is not there (yet)."""
    try:
        conn = connect_ro(db)
    except sqlite3.Error:
        return 0
    try:
        return int(conn.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def inbox_max_seq(db: Path) -> int:
    """The position of the newest stored message (0 when none or the store is not there yet)."""
    return _ro_count(db, "SELECT coalesce(max(seq), 0) FROM inbox")


def handled_count(db: Path) -> int:
    """Messages the agent has stored, accepted (inbox) or rejected (dead letters)."""
    return _ro_count(db, "SELECT (SELECT count(*) FROM inbox) + (SELECT count(*) FROM dead_letter)")


def checkpoint_position(db: Path) -> int:
    """The inbox position of the latest checkpoint (0 before the first)."""
    return _ro_count(db, "SELECT coalesce((SELECT position FROM checkpoints ORDER BY id DESC LIMIT 1), 0)")
