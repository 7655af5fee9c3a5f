"""The echo ceiling: a raw paho-mqtt process that decodes each reading and replies.

It is what any Python agent must at least do per message (receive at QoS 1,
parse the JSON, publish a QoS 1 reply carrying the reading's id), with nothing
else: no validation, no store, no model. Its messages/s is the practical ceiling
the agent is compared with. It uses the agent's transport settings where they
matter for speed (MQTT 5, TCP_NODELAY, paho's default outgoing window) but
paho's automatic acknowledgement.

Run as a process::

    python -m streamlearn.bench.echo --port 1883 --name echo1 [--persistent]

It subscribes to ``sensors/bench`` at QoS 1 and replies on
``bench/<name>/<device>/reply`` with ``{"id": "<boot>|<seq>", "device": ...}``;
once subscribed it publishes a retained ``online`` on ``bench/<name>/status``.
On SIGTERM it disconnects and prints its counters as one JSON line.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from typing import Any

import orjson

from streamlearn.bench.common import TOPIC


def status_topic(name: str) -> str:
    return f"bench/{name}/status"


def reply_filter(name: str) -> str:
    return f"bench/{name}/+/reply"


class Echo:
    def __init__(self, port: int, name: str, persistent: bool = False, host: str = "127.0.0.1") -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.name = name
        self.counters = {"received": 0, "replied": 0, "errors": 0, "publish_failed": 0}
        self._prefix = f"bench/{name}/"
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-{name}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_socket_open = self._on_socket_open
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.will_set(status_topic(name), b"offline", qos=1, retain=True)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if persistent else 0
        props.ReceiveMaximum = 1000  # as the agent's receive_maximum
        self._client.connect(host, port, keepalive=30, clean_start=not persistent, properties=props)

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        client.subscribe(TOPIC, qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        client.publish(status_topic(self.name), b"online", qos=1, retain=True)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            self.counters["received"] += 1
            obj = orjson.loads(msg.payload)
            device = str(obj["device"])
            body = orjson.dumps({"id": f"{obj['boot']}|{obj['seq']}", "device": device})
            info = client.publish(self._prefix + device + "/reply", body, qos=1)
            if info.rc == 0:
                self.counters["replied"] += 1
            else:
                self.counters["publish_failed"] += 1
        except Exception:  # never raise in a paho callback
            self.counters["errors"] += 1

    def run(self, stop: threading.Event) -> dict[str, int]:
        self._client.loop_start()
        try:
            while not stop.wait(0.2):
                pass
        finally:
            self._client.disconnect()
            self._client.loop_stop()
        return dict(self.counters)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="echo")
    parser.add_argument("--persistent", action="store_true",
                        help="keep the session (and queued messages) while stopped")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop after this long anyway")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    timer = threading.Timer(args.max_seconds, stop.set)
    timer.daemon = True
    timer.start()
    echo = Echo(args.port, args.name, persistent=args.persistent)
    counters = echo.run(stop)
    sys.stdout.write(orjson.dumps(counters).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
