"""The agent end to end: a real Mosquitto, the agent as a process, a real SQLite store."""

from __future__ import annotations

import collections
import sqlite3
import threading
from pathlib import Path

import orjson
import pytest

from streamlearn.config import parse_config
from streamlearn.dedupe import payload_hash
from streamlearn.sim import Publisher, SensorSimulator, SimMessage
from streamlearn.store import reader
from tests.helpers import AgentProcess, Collector, base_config, wait_for, write_config

DIGEST_MOD = 1 << 64


def stream_state(store: Path, stream: str) -> dict:
    conn = reader.open_readonly(store)
    try:
        row = conn.execute("SELECT state FROM stream_state WHERE stream = ?", (stream,)).fetchone()
        return orjson.loads(row[0]) if row else {}
    finally:
        conn.close()


def start_agent(tmp_path: Path, data: dict, port: int) -> tuple[AgentProcess, Collector]:
    config_path = write_config(tmp_path / "agent.toml", data)
    status = Collector(port, ["streamlearn/gw/status"], client_id=f"status-{tmp_path.name}")
    agent = AgentProcess(config_path, tmp_path / "agent.log").start()
    wait_for(lambda: (b"online" in [p for _, p in status.matching("/status")[-1:]]) or not agent.alive(),
             20, what="agent online")
    assert agent.alive(), agent.log()
    return agent, status


@pytest.mark.parametrize("network_loop", ["thread", "agent"])
def test_every_reading_gets_one_prediction_and_the_model_learns(broker, tmp_path: Path, network_loop: str) -> None:
    data = base_config(tmp_path / "s.db", broker.port)
    data["mqtt"]["network_loop"] = network_loop
    data["mqtt"]["client_id"] = f"every-{network_loop}"
    cfg = parse_config(data)
    sim = SensorSimulator(cfg.streams[0], devices=4, seed=1, bad_every=50)
    messages = list(sim.messages(3000))
    readings = [m for m in messages if m.kind == "reading"]
    bad = [m for m in messages if m.kind == "bad"]
    assert len(bad) == 60

    predictions = Collector(broker.port, ["streamlearn/gw/+/+/prediction", "streamlearn/gw/dead-letter"],
                            client_id=f"pred-collector-{network_loop}")
    agent, status = start_agent(tmp_path, data, broker.port)
    try:
        pub = Publisher("127.0.0.1", broker.port)
        pub.publish_all(messages, rate=1500)
        assert pub.flush(30)
        pub.close()
        got = predictions.wait_count("/prediction", len(readings), timeout=60)
        dead = predictions.wait_count("/dead-letter", len(bad), timeout=30)
        assert agent.terminate() == 0
    finally:
        agent.stop_quietly()
        predictions.close()
        status.close()

    # exactly one prediction per reading, and each names its reading
    per_reading = collections.Counter()
    for topic, payload in got:
        body = orjson.loads(payload)
        assert topic == f"streamlearn/gw/boiler/{body['device']}/prediction"
        assert isinstance(body["prediction"], float) and body["model_version"] >= 0 and body["latency_ms"] >= 0
        per_reading[(body["device"], body["id"])] += 1
    expected = {(m.device, f"b0|{m.seq}") for m in readings}
    assert set(per_reading) == expected
    assert max(per_reading.values()) == 1
    # the bad payloads are dead letters, in the table and on the topic, with reasons
    conn = reader.open_readonly(tmp_path / "s.db")
    reasons = collections.Counter(r for (r,) in conn.execute("SELECT reason FROM dead_letter"))
    assert sum(reasons.values()) == len(bad) == len(dead)
    assert set(reasons) <= {"not_json", "empty", "bad_utf8", "not_object", "non_finite"}
    assert {orjson.loads(p)["reason"] for _, p in dead} == set(reasons)
    # the model learned: its rolling error ends well below predicting the mean
    (status_row,) = reader.stream_status(conn)
    assert status_row["learned"] == len(readings) and status_row["skipped"] == 0
    assert status_row["error"] < 0.5 * status_row["baseline_error"], status_row
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def publish_in_background(port: int, messages: list[SimMessage], rate: float) -> tuple[threading.Thread, list]:
    progress: list = [0, None]

    def run() -> None:
        try:
            pub = Publisher("127.0.0.1", port, client_id="restart-sensors")
            for msg in messages:
                pub.publish_all([msg], rate=None)
                progress[0] += 1
                if rate:
                    threading.Event().wait(1.0 / rate)
            pub.flush(60)
            pub.close()
        except Exception as exc:  # reported to the test thread
            progress[1] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, progress


