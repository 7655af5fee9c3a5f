"""Brokers for first runs, demos, tests and benchmarks.

``reachable(host, port)`` tells whether something accepts TCP connections there.
``MosquittoProcess`` starts a private Mosquitto with the gateway config shipped
in ``deploy/mosquitto/`` (persistence, large queues, TCP_NODELAY) on a port of
its own, and stops it by its PID. The pure-Python ``amqtt`` broker is used when
Mosquitto is not installed and ``amqtt`` is (MQTT 3.1.1 only).
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from streamlearn.errors import BrokerError

logger = logging.getLogger(__name__)


def reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def gateway_config_text() -> str:
    """The broker settings streamlearn ships for gateways (``deploy/mosquitto``)."""
    return resources.files("streamlearn.data").joinpath("mosquitto-gateway.conf").read_text()


class MosquittoProcess:
    """A private Mosquitto on 127.0.0.1, stopped by its PID.

    Parameters
    ----------
    port
        Port to listen on (a free one when None).
    workdir
        Directory for its config, persistence file and log (a temp dir when None).
    extra_config
        Lines appended to the shipped gateway config (later lines win).
    listener
        The listener block, with ``{port}`` for the port (default: plain TCP on
        127.0.0.1, anonymous clients allowed).
    """

    def __init__(
        self, port: int | None = None, workdir: str | Path | None = None, extra_config: str = "",
        listener: str = "listener {port} 127.0.0.1\nallow_anonymous true",
    ) -> None:
        self.binary = find_mosquitto()
        if self.binary is None:
            raise BrokerError(
                "mosquitto is not installed (Debian/Ubuntu: apt-get install -y mosquitto)"
            )
        self.port = port or free_port()
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="streamlearn-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_config = extra_config
        self.listener = listener
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def write_config(self) -> None:
        text = gateway_config_text()
        text += (
            f"\n# --- private instance ---\n{self.listener.format(port=self.port)}\n"
            f"persistence_location {self.workdir}/\n"
            # run as whoever started it, so it can write its own work dir
            f"user {getpass.getuser()}\n"
            f"log_dest file {self.log_path}\n"
        )
        if self.extra_config:
            text += "\n" + self.extra_config + "\n"
        self.config_path.write_text(text)

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        self.write_config()
        self.proc = subprocess.Popen(
            [str(self.binary), "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise BrokerError(f"mosquitto exited at start: {(err + log).strip()[-500:]}")
            if reachable("127.0.0.1", self.port, timeout=0.2):
                logger.info("started mosquitto pid %d on 127.0.0.1:%d", self.proc.pid, self.port)
                return self
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout:g} s")

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file) or SIGKILL, then wait."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self.proc = None
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        if proc.stderr:
            proc.stderr.close()
        self.proc = None

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AmqttProcess:
    """The pure-Python amqtt broker in a subprocess (MQTT 3.1.1 only)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        try:
            import amqtt  # noqa: F401
        except ImportError:
            return False
        return True

    def start(self, timeout: float = 15.0) -> AmqttProcess:
        script = (
            "import asyncio\nfrom amqtt.broker import Broker\n"
            "async def main():\n"
            f"    b = Broker({{'listeners': {{'default': {{'type': 'tcp', 'bind': '127.0.0.1:{self.port}'}}}},"
            " 'auth': {'allow-anonymous': True}, 'topic-check': {'enabled': False}})\n"
            "    await b.start()\n    await asyncio.Event().wait()\n"
            "asyncio.run(main())\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError("the amqtt broker exited at start")
            if reachable("127.0.0.1", self.port, timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"amqtt did not listen on port {self.port} within {timeout:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
