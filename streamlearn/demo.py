"""``streamlearn demo``: the agent on simulated drifting sensors, end to end.

Finds or starts a broker, runs the agent in this process on the embedded demo
config, publishes simulated readings (with a concept drift half-way and a few
bad payloads), counts the predictions that come back over MQTT, and prints what
the models learned.
"""

from __future__ import annotations

import shutil
import threading
import time
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from streamlearn.config import Config, parse_config
from streamlearn.errors import BrokerError, TransportError
from streamlearn.transport.broker import AmqttProcess, MosquittoProcess, reachable

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 48) -> str:
    """Values as a line of block characters (higher = taller).

    >>> sparkline([0.0, 1.0, 2.0], width=3)
    '▁▅█'
    """
    if not values:
        return ""
    step = max(1, len(values) // width)
    vals = [sum(values[i:i + step]) / len(values[i:i + step]) for i in range(0, len(values), step)][:width]
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in vals)


def demo_config(workdir: Path, host: str, port: int, protocol: str) -> Config:
    data: dict[str, Any] = tomllib.loads(resources.files("streamlearn.data").joinpath("demo.toml").read_text())
    data["mqtt"] = {"host": host, "port": port, "protocol": protocol, "client_id": "streamlearn-demo"}
    data["store"]["path"] = str(workdir / "streamlearn.db")
    return parse_config(data)


def _write_config_copy(config: Config, workdir: Path) -> Path:
    """The demo config as TOML, so ``streamlearn status -c`` works afterwards."""
    path = workdir / "demo.toml"
    text = resources.files("streamlearn.data").joinpath("demo.toml").read_text()
    header = (
        f'[mqtt]\nhost = "{config.mqtt.host}"\nport = {config.mqtt.port}\n'
        f'protocol = "{config.mqtt.protocol}"\nclient_id = "streamlearn-demo"\n\n'
    )
    text = text.replace("[store]\n", f'[store]\npath = "{config.store.path.resolve()}"\n', 1)
    path.write_text(header + text)
    return path


def run_demo(workdir: Path, messages: int, rate: float, broker: str | None) -> None:
    """Run the demo against ``broker`` (``host:port``), or a broker it starts.

    Without ``broker`` a private Mosquitto with the shipped gateway config is
    preferred over the machine's broker, whose defaults (a queue of 1000 per
    offline client) may drop readings; then a broker on 127.0.0.1:1883; then amqtt.
    """
    console = Console(width=None if Console().is_terminal else 100)
    workdir.mkdir(parents=True, exist_ok=True)
    started: MosquittoProcess | AmqttProcess | None = None
    protocol = "5"
    if broker is not None:
        host, _, port_text = broker.partition(":")
        host, port = host or "127.0.0.1", int(port_text or 1883)
        if not reachable(host, port):
            raise BrokerError(f"no broker answers at {host}:{port}")
        console.print(f"using the broker at {host}:{port}")
    else:
        try:
            started = MosquittoProcess(workdir=workdir / "broker").start()
            console.print(f"started mosquitto on 127.0.0.1:{started.port} with the shipped gateway config")
        except BrokerError as exc:
            if reachable("127.0.0.1", 1883):
                console.print(f"({exc}); using the broker at 127.0.0.1:1883")
                started = None
            elif AmqttProcess.available():
                started = AmqttProcess().start()
                protocol = "3.1.1"
                console.print(f"started the pure-Python amqtt broker on 127.0.0.1:{started.port} (MQTT 3.1.1)")
            else:
                raise BrokerError(f"no broker on 127.0.0.1:1883 and none could be started: {exc}") from None
        host, port = "127.0.0.1", started.port if started is not None else 1883
    try:
        _run(console, workdir, messages, rate, host, port, protocol)
    finally:
        if started is not None:
            started.stop()


