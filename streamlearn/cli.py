"""The ``streamlearn`` command line.

Commands parse options and call library functions; every ``StreamlearnError``
becomes one line on stderr and exit code 1 (2 for usage errors). Only this module
configures logging and reads the environment. Heavy imports (numpy, paho, the
agent) happen inside the commands that need them, so ``status`` stays quick.
"""

from __future__ import annotations

import csv
import functools
import gc
import io
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from streamlearn.errors import StoreSyncError, StreamlearnError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_RESTART = 75  # EX_TEMPFAIL: the agent stopped on a fault that a restart recovers from
SWITCH_INTERVAL_S = 0.0005  # GIL switch interval of a running agent (see run)
logger = logging.getLogger("streamlearn")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("paho").setLevel(logging.WARNING)


def clean_errors(func: F) -> F:
    """Turn library errors into one clean line instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except StreamlearnError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def output_options(func: F) -> F:
    """The shared ``--table / --json / --csv`` switch of listing commands."""
    func = click.option("--csv", "fmt", flag_value="csv", help="Output CSV.")(func)
    func = click.option("--json", "fmt", flag_value="json", help="Output JSON (one array).")(func)
    func = click.option("--table", "fmt", flag_value="table", default=True, help="Output a table (default).")(func)
    return func


def emit(rows: list[dict[str, Any]], fmt: str, title: str | None = None) -> None:
    if fmt == "json":
        import orjson

        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
        return
    if fmt == "csv":
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        click.echo(buf.getvalue(), nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    if not rows:
        click.echo(f"{title + ': ' if title else ''}nothing yet")
        return
    for name in rows[0]:
        table.add_column(name, justify="right" if isinstance(rows[0][name], (int, float)) else "left")
    for r in rows:
        table.add_row(*(_fmt(v) for v in r.values()))
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _store_path(config_path: str | None, store: str | None) -> Path:
    if store is not None:
        return Path(store)
    if config_path is None:
        raise click.UsageError("give --config FILE or --store PATH")
    from streamlearn.config import load_config

    return load_config(config_path).store.path


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streamlearn")
def main() -> None:
    """streamlearn: an online-learning agent for IoT gateways.

    It subscribes to MQTT sensor topics, predicts with a compact PyTorch model,
    publishes each prediction, and keeps learning from every labelled reading. All
    state lives in one SQLite file.
    """


# -- run -----------------------------------------------------------------------------


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML config file.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Overrides agent.log_level.")
@click.option("--max-messages", type=int, default=None, hidden=True,
              help="Stop after processing this many messages (tests).")
@clean_errors
def run(config_path: str, log_level: str | None, max_messages: int | None) -> None:
    """Run the agent until SIGTERM or Ctrl-C."""
    import signal
    import threading

    from streamlearn.config import load_config

    config = load_config(config_path)
    _setup_logging(log_level or config.agent.log_level)
    from streamlearn.agent import Agent, open_store
    from streamlearn.faults import fault_hook
    from streamlearn.transport.mqtt import MqttTransport

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        logger.info("signal %d: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    import os

    store = open_store(config, fault_hook=fault_hook(os.environ.get("STREAMLEARN_FAULT")))
    try:
        status_topic = f"{config.mqtt.topic_prefix}/{config.agent.gateway}/status"
        transport = MqttTransport(config.mqtt, config.client_id, status_topic,
                                  network_loop=config.mqtt.network_loop)
        agent = Agent(config, transport, store, freeze_gc=True)
        # the store's fsync thread (and, with mqtt.network_loop = "thread", paho's network thread,
        # which writes our predictions and reads the next readings): with the default 5 ms GIL
        # switch interval each waits up to 5 ms each time the agent's thread is busy
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        # a full garbage collection walks every object the imports made (~90,000, 30 ms here):
        # the agent's p99 latency was that pause; frozen objects are not walked again. So the
        # modules the first readings would import (river's detectors, numpy's random generators
        # for the models' initialisation) are imported first, and frozen with the rest
        import numpy.random  # noqa: F401

        from streamlearn.monitors import import_detectors

        import_detectors({d for s in config.streams for d in s.drift.detectors})
        gc.collect()
        gc.freeze()
        try:
            agent.run(stop, max_messages=max_messages)
        except StoreSyncError as exc:
            # not a config error: a restart (systemd's Restart=on-failure) is what recovers
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_RESTART)
        logger.info("stopped: %s", agent.status())
    finally:
        store.close()


# -- config -----------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Check configuration files."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
@clean_errors
def config_check(path: str) -> None:
    """Validate a config file and summarise it."""
    from streamlearn.config import load_config

    cfg = load_config(path)
    click.echo(f"{path}: ok")
    click.echo(f"  broker {cfg.mqtt.host}:{cfg.mqtt.port} (MQTT {cfg.mqtt.protocol}), client id {cfg.client_id}")
    click.echo(f"  store {cfg.store.path}")
    for s in cfg.streams:
        model = f"{s.model.kind} {s.model.hidden}" if s.model.kind == "mlp" else "linear"
        click.echo(
            f"  stream {s.name}: {s.topic} -> {s.task}, {len(s.features)} features, "
            f"labels from {s.label.source}, {model}, {'per device' if s.per_device else 'shared'}"
        )


# -- status --------------------------------------------------------------------------------


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Config naming the store.")
@click.option("--store", type=click.Path(dir_okay=False), help="Store file (instead of --config).")
@output_options
@clean_errors
def status(config_path: str | None, store: str | None, fmt: str) -> None:
    """Per stream: messages, labelled, dead letters, loss and checkpoint age."""
    from streamlearn.store import reader

    path = _store_path(config_path, store)
    conn = reader.open_readonly(path)
    rows = reader.stream_status(conn)
    summary = reader.store_summary(conn)
    running = reader.agent_running(path)
    health = reader.health(path)
    if fmt == "json":
        emit([{"agent_running": running, **summary, "health": health, "streams": rows}], fmt)
        return
    emit(rows, fmt, title=f"{path} ({'agent running' if running else 'no agent running'})")
    if fmt == "table":
        click.echo(
            f"checkpoint {summary['checkpoint_id']} at inbox position {summary['position']}; "
            f"{summary['inbox_rows']} inbox rows kept, {summary['unreplayed']} after the checkpoint; "
            f"{summary['dead_letters_unrouted']} dead letters matched no stream"
        )
        if health is not None:
            import time

            age = time.time() - float(health.get("at", 0))
            line = f"agent health: {health.get('state')} ({age:.0f} s ago, pid {health.get('pid')})"
            if health.get("last_error"):
                line += f"; last error: {health['last_error']}"
            if health.get("checkpoints_stretched"):
                line += (f"; checkpoint interval stretched {health['checkpoints_stretched']} times (writing one "
                         f"took {health.get('checkpoint_write_ms')} ms; store.checkpoint_max_share)")
            click.echo(line)


@main.command("dead-letters")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Config naming the store.")
@click.option("--store", type=click.Path(dir_okay=False), help="Store file (instead of --config).")
@click.option("--stream", default=None, help="Only this stream.")
@click.option("--limit", default=50, show_default=True, help="Newest N.")
@output_options
@clean_errors
def dead_letters(config_path: str | None, store: str | None, stream: str | None, limit: int, fmt: str) -> None:
    """List rejected messages with the reason."""
    from streamlearn.store import reader

    conn = reader.open_readonly(_store_path(config_path, store))
    emit(reader.dead_letters(conn, stream, limit), fmt, title="dead letters")


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Config naming the store.")
@click.option("--store", type=click.Path(dir_okay=False), help="Store file (instead of --config).")
@click.option("--stream", default=None, help="Only this stream.")
@click.option("--device", default=None, help="Only this device's model ('*' for a shared model).")
@click.option("--since", default=None, help="Only events since: 30m, 2h, 7d, an ISO time, or epoch seconds.")
@click.option("--limit", type=int, default=None, help="Only the newest N.")
@output_options
@clean_errors
def drift(config_path: str | None, store: str | None, stream: str | None, device: str | None,
          since: str | None, limit: int | None, fmt: str) -> None:
    """The drift history: every detection and learning-rate decision.

    Reads the store read-only, so it is safe while the agent runs.
    """
    import datetime as dt

    from streamlearn.store import reader

    try:
        since_at = reader.parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    conn = reader.open_readonly(_store_path(config_path, store))
    events = reader.drift_events(conn, stream, device, since_at, limit)
    if fmt == "table":
        for e in events:
            e["at"] = dt.datetime.fromtimestamp(e["at"]).isoformat(timespec="seconds")
    emit(events, fmt, title="drift history")


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Config naming the store.")
@click.option("--store", type=click.Path(dir_okay=False), help="Store file (instead of --config).")
@click.option("--stream", default=None, help="Only this stream (default: every stream).")
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the PNG files.")
@clean_errors
def plot(config_path: str | None, store: str | None, stream: str | None, out_dir: str) -> None:
    """Write <stream>.png: rolling loss, learning rate and drift markers over time."""
    from streamlearn.plot import plot_streams

    for path in plot_streams(_store_path(config_path, store), Path(out_dir), stream):
        click.echo(f"wrote {path}")


# -- simulate ---------------------------------------------------------------------------------


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The agent's config: readings are made to fit its streams and broker.")
@click.option("--stream", "stream_name", default=None, help="Stream to simulate (default: all).")
@click.option("--count", default=5000, show_default=True, help="Readings per stream.")
@click.option("--devices", default=3, show_default=True, help="Devices per stream.")
@click.option("--rate", default=500.0, show_default=True, help="Messages per second (0: as fast as possible).")
@click.option("--drift-at", type=int, default=None, help="Reading index where the concept changes.")
@click.option("--bad-every", default=0, show_default=True, help="Every n-th message is a bad payload.")
@click.option("--seed", default=0, show_default=True)
@clean_errors
def simulate(config_path: str, stream_name: str | None, count: int, devices: int, rate: float,
             drift_at: int | None, bad_every: int, seed: int) -> None:
    """Publish simulated sensor readings for a config's streams."""
    from streamlearn.config import load_config
    from streamlearn.sim import Publisher, SensorSimulator

    cfg = load_config(config_path)
    streams = [cfg.stream(stream_name)] if stream_name else cfg.streams
    pub = Publisher(cfg.mqtt.host, cfg.mqtt.port)
    try:
        for i, s in enumerate(streams):
            sim = SensorSimulator(s, devices=devices, seed=seed + i, drift_at=drift_at, bad_every=bad_every)
            n = pub.publish_all(sim.messages(count), rate=rate or None)
            click.echo(f"{s.name}: published {n} messages")
        if not pub.flush(60):
            raise click.ClickException("the broker did not acknowledge every message within 60 s")
    finally:
        pub.close()


