"""Read-only views of a store for the CLI, safe while the agent writes.

The connection is opened with ``mode=ro``: a reader can never write, and in WAL
mode it never blocks the agent.
"""

from __future__ import annotations

import fcntl
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from streamlearn.errors import StoreError


def open_readonly(path: str | Path) -> sqlite3.Connection:
    """A read-only connection; StoreError when the file is missing or not a store."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such store (has the agent run with this config?)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("SELECT 1 FROM checkpoints LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a streamlearn store ({exc})") from None
    return conn


def agent_running(path: str | Path) -> bool:
    """True when an agent holds the store's lock."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    if not lock.exists():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


def rows(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    cur = conn.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def stream_status(conn: sqlite3.Connection, now: float | None = None) -> list[dict[str, Any]]:
    """Per stream: messages, labelled, learned, dead letters, loss, error and checkpoint age."""
    now = time.time() if now is None else now
    last = conn.execute("SELECT created_at, position FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
    out = []
    for r in rows(
        conn,
        "SELECT m.* FROM metrics m JOIN (SELECT stream, max(id) AS id FROM metrics GROUP BY stream) l"
        " ON m.id = l.id ORDER BY m.stream",
    ):
        models = conn.execute("SELECT count(*) FROM current_models WHERE stream = ?", (r["stream"],)).fetchone()[0]
        dead = conn.execute("SELECT count(*) FROM dead_letter WHERE stream = ?", (r["stream"],)).fetchone()[0]
        out.append({
            "stream": r["stream"],
            "models": models,
            "messages": r["messages"],
            "labelled": r["labelled"],
            "batched": r["batched"],
            "learned": r["learned"],
            "skipped": r["skipped"],
            "dead_letters": dead,
            "loss": r["loss"],
            "error": r["error"],
            "baseline_error": r["baseline_error"],
            "lr": r["lr"],
            "checkpoint_age_s": None if last is None else round(now - last[0], 1),
        })
    return out


def store_summary(conn: sqlite3.Connection) -> dict[str, Any]:
    last = conn.execute(
        "SELECT id, created_at, position, duration_ms FROM checkpoints ORDER BY id DESC LIMIT 1"
    ).fetchone()
    inbox = conn.execute("SELECT count(*), min(seq), max(seq) FROM inbox").fetchone()
    unrouted = conn.execute("SELECT count(*) FROM dead_letter WHERE stream IS NULL").fetchone()[0]
    return {
        "checkpoint_id": last[0] if last else None,
        "checkpoint_at": last[1] if last else None,
        "position": last[2] if last else 0,
        "inbox_rows": inbox[0],
        "inbox_last_seq": inbox[2] or 0,
        "unreplayed": max(0, (inbox[2] or 0) - (last[2] if last else 0)),
        "dead_letters_unrouted": unrouted,
    }


def dead_letters(conn: sqlite3.Connection, stream: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    sql = "SELECT id, received_at, topic, stream, reason, detail, payload_size, payload FROM dead_letter"
    params: tuple[Any, ...] = ()
    if stream is not None:
        sql += " WHERE stream = ?"
        params = (stream,)
    sql += " ORDER BY id DESC LIMIT ?"
    out = rows(conn, sql, params + (limit,))
    for r in out:
        r["payload"] = bytes(r["payload"][:120]).decode("utf-8", "replace")
    return out


def metrics_history(conn: sqlite3.Connection, stream: str) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM metrics WHERE stream = ? ORDER BY id", (stream,))


def model_states(conn: sqlite3.Connection, stream: str) -> list[dict[str, Any]]:
    out = []
    for key, state, updated in conn.execute(
        "SELECT model_key, state, updated_at FROM current_models WHERE stream = ? ORDER BY model_key", (stream,)
    ):
        s = orjson.loads(state)
        out.append({"model_key": key, "updated_at": updated, **s["metrics"],
                    "n_learned": s["learner"]["n_learned"], "n_skipped": s["learner"]["n_skipped"]})
    return out


def drift_events(conn: sqlite3.Connection, stream: str | None = None, device: str | None = None,
                 since: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Drift detections and learning-rate decisions, oldest first."""
    where, params = [], []
    if stream is not None:
        where.append("stream = ?")
        params.append(stream)
    if device is not None:
        where.append("model_key = ?")
        params.append(device)
    if since is not None:
        where.append("at >= ?")
        params.append(since)
    sql = ("SELECT id, at, stream, model_key AS device, step, detector, statistic, action, lr_before, lr_after,"
           " loss_before FROM drift_events")
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id"
    if limit is not None:
        sql = f"SELECT * FROM ({sql[:-len(' ORDER BY id')]} ORDER BY id DESC LIMIT {int(limit)}) ORDER BY id"
    return rows(conn, sql, tuple(params))


def parse_since(text: str, now: float | None = None) -> float:
    """``1h``, ``30m``, ``2d``, ``45s``, an ISO date/time, or epoch seconds -> epoch seconds.

    >>> parse_since("2h", now=10_000.0)
    2800.0
    >>> parse_since("1970-01-02T00:00:00+00:00")
    86400.0
    """
    import datetime as dt

    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    text = text.strip()
    if text[:-1].replace(".", "", 1).isdigit() and text[-1:] in units:
        return now - float(text[:-1]) * units[text[-1]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: expected 30m, 2h, 7d, an ISO date/time or epoch seconds") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def health(path: str | Path) -> dict[str, Any] | None:
    """The agent's last health report written next to the store, or None."""
    target = Path(path).with_name(Path(path).name + ".health.json")
    try:
        data = orjson.loads(target.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
