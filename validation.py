"""What a command body must be beyond its Struct, and how a failure is told.

A body is decoded into its Struct (`decode_command`, `decode_batch`, `decode_batch_item`): a malformed body is a
MalformedBody (400), a wrong shape a ValidationFailed (422) whose paths read like `$.commands[3].qos`. Then
`check_command` applies the rules a Struct cannot express (allowed protocols, protocol options, metadata, MQTT
topics, depth, expiry). `problem_for` turns any error into the RFC 9457 body the client reads.
"""

from __future__ import annotations

import math
import re
import unicodedata
from datetime import UTC, datetime
from typing import Any

import msgspec

import mqtt_topics
from errors import FieldProblem, MalformedBody, PusherError, ValidationFailed
from schemas import (
    MAX_SCHEDULE,
    MAX_TTL,
    PROTOCOL_OPTIONS,
    CommandRequest,
    FanoutRequest,
    FieldError,
    Problem,
    _BatchEnvelope,
    _MetadataOptions,
)

_INT64 = 2**63


def problem_for(error: BaseException, http_request_id: str | None = None, instance: str | None = None) -> Problem:
    """The problem+json body for an error; anything not ours gets the fixed 500 body."""
    if not isinstance(error, PusherError):
        error = PusherError("An unexpected error occurred; the log has the details under this request id")
    errors = getattr(error, "errors", None)
    return Problem(
        type=f"/problems/{error.slug}",
        title=error.title,
        status=error.status,
        detail=error.detail,
        instance=instance,
        http_request_id=http_request_id,
        errors=[FieldError(loc=e.loc, msg=e.msg) for e in errors] if errors else None,
    )


_DECODERS = {
    "json": {
        CommandRequest: msgspec.json.Decoder(CommandRequest),
        _BatchEnvelope: msgspec.json.Decoder(_BatchEnvelope),
        FanoutRequest: msgspec.json.Decoder(FanoutRequest),
    },
    "msgpack": {
        CommandRequest: msgspec.msgpack.Decoder(CommandRequest),
        _BatchEnvelope: msgspec.msgpack.Decoder(_BatchEnvelope),
        FanoutRequest: msgspec.msgpack.Decoder(FanoutRequest),
    },
}


def _decode(body: bytes, kind: type, fmt: str, prefix: str = "$") -> Any:
    """Decode `body` as `kind`; malformed → MalformedBody, wrong shape → ValidationFailed."""
    try:
        return _DECODERS[fmt][kind].decode(body)
    except msgspec.ValidationError as exc:
        raise ValidationFailed([field_problem(str(exc), prefix)]) from None
    except msgspec.DecodeError as exc:
        raise MalformedBody(_malformed_detail(str(exc))) from None
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"Body is not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise MalformedBody("Body is nested too deeply") from None


def _malformed_detail(message: str) -> str:
    """msgspec's decode error in the words of the API (the format is in its message already)."""
    if message == "Input data was truncated":
        return "Body is empty or truncated"
    return message.replace("JSON is malformed", "Body is not valid JSON").replace(
        "MessagePack data is malformed", "Body is not valid MessagePack"
    )


_PATH = re.compile(r"^(?P<msg>.*?)(?: - at (?:`key` in )?`(?P<loc>\$[^`]*)`)?$", re.S)


_PATTERN_HINTS = {
    "parser_script_ref": "Must be a plain file name: no '/', '\\', '..' or control characters",
    "request_id": "Only letters, digits and . _ ~ : - are allowed",
    "protocol": "Only lowercase letters, digits, '_' and '-' are allowed",
}


def field_problem(message: str, prefix: str) -> FieldProblem:
    """Split msgspec's 'msg - at `$.path`' and root the path at `prefix`."""
    match = _PATH.match(message)
    msg, loc = match["msg"], match["loc"] or "$"
    if "matching regex" in msg:
        msg = _PATTERN_HINTS.get(loc.rsplit(".", 1)[-1], "Must not contain control characters")
    if msg.startswith("Object contains unknown field"):
        field = msg.split("`")[1]
        loc, msg = f"{loc}.{field}", "Unknown field"
    elif msg.startswith("Object missing required field"):
        field = msg.split("`")[1]
        loc, msg = f"{loc}.{field}", "Field required"
    return FieldProblem(loc=prefix + loc[1:], msg=msg)


def decode_command(body: bytes, fmt: str) -> CommandRequest:
    """Decode one command body (JSON or msgpack)."""
    return _decode(body, CommandRequest, fmt)


def decode_batch(body: bytes, fmt: str) -> list[msgspec.Raw]:
    """Decode the batch envelope only; its items stay raw for item-by-item validation."""
    return _decode(body, _BatchEnvelope, fmt).commands