# -- demo ------------------------------------------------------------------------------------


@main.command()
@click.option("--messages", default=6000, show_default=True, help="Readings per stream.")
@click.option("--rate", default=800.0, show_default=True, help="Messages per second.")
@click.option("--workdir", default=".demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo's store and config go.")
@click.option("--broker", default=None, metavar="HOST:PORT",
              help="Use this broker (default: start a private Mosquitto, else use 127.0.0.1:1883).")
@clean_errors
def demo(messages: int, rate: float, workdir: str, broker: str | None) -> None:
    """Run the agent on simulated drifting sensors and show what it learned."""
    _setup_logging("warning")
    from streamlearn.demo import run_demo

    run_demo(Path(workdir), messages=messages, rate=rate, broker=broker)


# -- bench ------------------------------------------------------------------------------------


@main.group()
def bench() -> None:
    """Benchmarks that print tables and write reports (not tests: they measure)."""


@bench.command("accuracy")
@click.option("--streams", default=None, help="Comma-separated stream names (default: all ten).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("-n", "--samples", "n", default=10_000, show_default=True, help="Samples per synthetic stream.")
@click.option("--policies", default=None,
              help="Comma-separated policies to compare (default: all seven).")
@click.option("--no-river", is_flag=True, help="Skip river's linear model and ARF (the ARF is slow).")
@click.option("--quick", is_flag=True, help="One seed, 3,000 samples, no ARF: a smoke test.")
@click.option("--workers", type=int, default=None, help="Processes (default: one per core).")
@click.option("--out", "out_dir", default="reports", show_default=True, type=click.Path(file_okay=False))
@clean_errors
def bench_accuracy(streams: str | None, seeds: str, n: int, policies: str | None, no_river: bool,
                   quick: bool, workers: int | None, out_dir: str) -> None:
    """Prequential error of every learning-rate policy against the best fixed rate in hindsight,
    river's linear model and ARF, and the naive baselines, on ten drifting streams."""
    from rich.progress import Progress

    from streamlearn.bench.accuracy import DEFAULT_POLICIES, markdown, run_accuracy, write_reports
    from streamlearn.config import ScheduleConfig

    chosen = DEFAULT_POLICIES
    if policies:
        names = [p.strip() for p in policies.split(",")]
        unknown = set(names) - set(DEFAULT_POLICIES)
        if unknown:
            raise click.BadParameter(f"unknown policies {sorted(unknown)}; choose from {list(DEFAULT_POLICIES)}")
        chosen = {k: DEFAULT_POLICIES[k] for k in names}
    seed_list = [int(x) for x in seeds.split(",")]
    if quick:
        seed_list, n, no_river = seed_list[:1], 3000, True
    default = ScheduleConfig().policy
    if default not in chosen:
        chosen = {default: DEFAULT_POLICIES[default], **chosen}
    with Progress(transient=True) as progress:
        task = progress.add_task("prequential runs", total=None)
        report = run_accuracy(
            streams=streams.split(",") if streams else None, seeds=seed_list, n=n, policies=chosen,
            river=not no_river, default=default, workers=workers,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    click.echo(markdown(report))
    for kind, path in write_reports(report, Path(out_dir)).items():
        click.echo(f"wrote {path}")


THROUGHPUT_SECTIONS = ("flood", "latency", "backlog", "scale", "profile")


@bench.command("throughput")
@click.option("--quick", is_flag=True, help="Small counts, one repeat: a smoke test (about 1.5 min).")
@click.option("--sections", default=",".join(THROUGHPUT_SECTIONS), show_default=True,
              help="Comma-separated subset of the sections.")
@click.option("--repeats", type=int, default=None, help="Repeats per measurement (default 3).")
@click.option("--learner-json", type=click.Path(dir_okay=False), default=None,
              help="A `bench learner` result to include in the targets table.")
@click.option("--out", default="reports/bench-throughput.json", show_default=True, type=click.Path(dir_okay=False))
@clean_errors
def bench_throughput(quick: bool, sections: str, repeats: int | None, learner_json: str | None, out: str) -> None:
    """The agent against the echo ceiling over a private Mosquitto: throughput, latency at 100,
    1,000 and 5,000 msg/s, backlog drain, 1/100/1,000 devices, RSS, CPU per message, stage profile."""
    from streamlearn.bench import run_throughput

    chosen = tuple(x.strip() for x in sections.split(",") if x.strip())
    unknown = set(chosen) - set(THROUGHPUT_SECTIONS)
    if unknown:
        raise click.BadParameter(f"unknown sections {sorted(unknown)}; choose from {THROUGHPUT_SECTIONS}")
    run_throughput(out_json=Path(out), quick=quick, sections=chosen, repeats=repeats,
                   learner_json=Path(learner_json) if learner_json else None)


@bench.command("learner")
@click.option("--quick", is_flag=True, help="500 samples, one repeat.")
@click.option("--out", default="reports/bench-learner.json", show_default=True, type=click.Path(dir_okay=False))
@clean_errors
def bench_learner(quick: bool, out: str) -> None:
    """Per-sample cost of the fused learner against the naive torch loop (and deep-river if
    installed) on the same 8-32-32-1 MLP and stream, and how closely their results agree."""
    from streamlearn.bench import run_learner_bench

    run_learner_bench(out_json=Path(out), quick=quick)


if __name__ == "__main__":
    main()
