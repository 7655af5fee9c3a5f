"""Payload -> Reading, or a DecodeError with a reason.

A message is routed to a stream by its topic (the first stream whose reading or
label topic filter matches), then its JSON payload is parsed and checked before
anything reaches a model. Everything suspicious is rejected with a stable reason
code and a sentence naming the field:

=================  ===========================================================
reason             when
=================  ===========================================================
``no_stream``      no configured stream matches the topic
``too_large``      payload longer than the stream's ``max_payload_bytes``
``empty``          zero-length payload
``bad_utf8``       bytes that are not UTF-8
``bom``            a UTF-8 byte order mark before the JSON
``not_json``       anything else the JSON parser refuses (NaN, Infinity, ...)
``non_finite``     a number too large for a double (``1e400``, 5,000 digits)
``too_deep``       objects or arrays nested deeper than 8 levels
``duplicate_key``  the same key twice in one object
``not_object``     the top level is not a JSON object
``missing_field``  a feature, id or forecast field is absent
``not_a_number``   a feature is not a number (``true``, ``"3"``, ``null``...)
``out_of_range``   a value outside its configured range or ``max_abs_value``
``bad_label``      a label that is not a number / not a known class
``bad_device``     a device id that is empty, too long or has ``/ + #``
``bad_id``         an id field that is not a string or an integer
``clock_skew``     a timestamp further than ``max_clock_skew_seconds`` from now
=================  ===========================================================

>>> from streamlearn.config import parse_config
>>> cfg = parse_config({"streams": [{"name": "boiler", "topic": "sensors/+/boiler",
...     "features": ["t_in", "flow"], "label": {"field": "power"},
...     "device": {"topic_level": 1}}]})
>>> codec = Codec(cfg.streams)
>>> r = codec.decode("sensors/dev7/boiler", b'{"t_in": 20.5, "flow": 3, "power": 7.0}', 0.0)
>>> (r.stream, r.device, r.features, r.target)
('boiler', 'dev7', [20.5, 3.0], 7.0)
>>> codec.decode("sensors/dev7/boiler", b'{"t_in": true, "flow": 3}', 0.0)
Traceback (most recent call last):
...
streamlearn.errors.DecodeError: not_a_number: field 't_in': expected a number, got true
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import orjson

from streamlearn.config import StreamConfig
from streamlearn.errors import DecodeError

MAX_DEPTH = 8
_READING = "reading"
_LABEL = "label"
_BAD_DEVICE_CHARS = frozenset("/+#\x00")


@dataclass(slots=True)
class Reading:
    """One validated message, ready for the feature stage.

    ``kind`` is ``"reading"`` (features, maybe a target) or ``"label"`` (a target
    for an earlier reading, joined by ``join_id``).
    """

    stream: str
    kind: str
    device: str
    features: list[float]
    target: float | None
    msg_id: str | None
    join_id: str | None
    timestamp: float | None
    forecast_value: float | None = None
    sequence: int | None = None  # the sequence_field's value
    sequence_scope: str | None = None  # device and the other id fields: where `sequence` counts up


class TopicFilter:
    """An MQTT topic filter compiled for matching.

    >>> f = TopicFilter("sensors/+/temp/#")
    >>> f.matches("sensors/a/temp"), f.matches("sensors/a/temp/x/y"), f.matches("sensors/temp")
    (True, True, False)
    """

    __slots__ = ("text", "_levels")

    def __init__(self, text: str) -> None:
        self.text = text
        self._levels = text.split("/")

    def matches(self, topic: str) -> bool:
        levels = topic.split("/")
        pattern = self._levels
        for i, want in enumerate(pattern):
            if want == "#":
                # '#' also matches the parent level; '$' topics never match wildcards
                return not (i == 0 and topic.startswith("$"))
            if i >= len(levels):
                return False
            if want == "+":
                if i == 0 and levels[0].startswith("$"):
                    return False
                continue
            if want != levels[i]:
                return False
        return len(levels) == len(pattern)


def _number(value: Any, field: str, stream: StreamConfig) -> float:
    if type(value) is float:
        x = value
    elif type(value) is int:
        x = float(value)
    else:
        raise DecodeError(
            "not_a_number", f"field {field!r}: expected a number, got {_show(value)}"
        )
    if not math.isfinite(x):  # orjson refuses these, but a float(int) can overflow
        raise DecodeError("non_finite", f"field {field!r}: {_show(value)} is not finite")
    limits = stream.ranges.get(field)
    if limits is not None:
        if not limits[0] <= x <= limits[1]:
            raise DecodeError(
                "out_of_range",
                f"field {field!r}: {x!r} outside its range [{limits[0]}, {limits[1]}]",
            )
    elif abs(x) > stream.max_abs_value:
        raise DecodeError(
            "out_of_range", f"field {field!r}: |{x!r}| exceeds max_abs_value {stream.max_abs_value}"
        )
    return x


def _show(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _identifier(value: Any, field: str) -> str:
    if type(value) is str and 0 < len(value) <= 256:
        return value
    if type(value) is int:
        return str(value)
    raise DecodeError("bad_id", f"field {field!r}: expected a string or an integer id, got {_show(value)}")


def _device(value: Any, where: str) -> str:
    if type(value) is int:
        value = str(value)
    if type(value) is not str or not 0 < len(value) <= 64 or _BAD_DEVICE_CHARS.intersection(value):
        raise DecodeError(
            "bad_device", f"{where}: expected a device id (1-64 chars, no / + #), got {_show(value)}"
        )
    return value


def _count_keys(obj: Any, depth: int) -> int:
    """Total keys in all nested objects; raises ``too_deep`` past MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise DecodeError("too_deep", f"nested deeper than {MAX_DEPTH} levels")
    if type(obj) is dict:
        n = len(obj)
        for v in obj.values():
            if type(v) is dict or type(v) is list:
                n += _count_keys(v, depth + 1)
        return n
    if type(obj) is list:
        n = 0
        for v in obj:
            if type(v) is dict or type(v) is list:
                n += _count_keys(v, depth + 1)
        return n
    return 0


