"""The goals, each computed from what one run measured: a table (measured, goal, met) and a chart of the same.

Every goal is a value per round (a ratio of two rows of that round, or a scenario's figure), shown as the median
with the rounds' range, so the noise is on the page beside the figure. A goal whose rows did not run (a partial
run: --only, --rows) is "not measured". In the chart each goal is a bar of its score, measured ÷ goal for a
"at least" goal and goal ÷ measured for an "at most" one, so 1.0 is the goal's line for both and a bar past it is
a goal met.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Protocol

from measure import Row
from names import (
    ASYNC,
    BATCH,
    FLOOR,
    PREFILLED_LOAD,
    PUSHER,
    RAW,
    SEED_NO_GET,
    SINGLE,
    TWO_PROCESSES,
    prefilled_target,
)

RowKey = tuple[str, str, int | None]


class Measured(Protocol):
    """What a run hands over: its rows, its other figures by name (a value per round), its prefill size."""

    rows: dict[RowKey, Row]
    extra: dict[str, list[float]]
    prefill: int
    outage_commands: int
    waiter_count: int
    fleet_devices: int


@dataclass
class Goal:
    """One goal: a value per round, the line it must reach, and which side of the line is met."""

    group: str
    name: str
    target: float
    at_most: bool  # lower is better
    unit: str  # "×" for a ratio, else the unit of an absolute figure ("ms", "MB", "s"); "" for a check
    rounds: list[float] = field(default_factory=list)
    basis: str = ""  # the medians it is computed from, for the reader

    @property
    def measured(self) -> float | None:
        """The median over the rounds; for a check (1 held, 0 not), the worst round (None: not measured)."""
        if not self.rounds:
            return None
        return min(self.rounds) if self.unit == "" else statistics.median(self.rounds)

    @property
    def met(self) -> bool | None:
        """Met, missed, or None when not measured."""
        value = self.measured
        if value is None:
            return None
        return value <= self.target if self.at_most else value >= self.target

    @property
    def score(self) -> float | None:
        """Measured ÷ goal (at least) or goal ÷ measured (at most): 1.0 is the line, above it is met."""
        value = self.measured
        if value is None:
            return None
        if self.at_most:
            return math.inf if value <= 0 else self.target / value
        return value / self.target

    def shown(self) -> str:
        """The median and, over several rounds, their range; rounded toward missing, so that a miss never
        prints as the goal itself (0.2997 as "0.30")."""
        if self.measured is None:
            return "not measured"
        if self.unit == "":
            bad = sum(1 for value in self.rounds if value < 1)
            return (
                f"failed in {bad} of {len(self.rounds)}" if bad else f"ok in {len(self.rounds)} of {len(self.rounds)}"
            )

        def one(value: float) -> str:
            digits = 2 if self.unit in ("×", "s") or abs(value) < 10 else 0
            scale = 10**digits
            rounded = (math.ceil if self.at_most else math.floor)(round(value * scale, 6)) / scale
            return f"{rounded:,.{digits}f}"

        text = f"{one(self.measured)}{self.unit if self.unit == '×' else ' ' + self.unit}"
        if len(self.rounds) > 1:
            text += f" ({one(min(self.rounds))}–{one(max(self.rounds))})"
        return text

    def wanted(self) -> str:
        """The goal's line, as the issue states it."""
        if self.unit == "":
            return "holds"
        number = f"{self.target:g}" if self.unit == "×" else f"{self.target:,g}"
        return f"{'≤' if self.at_most else '≥'} {number}{self.unit if self.unit == '×' else ' ' + self.unit}"


def _row(bench: Measured, target: str, load: str, connections: int | None) -> Row | None:
    row = bench.rows.get((target, load, connections))
    return row if row is not None and row.rates else None


def _ratio(top: list[float], bottom: list[float]) -> list[float]:
    """Round by round (rows measured in the same round), as far as both have rounds."""
    return [a / b for a, b in zip(top, bottom, strict=False) if b]


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"
    return f"{text} {unit}".rstrip()


def _rows_ratio(group: str, name: str, target: float, at_most: bool, top: Row | None, bottom: Row | None,
                figure: Callable[[Row], list[float]], unit: str) -> Goal:  # fmt: skip
    """A goal that is one row's figure over another's, round by round."""
    goal = Goal(group, name, target, at_most, "×")
    if top is not None and bottom is not None:
        goal.rounds = _ratio(figure(top), figure(bottom))
        goal.basis = f"{_fmt(_median(figure(top)))} / {_fmt(_median(figure(bottom)), unit)}"
    return goal


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _figure(group: str, name: str, target: float, at_most: bool, unit: str, rounds: list[float],
            basis: str = "") -> Goal:  # fmt: skip
    return Goal(group, name, target, at_most, unit, list(rounds), basis)


