"""Validation rules and hostile bodies, decided by validation.py alone (no server, no Kafka)."""

from __future__ import annotations

import json

import msgspec
import pytest

from errors import MalformedBody, ValidationFailed
from openapi import PLAN_BATCH_EXAMPLE, PLAN_EXAMPLE
from validation import check_command, decode_batch, decode_batch_item, decode_command, merged_metadata

PROTOCOLS = ("mqtt", "coap")


def valid(**changes) -> dict:
    body = {"device_id": "d1", "command_type": "reboot", "payload": {}, "protocol": "mqtt"}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def problems(body: dict | bytes) -> list[tuple[str, str]]:
    """All field problems for a body, decoded as JSON then checked by the rules."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        cmd = decode_command(raw, "json")
    except ValidationFailed as exc:
        return [(e.loc, e.msg) for e in exc.errors]
    return [(p.loc, p.msg) for p in check_command(cmd, PROTOCOLS, 32)]


def test_plan_examples_are_valid():
    """The plan's single and batch examples decode and pass every rule."""
    assert problems(PLAN_EXAMPLE) == []
    raw = json.dumps(PLAN_BATCH_EXAMPLE).encode()
    for index, item in enumerate(decode_batch(raw, "json")):
        assert check_command(decode_batch_item(item, "json", index), PROTOCOLS, 32) == []


@pytest.mark.parametrize("field", ["device_id", "command_type", "payload", "protocol"])
def test_required_fields(field):
    """Each required field, when missing, is named in the error."""
    assert problems(valid(**{field: ...})) == [(f"$.{field}", "Field required")]


@pytest.mark.parametrize(
    ("changes", "loc"),
    [
        ({"device_id": ""}, "$.device_id"),
        ({"device_id": "x" * 256}, "$.device_id"),
        ({"device_id": "a\x00b"}, "$.device_id"),
        ({"device_id": "a\r\nb"}, "$.device_id"),
        ({"device_id": "a\x85b"}, "$.device_id"),
        ({"command_type": ""}, "$.command_type"),
        ({"command_type": "x" * 129}, "$.command_type"),
        ({"command_type": "reboot\n"}, "$.command_type"),
        ({"protocol": "MQTT"}, "$.protocol"),
        ({"protocol": ""}, "$.protocol"),
        ({"parser_script_ref": "../etc/passwd"}, "$.parser_script_ref"),
        ({"parser_script_ref": "dir/parser.py"}, "$.parser_script_ref"),
        ({"parser_script_ref": "dir\\parser.py"}, "$.parser_script_ref"),
        ({"parser_script_ref": ".."}, "$.parser_script_ref"),
        ({"parser_script_ref": ""}, "$.parser_script_ref"),
        ({"qos": 3}, "$.qos"),
        ({"qos": -1}, "$.qos"),
        ({"qos": "1"}, "$.qos"),
        ({"qos": True}, "$.qos"),
        ({"qos": 1.0}, "$.qos"),
        ({"retain": "yes"}, "$.retain"),
        ({"payload": []}, "$.payload"),
        ({"payload": "text"}, "$.payload"),
        ({"metadata": [1]}, "$.metadata"),
        ({"device_id": 7}, "$.device_id"),
        ({"request_id": "has space"}, "$.request_id"),
        ({"request_id": "a/b"}, "$.request_id"),
        ({"request_id": "x" * 129}, "$.request_id"),
        ({"request_id": "abc\n"}, "$.request_id"),
        ({"parser_script_ref": "parser.py\n"}, "$.parser_script_ref"),
        ({"protocol": "mqtt\n"}, "$.protocol"),
        ({"device_id": "d1\n"}, "$.device_id"),
        ({"extra": 1}, "$.extra"),
    ],
)
def test_field_rules(changes, loc):
    """Bounded strings without control characters, plain file names, ranges and types: one error naming the field."""
    found = problems(valid(**changes))
    assert [where for where, _ in found] == [loc], found


def test_messages_are_readable():
    """Pattern failures explain the rule instead of printing a regex."""
    [(_, msg)] = problems(valid(parser_script_ref="../x"))
    assert msg.startswith("Must be a plain file name")
    [(_, msg)] = problems(valid(device_id="a\nb"))
    assert msg == "Must not contain control characters"
    [(_, msg)] = problems(valid(extra=1))
    assert msg == "Unknown field"


