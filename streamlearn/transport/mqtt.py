"""The MQTT transport: paho-mqtt 2.x, VERSION2 callbacks, manual acknowledgements.

What it does about the defaults that silently lose data (DESIGN, facts):

* a fixed client id, ``clean_start=False`` (MQTT 5) or ``clean_session=False``
  (3.1.1) and a Session Expiry Interval, so the broker keeps our subscriptions
  and queues messages while the agent is down or restarting;
* ``manual_ack=True``: a QoS 1 message is acknowledged only when the agent says
  it is committed, so a crash can never lose an acknowledged message;
* callbacks only hand off to a queue and never raise (an exception in a paho
  callback kills its network thread while ``is_connected()`` stays True);
* subscriptions are made in ``on_connect``, every time, so they survive reconnects;
* TCP_NODELAY on our socket (Nagle costs ~2 ms per round trip);
* a retained ``online``/``offline`` status with a last will;
* a bounded outgoing queue: ``publish`` returns False instead of growing memory
  without limit while the broker is away.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from streamlearn.config import MqttConfig, read_password
from streamlearn.transport import Message

logger = logging.getLogger(__name__)

SESSION_TAKEN_OVER = 142  # MQTT 5 reason code 0x8E


class MqttTransport:
    """paho-mqtt client owned by the agent.

    Parameters
    ----------
    config
        Broker address, protocol, credentials, TLS and session settings.
    client_id
        Fixed id: the broker keeps the session (and queued messages) under it.
    status_topic
        Retained ``online``/``offline`` topic; ``offline`` is also the last will.
    """

    def __init__(self, config: MqttConfig, client_id: str, status_topic: str) -> None:
        self.config = config
        self.client_id = client_id
        self.status_topic = status_topic
        self._queue: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._generation = 0
        self._subscriptions: list[str] = []
        self._connected = threading.Event()
        self._client: mqtt.Client | None = None
        self._counters = {
            "received": 0,
            "acked": 0,
            "ack_skipped_stale": 0,
            "published": 0,
            "publish_dropped": 0,
            "connects": 0,
            "disconnects": 0,
            "callback_errors": 0,
        }
        self.session_present: bool | None = None
        self.taken_over = False
        self.last_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        cfg = self.config
        v5 = cfg.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        client.enable_logger(logging.getLogger("paho"))
        if cfg.username is not None:
            client.username_pw_set(cfg.username, read_password(cfg))
        if cfg.tls is not None:
            client.tls_set(
                ca_certs=str(cfg.tls.ca_certs) if cfg.tls.ca_certs else None,
                certfile=str(cfg.tls.certfile) if cfg.tls.certfile else None,
                keyfile=str(cfg.tls.keyfile) if cfg.tls.keyfile else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if cfg.tls.insecure:
                client.tls_insecure_set(True)
        client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        client.reconnect_delay_set(cfg.reconnect_min_delay, cfg.reconnect_max_delay)
        client.max_queued_messages_set(cfg.max_queued_publishes)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        return client

    def start(self, subscriptions: list[str]) -> None:
        """Connect in the background (retrying with back-off) and subscribe on every connect."""
        self._subscriptions = list(subscriptions)
        self._client = client = self._make_client()
        props = None
        if self.config.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.config.session_expiry
            props.ReceiveMaximum = self.config.receive_maximum
            client.connect_async(
                self.config.host, self.config.port, self.config.keepalive,
                clean_start=False, properties=props,
            )
        else:
            client.connect_async(self.config.host, self.config.port, self.config.keepalive)
        client.loop_start()
        logger.info(
            "connecting to %s:%d as %r (MQTT %s)",
            self.config.host, self.config.port, self.client_id, self.config.protocol,
        )

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self) -> None:
        client = self._client
        if client is None:
            return
        if self._connected.is_set():
            info = client.publish(self.status_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError) as exc:
                logger.warning("offline status not delivered: %s", exc)
        client.disconnect()
        client.loop_stop()
        self._client = None
        self._connected.clear()

    # -- callbacks: hand off, never raise ------------------------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as exc:
            logger.debug("TCP_NODELAY not set: %s", exc)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        try:
            if reason_code.is_failure:
                self.last_error = f"broker refused the connection: {reason_code}"
                logger.error("%s", self.last_error)
                return
            self._generation += 1
            self._counters["connects"] += 1
            self.session_present = bool(flags.session_present)
            self.last_error = None
            if self.config.protocol == "5":
                options = SubscribeOptions(qos=1)
                client.subscribe([(topic, options) for topic in self._subscriptions])
            else:
                client.subscribe([(topic, 1) for topic in self._subscriptions])
            client.publish(self.status_topic, b"online", qos=1, retain=True)
            self._connected.set()
            if self._counters["connects"] > 1 and not self.session_present:
                logger.warning(
                    "connected, but the broker had no session for %r: messages published "
                    "while the agent was away are lost (is persistence on, and the session "
                    "expiry long enough?)", self.client_id,
                )
            else:
                logger.info("connected (session present: %s)", self.session_present)
        except Exception:
            self._counters["callback_errors"] += 1
            logger.exception("error in on_connect (ignored to keep the network thread alive)")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.last_error = f"cannot connect to {self.config.host}:{self.config.port}"
        logger.warning("%s; retrying", self.last_error)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        try:
            was_connected = self._connected.is_set()
            self._connected.clear()
            self._counters["disconnects"] += 1
            value = getattr(reason_code, "value", reason_code)
            if value == SESSION_TAKEN_OVER:
                self.taken_over = True
                self.last_error = (
                    f"another client connected with our client id {self.client_id!r} and took "
                    "over the session"
                )
                logger.error("%s", self.last_error)
            elif value != 0 and was_connected:  # after a refusal, keep the refusal's reason
                self.last_error = f"disconnected: {reason_code}"
                logger.warning("disconnected from the broker (%s); reconnecting", reason_code)
        except Exception:
            self._counters["callback_errors"] += 1
            logger.exception("error in on_disconnect (ignored to keep the network thread alive)")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                topic = "\ufffd" + msg._topic.decode("utf-8", "replace")  # routed to a dead letter
            self._queue.put(
                Message(
                    topic, msg.payload, msg.qos, bool(msg.dup), msg.mid,
                    time.time(), time.perf_counter(), self._generation,
                )
            )
            self._counters["received"] += 1
        except Exception:
            self._counters["callback_errors"] += 1
            logger.exception("error in on_message (ignored to keep the network thread alive)")

    # -- agent side ------------------------------------------------------------------

    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        q = self._queue
        try:
            first = q.get(timeout=timeout) if timeout > 0 else q.get_nowait()
        except queue.Empty:
            return []
        out = [first]
        try:
            while len(out) < max_messages:
                out.append(q.get_nowait())
        except queue.Empty:
            pass
        return out

    def ack(self, messages: list[Message]) -> None:
        client = self._client
        if client is None:
            return
        generation = self._generation
        for m in messages:
            if m.qos == 0:
                continue
            if m.generation != generation:
                self._counters["ack_skipped_stale"] += 1
                continue
            client.ack(m.mid, m.qos)
            self._counters["acked"] += 1

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        client = self._client
        if client is None:
            return False
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
            info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0
        ):
            self._counters["published"] += 1
            return True
        self._counters["publish_dropped"] += 1
        return False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def backlog(self) -> int:
        """Messages received but not yet taken by the agent."""
        return self._queue.qsize()

    def stats(self) -> dict[str, int | float | bool]:
        out: dict[str, int | float | bool] = dict(self._counters)
        out["connected"] = self.connected
        out["backlog"] = self.backlog()
        return out