def goals(bench: Measured) -> list[Goal]:
    """Every goal of the run, in the order of the table."""
    extra = bench.extra
    floor64, floor16 = _row(bench, FLOOR, "single", 64), _row(bench, FLOOR, "single", 16)
    floor_batch = _row(bench, FLOOR, BATCH, 16)
    single64, single16 = _row(bench, SINGLE, "single", 64), _row(bench, SINGLE, "single", 16)
    asynchronous = _row(bench, ASYNC, "single", 64)
    batch = _row(bench, PUSHER, BATCH, 16)
    seed = _row(bench, SEED_NO_GET, "single", 64)
    raw = _row(bench, RAW, "producer", None)
    filled = prefilled_target(bench.prefill)
    filled_single, filled_mixed = _row(bench, filled, "single", 64), _row(bench, filled, PREFILLED_LOAD, 64)
    two = _row(bench, TWO_PROCESSES, "single", 64)

    def rates(row: Row) -> list[float]:
        return row.round_commands()

    speed, growth, earlier = "speed against the floor", "cost as the work grows", "earlier goals"
    outage = f"outage: {bench.outage_commands:,} accepted while Kafka is down ≥ 0.80× respond-async"
    result = [
        _rows_ratio(speed, "single, 200 after ack, 64 conns ≥ 0.60× the floor", 0.60, False, single64, floor64,
                    rates, "cmd/s"),
        _rows_ratio(speed, "its p99 ≤ 1.5× the floor's p99", 1.5, True, single64, floor64, lambda r: r.p99, "ms"),
        _rows_ratio(speed, "single, 16 conns: p99 ≤ 2× the floor's p99 at 16", 2.0, True, single16, floor16,
                    lambda r: r.p99, "ms"),
        _rows_ratio(speed, "batch of 100 ≥ 0.50× the floor's batch", 0.50, False, batch, floor_batch, rates,
                    "cmd/s"),
        _rows_ratio(speed, "Prefer: respond-async ≥ 1.0× the 200 row", 1.0, False, asynchronous, single64, rates,
                    "cmd/s"),
        _rows_ratio(speed, "CPU per command, all threads ≤ 1.6× the floor's", 1.6, True, single64, floor64,
                    lambda r: r.cpu_per_command, "µs"),
        _rows_ratio(speed, "stretch: single, 64 conns ≥ the seed without .get()", 1.0, False,
                    single64, seed, rates, "cmd/s"),
        _rows_ratio(growth, f"over {bench.prefill:,} finished commands: single ≥ 0.90× the empty journal's", 0.90,
                    False, filled_single, single64, rates, "cmd/s"),
        _figure(growth, "… and under 5 % status, 1 % list reads: status p99 ≤ 5 ms", 5, True, "ms",
                filled_mixed.status_p99 if filled_mixed else []),
        _figure(growth, "… list p99 ≤ 20 ms", 20, True, "ms", filled_mixed.list_p99 if filled_mixed else []),
        _outage_accept(growth, outage, extra, asynchronous),
        _figure(growth, "outage: restart to /ready with the backlog ≤ 2 s", 2, True, "s",
                extra.get("outage_ready", [])),
        _outage_drain(growth, extra, raw),
        _figure(growth, "outage: RSS throughout ≤ 100 MB", 100, True, "MB", extra.get("outage_peak_rss", [])),
        _figure(growth, "outage: per-device order and exactly once, read back from the topic", 1, False, "",
                extra.get("outage_delivered", [])),
        _figure(growth, f"{bench.waiter_count:,} waiting clients: RSS grows ≤ 150 MB", 150, True, "MB",
                extra.get("waiters_rss_growth", [])),
        _figure(growth, f"{bench.waiter_count:,} waiting clients: single ≥ 0.80× itself without them", 0.80, False, "×",
                *_pair(extra.get("waiters_single_with", []), extra.get("waiters_single_without", []), "cmd/s")),
        _figure(growth, f"{bench.fleet_devices:,} devices: RSS grows ≤ 20 MB beyond 1,000 devices'", 20,
                True, "MB", extra.get("fleet_rss_growth", [])),
        _figure(earlier, "idle RSS ≤ 50 MB", 50, True, "MB", extra.get("idle_rss", [])),
        _figure(earlier, "RSS under 64-connection load ≤ 100 MB", 100, True, "MB", single64.rss if single64 else []),
        _figure(earlier, "start to /ready ≤ 1 s", 1, True, "s", extra.get("start_to_ready", [])),
        _rows_ratio(earlier, "2 processes ≥ 1.6× one", 1.6, False, two, single64, rates, "cmd/s"),
    ]  # fmt: skip
    return result


