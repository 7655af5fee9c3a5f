"""The MQTT transport: paho-mqtt 2.x, VERSION2 callbacks, manual acknowledgements.

What it does about the defaults that silently lose data (DESIGN, facts):

* a fixed client id, ``clean_start=False`` (MQTT 5) or ``clean_session=False``
  (3.1.1) and a Session Expiry Interval, so the broker keeps our subscriptions
  and queues messages while the agent is down or restarting;
* ``manual_ack=True``: a QoS 1 message is acknowledged only when the agent says
  it is committed, and only on the connection that delivered it;
* callbacks only hand off and never raise or wait (an exception in a paho
  callback kills its network thread while ``is_connected()`` stays True);
* subscriptions are made in ``on_connect``, every time, so they survive reconnects;
* TCP_NODELAY on our socket (Nagle costs ~2 ms per round trip);
* a retained ``online``/``offline`` status with a last will.

Publishing (measured, see the report of this change): paho's own in-flight limit
(``max_inflight_messages``, default 20) parks every further QoS 1 publish in its
queue and re-scans the whole outgoing dict on every PUBACK; the queue then fills up
and paho drops silently. Here paho's limit is off (0, which also skips the scan)
and the transport keeps its own count of unacknowledged QoS 1 publishes, capped by
a *window* (``publish_window``, the broker's Receive Maximum from the MQTT 5
CONNACK, and ``max_queued_publishes``, whichever is smallest). ``publish()`` on
the agent's thread waits while the window is full (at most ``publish_timeout``),
and only then drops and counts. After such a timeout it drops without waiting
until the window has room again, so a long broker outage costs one wait, not one
per prediction. ``drain()`` waits until every publish is acknowledged; ``stop()``
drains (bounded), publishes ``offline`` and disconnects.

Receiving: the broker bounds what it sends us (MQTT 5: our Receive Maximum,
honoured by Mosquitto 2.0.11 for QoS 1; 3.1.1: the broker's
``max_inflight_messages``), but after each reconnect it redelivers every message
still unacknowledged, and the copies received on the old connection cannot be
acknowledged any more. A redelivery of a message still waiting in our queue
replaces the old copy in place (new packet id and connection), so the queue holds
each message once however often the connection drops.

One agent per client id: :class:`~streamlearn.transport.lock.ClientIdLock` stops
a second agent on this machine. An agent elsewhere is detected from the broker:
a DISCONNECT with reason 142 (Session taken over), or, since Mosquitto 2.0.11
just closes the older connection (exactly what a broker restart looks like), a
retained *instance marker* each agent publishes on every connect: an agent that
finds, on reconnecting, the marker of a newer agent with its client id has been
taken over. It then stops reconnecting and sets :attr:`MqttTransport.fatal_error`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from streamlearn.config import MqttConfig, read_password
from streamlearn.errors import TransportError
from streamlearn.transport import Message, paho_speedups
from streamlearn.transport.lock import ClientIdLock

logger = logging.getLogger(__name__)

SESSION_TAKEN_OVER = 142  # MQTT 5 reason code 0x8E
MAX_WINDOW = 65_000  # paho refuses a publish whose packet id (1..65535) is still in flight
# disconnects this soon after a connect, this many within FLAP_WINDOW_S, make a warning (not fatal:
# a broker restarting every few seconds looks the same from here)
FLAP_AFTER_CONNECT_S = 5.0
MESSAGE_OVERHEAD = 320  # bytes a queued message costs beside its payload and topic (tracemalloc: ~270)
# What the receive queue holds: plain tuples of a Message's fields, in its order, which the garbage
# collector stops tracking (atomic contents) and so never walks. After an outage Mosquitto sends
# past its in-flight limit and the queue holds up to max_backlog_bytes (~40,000 readings): as
# Message objects each full collection walked them all, 13 ms for 40,000 (11.5 ms median, 28 ms
# longest, 24 times per 100,000 readings in a backlog drain); as tuples 0.3 ms
QueuedMessage = tuple[str, bytes, int, bool, int, float, float, int]
_TOPIC, _PAYLOAD, _QOS, _RECEIVED_AT, _RECEIVED_MONO, _GENERATION = 0, 1, 2, 5, 6, 7
FLAP_COUNT = 3
FLAP_WINDOW_S = 30.0


class _PahoLog:
    """paho's logger, without the "Client is not connected" ERROR paho 2.2's network thread logs
    each time its loop runs once more without a socket: after our own DISCONNECT (every normal
    stop) and after every failed reconnect attempt. What happened is logged by us already
    ("disconnected from the broker", "cannot connect to ..."), so it goes to DEBUG."""

    def __init__(self) -> None:
        self._log = logging.getLogger("paho")

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        # paho logs every packet it reads or writes at DEBUG: dropped here, one call sooner than
        # Logger.log would, unless someone asked for paho's DEBUG
        if level <= logging.DEBUG and not self._log.isEnabledFor(logging.DEBUG):
            return
        if level > logging.DEBUG and isinstance(msg, str) and msg.startswith("Client is not connected"):
            level = logging.DEBUG
        self._log.log(level, msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


NETWORK_LOOPS = ("thread", "agent")


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
    publish_window
        Most QoS 1 publishes awaiting their PUBACK (also capped by the broker's
        Receive Maximum and ``config.max_queued_publishes``).
    publish_timeout
        Seconds ``publish()`` waits for room in a full window before it drops.
    stop_timeout
        Seconds ``stop()`` waits for outstanding publishes and the ``offline`` status.
    lock_dir
        Directory of the client-id lock files (default ``<tempdir>/streamlearn-locks``).
    lock
        Take the client-id lock (``False`` only for tools that share an id on purpose).
    instance_topic
        Retained topic of the instance marker (default ``<status_topic>/instance``;
        ``""`` turns the marker off).
    network_loop
        ``"thread"``: paho's own network thread reads and writes the socket, and
        reconnects (any thread may publish). ``"agent"``: the thread that calls
        ``start()`` runs the network loop itself, inside ``receive()``, ``drain()`` and
        a publish waiting for room; it alone may publish (acknowledgements from other
        threads are handed to it). No second thread contends for the GIL, and a
        prediction is written to the socket by the call that publishes it.
    """

    def __init__(
        self, config: MqttConfig, client_id: str, status_topic: str, *,
        publish_window: int = 1000, publish_timeout: float = 10.0, stop_timeout: float = 5.0,
        lock_dir: str | Path | None = None, lock: bool = True, instance_topic: str | None = None,
        max_backlog_bytes: int = 32 * 1024 * 1024, network_loop: str = "thread",
    ) -> None:
        if publish_window < 1:
            raise ValueError("publish_window must be at least 1")
        if network_loop not in NETWORK_LOOPS:
            raise ValueError(f"network_loop must be one of {NETWORK_LOOPS}, not {network_loop!r}")
        paho_speedups.install()
        self.config = config
        self.client_id = client_id
        self.status_topic = status_topic
        self.publish_window = min(int(publish_window), MAX_WINDOW)
        self.publish_timeout = float(publish_timeout)
        self.stop_timeout = float(stop_timeout)
        self.max_backlog_bytes = max(0, int(max_backlog_bytes))
        self.instance_topic = f"{status_topic}/instance" if instance_topic is None else instance_topic
        self.instance_id = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.lock: ClientIdLock | None = (
            ClientIdLock(config.host, config.port, client_id, lock_dir) if lock else None
        )
        self._client: mqtt.Client | None = None
        self._state = "new"  # new -> started -> stopped
        self._subscriptions: list[str] = []
        self._connected = threading.Event()
        self._disconnected = threading.Event()  # on_disconnect ran: paho wrote our DISCONNECT (and what came before)
        self._subscribed = threading.Event()
        self._subscribe_mid: int | None = None
        self._subscribe_topics: list[str] = []
        self._stopping = False
        self._resyncing = False
        self._resync_pending = False
        self._shedding = False  # from the first shed message until the next connection: keeps the order
        self._resync_generation = -1  # the connection a resync is leaving (sheds on it need no other)
        self._shed_in_episode = 0
        self._net_ident: int | None = None  # paho's network thread: never waits in publish()
        self._generation = 0
        # receiving: a deque under a condition; a redelivery takes the place of its stale copy
        self._rx = threading.Condition()
        self._queue: collections.deque[QueuedMessage] = collections.deque()
        self._backlog_bytes = 0  # payloads, topics and MESSAGE_OVERHEAD of what _queue holds
        self._stale: dict[tuple[str, bytes], collections.deque[QueuedMessage]] = {}
        # queued copies (by id) that a redelivery took over: its (mid, qos, generation), dup set
        self._redelivered: dict[int, tuple[int, int, int]] = {}
        # publishing: the window of unacknowledged QoS 1 publishes
        self._tx = threading.Condition()
        self._window = self._cap_window(None)
        self._outstanding = 0
        self._pending: set[int] = set()  # packet ids awaiting PUBACK
        self._early: dict[int, Any] = {}  # PUBACKs that beat publish() to recording the id
        self._qos0: set[int] = set()
        self._dropping = False
        self._dropped_in_episode = 0
        self._last_refusal_log = 0.0
        self._counters: dict[str, int | float] = {
            "received": 0,
            "acked": 0,
            "ack_skipped_stale": 0,
            "redeliveries_merged": 0,
            "shed": 0,
            "resyncs": 0,
            "backlog_max": 0,
            "backlog_bytes_max": 0,
            "published": 0,
            "publish_acked": 0,
            "publish_refused": 0,
            "publish_dropped": 0,
            "publish_waits": 0,
            "publish_wait_s": 0.0,
            "connects": 0,
            "disconnects": 0,
            "callback_errors": 0,
        }
        self.session_present: bool | None = None
        self.broker_receive_maximum: int | None = None
        self.taken_over = False
        self.fatal_error: str | None = None
        self.last_error: str | None = None
        self._connected_at = 0.0
        self._quick_disconnects: collections.deque[float] = collections.deque()
        self._last_flap_warning = 0.0
        self._warned_instances: set[str] = set()
        self._own_marker_seen = False
        # network_loop = "agent": the loop runs on the thread that started us
        self.network_loop = network_loop
        self._inline = network_loop == "agent"
        self._loop_ident: int | None = None
        self._in_loop = False  # inside paho's loop (its callbacks): never pump again, never wait
        self._acks_waiting: collections.deque[list[Message]] = collections.deque()  # from other threads
        self._reconnect_at = 0.0
        self._reconnect_delay = float(config.reconnect_min_delay)

    # -- lifecycle ------------------------------------------------------------------

    def _cap_window(self, broker_receive_maximum: int | None) -> int:
        window = min(self.publish_window, self.config.max_queued_publishes)
        if broker_receive_maximum:
            window = min(window, broker_receive_maximum)
        return max(1, window)

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
        client.enable_logger(_PahoLog())  # type: ignore[arg-type]
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
        # paho's own in-flight limit off: 0 skips its O(n) rescan of the outgoing dict on every
        # PUBACK; the window below bounds what is in flight (and so what paho holds)
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        return client

    def _ensure_client(self) -> mqtt.Client:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def acquire_lock(self) -> None:
        """Claim the client id on this machine; raises TransportError naming the pid that holds it.

        ``start()`` calls it; call it earlier to refuse before doing any work."""
        if self.lock is not None:
            self.lock.acquire()

    def start(self, subscriptions: list[str]) -> None:
        """Connect in the background (retrying with back-off) and subscribe on every connect."""
        if self._state == "started":
            raise RuntimeError("the transport is already started")
        self.acquire_lock()
        self._subscriptions = list(subscriptions)
        self._stopping = False
        self._state = "started"
        self.started_at = time.time()  # in the instance marker: the newer agent keeps a shared client id
        client = self._ensure_client()
        self._connect_async(client)
        if self._inline:  # the first pump() connects
            self._loop_ident = threading.get_ident()
            self._reconnect_at = 0.0
        else:
            client.loop_start()
        logger.info(
            "connecting to %s:%d as %r (MQTT %s)",
            self.config.host, self.config.port, self.client_id, self.config.protocol,
        )

    def _connect_async(self, client: mqtt.Client) -> None:
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

    @property
    def _can_shed(self) -> bool:
        """Messages we do not queue come back on the next connection only if the broker keeps the session."""
        return self.max_backlog_bytes > 0 and (self.config.protocol != "5" or self.config.session_expiry > 0)

    def _runs_loop_here(self) -> bool:
        """network_loop = "agent" and this is its thread (outside paho's callbacks): waiting
        means running the loop."""
        return self._inline and threading.get_ident() == self._loop_ident and not self._in_loop

    def wait_connected(self, timeout: float) -> bool:
        if self._runs_loop_here():
            return self._pump_until(self._connected.is_set, timeout)
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the broker acknowledged the subscriptions of the current connection."""
        if self._runs_loop_here():
            return self._pump_until(self._subscribed.is_set, timeout) and self._connected.is_set()
        return self._subscribed.wait(timeout) and self._connected.is_set()

    def stop(self) -> None:
        """Drain outstanding publishes (bounded), publish ``offline``, disconnect, release the lock."""
        client = self._client
        self._stopping = True
        with self._tx:
            self._tx.notify_all()
        try:
            if client is None:
                return
            if self._state == "started" and self._connected.is_set() and not self.fatal_error:
                deadline = time.monotonic() + self.stop_timeout
                if not self.drain(max(0.0, deadline - time.monotonic() - 1.0)):
                    logger.warning("%d publishes still unacknowledged at stop", self.outstanding())
                self._publish_nowait(self.status_topic, b"offline", qos=1, retain=True)
                if not self.drain(max(1.0, deadline - time.monotonic())):
                    logger.warning("stopping with %d publishes unacknowledged (offline status included)",
                                   self.outstanding())
            elif self.outstanding() and not self.fatal_error:
                logger.warning("stopping while disconnected: %d publishes not delivered", self.outstanding())
            self._disconnected.clear()
            client.disconnect()
            if not self._inline:
                client.loop_stop()
            elif self._runs_loop_here() and client.socket() is not None:  # (else nothing to write it to)
                self._pump_until(self._disconnected.is_set, 1.0)
        finally:
            self._client = None
            self._state = "stopped"
            self._connected.clear()
            with self._tx:
                self._pending.clear()
                self._early.clear()
                self._qos0.clear()
                self._outstanding = 0
                self._tx.notify_all()
            if self.lock is not None:
                self.lock.release()

    # -- callbacks: hand off, never raise, never wait ---------------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._net_ident = threading.get_ident()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as exc:
            logger.debug("TCP_NODELAY not set: %s", exc)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        try:
            self._net_ident = threading.get_ident()
            if reason_code.is_failure:
                self.last_error = f"broker refused the connection: {reason_code}"
                logger.error("%s", self.last_error)
                return
            if self.fatal_error:  # paho reconnected before it saw that we stop: leave at once
                client.disconnect()
                return
            self._connected_at = time.monotonic()
            self._reconnect_delay = float(self.config.reconnect_min_delay)
            self._counters["connects"] += 1
            self.session_present = bool(flags.session_present)
            self.last_error = None
            rm = getattr(properties, "ReceiveMaximum", None) if self.config.protocol == "5" else None
            self.broker_receive_maximum = int(rm) if rm else None
            with self._tx:
                self._window = self._cap_window(self.broker_receive_maximum)
                self._tx.notify_all()
            with self._rx:
                self._generation += 1
                self._shedding = False  # the broker resends, in order, everything we left unacknowledged
                self._index_stale()
            if self.config.protocol == "5":
                topics: list[Any] = [(t, SubscribeOptions(qos=1)) for t in self._subscriptions]
                if self.instance_topic:
                    topics.append((self.instance_topic, SubscribeOptions(qos=0)))
            else:
                topics = [(t, 1) for t in self._subscriptions]
                if self.instance_topic:
                    topics.append((self.instance_topic, 0))
            self._subscribed.clear()
            if topics:
                _, self._subscribe_mid = client.subscribe(topics)
                self._subscribe_topics = [t for t, _ in topics]
            else:
                self._subscribed.set()
            self._publish_nowait(self.status_topic, b"online", qos=1, retain=True)
            if self.instance_topic:
                self._publish_nowait(self.instance_topic, self._marker(), qos=1, retain=True)
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

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        try:
            if mid != self._subscribe_mid:
                return
            for topic, rc in zip(self._subscribe_topics, reason_codes or [], strict=False):
                if getattr(rc, "is_failure", False):
                    if topic == self.instance_topic:
                        logger.warning("the broker refused our subscription to %r (%s): an agent elsewhere with "
                                       "our client id can only be detected by reason code 142", topic, rc)
                    else:
                        self.last_error = f"the broker refused the subscription to {topic!r}: {rc}"
                        logger.error("%s (check the broker's ACL)", self.last_error)
            self._subscribed.set()
        except Exception:
            self._counters["callback_errors"] += 1
            logger.exception("error in on_subscribe (ignored to keep the network thread alive)")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.last_error = f"cannot connect to {self.config.host}:{self.config.port}"
        logger.warning("%s; retrying", self.last_error)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        try:
            with self._rx:  # waits for an ack() in progress: its PUBACKs die with this connection
                was_connected = self._connected.is_set()
                self._connected.clear()
            self._disconnected.set()
            self._subscribed.clear()
            self._counters["disconnects"] += 1
            value = getattr(reason_code, "value", reason_code)
            if value == SESSION_TAKEN_OVER:
                self._fatal(
                    f"another client connected to {self.config.host}:{self.config.port} with our client id "
                    f"{self.client_id!r} and took over the session (reason 142); this agent stops so that "
                    "the two do not knock each other off the broker. Stop the other one, or give each its "
                    "own mqtt.client_id", client,
                )
            elif self.fatal_error or self._stopping or self._resyncing:
                pass
            elif value != 0 and was_connected:  # after a refusal, keep the refusal's reason
                self.last_error = f"disconnected: {reason_code}"
                logger.warning("disconnected from the broker (%s); reconnecting", reason_code)
                self._note_quick_disconnect()
        except Exception:
            self._counters["callback_errors"] += 1
            logger.exception("error in on_disconnect (ignored to keep the network thread alive)")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                topic = "\ufffd" + msg._topic.decode("utf-8", "replace")  # routed to a dead letter
            if self.instance_topic and topic == self.instance_topic:
                if msg.qos > 0:  # a stream filter may match it at QoS 1: it is ours to acknowledge
                    client.ack(msg.mid, msg.qos)
                self._check_marker(msg.payload, client)
                return
            if self.fatal_error:
                return  # the session belongs to the other agent now; it gets this message again
            payload = msg.payload
            with self._rx:
                self._counters["received"] += 1
                if self._stale:  # (Mosquitto does not always set DUP on what it sends again)
                    copies = self._stale.get((topic, payload))
                    if copies:
                        old = copies.popleft()
                        if not copies:
                            del self._stale[(topic, payload)]
                        # the broker redelivered a message we still hold from an earlier connection:
                        # keep its place in the queue, take the packet id we can acknowledge now
                        self._redelivered[id(old)] = (msg.mid, msg.qos, self._generation)
                        self._counters["redeliveries_merged"] += 1
                        return
                cost = len(payload) + len(topic) + MESSAGE_OVERHEAD
                if self._shedding or (
                        self._backlog_bytes + cost > self.max_backlog_bytes and self._queue and self._can_shed):
                    # the broker sends past its in-flight limit (Mosquitto 2.0.11 does once acks flow):
                    # leave it unacknowledged; a reconnect, once the agent caught up, brings it back.
                    # Every later message of this connection is left too: queueing one while an
                    # earlier one waits at the broker would hand the agent a later sequence number
                    # first, and the earlier reading would come back out of order.
                    self._shedding = True
                    self._counters["shed"] += 1
                    self._shed_in_episode += 1
                    if not self._resync_pending and self._resync_generation != self._generation:
                        self._resync_pending = True
                        logger.warning(
                            "%d messages (%.1f MB) wait for the agent: the broker sends past its in-flight limit; "
                            "further ones stay unacknowledged at the broker until the agent caught up and we "
                            "reconnect", len(self._queue), self._backlog_bytes / 1e6,
                        )
                    return
                self._queue.append((topic, payload, msg.qos, bool(msg.dup), msg.mid,
                                    time.time(), time.perf_counter(), self._generation))
                self._backlog_bytes += cost
                if len(self._queue) > self._counters["backlog_max"]:
                    self._counters["backlog_max"] = len(self._queue)
                if self._backlog_bytes > self._counters["backlog_bytes_max"]:
                    self._counters["backlog_bytes_max"] = self._backlog_bytes
                self._rx.notify()
        except Exception:
            self._counters["callback_errors"] += 1
            logger.exception("error in on_message (ignored to keep the network thread alive)")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        # paho calls this holding its outgoing-message lock: only take ours, briefly
        try:
            with self._tx:
                if mid in self._pending:
                    self._pending.discard(mid)
                    self._settle(reason_code)
                elif mid in self._qos0:
                    self._qos0.discard(mid)
                else:  # the PUBACK came before publish() recorded the packet id
                    self._early[mid] = reason_code
        except Exception:
            self._counters["callback_errors"] += 1
            logger.exception("error in on_publish (ignored to keep the network thread alive)")

    # -- helpers of the callbacks ------------------------------------------------------

    def _index_stale(self) -> None:
        """Index queued messages of earlier connections, for redeliveries to replace (under _rx)."""
        self._stale = {}
        redelivered = self._redelivered
        for q in self._queue:
            qos, generation = q[_QOS], q[_GENERATION]
            if redelivered and id(q) in redelivered:
                _, qos, generation = redelivered[id(q)]
            if qos > 0 and generation != self._generation:
                self._stale.setdefault((q[_TOPIC], q[_PAYLOAD]), collections.deque()).append(q)

    def _settle(self, reason_code: Any) -> None:
        """One QoS 1 publish acknowledged (under _tx)."""
        self._outstanding -= 1
        self._counters["publish_acked"] += 1
        refused = getattr(reason_code, "is_failure", False)
        if refused:
            self._counters["publish_refused"] += 1
            now = time.monotonic()
            if now - self._last_refusal_log >= 60.0:
                self._last_refusal_log = now
                logger.warning("the broker refused a publish: %s (%d refused so far)",
                               reason_code, self._counters["publish_refused"])
        # wake a waiting publish() only once a quarter of the window is free (one wake-up per
        # PUBACK costs a thread switch per message), and drain() when nothing is left
        if self._outstanding == 0 or self._outstanding <= self._resume_level:
            self._tx.notify_all()

    def _marker(self) -> bytes:
        return json.dumps({
            "instance": self.instance_id, "pid": os.getpid(), "host": socket.gethostname(),
            "client_id": self.client_id, "started": self.started_at, "at": time.time(),
        }).encode()

    def _check_marker(self, payload: bytes, client: mqtt.Client) -> None:
        """Another agent's marker, published after we started, means another live agent uses our id."""
        try:
            data = json.loads(payload)
            other = data["instance"]
            other_started, other_at = float(data["started"]), float(data["at"])
        except (ValueError, KeyError, TypeError):
            return
        if other == self.instance_id:
            self._own_marker_seen = True
            return
        if not self._own_marker_seen or other_at < self.started_at:
            # the retained marker found on our first subscribe was there before we published ours:
            # left by an agent that ran before this one (its clock may be off); only a marker that
            # replaced ours is evidence of another live agent
            return
        who = f"pid {data.get('pid')} on {data.get('host')!s}"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other_started))
        if (other_started, str(other)) > (self.started_at, self.instance_id):
            self._fatal(
                f"another agent ({who}, started {since}) connected to {self.config.host}:{self.config.port} "
                f"with our client id {self.client_id!r} and took over the session; this agent stops so that "
                "the two do not knock each other off the broker. Stop the other one, or give each its own "
                "mqtt.client_id", client,
            )
        elif other not in self._warned_instances:
            self._warned_instances.add(other)
            logger.warning(
                "another client connected with our client id %r (%s, started %s); it started before this "
                "agent and will stop when it sees that this one took over the session", self.client_id, who, since,
            )

    def _note_quick_disconnect(self) -> None:
        now = time.monotonic()
        if now - self._connected_at > FLAP_AFTER_CONNECT_S:
            return
        q = self._quick_disconnects
        q.append(now)
        while q and now - q[0] > FLAP_WINDOW_S:
            q.popleft()
        if len(q) >= FLAP_COUNT and now - self._last_flap_warning > 300.0:
            self._last_flap_warning = now
            logger.warning(
                "disconnected %d times within %.0f s, each within %.0f s of connecting: another client may be "
                "using our client id %r (Mosquitto closes the older connection without a reason), or the "
                "broker keeps restarting", len(q), FLAP_WINDOW_S, FLAP_AFTER_CONNECT_S, self.client_id,
            )

    def _fatal(self, message: str, client: mqtt.Client) -> None:
        """Stop for good: no more reconnects; the agent's loop sees ``fatal_error``."""
        if self.fatal_error:
            return
        self.fatal_error = message
        self.taken_over = True
        self.last_error = message
        logger.error("%s", message)
        self._connected.clear()
        with self._rx:  # not ours to acknowledge any more: the broker redelivers them to the other agent
            self._queue.clear()
            self._backlog_bytes = 0
            self._stale = {}
            self._redelivered.clear()
            self._rx.notify_all()
        with self._tx:
            self._tx.notify_all()
        try:
            if client.is_connected():
                client.disconnect()  # a normal DISCONNECT: no last will, our "offline" would be wrong
            client.loop_stop()  # from the network thread: only tells its loop to end, no reconnect
        except Exception:
            logger.debug("stopping the network loop after a takeover", exc_info=True)

    # -- agent side ------------------------------------------------------------------

    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        """Up to ``max_messages`` received messages; waits at most ``timeout`` for the first."""
        if self._resync_pending and not self._queue:
            # the agent took (and, between batches, acknowledged) everything we held: nothing of
            # ours goes stale, and the broker sends again what we left unacknowledged
            self._resync()
        if self._inline:
            self._pump_until(lambda: bool(self._queue) or bool(self.fatal_error), timeout)
            # and what else the socket holds (paho reads one packet a turn when nothing of ours is
            # in flight), up to the batch asked for
            got = len(self._queue)
            while 0 < got < max_messages and not self.fatal_error:
                self.pump(0.0)
                if len(self._queue) == got:
                    break
                got = len(self._queue)
        with self._rx:
            if not self._queue and timeout > 0 and not self._inline:
                self._rx.wait_for(lambda: bool(self._queue) or bool(self.fatal_error), timeout)
            out: list[Message] = []
            q = self._queue
            while q and len(out) < max_messages:
                queued = q.popleft()
                over = self._redelivered.pop(id(queued), None) if self._redelivered else None
                if over is None:
                    m = Message(*queued)
                else:
                    mid, qos, generation = over
                    m = Message(queued[_TOPIC], queued[_PAYLOAD], qos, True, mid, queued[_RECEIVED_AT],
                                queued[_RECEIVED_MONO], generation)
                self._backlog_bytes -= len(m.payload) + len(m.topic) + MESSAGE_OVERHEAD
                if self._stale and m.generation != self._generation:
                    copies = self._stale.get((m.topic, m.payload))
                    if copies is not None:
                        for i, c in enumerate(copies):
                            if c is queued:
                                del copies[i]
                                break
                        if not copies:
                            del self._stale[(m.topic, m.payload)]
                out.append(m)
        return out

    # -- network_loop = "agent": the loop on the caller's thread ------------------------

    def pump(self, timeout: float) -> None:
        """Run the network loop once on this thread: write the acknowledgements handed over by
        other threads, read and write what the socket has (waiting at most ``timeout`` s for
        something to happen), keep the connection alive, reconnect after the back-off."""
        if not self._inline:
            raise RuntimeError("pump() is for network_loop = 'agent'; paho's thread runs this loop")
        client = self._client
        if client is None or self._state != "started" or self.fatal_error or self._in_loop:
            if timeout > 0 and self._state != "started":
                time.sleep(timeout)  # not started (or stopped): nothing can arrive, as with paho's thread
            return
        if threading.get_ident() != self._loop_ident:
            raise RuntimeError("pump() runs on the thread that started the transport")
        self._flush_acks()
        if client.socket() is None:
            if self._stopping:
                return
            wait = self._reconnect_at - time.monotonic()
            if wait > 0:
                if timeout > 0:
                    # the back-off: nothing can arrive without a connection (acknowledgements handed
                    # over meanwhile are of the lost one, and skipped when written)
                    time.sleep(min(timeout, wait))
                return
            self._connect_now(client)
            timeout = 0.0  # read the CONNACK if it is there; the caller comes back for the rest
            if client.socket() is None:
                return
        self._in_loop = True
        try:
            rc = client.loop(timeout)
        finally:
            self._in_loop = False
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and client.socket() is None and not self._stopping:
            self._schedule_reconnect()  # paho closed the socket (and ran on_disconnect)

    def _pump_until(self, done: Any, timeout: float) -> bool:
        """Pump until ``done()`` or ``timeout`` s passed (at least once); returns ``done()``."""
        deadline = time.monotonic() + max(0.0, timeout)
        self.pump(0.0)
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or self.fatal_error:
                break
            self.pump(min(left, 1.0))
        return bool(done())

    def pump_for(self, seconds: float, stop: threading.Event) -> bool:
        """Keep the connection going for ``seconds`` (the agent waiting out a store error);
        True once ``stop`` is set. With paho's own thread this is ``stop.wait(seconds)``."""
        if not self._inline or self._client is None:
            return stop.wait(seconds)
        self._pump_until(stop.is_set, seconds)
        return stop.is_set()

    def _connect_now(self, client: mqtt.Client) -> None:
        try:
            client.reconnect()  # to what connect_async named; on_connect runs once the CONNACK is read
        except OSError as exc:
            self._on_connect_fail(client, None)
            logger.debug("connect failed: %s", exc)
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        """The next attempt after the back-off, doubled each time up to reconnect_max_delay
        (back to reconnect_min_delay once connected), as paho's own loop does."""
        self._reconnect_at = time.monotonic() + self._reconnect_delay
        self._reconnect_delay = min(2 * self._reconnect_delay, float(self.config.reconnect_max_delay))

    def _flush_acks(self) -> None:
        while self._acks_waiting:
            self._ack_now(self._acks_waiting.popleft())

    def _poke(self) -> None:
        """Wake the loop thread from its select() to write the acknowledgements handed over."""
        client = self._client
        wake = getattr(client, "_sockpairW", None)  # paho's own wake-up socket (what publish() writes to)
        if wake is None:
            return  # no loop has run yet: the first one writes them
        try:
            wake.send(b"\0")
        except BlockingIOError:
            logger.debug("wake-up socket full: the loop thread is woken already")
        except OSError as exc:  # closed by a reconnect under way: its loop picks the acks up
            logger.debug("could not wake the network loop: %s", exc)

    def _resync(self) -> None:
        """Reconnect (a normal DISCONNECT: no last will) so the broker resends what we shed."""
        client = self._client
        with self._rx:
            self._resync_pending = False
            self._resync_generation = self._generation
            shed, self._shed_in_episode = self._shed_in_episode, 0
        if (client is None or self._state != "started" or self._stopping or self.fatal_error
                or not self._connected.is_set()):
            return  # (a reconnect under way brings them back as well)
        self._counters["resyncs"] += 1
        logger.info("reconnecting so that the broker sends again the %d messages we left unacknowledged",
                    shed)
        self._resyncing = True
        try:
            # a QoS 1 round trip first: the broker handles our packets in order, so once it acknowledged
            # this publish it has handled the PUBACKs sent before it. Without it Mosquitto 2.0.11 sent
            # again, on the next connection, messages whose PUBACK came just before our DISCONNECT.
            self._publish_nowait(self.status_topic, b"online", qos=1, retain=True)
            if not self.drain(5.0):
                logger.warning("publishes still unacknowledged before reconnecting: %d", self.outstanding())
            self._disconnected.clear()
            client.disconnect()
            # paho calls on_disconnect once it wrote the DISCONNECT, after the PUBACKs queued before it;
            # stopping the loop earlier drops them, and the broker sends those messages again
            seen = (self._pump_until(self._disconnected.is_set, 5.0) if self._inline
                    else self._disconnected.wait(5.0))
            if not seen:
                logger.warning("the broker did not see our DISCONNECT within 5 s; reconnecting anyway")
            if self._inline:
                self._connect_async(client)
                self._connect_now(client)
                return
            client.loop_stop()
            # loop_start() makes a new wake-up socket pair without closing the old one (paho 2.2)
            reset = getattr(client, "_reset_sockets", None)
            if reset is not None:
                reset(sockpair_only=True)
            self._connect_async(client)
            client.loop_start()
        finally:
            self._resyncing = False

    def ack(self, messages: list[Message]) -> None:
        """Acknowledge committed messages; those of an earlier connection are skipped (redelivered)."""
        if self._inline and threading.get_ident() != self._loop_ident:
            self._acks_waiting.append(messages)  # the loop thread writes them (and checks the connection then)
            self._poke()
            return
        self._ack_now(messages)

    def _ack_now(self, messages: list[Message]) -> None:
        client = self._client
        if client is None or self.fatal_error:
            return
        with self._rx:  # on_connect/on_disconnect change the connection under this lock
            generation = self._generation if self._connected.is_set() else -1
            for m in messages:
                if m.qos == 0:
                    continue
                if m.generation != generation:
                    self._counters["ack_skipped_stale"] += 1
                    continue
                client.ack(m.mid, m.qos)
                self._counters["acked"] += 1

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Hand a message to the broker; False (and counted) when it had to be dropped.

        QoS 1: waits up to ``publish_timeout`` while ``publish_window`` publishes await their
        PUBACK (never on paho's thread, never before ``start()``), then drops."""
        if self._state == "stopped" or self.fatal_error:
            return self._drop()
        if self._inline:
            if threading.get_ident() != self._loop_ident and self._state == "started":
                raise RuntimeError("with network_loop = 'agent' only the thread that started the transport "
                                   "may publish")
            return self._send(topic, payload, qos, retain, wait=not self._in_loop)
        return self._send(topic, payload, qos, retain, wait=threading.get_ident() != self._net_ident)

    def _publish_nowait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """For our own status messages: never waits, may exceed the window by one."""
        return self._send(topic, payload, qos, retain, wait=False, force=True)

    def _drop(self) -> bool:
        with self._tx:
            self._counters["publish_dropped"] += 1
        return False

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool, wait: bool, force: bool = False) -> bool:
        client = self._ensure_client()
        if qos == 0:
            info = client.publish(topic, payload, qos=0, retain=retain)
            with self._tx:
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._counters["publish_dropped"] += 1
                    return False
                if self._early.pop(info.mid, None) is None:
                    self._qos0.add(info.mid)
                self._counters["published"] += 1
            return True
        with self._tx:
            if self._outstanding >= self._window and not force:
                can_wait = (wait and self._state == "started" and not self._dropping and not self._stopping
                            and self.publish_timeout > 0)
                if can_wait:
                    self._counters["publish_waits"] += 1
                    t0 = time.monotonic()
                    def room() -> bool:
                        return self._outstanding <= self._resume_level or self._stopping or bool(self.fatal_error)

                    if self._inline and self._state == "started":  # the PUBACKs come in through our own loop
                        self._tx.release()
                        try:
                            self._pump_until(room, self.publish_timeout)
                        finally:
                            self._tx.acquire()
                    else:
                        self._tx.wait_for(room, self.publish_timeout)
                    self._counters["publish_wait_s"] += time.monotonic() - t0
                if self._outstanding >= self._window or self.fatal_error:
                    self._counters["publish_dropped"] += 1
                    self._dropped_in_episode += 1
                    if not self._dropping:
                        self._dropping = True
                        logger.warning(
                            "%d publishes unacknowledged for %.0f s (broker %s): dropping publishes until "
                            "the broker acknowledges", self._outstanding, self.publish_timeout,
                            "connected" if self._connected.is_set() else "not connected",
                        )
                    return False
            if self._dropping:
                self._dropping = False
                logger.info("publishing again; %d publishes were dropped", self._dropped_in_episode)
                self._dropped_in_episode = 0
            self._outstanding += 1
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except BaseException:
            with self._tx:
                self._outstanding -= 1
                self._tx.notify_all()
            raise
        with self._tx:
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self._outstanding -= 1  # paho did not keep it
                self._counters["publish_dropped"] += 1
                self._tx.notify_all()
                return False
            self._counters["published"] += 1
            if info.mid in self._early:
                self._settle(self._early.pop(info.mid))
            else:
                self._pending.add(info.mid)
        return True

    def outstanding(self) -> int:
        """QoS 1 publishes handed to paho and not yet acknowledged by the broker."""
        with self._tx:
            return self._outstanding

    def drain(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until every publish is acknowledged; True when none is left."""
        if self._runs_loop_here() and self._state == "started":
            return self._pump_until(lambda: self._outstanding == 0 or bool(self.fatal_error), timeout) \
                and self._outstanding == 0
        with self._tx:
            if threading.get_ident() == self._net_ident:
                return self._outstanding == 0
            self._tx.wait_for(lambda: self._outstanding == 0 or bool(self.fatal_error), timeout)
            return self._outstanding == 0

    @property
    def _resume_level(self) -> int:
        """A publish waiting for a full window resumes when the outstanding count is down to this."""
        return self._window - max(1, self._window // 4)

    @property
    def window(self) -> int:
        """Current cap on unacknowledged QoS 1 publishes."""
        return self._window

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def backlog(self) -> int:
        """Messages received but not yet taken by the agent."""
        return len(self._queue)

    @property
    def resync_due(self) -> bool:
        """The next ``receive`` reconnects so that the broker sends again what was shed: what the
        agent took should be acknowledged first (else it comes again, and is dropped as seen)."""
        return self._resync_pending and not self._queue

    def stats(self) -> dict[str, int | float | bool | str]:
        with self._tx:
            out: dict[str, int | float | bool | str] = dict(self._counters)
            out["publish_wait_s"] = round(float(out["publish_wait_s"]), 3)
            out["outstanding"] = self._outstanding
            out["publish_window"] = self._window
        out["connected"] = self.connected
        out["backlog"] = self.backlog()
        out["backlog_bytes"] = self._backlog_bytes
        out["fatal"] = self.fatal_error is not None
        out["network_loop"] = self.network_loop
        return out