def test_protocol_must_be_allowed():
    """A well-formed protocol outside ALLOWED_PROTOCOLS is refused with the list."""
    assert problems(valid(protocol="zigbee")) == [("$.protocol", "Must be one of: mqtt, coap")]


@pytest.mark.parametrize(
    ("changes", "loc", "msg"),
    [
        ({"protocol": "coap", "qos": 1}, "$.qos", "Only allowed with protocol mqtt"),
        ({"protocol": "coap", "retain": False}, "$.retain", "Only allowed with protocol mqtt"),
        ({"protocol": "mqtt", "confirmable": True}, "$.confirmable", "Only allowed with protocol coap"),
        ({"qos": 1, "metadata": {"qos": 2}}, "$.qos", "Conflicts with metadata.qos=2"),
        ({"protocol": "coap", "confirmable": True, "metadata": {"confirmable": False}}, "$.confirmable", None),
    ],
)
def test_protocol_options(changes, loc, msg):
    """qos/retain only with mqtt, confirmable only with coap, and never contradicting metadata."""
    [(where, text)] = problems(valid(**changes))
    assert where == loc
    if msg:
        assert text == msg


def test_protocol_options_merge_into_metadata():
    """Options fold into metadata; the same value in both places is fine."""
    metadata = {"qos": 1, "topic": "devices/d1/commands"}
    cmd = decode_command(json.dumps(valid(qos=1, retain=True, metadata=metadata)).encode(), "json")
    assert check_command(cmd, PROTOCOLS, 32) == []
    assert merged_metadata(cmd) == {"qos": 1, "topic": "devices/d1/commands", "retain": True}
    assert merged_metadata(decode_command(json.dumps(valid()).encode(), "json")) == {}


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def test_payload_nesting_is_bounded():
    """A payload nested deeper than MAX_PAYLOAD_DEPTH is a 422 naming where."""
    assert problems(valid(payload=_nested(32))) == []
    [(loc, msg)] = problems(valid(payload=_nested(33)))
    assert loc.startswith("$.payload.k.k") and msg == "Nested deeper than 32 levels"


def test_absurd_nesting_is_a_400_not_a_crash():
    """Nesting beyond the decoder's recursion limit is a malformed body."""
    body = b'{"device_id":"d","command_type":"c","protocol":"mqtt","payload":{"a":' + b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(MalformedBody, match="nested too deeply"):
        decode_command(body + b"}}", "json")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b'{"device_id":"d","command_type":"c","protocol":"mqtt","payload":{"x":NaN}}', "not valid JSON"),
        (b'{"device_id":"d","command_type":"c","protocol":"mqtt","payload":{"x":Infinity}}', "not valid JSON"),
        (b'{"device_id":"\xff","command_type":"c","protocol":"mqtt","payload":{}}', "not valid UTF-8"),
        (
            b'{"device_id":"d","command_type":"c","protocol":"mqtt","payload":{}} trailing',
            r"trailing characters \(byte",
        ),
        (b'{"device_id":"d",', "empty or truncated"),
        (b"", "empty or truncated"),
        (b"\x00\x01", "not valid JSON"),
    ],
)
def test_malformed_json_is_400_with_position(raw, match):
    """NaN, invalid UTF-8, trailing garbage and truncation are malformed bodies, with the byte where it broke."""
    with pytest.raises(MalformedBody, match=match):
        decode_command(raw, "json")


def test_numbers_out_of_range():
    """1e400 and integers beyond 64 bits are refused: connectors in other languages could not read them."""
    assert problems(b'{"device_id":"d","command_type":"c","protocol":"mqtt","payload":{"x":1e400}}')[0][0].startswith(
        "$.payload"
    )
    assert problems(valid(payload={"x": 2**64})) == [("$.payload.x", "Integer outside the signed 64-bit range")]
    assert problems(valid(payload={"x": [-(2**63), 2**63 - 1]})) == []


def test_duplicate_keys_last_one_wins():
    """Duplicate keys resolve as in most JSON parsers (the last wins); Kafka gets only the validated value."""
    raw = b'{"device_id":"a","device_id":"b","command_type":"c","protocol":"mqtt","payload":{}}'
    assert decode_command(raw, "json").device_id == "b"


