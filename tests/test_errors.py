"""The exception hierarchy: the tree errors.py draws is the tree its classes make."""

from __future__ import annotations

import re

import errors
from errors import MessageRejected, PusherError, SinkUnavailable


def _drawn() -> tuple[set[tuple[str, str]], dict[str, int]]:
    """(parent, child) pairs and each class's status, as the module docstring draws them."""
    edges: set[tuple[str, str]] = set()
    statuses: dict[str, int] = {}
    parents: list[str] = []
    for line in errors.__doc__.splitlines():
        found = re.match(r"^ {4}((?:[│ ] {3}|[├└]── )*)(\w+) +(\d{3})\b", line)
        if not found:
            continue
        depth = len(found[1]) // 4
        name = found[2]
        parents[depth:] = [name]
        if depth:
            edges.add((parents[depth - 1], name))
        statuses[name] = int(found[3])
    return edges, statuses


def _defined(cls: type = PusherError) -> set[tuple[str, str]]:
    """(parent, child) pairs of the classes below `cls`."""
    edges = set()
    for sub in cls.__subclasses__():
        edges.add((cls.__name__, sub.__name__))
        edges |= _defined(sub)
    return edges


def test_the_drawn_tree_is_the_class_tree():
    """Every exception class is drawn under its parent, with the status it answers."""
    edges, statuses = _drawn()
    assert edges == _defined()
    assert statuses == {name: getattr(errors, name).status for name in statuses}


def test_sink_errors_say_what_is_known_from_their_constructor():
    """Whether a record may have reached Kafka is given when the error is made, not patched in later."""
    assert SinkUnavailable("x", uncertain=True).uncertain is True
    assert MessageRejected("x", sent=True).sent is True
    plain = SinkUnavailable("x")
    assert (plain.uncertain, plain.sent, plain.detail) == (False, False, "x")