def _run(console: Console, workdir: Path, messages: int, rate: float, host: str, port: int, protocol: str) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from streamlearn.agent import Agent, open_store
    from streamlearn.sim import Publisher, SensorSimulator
    from streamlearn.store import reader
    from streamlearn.transport.mqtt import MqttTransport

    for name in ("streamlearn.db", "streamlearn.db-wal", "streamlearn.db-shm"):
        (workdir / name).unlink(missing_ok=True)
    config = demo_config(workdir, host, port, protocol)
    config_path = _write_config_copy(config, workdir)

    # a downstream consumer: counts the predictions and dead letters that come back
    received = {"prediction": 0, "dead-letter": 0}
    watcher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="streamlearn-demo-watcher")

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        if kind in received:
            received[kind] += 1

    watcher.on_message = on_message
    watcher.on_connect = lambda c, u, f, rc, p: c.subscribe([("streamlearn/demo/+/+/prediction", 1),
                                                               ("streamlearn/demo/dead-letter", 1)])
    watcher.connect(host, port)
    watcher.loop_start()

    store = open_store(config)
    transport = MqttTransport(config.mqtt, config.client_id, "streamlearn/demo/status",
                              network_loop=config.mqtt.network_loop)
    agent = Agent(config, transport, store)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), name="agent", daemon=True)
    thread.start()
    if not transport.wait_connected(15):
        stop.set()
        raise TransportError(f"the agent could not connect to {host}:{port}: {transport.last_error}")

    sims = [SensorSimulator(s, devices=4, seed=i, drift_at=messages // 2, bad_every=500)
            for i, s in enumerate(config.streams)]
    streams = [iter(sim.messages(messages)) for sim in sims]
    publisher = Publisher(host, port, client_id="streamlearn-demo-sensors")
    total = messages * len(streams)
    published = 0
    start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("publishing simulated readings", total=total)
        for i in range(messages):
            for it in streams:
                msg = next(it)
                wait = start + published / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                publisher.publish(msg.topic, msg.payload)
                published += 1
            if i % 100 == 0:
                progress.update(task, completed=published)
        progress.update(task, completed=published, description="waiting for the agent to catch up")
        publisher.flush(60)
        deadline = time.monotonic() + 60
        while agent.counters["received"] < total and time.monotonic() < deadline:
            time.sleep(0.05)
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join(30)
    publisher.close()
    deadline = time.monotonic() + 5
    readings = agent.counters["processed"]
    while received["prediction"] < readings and time.monotonic() < deadline:
        time.sleep(0.05)
    watcher.disconnect()
    watcher.loop_stop()
    store.close()
    _report(console, config, config_path, workdir, total, elapsed, received, messages // 2)


def _report(console: Console, config: Config, config_path: Path, workdir: Path, total: int,
            elapsed: float, received: dict[str, int], drift_at: int) -> None:
    from streamlearn.store import reader

    conn = reader.open_readonly(config.store.path)
    status = reader.stream_status(conn)
    table = Table(title=f"what the agent learned ({total} messages in {elapsed:.1f} s)")
    for col in ("stream", "devices", "readings", "learned", "bad", "error", "baseline", "error over time"):
        table.add_column(col, no_wrap=True)
    for row in status:
        history = reader.metrics_history(conn, row["stream"])
        curve = [h["error"] for h in history if h["error"] is not None]
        table.add_row(
            row["stream"], str(row["models"]), str(row["messages"]), str(row["learned"]),
            str(row["dead_letters"]), f"{row['error']:.3f}" if row["error"] is not None else "-",
            f"{row['baseline_error']:.3f}" if row["baseline_error"] is not None else "-",
            sparkline(curve, width=24),
        )
    console.print(table)
    console.print("error: mean absolute error of the published predictions (moving average); baseline:\n"
                  "the same for always predicting the mean so far. The concept drifts half-way.")
    reasons = conn.execute("SELECT reason, count(*) FROM dead_letter GROUP BY reason ORDER BY 2 DESC").fetchall()
    console.print(
        f"predictions received over MQTT: {received['prediction']}; dead letters published: "
        f"{received['dead-letter']} ({', '.join(f'{r}: {n}' for r, n in reasons) or 'none'})"
    )
    console.print(
        "the boiler models predict power from four sensors (labels in the payload); the pump models\n"
        "forecast vibration 5 readings ahead with no labels at all, and publish an anomaly score."
    )
    console.print(f"\nstore: {config.store.path}\nnext: streamlearn status -c {config_path}"
                  f"\n      streamlearn dead-letters -c {config_path}"
                  f"\n      sqlite-utils tables {config.store.path} --counts")
    if shutil.which("sqlite-utils") is None:
        console.print("(sqlite-utils is installed in the virtualenv: .venv/bin/sqlite-utils)")