def decode_batch_item(raw: msgspec.Raw, fmt: str, index: int) -> CommandRequest:
    """Decode one raw batch item; error paths read `$.commands[index]…`."""
    return _decode(bytes(raw), CommandRequest, fmt, prefix=f"$.commands[{index}]")


def check_command(
    cmd: CommandRequest,
    allowed_protocols: tuple[str, ...],
    max_depth: int,
    prefix: str = "$",
    topic_template: str = mqtt_topics.DEFAULT_TEMPLATE,
) -> list[FieldProblem]:
    """The rules a Struct cannot express: protocol, per-protocol options, metadata, MQTT topic, depth."""
    problems: list[FieldProblem] = []
    if _invisible(cmd.command_type):
        problems.append(FieldProblem(f"{prefix}.command_type", "Must not contain invisible format characters"))
    if cmd.protocol not in allowed_protocols:
        problems.append(FieldProblem(f"{prefix}.protocol", f"Must be one of: {', '.join(allowed_protocols)}"))
    metadata = cmd.metadata or {}
    for option, protocol in PROTOCOL_OPTIONS.items():
        value = getattr(cmd, option)
        if value is None:
            continue
        if cmd.protocol != protocol:
            problems.append(FieldProblem(f"{prefix}.{option}", f"Only allowed with protocol {protocol}"))
        elif option in metadata and metadata[option] != value:
            problems.append(
                FieldProblem(f"{prefix}.{option}", f"Conflicts with metadata.{option}={metadata[option]!r}")
            )
    problems.extend(device_problems(cmd, topic_template, prefix))
    for field in ("payload", "metadata"):
        value = getattr(cmd, field)
        if value is not None:
            where = _find_unsafe_value(value, max_depth, f"{prefix}.{field}")
            if where:
                problems.append(where)
    expiry = expiry_problem(cmd, datetime.now(UTC), prefix)
    if expiry:
        problems.append(expiry)
    return problems


def _invisible(value: str) -> bool:
    """Whether `value` holds an invisible format character (never ASCII: the common case skips the look-up)."""
    return not value.isascii() and any(unicodedata.category(ch) == "Cf" for ch in value)


def device_problems(
    cmd: CommandRequest, topic_template: str, prefix: str = "$", device_loc: str | None = None
) -> list[FieldProblem]:
    """What depends on the device: its id, metadata's typed keys and the MQTT topic (the device's own or one below
    it). The device id's problems are told at `device_loc` (default: `{prefix}.device_id`)."""
    device_loc = device_loc or f"{prefix}.device_id"
    problems = []
    if _invisible(cmd.device_id):
        problems.append(FieldProblem(device_loc, "Must not contain invisible format characters"))
    for problem in _metadata_problems(cmd, topic_template, prefix):
        loc = device_loc if problem.loc == f"{prefix}.device_id" else problem.loc
        problems.append(FieldProblem(loc, problem.msg))
    return problems


def _metadata_problems(cmd: CommandRequest, topic_template: str, prefix: str) -> list[FieldProblem]:
    """metadata's typed keys, and the MQTT topic: the device's own topic or one below it."""
    topic: Any = msgspec.UNSET
    if cmd.metadata and all(isinstance(key, str) for key in cmd.metadata):  # other keys: _find_unsafe_value
        try:
            topic = msgspec.convert(cmd.metadata, _MetadataOptions).topic
        except msgspec.ValidationError as exc:
            return [field_problem(str(exc), f"{prefix}.metadata")]
    if cmd.protocol != "mqtt" and topic is msgspec.UNSET:
        return []
    problem = mqtt_topics.device_id_problem(topic_template, cmd.device_id)
    if problem:
        return [FieldProblem(f"{prefix}.device_id", problem)]
    problem = None if topic is msgspec.UNSET else mqtt_topics.topic_problem(topic_template, cmd.device_id, topic)
    return [FieldProblem(f"{prefix}.metadata.topic", problem)] if problem else []