def test_not_an_object():
    """A JSON array or string is a 422 at the root."""
    assert problems(b"[1, 2]") == [("$", "Expected `object`, got `array`")]
    assert problems(b'"x"') == [("$", "Expected `object`, got `str`")]


def test_msgpack_bodies():
    """MessagePack decodes to the same command, and garbage is a malformed body."""
    cmd = decode_command(msgspec.msgpack.encode(PLAN_EXAMPLE), "msgpack")
    assert cmd.device_id == "efento_device_001" and cmd.payload == {"measurement_interval": 600}
    with pytest.raises(MalformedBody, match="not valid MessagePack"):
        decode_command(b"\xc1", "msgpack")


def test_batch_items_carry_their_index_in_paths():
    """A batch item's error path starts with $.commands[i]."""
    raw = json.dumps({"commands": [valid(), valid(qos=7)]}).encode()
    items = decode_batch(raw, "json")
    decode_batch_item(items[0], "json", 0)
    with pytest.raises(ValidationFailed) as caught:
        decode_batch_item(items[1], "json", 1)
    assert [(e.loc, e.msg) for e in caught.value.errors] == [("$.commands[1].qos", "Expected `int` <= 2")]


def test_batch_envelope_is_strict():
    """The envelope must be an object with a `commands` list and nothing else."""
    for raw in (b"[]", b'{"commands": {}}', b'{"commands": [], "x": 1}', b"{}"):
        with pytest.raises(ValidationFailed):
            decode_batch(raw, "json")


@pytest.mark.parametrize(
    ("changes", "loc", "msg"),
    [
        ({"ttl_seconds": 0}, "$.ttl_seconds", "Expected `int` >= 1"),
        ({"ttl_seconds": 31 * 86400}, "$.ttl_seconds", "Expected `int` <= 2592000"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "$.expires_at", "Already in the past"),
        ({"expires_at": "2999-01-01T00:00:00Z"}, "$.expires_at", "At most 2592000 seconds ahead"),
        ({"expires_at": "2030-01-01T00:00:00"}, "$.expires_at", "Expected `datetime` with a timezone component"),
        ({"expires_at": "soon"}, "$.expires_at", None),
        ({"ttl_seconds": 5, "expires_at": "2999-01-01T00:00:00Z"}, "$.expires_at", "Give ttl_seconds or expires_at"),
    ],
)
def test_expiry_fields(changes, loc, msg):
    """ttl_seconds is 1 s to 30 days; expires_at needs a UTC offset, lies ahead, within 30 days; not both."""
    [(where, text)] = problems(valid(**changes))
    assert where == loc
    if msg:
        assert text.startswith(msg), text


def test_msgpack_values_that_json_cannot_hold_are_refused():
    """Binary, extension types, NaN and non-string keys are a 422 naming the place, not a 500."""
    base = {"device_id": "d", "command_type": "c", "protocol": "mqtt"}
    cases = [
        ({"payload": {"b": b"\x00"}}, "$.payload.b", "Not a JSON value (bytes)"),
        ({"payload": {"e": msgspec.msgpack.Ext(1, b"")}}, "$.payload.e", "Not a JSON value (Ext)"),
        ({"payload": {"n": float("nan")}}, "$.payload.n", "Numbers must be finite (no NaN or Infinity)"),
        ({"payload": {"deep": {1: 2}}}, "$.payload.deep", "Object keys must be strings"),
    ]
    for extra, loc, msg in cases:
        cmd = decode_command(msgspec.msgpack.encode({**base, **extra}), "msgpack")
        assert [(p.loc, p.msg) for p in check_command(cmd, PROTOCOLS, 32)] == [(loc, msg)]


# ---------------------------------------------------------------- MQTT topics and typed metadata


@pytest.mark.parametrize(
    ("topic", "says"),
    [
        ("devices/dev-b/commands", "Must be the device's topic 'devices/dev-a/commands' or a topic below it"),
        ("devices/+/commands", "Must not contain the wildcards + or #"),
        ("devices/dev-a/commands/#", "Must not contain the wildcards + or #"),
        ("$SYS/broker/load", "Must not start with $"),
        ("devices/dev-a/commands//x", "Must not have an empty level"),
        ("devices/dev-a/commands/a\x00b", "Must not contain NUL or other control characters"),
        (5, "Expected `str`, got `int`"),
    ],
)
def test_metadata_topic_must_be_the_device_own(topic, says):
    """metadata.topic names the device's topic or one below it; another device's topic, a wildcard, a broker
    topic, an empty level or a NUL is a 422 naming $.metadata.topic."""
    [(loc, msg)] = problems(valid(device_id="dev-a", metadata={"topic": topic}, retain=True))
    assert loc == "$.metadata.topic" and msg.startswith(says), msg


