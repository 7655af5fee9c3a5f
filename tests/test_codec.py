"""Decoding: good payloads become Readings; everything bad is a DecodeError with a reason."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamlearn.codec import Codec, TopicFilter, parse_json_object
from streamlearn.config import parse_config
from streamlearn.errors import DecodeError


@pytest.fixture(scope="module")
def codec() -> Codec:
    cfg = parse_config({"streams": [{
        "name": "boiler", "topic": "s/+/boiler", "device": {"topic_level": 1},
        "features": ["a", "b"], "label": {"field": "y"}, "id_fields": ["seq"], "sequence_field": "seq",
        "ranges": {"a": [-50, 150]}, "timestamp_field": "ts", "max_clock_skew_seconds": 60,
    }, {
        "name": "kind", "topic": "k/#", "features": ["a"], "task": "multiclass", "classes": ["x", "y", 3],
        "label": {"source": "topic", "topic": "lab/#", "id_field": "id", "field": "c"},
    }]})
    return Codec(cfg.streams)


NOW = 1_800_000_000.0


def good(**kv: object) -> bytes:
    body = {"a": 1.5, "b": 2, "y": 3.0, "seq": 7, "ts": NOW}
    body.update(kv)
    return orjson.dumps(body)


def test_a_good_reading(codec: Codec) -> None:
    r = codec.decode("s/dev1/boiler", good(), NOW)
    assert (r.stream, r.kind, r.device, r.features, r.target, r.msg_id) == ("boiler", "reading", "dev1", [1.5, 2.0], 3.0, "7")


def test_a_reading_without_its_label_is_still_a_reading(codec: Codec) -> None:
    body = orjson.loads(good())
    del body["y"]
    assert codec.decode("s/dev1/boiler", orjson.dumps(body), NOW).target is None


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"x" * 70_000, "too_large"),
        (b'{"a": NaN, "b": 1, "seq": 1, "ts": 1}', "not_json"),
        (b'{"a": Infinity, "b": 1}', "not_json"),
        (b'{"a": 1e400, "b": 1}', "non_finite"),
        (b'{"a": ' + b"9" * 5000 + b', "b": 1}', "non_finite"),
        (b'{"a": 1, "a": 2, "b": 1, "seq": 1, "ts": 1800000000}', "duplicate_key"),
        (b'\xef\xbb\xbf{"a": 1}', "bom"),
        (b'{"a": "\xff\xfe"}', "bad_utf8"),
        (b"[" * 100_000 + b"]" * 100_000, "too_long_or_deep"),
        (b'{"n": ' + b'{"n": ' * 20 + b"1" + b"}" * 21, "too_deep"),
        (b"[1, 2]", "not_object"),
        (good(a=True), "not_a_number"),
        (good(a="3"), "not_a_number"),
        (good(a=None), "not_a_number"),
        (good(a=500), "out_of_range"),
        (good(b=1e12), "out_of_range"),
        (good(y=False), "bad_label"),
        (good(seq=1.5), "bad_id"),
        (good(seq=True), "bad_id"),
        (good(ts=NOW - 86_400), "clock_skew"),
        (orjson.dumps({"b": 1, "y": 1, "seq": 1, "ts": NOW}), "missing_field"),
        (orjson.dumps({"a": 1, "b": 1, "y": 1, "ts": NOW}), "missing_field"),
    ],
)
def test_bad_payloads_have_a_reason(codec: Codec, payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode("s/dev1/boiler", payload, NOW)
    if reason == "too_long_or_deep":
        assert info.value.reason in ("too_large", "too_deep")
    else:
        assert info.value.reason == reason, info.value


def test_colons_inside_strings_do_not_hide_duplicates() -> None:
    assert parse_json_object(b'{"t": "12:00:01", "u": 1}', 1000) == {"t": "12:00:01", "u": 1}
    with pytest.raises(DecodeError, match="duplicate_key"):
        parse_json_object(b'{"t": "12:00", "u": 1, "u" : 2}', 1000)


def test_unknown_topics_and_bad_devices(codec: Codec) -> None:
    with pytest.raises(DecodeError, match="no_stream"):
        codec.decode("elsewhere/x", good(), NOW)
    with pytest.raises(DecodeError, match="bad_device"):
        codec.decode("s/" + "d" * 65 + "/boiler", good(), NOW)


def test_labels_and_classes(codec: Codec) -> None:
    lab = codec.decode("lab/1", b'{"id": 5, "c": "y"}', NOW)
    assert (lab.kind, lab.join_id, lab.target) == ("label", "5", 1.0)
    assert codec.decode("lab/1", b'{"id": "q", "c": 3}', NOW).target == 2.0
    with pytest.raises(DecodeError, match="bad_label"):
        codec.decode("lab/1", b'{"id": 5, "c": "z"}', NOW)
    with pytest.raises(DecodeError, match="missing_field"):
        codec.decode("k/x", b'{"a": 1}', NOW)  # no join id for its label


def test_topic_filters_follow_mqtt() -> None:
    assert TopicFilter("a/#").matches("a")
    assert TopicFilter("#").matches("a/b/c") and not TopicFilter("#").matches("$SYS/x")
    assert TopicFilter("+/+").matches("a/b") and not TopicFilter("+/+").matches("a/b/c")
    assert not TopicFilter("a/+").matches("a")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_other_errors(codec: Codec, payload: bytes) -> None:
    try:
        codec.decode("s/dev1/boiler", payload, NOW)
    except DecodeError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "y", "seq", "ts", "x"]), json_values, max_size=6))
def test_generated_objects_either_decode_cleanly_or_are_rejected(codec: Codec, body: dict) -> None:
    payload = json.dumps(body).encode()  # the stdlib writes integers of any size
    try:
        reading = codec.decode("s/dev1/boiler", payload, NOW)
    except DecodeError as exc:
        assert exc.reason and exc.detail
        return
    assert all(isinstance(v, float) and abs(v) <= 1e9 for v in reading.features)


def test_fields_the_stream_does_not_name_are_dead_letters_unless_ignored(codec: Codec) -> None:
    with pytest.raises(DecodeError) as err:
        codec.decode("s/dev1/boiler", good(rssi=-70), NOW)
    assert err.value.reason == "unexpected_field" and "rssi" in err.value.detail
    with pytest.raises(DecodeError) as err:  # label messages of a topic-label stream as well
        codec.decode("lab/1", orjson.dumps({"id": "m1", "c": "x", "note": "hi"}), NOW)
    assert err.value.reason == "unexpected_field"
    assert codec.decode("lab/1", orjson.dumps({"id": "m1", "c": "x"}), NOW).target == 0.0
    lenient = Codec(parse_config({"streams": [{
        "name": "boiler", "topic": "s/+/boiler", "features": ["a", "b"], "label": {"field": "y"},
        "extra_fields": "ignore",
    }]}).streams)
    assert lenient.decode("s/dev1/boiler", good(rssi=-70), NOW).features == [1.5, 2.0]