def _reject_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DecodeError("duplicate_key", f"key {key!r} appears twice")
        seen[key] = value
    return seen


def parse_json_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Parse a payload as one JSON object, strictly.

    orjson already refuses NaN, Infinity, numbers beyond a double, invalid UTF-8
    and nesting past 1024. Duplicate keys it silently merges, so they are checked
    here without a second parse in the common case: every key/value pair has one
    structural ``:``, so when the payload holds exactly as many colons as the parsed
    objects hold keys, no key was repeated; only otherwise does the slower exact
    check run.
    """
    n = len(payload)
    if n == 0:
        raise DecodeError("empty", "empty payload")
    if n > max_bytes:
        raise DecodeError("too_large", f"{n} bytes exceeds max_payload_bytes {max_bytes}")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise _json_error(payload, str(exc)) from None
    if type(obj) is not dict:
        raise DecodeError("not_object", f"expected a JSON object, got {type(obj).__name__}")
    n_keys = _count_keys(obj, 1)
    if payload.count(b":") != n_keys:
        try:
            json.loads(payload, object_pairs_hook=_reject_duplicate_pairs)
        except RecursionError:
            raise DecodeError("too_deep", "nested too deeply") from None
    return obj


def _json_error(payload: bytes, message: str) -> DecodeError:
    if "infinity" in message:
        return DecodeError("non_finite", "a number does not fit in a double")
    if "depth limit" in message:
        return DecodeError("too_deep", "nested too deeply")
    if "UTF-8" in message and "BOM" not in message:
        return DecodeError("bad_utf8", "payload is not valid UTF-8")
    if "BOM" in message or "byte order mark" in message:
        return DecodeError("bom", "payload starts with a UTF-8 byte order mark")
    if b"NaN" in payload or b"Infinity" in payload:
        return DecodeError("not_json", "NaN and Infinity are not JSON numbers")
    return DecodeError("not_json", message[:200])


class _StreamDecoder:
    """Decoding rules for one stream (its readings and its labels)."""

    def __init__(self, stream: StreamConfig) -> None:
        self.config = stream
        self.name = stream.name
        self.reading_filter = TopicFilter(stream.topic)
        self.label_filter = TopicFilter(stream.label.topic) if stream.label.topic else None
        self.features = list(stream.features)
        self.classes = {str(c): i for i, c in enumerate(stream.classes or [])}
        self.forecast_field = stream.label.field if stream.label.source == "forecast" else None
        self.payload_label = stream.label.field if stream.label.source == "payload" else None
        # the fields a payload may carry (None: any); anything else is a dead letter
        self.reading_fields: frozenset[str] | None = None
        self.label_fields: frozenset[str] | None = None
        if stream.extra_fields == "reject":
            device_field = [stream.device.field] if stream.device.field else []
            label = stream.label
            self.reading_fields = frozenset(
                [*stream.features, *stream.id_fields, *device_field]
                + [f for f in (stream.timestamp_field, stream.sequence_field) if f]
                + ([label.field] if label.source in ("payload", "forecast") else [label.id_field]))
            if label.source == "topic":
                self.label_fields = frozenset([label.label_id, label.field, *device_field])

    def device_of(self, topic: str, obj: dict[str, Any]) -> str:
        spec = self.config.device
        if spec.topic_level is not None:
            levels = topic.split("/")
            if spec.topic_level >= len(levels):
                raise DecodeError(
                    "bad_device", f"topic {topic!r} has no level {spec.topic_level} for the device id"
                )
            return _device(levels[spec.topic_level], f"topic level {spec.topic_level}")
        if spec.field is not None:
            if spec.field not in obj:
                raise DecodeError("missing_field", f"device field {spec.field!r} is missing")
            return _device(obj[spec.field], f"field {spec.field!r}")
        return "default"

    def target(self, value: Any, field: str) -> float:
        task = self.config.task
        if task == "regression":
            try:
                return _number(value, field, self.config)
            except DecodeError as exc:
                raise DecodeError("bad_label", exc.detail) from None
        if self.classes:
            if type(value) is not bool and (type(value) is str or type(value) is int):
                index = self.classes.get(str(value))
                if index is not None:
                    return float(index)
            raise DecodeError(
                "bad_label",
                f"field {field!r}: expected one of {list(self.classes)}, got {_show(value)}",
            )
        # binary without named classes: true/false or 0/1
        if value is True or value is False or (type(value) is int and value in (0, 1)):
            return float(value)
        raise DecodeError("bad_label", f"field {field!r}: expected true/false or 0/1, got {_show(value)}")

    def decode(self, kind: str, topic: str, obj: dict[str, Any], received_at: float) -> Reading:
        cfg = self.config
        allowed = self.label_fields if kind == _LABEL else self.reading_fields
        if allowed is not None and not allowed.issuperset(obj):
            extra = sorted(k for k in obj if k not in allowed)
            raise DecodeError("unexpected_field", f"fields the stream does not name: {extra[:5]} "
                              f"(set extra_fields = \"ignore\" to accept them)")
        device = self.device_of(topic, obj)
        if kind == _LABEL:
            label_id_field = cfg.label.label_id
            if label_id_field not in obj:
                raise DecodeError("missing_field", f"label id field {label_id_field!r} is missing")
            join_id = _identifier(obj[label_id_field], label_id_field)
            if cfg.label.field not in obj:
                raise DecodeError("missing_field", f"label field {cfg.label.field!r} is missing")
            target = self.target(obj[cfg.label.field], cfg.label.field)
            return Reading(self.name, _LABEL, device, [], target, None, join_id, None)

        features = []
        for field in self.features:
            if field not in obj:
                raise DecodeError("missing_field", f"feature {field!r} is missing")
            features.append(_number(obj[field], field, cfg))

        msg_id = None
        sequence = None
        scope = None
        if cfg.id_fields:
            parts = []
            for field in cfg.id_fields:
                if field not in obj:
                    raise DecodeError("missing_field", f"id field {field!r} is missing")
                parts.append(_identifier(obj[field], field))
            msg_id = "|".join(parts)
            if cfg.sequence_field is not None:
                sequence = obj[cfg.sequence_field]
                if type(sequence) is not int or sequence < 0:
                    raise DecodeError(
                        "bad_id", f"field {cfg.sequence_field!r}: expected a non-negative integer sequence number"
                    )
                scope = "|".join([self.name, device] + [
                    p for f, p in zip(cfg.id_fields, parts) if f != cfg.sequence_field])

        timestamp = None
        if cfg.timestamp_field is not None:
            if cfg.timestamp_field not in obj:
                raise DecodeError("missing_field", f"timestamp field {cfg.timestamp_field!r} is missing")
            raw_ts = obj[cfg.timestamp_field]
            if type(raw_ts) not in (int, float) or not math.isfinite(raw_ts):
                raise DecodeError(
                    "not_a_number", f"field {cfg.timestamp_field!r}: expected epoch seconds, got {_show(raw_ts)}"
                )
            timestamp = float(raw_ts) / 1000.0 if raw_ts > 1e11 else float(raw_ts)
            skew = abs(timestamp - received_at)
            if received_at > 0 and skew > cfg.max_clock_skew_seconds:
                raise DecodeError(
                    "clock_skew",
                    f"field {cfg.timestamp_field!r}: {skew:.0f} s from the gateway clock "
                    f"(max_clock_skew_seconds {cfg.max_clock_skew_seconds:g})",
                )

        target = None
        forecast_value = None
        join_id = None
        if self.payload_label is not None:
            raw = obj.get(self.payload_label)
            if raw is not None:
                target = self.target(raw, self.payload_label)
        elif self.forecast_field is not None:
            if self.forecast_field not in obj:
                raise DecodeError("missing_field", f"forecast field {self.forecast_field!r} is missing")
            forecast_value = _number(obj[self.forecast_field], self.forecast_field, cfg)
        else:  # topic labels: the reading must carry the id its label will quote
            id_field = cfg.label.id_field
            assert id_field is not None
            if id_field not in obj:
                raise DecodeError("missing_field", f"label join field {id_field!r} is missing")
            join_id = _identifier(obj[id_field], id_field)
        return Reading(self.name, _READING, device, features, target, msg_id, join_id, timestamp, forecast_value,
                       sequence, scope)


class Codec:
    """Routes topics to streams and decodes payloads into Readings."""

    _CACHE_MAX = 4096

    def __init__(self, streams: list[StreamConfig]) -> None:
        self._decoders = [_StreamDecoder(s) for s in streams]
        self._routes: dict[str, tuple[_StreamDecoder, str] | None] = {}

    @property
    def subscriptions(self) -> list[str]:
        """Every topic filter the transport must subscribe to."""
        out: list[str] = []
        for d in self._decoders:
            for f in (d.reading_filter, d.label_filter):
                if f is not None and f.text not in out:
                    out.append(f.text)
        return out

    def route(self, topic: str) -> tuple[str, str] | None:
        """``(stream, kind)`` for a topic, or None when no stream takes it."""
        found = self._route(topic)
        return None if found is None else (found[0].name, found[1])

    def _route(self, topic: str) -> tuple[_StreamDecoder, str] | None:
        try:
            return self._routes[topic]
        except KeyError:
            pass
        found = None
        for d in self._decoders:
            if d.reading_filter.matches(topic):
                found = (d, _READING)
                break
            if d.label_filter is not None and d.label_filter.matches(topic):
                found = (d, _LABEL)
                break
        if len(self._routes) >= self._CACHE_MAX:
            self._routes.clear()
        self._routes[topic] = found
        return found

    def decode(self, topic: str, payload: bytes, received_at: float) -> Reading:
        """Decode one message; raises DecodeError with a reason code."""
        found = self._route(topic)
        if found is None:
            raise DecodeError("no_stream", f"no stream subscribes to topic {topic[:200]!r}")
        decoder, kind = found
        obj = parse_json_object(payload, decoder.config.max_payload_bytes)
        return decoder.decode(kind, topic, obj, received_at)