def test_metadata_topic_below_the_device_topic_passes():
    """The device's own topic and a sub-topic of it are accepted, with any protocol."""
    assert problems(valid(device_id="dev-a", metadata={"topic": "devices/dev-a/commands"})) == []
    assert problems(valid(device_id="dev-a", metadata={"topic": "devices/dev-a/commands/led/2"})) == []
    assert problems(valid(device_id="dev-a", protocol="coap", metadata={"topic": "devices/dev-b/commands"})) == [
        ("$.metadata.topic", "Must be the device's topic 'devices/dev-a/commands' or a topic below it")
    ]


def test_topic_template_decides_the_device_topic():
    """With another template, the device's topic moves with it."""
    body = valid(device_id="dev-a", metadata={"topic": "plant/dev-a/in"})
    cmd = decode_command(json.dumps(body).encode(), "json")
    assert check_command(cmd, PROTOCOLS, 32, topic_template="plant/{device_id}/in") == []
    [problem] = check_command(cmd, PROTOCOLS, 32)
    assert problem.loc == "$.metadata.topic"


@pytest.mark.parametrize("device_id", ["a+b", "a#", "a/commands/x", "a/"])
def test_mqtt_device_ids_must_make_a_topic_of_their_own(device_id):
    """An mqtt device id that would make a wildcard or empty-level topic, or one below another device's topic,
    is a 422 on $.device_id; the same id is fine for a protocol without topics."""
    [(loc, _)] = problems(valid(device_id=device_id))
    assert loc == "$.device_id"
    assert problems(valid(device_id=device_id, protocol="coap")) == []


def test_device_ids_with_a_slash_that_nest_nowhere_pass():
    """Site-style ids (`site-a/pump-1`) keep working: their topic lies below no other device's."""
    assert problems(valid(device_id="site-a/pump-1")) == []


@pytest.mark.parametrize(
    ("metadata", "loc", "msg"),
    [
        ({"qos": 1.0}, "$.metadata.qos", "Expected `int`, got `float`"),
        ({"qos": True}, "$.metadata.qos", "Expected `int`, got `bool`"),
        ({"qos": 3}, "$.metadata.qos", "Expected `int` <= 2"),
        ({"qos": "1"}, "$.metadata.qos", "Expected `int`, got `str`"),
        ({"qos": None}, "$.metadata.qos", "Expected `int`, got `null`"),
        ({"retain": 1}, "$.metadata.retain", "Expected `bool`, got `int`"),
        ({"retain": "true"}, "$.metadata.retain", "Expected `bool`, got `str`"),
        ({"confirmable": 0}, "$.metadata.confirmable", "Expected `bool`, got `int`"),
    ],
)
def test_metadata_protocol_options_are_strictly_typed(metadata, loc, msg):
    """metadata.qos is an integer 0-2 (not 1.0, not true) and retain/confirmable are booleans: a 422 naming
    the key, as the fields of the same name."""
    assert problems(valid(metadata=metadata)) == [(loc, msg)]


def test_metadata_qos_float_is_refused_in_msgpack_and_in_a_batch():
    """The same rule for MessagePack bodies, and in a batch the path carries the item's index."""
    cmd = decode_command(msgspec.msgpack.encode(valid(metadata={"qos": 1.0})), "msgpack")
    assert [p.loc for p in check_command(cmd, PROTOCOLS, 32)] == ["$.metadata.qos"]
    raw = json.dumps({"commands": [valid(), valid(device_id="dev-a", metadata={"topic": "$SYS/x"})]}).encode()
    item = decode_batch_item(decode_batch(raw, "json")[1], "json", 1)
    [problem] = check_command(item, PROTOCOLS, 32, "$.commands[1]")
    assert problem.loc == "$.commands[1].metadata.topic"
