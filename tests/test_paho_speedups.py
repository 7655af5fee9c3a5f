"""The shared-table Properties behave exactly as paho's own (streamlearn/transport/paho_speedups.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties

from streamlearn.transport import paho_speedups

# a value of each property, by its attribute name, for a packet type it applies to
VALUES = {
    "PayloadFormatIndicator": (PacketTypes.PUBLISH, 1),
    "MessageExpiryInterval": (PacketTypes.PUBLISH, 3600),
    "ContentType": (PacketTypes.PUBLISH, "application/json"),
    "ResponseTopic": (PacketTypes.PUBLISH, "a/b/reply"),
    "CorrelationData": (PacketTypes.PUBLISH, b"\x00\x01corr"),
    "SubscriptionIdentifier": (PacketTypes.PUBLISH, [7, 300]),
    "SessionExpiryInterval": (PacketTypes.CONNECT, 604800),
    "AssignedClientIdentifier": (PacketTypes.CONNACK, "auto-123"),
    "ServerKeepAlive": (PacketTypes.CONNACK, 45),
    "AuthenticationMethod": (PacketTypes.CONNECT, "SCRAM-SHA-1"),
    "AuthenticationData": (PacketTypes.CONNECT, b"secret"),
    "RequestProblemInformation": (PacketTypes.CONNECT, 1),
    "WillDelayInterval": (PacketTypes.WILLMESSAGE, 10),
    "RequestResponseInformation": (PacketTypes.CONNECT, 1),
    "ResponseInformation": (PacketTypes.CONNACK, "resp"),
    "ServerReference": (PacketTypes.DISCONNECT, "other:1883"),
    "ReasonString": (PacketTypes.PUBACK, "quota exceeded"),
    "ReceiveMaximum": (PacketTypes.CONNECT, 1000),
    "TopicAliasMaximum": (PacketTypes.CONNACK, 10),
    "TopicAlias": (PacketTypes.PUBLISH, 3),
    "MaximumQoS": (PacketTypes.CONNACK, 1),
    "RetainAvailable": (PacketTypes.CONNACK, 1),
    "UserProperty": (PacketTypes.PUBLISH, [("k", "v"), ("k2", "v2")]),
    "MaximumPacketSize": (PacketTypes.CONNECT, 268435455),
    "WildcardSubscriptionAvailable": (PacketTypes.CONNACK, 0),
    "SubscriptionIdentifierAvailable": (PacketTypes.CONNACK, 1),
    "SharedSubscriptionAvailable": (PacketTypes.CONNACK, 1),
}


@pytest.fixture
def patched() -> Iterator[None]:
    was = paho_speedups.installed()
    assert paho_speedups.install()
    yield
    if not was:
        paho_speedups.uninstall()


def _both(fn):  # type: ignore[no-untyped-def]
    """fn() with paho's own Properties, then with the patch."""
    was = paho_speedups.installed()
    paho_speedups.uninstall()
    try:
        original = fn()
        paho_speedups.install()
        return original, fn()
    finally:
        if not was:
            paho_speedups.uninstall()


def _props(packet_type: int, **values: object) -> Properties:
    p = Properties(packet_type)
    for name, value in values.items():
        setattr(p, name, value)
    return p


def _set(p: Properties) -> dict[str, object]:
    return {k: v for k, v in vars(p).items() if k not in ("packetType", "types", "names", "properties")}


def test_every_packet_type_gets_the_same_tables() -> None:
    for packet_type in range(1, 16):
        original, ours = _both(lambda: vars(Properties(packet_type)).copy())  # noqa: B023
        assert ours == original


def test_the_patch_is_a_patch_and_can_be_taken_back() -> None:
    was = paho_speedups.installed()
    try:
        paho_speedups.uninstall()
        assert not paho_speedups.installed()
        assert paho_speedups.install() and paho_speedups.install()  # a second install is a no-op
        a, b = Properties(PacketTypes.PUBLISH), Properties(PacketTypes.PUBACK)
        assert a.names is b.names and a.properties is b.properties  # shared, not rebuilt
    finally:
        if not was:
            paho_speedups.uninstall()


@pytest.mark.parametrize("name", sorted(VALUES))
def test_each_property_packs_and_unpacks_as_with_paho_alone(name: str) -> None:
    packet_type, value = VALUES[name]

    def round_trip() -> tuple[bytes, dict[str, object]]:
        packed = _props(packet_type, **{name: value}).pack()
        back = Properties(packet_type)
        back.unpack(packed)
        return packed, _set(back)

    original, ours = _both(round_trip)
    assert ours == original
    assert ours[1], "the property came back"


def test_unpack_into_a_used_object_clears_what_was_there(patched: None) -> None:
    p = _props(PacketTypes.PUBLISH, ContentType="text/plain", UserProperty=[("a", "b")])
    p.unpack(_props(PacketTypes.PUBLISH, TopicAlias=9).pack())
    assert _set(p) == {"TopicAlias": 9}
    p.unpack(Properties(PacketTypes.PUBLISH).pack())  # no properties at all
    assert _set(p) == {} and p.isEmpty()


def test_validation_is_paho_s_own(patched: None) -> None:
    p = Properties(PacketTypes.PUBACK)
    with pytest.raises(MQTTException, match="does not apply"):
        p.SessionExpiryInterval = 10
    with pytest.raises(MQTTException, match="must be one of"):
        p.NoSuchProperty = 1