def _pair(top: list[float], bottom: list[float], unit: str) -> tuple[list[float], str]:
    """Two figures of the same rounds: their ratios, and the medians they come from."""
    if not top or not bottom:
        return [], ""
    return _ratio(top, bottom), f"{_fmt(_median(top))} / {_fmt(_median(bottom), unit)}"


def _outage_accept(group: str, name: str, extra: dict[str, list[float]], asynchronous: Row | None) -> Goal:
    accepted = extra.get("outage_accept_rate", [])
    goal = Goal(group, name, 0.80, False, "×")
    if accepted and asynchronous is not None:
        goal.rounds = _ratio(accepted, asynchronous.round_commands())
        goal.basis = f"{_fmt(_median(accepted))} / {_fmt(asynchronous.commands, 'cmd/s')}"
    return goal


def _outage_drain(group: str, extra: dict[str, list[float]], raw: Row | None) -> Goal:
    drained = extra.get("outage_drain_rate", [])
    goal = Goal(group, "outage: the backlog drains after Kafka returns at ≥ 0.50× the raw producer", 0.50, False, "×")
    if drained and raw is not None:
        goal.rounds = _ratio(drained, raw.rates)
        goal.basis = f"{_fmt(_median(drained))} / {_fmt(raw.rate, 'msg/s')}"
    return goal


def table(found: list[Goal]) -> str:
    """The goals as a markdown table."""
    lines = ["| goal | measured (rounds' range) | goal | met | from (medians) |", "| --- | ---: | ---: | :---: | --- |"]
    group = None
    for goal in found:
        if goal.group != group:
            group = goal.group
            lines.append(f"| **{group}** | | | | |")
        met = {True: "yes", False: "**no**", None: "—"}[goal.met]
        lines.append(f"| {goal.name} | {goal.shown()} | {goal.wanted()} | {met} | {goal.basis} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the chart

_WIDTH, _LABEL, _BAR, _ROW, _TOP = 1080, 560, 380, 22, 62
_MAX_SCORE = 2.0  # the axis ends at twice the goal; a longer bar is cut there and says so
_COLOURS = {True: "#2e7d32", False: "#c62828", None: "#9e9e9e"}


def svg(found: list[Goal], title: str) -> str:
    """The goals as a bar chart: each bar is a goal's score, the line at 1.0 is every goal's own line."""
    groups = len({goal.group for goal in found})
    height = _TOP + (len(found) + groups) * _ROW + 30
    x0 = _LABEL + 10

    def x(score: float) -> float:
        return x0 + _BAR * min(score, _MAX_SCORE) / _MAX_SCORE

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{_WIDTH}" height="{height}" fill="#ffffff"/>',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
        '<text x="10" y="36" fill="#555">bar = measured ÷ goal ("at least") or goal ÷ measured ("at most"): '
        "past the line is met; grey = not measured</text>",
    ]
    bottom = height - 30
    for tick in (0.5, 1.0, 1.5, 2.0):
        out.append(f'<text x="{x(tick):.1f}" y="{_TOP - 4}" text-anchor="middle" fill="#555">{tick:g}</text>')
        out.append(f'<line x1="{x(tick):.1f}" y1="{_TOP}" x2="{x(tick):.1f}" y2="{bottom}" stroke="#e0e0e0"/>')
    y = _TOP
    group = None
    for goal in found:
        if goal.group != group:
            group = goal.group
            out.append(f'<text x="10" y="{y + 15}" font-weight="bold">{escape(group)}</text>')
            y += _ROW
        colour = _COLOURS[goal.met]
        out.append(f'<text x="{_LABEL}" y="{y + 15}" text-anchor="end">{escape(goal.name)}</text>')
        score = goal.score
        if score is None:
            out.append(f'<text x="{x0 + 4}" y="{y + 15}" fill="{colour}">not measured</text>')
        else:
            end = x(score)
            out.append(f'<rect x="{x0}" y="{y + 4}" width="{max(end - x0, 1):.1f}" height="{_ROW - 8}" '
                       f'fill="{colour}"/>')  # fmt: skip
            label = goal.shown().split(" (")[0] + (" ▶" if score > _MAX_SCORE else "")
            out.append(f'<text x="{end + 4:.1f}" y="{y + 15}" fill="#222">{escape(label)}</text>')
        y += _ROW
    out.append(f'<line x1="{x(1.0):.1f}" y1="{_TOP}" x2="{x(1.0):.1f}" y2="{y}" stroke="#000" '
               'stroke-width="1.5" stroke-dasharray="4 3"/>')  # fmt: skip
    out.append(f'<text x="{x(1.0):.1f}" y="{y + 16}" text-anchor="middle">goal</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
