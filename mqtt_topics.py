"""Which MQTT topic a command may go to: its device's own topic, or a topic below it. Standard library only.

A device's topic comes from one template (MQTT_TOPIC_TEMPLATE, default `devices/{device_id}/commands`). A caller
may name a topic in `metadata.topic`; it must be the device's topic or that topic plus more levels, and a plain
topic name: no wildcard (`+`, `#`), no leading `$` (broker topics such as `$SYS`), no empty level, no control
character, at most 65,535 bytes of UTF-8. That rule is only sound when no device's topic lies below another's,
so a device id whose topic would (`a/commands/x` under the default template, or any `/` when the template ends
with the id) is refused too. The service checks this at acceptance and the reference connector again before it
publishes; each function returns why a value is refused, or None.
"""

from __future__ import annotations

DEFAULT_TEMPLATE = "devices/{device_id}/commands"
PLACEHOLDER = "{device_id}"
MAX_TOPIC_BYTES = 65535  # MQTT strings carry a two-byte length


def topic_name_problem(topic: str) -> str | None:
    """Why `topic` is not a plain MQTT topic name to publish to (None: it is one)."""
    if not topic:
        return "Must not be empty"
    if "+" in topic or "#" in topic:
        return "Must not contain the wildcards + or #"
    if topic.startswith("$"):
        return "Must not start with $ (reserved for the broker, e.g. $SYS)"
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in topic):
        return "Must not contain NUL or other control characters"
    if "" in topic.split("/"):
        return "Must not have an empty level (leading, trailing or double /)"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "Must be valid UTF-8"
    if size > MAX_TOPIC_BYTES:
        return f"At most {MAX_TOPIC_BYTES} bytes of UTF-8"
    return None


def template_problem(template: str) -> str | None:
    """Why `template` cannot make device topics (None: it can)."""
    if template.count(PLACEHOLDER) != 1:
        return f"Must contain {PLACEHOLDER} exactly once"
    problem = topic_name_problem(device_topic(template, "device"))
    return problem and f"Not a valid topic name: {problem}"


def device_topic(template: str, device_id: str) -> str:
    """The device's own MQTT topic (plain replacement: braces in a device id stay as they are)."""
    return template.replace(PLACEHOLDER, device_id)


def device_id_problem(template: str, device_id: str) -> str | None:
    """Why `device_id` cannot have a topic of its own under `template` (None: it can)."""
    problem = topic_name_problem(device_topic(template, device_id))
    if problem:
        return f"Its MQTT topic {device_topic(template, device_id)!r} is not valid: {problem}"
    # Another id e has a topic that is a level prefix of this one's exactly when, with `after` the template's
    # text after the id, id + after starts with e + after + "/" for a shorter, non-empty e.
    after = template.split(PLACEHOLDER, 1)[1]
    tail = device_id + after
    for cut in range(1, len(device_id)):
        if tail.startswith(after + "/", cut):
            return f"Its MQTT topic would lie below the topic of device {device_id[:cut]!r}"
    return None


def topic_problem(template: str, device_id: str, topic: object) -> str | None:
    """Why a command for `device_id` may not be published to `topic` (None: it may)."""
    if not isinstance(topic, str):
        return "Must be a string"
    problem = topic_name_problem(topic)
    if problem:
        return problem
    own = device_topic(template, device_id)
    if topic != own and not topic.startswith(own + "/"):
        return f"Must be the device's topic {own!r} or a topic below it"
    return None
