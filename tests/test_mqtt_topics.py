"""The MQTT topic rule alone: a command reaches its device's own topic or one below it, never another's."""

from __future__ import annotations

import pytest

from mqtt_topics import (
    DEFAULT_TEMPLATE,
    MAX_TOPIC_BYTES,
    device_id_problem,
    device_topic,
    template_problem,
    topic_name_problem,
    topic_problem,
)


def test_a_device_topic_comes_from_the_template():
    """The id replaces {device_id}; braces inside an id are taken literally, never as a format field."""
    assert device_topic(DEFAULT_TEMPLATE, "dev-a") == "devices/dev-a/commands"
    assert device_topic("site/{device_id}", "{0}") == "site/{0}"


@pytest.mark.parametrize(
    "topic",
    ["devices/dev-a/commands", "devices/dev-a/commands/led", "devices/dev-a/commands/led/1"],
)
def test_the_device_topic_and_topics_below_it_are_allowed(topic):
    """The device's own topic and any deeper level under it pass."""
    assert topic_problem(DEFAULT_TEMPLATE, "dev-a", topic) is None


@pytest.mark.parametrize(
    ("topic", "says"),
    [
        ("devices/dev-b/commands", "Must be the device's topic"),
        ("devices/dev-a/commandsX", "Must be the device's topic"),  # a longer level is not a level below
        ("devices/dev-a", "Must be the device's topic"),  # above the device's topic
        ("devices/dev-a/commands/+", "wildcards"),
        ("devices/dev-a/commands/#", "wildcards"),
        ("devices/+/commands", "wildcards"),
        ("#", "wildcards"),
        ("$SYS/broker/clients", "Must not start with $"),
        ("$share/g/devices/dev-a/commands", "Must not start with $"),
        ("devices/dev-a/commands/", "empty level"),
        ("devices/dev-a/commands//x", "empty level"),
        ("/devices/dev-a/commands", "empty level"),
        ("devices/dev-a/commands/a\x00b", "control characters"),
        ("devices/dev-a/commands/a\nb", "control characters"),
        ("devices/dev-a/commands/\x85", "control characters"),
        ("devices/dev-a/commands/\ud800", "UTF-8"),
        ("", "Must not be empty"),
        (7, "Must be a string"),
        (None, "Must be a string"),
    ],
)
def test_other_topics_are_refused_with_the_reason(topic, says):
    """Another device's topic, a wildcard, a broker topic, an empty level, a control character: each refused."""
    problem = topic_problem(DEFAULT_TEMPLATE, "dev-a", topic)
    assert problem is not None and says in problem, problem


def test_topic_length_is_counted_in_utf8_bytes():
    """65,535 bytes of UTF-8 pass; one more is refused, however few characters that is."""
    own = device_topic(DEFAULT_TEMPLATE, "dev-a") + "/"
    assert topic_problem(DEFAULT_TEMPLATE, "dev-a", own + "x" * (MAX_TOPIC_BYTES - len(own))) is None
    assert "65535 bytes" in topic_name_problem(own + "é" * ((MAX_TOPIC_BYTES - len(own)) // 2 + 1))


@pytest.mark.parametrize(
    ("template", "device_id"),
    [
        (DEFAULT_TEMPLATE, "a+b"),
        (DEFAULT_TEMPLATE, "#"),
        (DEFAULT_TEMPLATE, "a/"),
        ("{device_id}/commands", "$SYS"),
        # Nested: its topic would lie below another device's topic.
        (DEFAULT_TEMPLATE, "a/commands/x"),
        (DEFAULT_TEMPLATE, "a/commands"),
        ("devices/{device_id}", "a/b"),
        ("{device_id}", "site-a/pump-1"),
    ],
)
def test_device_ids_without_a_topic_of_their_own_are_refused(template, device_id):
    """A device id that makes the template a wildcard, `$` or empty-level topic, or nests it under another
    device's topic, is refused."""
    assert device_id_problem(template, device_id) is not None


def test_nesting_is_refused_exactly_when_another_device_topic_is_a_prefix():
    """Ids with `/` stay allowed when no other id's topic lies above theirs, so site patterns keep working."""
    assert device_id_problem(DEFAULT_TEMPLATE, "site-a/pump-1") is None
    assert device_id_problem(DEFAULT_TEMPLATE, "site-a/commands-x") is None
    assert "'a'" in device_id_problem(DEFAULT_TEMPLATE, "a/commands/x")
    # The nested id's topic really is below the other device's topic, which the "or below" rule would let reach.
    nested, owner = device_topic(DEFAULT_TEMPLATE, "a/commands/x"), device_topic(DEFAULT_TEMPLATE, "a")
    assert nested.startswith(owner + "/") and topic_problem(DEFAULT_TEMPLATE, "a", nested) is None


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("devices/commands", "exactly once"),
        ("{device_id}/{device_id}", "exactly once"),
        ("devices/+/{device_id}", "wildcards"),
        ("$SYS/{device_id}", "Must not start with $"),
        ("devices//{device_id}", "empty level"),
        ("devices/{device_id}/", "empty level"),
    ],
)
def test_bad_templates_are_refused(template, says):
    """A template without exactly one {device_id}, or that is no topic name, is refused with the reason."""
    problem = template_problem(template)
    assert problem is not None and says in problem, problem


@pytest.mark.parametrize("template", [DEFAULT_TEMPLATE, "{device_id}", "site/{device_id}/cmd/in", "t-{device_id}"])
def test_good_templates_pass(template):
    """Templates with the id anywhere, as a level or inside one, are accepted."""
    assert template_problem(template) is None