@pytest.mark.parametrize(("protocol", "network_loop"), [("5", "thread"), ("3.1.1", "thread"), ("5", "agent")])
def test_restart_by_sigterm_and_kill9_learns_every_reading_exactly_once(broker, tmp_path: Path, protocol: str,
                                                                       network_loop: str) -> None:
    data = base_config(tmp_path / "s.db", broker.port)
    data["mqtt"]["protocol"] = protocol
    data["mqtt"]["network_loop"] = network_loop
    data["mqtt"]["client_id"] = f"restart-{protocol}-{network_loop}"
    cfg = parse_config(data)
    readings = list(SensorSimulator(cfg.streams[0], devices=3, seed=2).messages(4000))

    agent, status = start_agent(tmp_path, data, broker.port)
    try:
        thread, progress = publish_in_background(broker.port, readings, rate=800)
        wait_for(lambda: progress[0] >= 1000, 30, what="1000 published")
        assert agent.terminate() == 0  # SIGTERM: clean stop with a final checkpoint
        wait_for(lambda: progress[0] >= 1500, 30, what="publisher keeps going while the agent is down")
        agent.start()
        wait_for(lambda: progress[0] >= 2500, 30, what="2500 published")
        agent.kill()  # kill -9 mid-stream
        checkpoint_before = sqlite3.connect(tmp_path / "s.db").execute("SELECT max(id) FROM checkpoints").fetchone()[0]
        agent.start()
        thread.join(120)
        assert progress[1] is None, progress[1]
        assert progress[0] == len(readings)
        wait_for(lambda: stream_state(tmp_path / "s.db", "boiler").get("counters", {}).get("learned_count", 0)
                 >= len(readings), 60, interval=0.2, what="all readings learned")
        assert agent.terminate() == 0
    finally:
        agent.stop_quietly()
        status.close()

    state = stream_state(tmp_path / "s.db", "boiler")
    expected_digest = sum(payload_hash(m.topic, m.payload) for m in readings) % DIGEST_MOD
    assert state["counters"]["learned_count"] == len(readings)
    assert state["counters"]["learned_digest"] == expected_digest  # no reading missed or learned twice
    conn = reader.open_readonly(tmp_path / "s.db")
    keys = collections.Counter(k for (k,) in conn.execute("SELECT msg_key FROM inbox"))
    assert len(keys) == len(readings) and max(keys.values()) == 1
    learned = sum(orjson.loads(s)["learner"]["n_learned"] for (s,) in conn.execute("SELECT state FROM current_models"))
    assert learned == len(readings)  # the models resumed, they were not reset
    reasons = [r for (r,) in conn.execute("SELECT reason FROM checkpoints WHERE id > ?", (checkpoint_before,))]
    log = (tmp_path / "agent.log").read_text()
    assert "resumed checkpoint" in log
    assert reasons, "no checkpoint after the restart"
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_topic_labels_join_to_their_readings(broker, tmp_path: Path) -> None:
    data = base_config(
        tmp_path / "s.db", broker.port, name="press", topic="plant/+/press",
        task="multiclass", classes=["idle", "run", "fault"],
        label={"source": "topic", "topic": "plant/+/press/label", "id_field": "rid", "field": "state"},
    )
    data["mqtt"]["client_id"] = "labels-topic"
    cfg = parse_config(data)
    messages = list(SensorSimulator(cfg.streams[0], devices=2, seed=3).messages(2500))
    n_labels = sum(m.kind == "label" for m in messages)
    agent, status = start_agent(tmp_path, data, broker.port)
    try:
        pub = Publisher("127.0.0.1", broker.port, client_id="label-sensors")
        pub.publish_all(messages, rate=2000)
        pub.publish_all([SimMessage("plant/dev000/press/label", b'{"rid": "nobody", "state": "run"}', "label", "", 0)])
        assert pub.flush(30)
        pub.close()
        wait_for(lambda: stream_state(tmp_path / "s.db", "press").get("counters", {}).get("labels_unmatched", 0) >= 1,
                 60, interval=0.2, what="the stray label")
        assert agent.terminate() == 0
    finally:
        agent.stop_quietly()
        status.close()
    state = stream_state(tmp_path / "s.db", "press")
    assert state["counters"]["learned_count"] == n_labels
    assert state["counters"]["labels_unmatched"] == 1
    (row,) = reader.stream_status(reader.open_readonly(tmp_path / "s.db"))
    assert row["labelled"] == n_labels
    assert row["error"] < row["baseline_error"], row  # better than always guessing the majority class


