"""The paho transport against real Mosquitto brokers: TLS, passwords, sessions, acks."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamlearn.config import MqttConfig
from streamlearn.sim import Publisher
from streamlearn.transport.broker import MosquittoProcess
from streamlearn.transport.mqtt import MqttTransport
from tests.helpers import wait_for


def make_certs(d: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=streamlearn-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MosquittoProcess, Path]]:
    d = tmp_path_factory.mktemp("tls")
    make_certs(d)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwd"), "agent", "s3cret"], check=True)
    listener = (
        "listener {port} 127.0.0.1\nallow_anonymous false\n"
        f"password_file {d}/passwd\ncafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n"
    )
    broker = MosquittoProcess(workdir=d / "broker", listener=listener).start()
    yield broker, d
    broker.stop()


def test_tls_with_a_password(secure_broker: tuple[MosquittoProcess, Path], tmp_path: Path) -> None:
    broker, d = secure_broker
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = MqttConfig(port=broker.port, username="agent", password_file=tmp_path / "pw",
                     tls={"ca_certs": d / "ca.crt"})
    transport = MqttTransport(cfg, "tls-agent", "streamlearn/tls/status")
    transport.start(["t/#"])
    try:
        assert transport.wait_connected(10), transport.last_error
        # publish to ourselves over the TLS connection, receive, acknowledge
        wait_for(lambda: transport.publish("t/x", b"hello"), 5)
        msgs = wait_for(lambda: transport.receive(10, 0.1), 10, what="our own message")
        assert msgs[0].payload == b"hello" and msgs[0].qos == 1
        transport.ack(msgs)
        assert transport.stats()["acked"] == 1
    finally:
        transport.stop()


def test_a_wrong_password_is_reported(secure_broker: tuple[MosquittoProcess, Path]) -> None:
    broker, d = secure_broker
    cfg = MqttConfig(port=broker.port, username="agent", password="wrong", tls={"ca_certs": d / "ca.crt"},
                     reconnect_max_delay=2)
    transport = MqttTransport(cfg, "bad-agent", "streamlearn/bad/status")
    transport.start(["t/#"])
    try:
        wait_for(lambda: transport.last_error, 10, what="a connection error")
        assert not transport.connected
        assert "refused" in transport.last_error or "cannot connect" in transport.last_error
    finally:
        transport.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_session_keeps_unacknowledged_and_queued_messages(broker: MosquittoProcess, protocol: str) -> None:
    cfg = MqttConfig(port=broker.port, protocol=protocol)
    client_id = f"session-{protocol}"
    first = MqttTransport(cfg, client_id, f"streamlearn/{client_id}/status")
    first.start(["q/#"])
    assert first.wait_connected(10)
    pub = Publisher("127.0.0.1", broker.port, client_id=f"pub-{protocol}")
    for i in range(5):
        pub.publish("q/a", b"%d" % i)
    assert pub.flush(10)
    got = wait_for(lambda: first.receive(10, 0.1), 10)
    first.ack(got[:2])  # the other 3 stay unacknowledged
    first.stop()
    for i in range(5, 8):
        pub.publish("q/a", b"%d" % i)  # queued by the broker while nobody listens
    assert pub.flush(10)
    pub.close()

    second = MqttTransport(cfg, client_id, f"streamlearn/{client_id}/status")
    second.start(["q/#"])
    try:
        assert second.wait_connected(10)
        assert second.session_present
        received: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(received) < 6 and time.monotonic() < deadline:
            batch = second.receive(10, 0.1)
            received += [m.payload for m in batch]
            second.ack(batch)
        # the unacknowledged three come again (as redeliveries), then the three queued
        assert sorted(received) == [b"2", b"3", b"4", b"5", b"6", b"7"]
    finally:
        second.stop()