def _find_unsafe_value(value: Any, max_depth: int, loc: str, depth: int = 1) -> FieldProblem | None:
    """First place where `value` is not plain JSON, nests deeper than `max_depth`, or overflows 64 bits.

    JSON bodies can only hold plain JSON, but MessagePack can also carry binary, extension
    types, non-string keys and NaN; the Kafka record is JSON, so those are refused here.
    """
    if isinstance(value, dict | list):
        if depth > max_depth:
            return FieldProblem(loc, f"Nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return FieldProblem(loc, "Object keys must be strings")
                found = _find_unsafe_value(item, max_depth, f"{loc}.{key}", depth + 1)
                if found:
                    return found
        else:
            for index, item in enumerate(value):
                found = _find_unsafe_value(item, max_depth, f"{loc}[{index}]", depth + 1)
                if found:
                    return found
        return None
    if value is None or isinstance(value, str | bool):
        return None
    if isinstance(value, int):
        return None if -_INT64 <= value < _INT64 else FieldProblem(loc, "Integer outside the signed 64-bit range")
    if isinstance(value, float):
        return None if math.isfinite(value) else FieldProblem(loc, "Numbers must be finite (no NaN or Infinity)")
    return FieldProblem(loc, f"Not a JSON value ({type(value).__name__})")


def expiry_problem(cmd: CommandRequest | FanoutRequest, now: datetime, prefix: str = "$") -> FieldProblem | None:
    """ttl_seconds and expires_at exclude each other, expires_at must lie ahead (at most MAX_TTL) and not before
    not_before, and not_before at most MAX_SCHEDULE ahead (one in the past is due at once)."""
    if cmd.ttl_seconds is not None and cmd.expires_at is not None:
        return FieldProblem(f"{prefix}.expires_at", "Give ttl_seconds or expires_at, not both")
    if cmd.not_before is not None and (cmd.not_before - now).total_seconds() > MAX_SCHEDULE:
        return FieldProblem(f"{prefix}.not_before", f"At most {MAX_SCHEDULE} seconds ahead")
    if cmd.expires_at is not None:
        if cmd.expires_at <= now:
            return FieldProblem(f"{prefix}.expires_at", "Already in the past")
        if (cmd.expires_at - now).total_seconds() > MAX_TTL:
            return FieldProblem(f"{prefix}.expires_at", f"At most {MAX_TTL} seconds ahead")
        if cmd.not_before is not None and cmd.expires_at <= cmd.not_before:
            return FieldProblem(f"{prefix}.expires_at", "Must be after not_before: it would expire before it is due")
    return None


def decode_fanout(body: bytes, fmt: str) -> FanoutRequest:
    """Decode a fan-out body (JSON or msgpack)."""
    return _decode(body, FanoutRequest, fmt)


_MAX_LISTED = 100  # problems listed for one fan-out: enough to fix a body, bounded for 10,000 devices


def fanout_children(request: FanoutRequest) -> list[CommandRequest]:
    """The fan-out's command for each of its devices, in order; `{device_id}` in metadata.topic becomes the id."""
    fields = msgspec.structs.asdict(request)
    del fields["device_ids"], fields["fanout_id"]
    metadata = request.metadata
    topic = metadata.get("topic") if metadata else None
    if not (isinstance(topic, str) and mqtt_topics.PLACEHOLDER in topic):
        return [CommandRequest(device_id=device_id, **fields) for device_id in request.device_ids]
    children = []
    for device_id in request.device_ids:
        own = {**metadata, "topic": mqtt_topics.device_topic(topic, device_id)}
        children.append(CommandRequest(device_id=device_id, **{**fields, "metadata": own}))
    return children


def check_fanout(
    request: FanoutRequest,
    children: list[CommandRequest],
    allowed_protocols: tuple[str, ...],
    max_depth: int,
    max_fanout: int,
    topic_template: str = mqtt_topics.DEFAULT_TEMPLATE,
) -> list[FieldProblem]:
    """A fan-out's rules: at most MAX_FANOUT distinct devices, and each device's command valid (the shared fields
    are checked once, on the first; what depends on the device, on every one)."""
    if len(request.device_ids) > max_fanout:
        return [FieldProblem("$.device_ids", f"At most MAX_FANOUT={max_fanout} devices")]
    problems: list[FieldProblem] = []
    first_seen: dict[str, int] = {}
    for index, device_id in enumerate(request.device_ids):
        if device_id in first_seen:
            problems.append(
                FieldProblem(f"$.device_ids[{index}]", f"Duplicate of $.device_ids[{first_seen[device_id]}]")
            )
            if len(problems) >= _MAX_LISTED:
                return problems
        else:
            first_seen[device_id] = index
    for problem in check_command(children[0], allowed_protocols, max_depth, "$", topic_template):
        loc = "$.device_ids[0]" if problem.loc == "$.device_id" else problem.loc
        problems.append(FieldProblem(loc, problem.msg))
    for index, child in enumerate(children[1:], 1):
        for problem in device_problems(child, topic_template, "$", f"$.device_ids[{index}]"):
            msg = problem.msg if problem.loc.startswith("$.device_ids") else f"For {child.device_id!r}: {problem.msg}"
            problems.append(FieldProblem(problem.loc, msg))
            if len(problems) >= _MAX_LISTED:
                return problems
    return problems


def merged_metadata(cmd: CommandRequest) -> dict[str, Any]:
    """The command's metadata with its protocol options (qos, retain, confirmable) folded in."""
    metadata = dict(cmd.metadata or {})
    for option in PROTOCOL_OPTIONS:
        value = getattr(cmd, option)
        if value is not None:
            metadata[option] = value
    return metadata