def test_forecast_learns_without_labels(broker, tmp_path: Path) -> None:
    data = base_config(
        tmp_path / "s.db", broker.port, name="pump", topic="plant/+/pump",
        features=["vibration", "current"], lags=2,
        label={"source": "forecast", "field": "vibration", "horizon": 5},
        model={"kind": "mlp", "hidden": [16]}, optimizer={"name": "sgd", "lr": 0.02},
    )
    data["mqtt"]["client_id"] = "labels-forecast"
    cfg = parse_config(data)
    messages = list(SensorSimulator(cfg.streams[0], devices=2, seed=4).messages(3000))
    predictions = Collector(broker.port, ["streamlearn/gw/pump/+/prediction"], client_id="forecast-collector")
    agent, status = start_agent(tmp_path, data, broker.port)
    try:
        pub = Publisher("127.0.0.1", broker.port, client_id="forecast-sensors")
        pub.publish_all(messages, rate=2000)
        assert pub.flush(30)
        pub.close()
        got = predictions.wait_count("/prediction", len(messages), timeout=60)
        assert agent.terminate() == 0
    finally:
        agent.stop_quietly()
        predictions.close()
        status.close()
    # each device's first `horizon` readings have no target yet; every later one teaches the model
    assert stream_state(tmp_path / "s.db", "pump")["counters"]["learned_count"] == len(messages) - 2 * 5
    bodies = [orjson.loads(p) for _, p in got]
    scores = [b["anomaly_score"] for b in bodies if "anomaly_score" in b]
    assert len(scores) == len(messages) - 2 * 5 and all(s >= 0 for s in scores)
    (row,) = reader.stream_status(reader.open_readonly(tmp_path / "s.db"))
    assert row["error"] < 0.5 * row["baseline_error"], row


def test_a_drift_leaves_a_history_row_a_rate_change_and_a_message(broker, tmp_path: Path) -> None:
    data = base_config(tmp_path / "s.db", broker.port, per_device=False,
                       schedule={"policy": "drift_reset", "boost": 5.0, "half_life": 300},
                       optimizer={"name": "sgd", "lr": 0.02})
    data["mqtt"]["client_id"] = "drift-agent"
    # strict test-then-train: a slow machine falls behind 2,000 msg/s, and with this fixed-rate
    # policy the switch into micro-batches (slower learning per reading) can itself look like a
    # drift (README, Known shortfalls); this test is about the drift the simulator makes
    data["agent"]["micro_batch"] = False
    cfg = parse_config(data)
    messages = list(SensorSimulator(cfg.streams[0], devices=2, seed=5, drift_at=2500).messages(5000))
    watcher = Collector(broker.port, ["streamlearn/gw/boiler/drift", "streamlearn/gw/boiler/+/prediction"],
                        client_id="drift-watcher")
    agent, status = start_agent(tmp_path, data, broker.port)
    try:
        pub = Publisher("127.0.0.1", broker.port, client_id="drift-sensors")
        pub.publish_all(messages, rate=2000)
        assert pub.flush(30)
        pub.close()
        watcher.wait_count("/prediction", len(messages), timeout=60)
        drift_messages = watcher.wait_count("/drift", 1, timeout=10)
        assert agent.terminate() == 0
    finally:
        agent.stop_quietly()
        watcher.close()
        status.close()
    conn = reader.open_readonly(tmp_path / "s.db")
    events = [e for e in reader.drift_events(conn, stream="boiler") if e["detector"] != "policy"]
    assert events, "no drift in the history"
    first = events[0]
    assert 2500 <= first["step"] < 2500 + 500  # found within 500 readings of the change
    assert "page_hinkley" in first["detector"] and first["action"] == "boost"
    assert first["lr_after"] == pytest.approx(5 * first["lr_before"])
    body = orjson.loads(drift_messages[0][1])
    assert body["action"] == "boost" and body["lr_after"] == pytest.approx(first["lr_after"])
    # the boosted rate shows in the predictions published after the drift
    rates = {orjson.loads(p)["lr"] for _, p in watcher.matching("/prediction")}
    assert max(rates) == pytest.approx(first["lr_after"]) and min(rates) == pytest.approx(0.02)
