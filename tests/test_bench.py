"""The benchmark suite itself runs (short), so `make bench` does not rot; its figures are not judged here, only the
shape of what it reports."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from types import SimpleNamespace

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import goals
from measure import Row
from names import ASYNC, FLOOR, SINGLE
from outage import delivery_problems


def test_bench_runs_and_checks_kafka(kafka_bootstrap):
    """bench/run.py drives the no-op route, the floor and the service with wrk, the service with a fan-out to
    MAX_FANOUT devices, and every 2xx command is in Kafka once; a partial run prints the goals, the others not
    measured."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--only", "noop,floor,service", "--runs", "1",
         "--seconds", "1", "--warmup", "1", "--fanouts", "1", "--no-write"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.strip()]
    service_rows = [line for line in rows if line.startswith("pusher")]
    assert len(service_rows) == 6 and all(line.endswith("| ok") for line in service_rows), rows
    assert any(line.startswith("pusher | fan-out to 10,000 devices | 1 |") for line in service_rows), rows
    assert any(line.startswith("Fan-out: 1 per round to 10,000 devices") for line in rows), rows
    assert any(line.startswith("no-op Starlette route | single | 64 |") for line in rows), rows
    floor_rows = [line for line in rows if line.startswith("floor")]
    assert len(floor_rows) == 3 and all(line.endswith("| ok") for line in floor_rows), rows
    mixed = next(line for line in service_rows if "mixed" in line)
    assert " status p99 " in mixed, mixed  # the status reads timed on their own
    goal_lines = [line for line in rows if line.startswith("| single, 200 after ack, 64 conns ≥ 0.60× the floor |")]
    assert len(goal_lines) == 1 and "not measured" not in goal_lines[0], rows
    assert any(line.startswith("| stretch: single, 64 conns") and "| not measured |" in line for line in rows), rows


def _row(target: str, load: str, connections: int, rates: list[float], p99: list[float]) -> Row:
    row = Row(target, load, connections, rates=rates, p99=p99, read_shares=[0.0] * len(rates))
    row.cpu_per_command = [1e6 / rate for rate in rates]
    return row


def _measured() -> SimpleNamespace:
    rows = [
        _row(FLOOR, "single", 64, [1000, 2000, 1500], [30, 31, 32]),
        _row(SINGLE, "single", 64, [600, 1000, 900], [45, 47, 50]),
        _row(ASYNC, "single", 64, [500, 1100, 700], [60, 60, 60]),
    ]
    extra = {"outage_ready": [1.2, 2.5, 1.9], "outage_delivered": [1.0, 1.0, 0.0]}
    keyed = {(r.target, r.load, r.connections): r for r in rows}
    return SimpleNamespace(
        rows=keyed,
        extra=extra,
        prefill=1000,
        outage_commands=100_000,
        waiter_count=10_000,
        fleet_devices=1_000_000,
    )


def test_goals_are_computed_round_by_round_and_say_what_was_not_measured():
    """A ratio goal is the median of its rounds' ratios with their range, rounded toward missing; an at-most goal
    is met below its line; a check fails if any round failed; a goal without its rows is not measured."""
    found = {goal.name: goal for goal in goals.goals(_measured())}
    speed = found["single, 200 after ack, 64 conns ≥ 0.60× the floor"]
    assert speed.rounds == [0.6, 0.5, 0.6] and speed.met is True
    assert speed.shown() == "0.60× (0.50–0.60)" and speed.wanted() == "≥ 0.6×"
    asynchronous = found["Prefer: respond-async ≥ 1.0× the 200 row"]
    assert asynchronous.measured < 1 and asynchronous.met is False and asynchronous.shown().startswith("0.83×")
    cpu = found["CPU per command, all threads ≤ 1.6× the floor's"]
    assert cpu.at_most and cpu.met is False and cpu.score < 1  # 1.5–1.67× the floor's CPU: the median misses
    ready = found["outage: restart to /ready with the backlog ≤ 2 s"]
    assert ready.met is True and ready.shown() == "1.90 s (1.20–2.50)" and ready.score > 1
    assert found["outage: per-device order and exactly once, read back from the topic"].shown() == "failed in 1 of 3"
    batch = found["batch of 100 ≥ 0.50× the floor's batch"]
    assert batch.met is None and batch.score is None and batch.shown() == "not measured"
    table = goals.table(list(found.values()))
    assert "| batch of 100 ≥ 0.50× the floor's batch | not measured | ≥ 0.5× | — |" in table
    assert "| Prefer: respond-async ≥ 1.0× the 200 row | 0.83× (0.77–1.10) | ≥ 1× | **no** | 700 / 900 cmd/s |" in table


def test_goals_chart_is_an_svg_with_a_bar_per_measured_goal_and_the_goal_line():
    """The chart is one SVG document: a bar for each measured goal (green met, red missed), "not measured" for the
    others, and one dashed line where every goal's score is 1.0."""
    found = goals.goals(_measured())
    document = ET.fromstring(goals.svg(found, "Goals & <ratios>"))
    ns = "{http://www.w3.org/2000/svg}"
    bars = [rect for rect in document.iter(f"{ns}rect") if rect.get("fill") != "#ffffff"]
    measured = [goal for goal in found if goal.measured is not None]
    assert len(bars) == len(measured) and len(measured) >= 4
    assert {bar.get("fill") for bar in bars} == {"#2e7d32", "#c62828"}
    texts = [text.text for text in document.iter(f"{ns}text")]
    assert "Goals & <ratios>" in texts
    assert texts.count("not measured") == len(found) - len(measured)
    assert len([line for line in document.iter(f"{ns}line") if line.get("stroke-dasharray")]) == 1


def test_outage_check_finds_missing_duplicate_unknown_and_reordered_commands():
    """The outage's read-back compares the topic with the journal: every accepted command once, nothing else, and
    each device's commands in acceptance order (devices may interleave across partitions)."""
    journal = [("a1", "dev-a"), ("b1", "dev-b"), ("a2", "dev-a"), ("b2", "dev-b")]
    assert delivery_problems(journal, [("dev-b", "b1"), ("dev-b", "b2"), ("dev-a", "a1"), ("dev-a", "a2")]) == []
    problems = delivery_problems(journal, [("dev-a", "a2"), ("dev-a", "a1"), ("dev-b", "b1"), ("dev-b", "b1")])
    assert problems == [
        "1 accepted but not in Kafka (e.g. b2)",
        "1 in Kafka more than once (e.g. b1)",
        "1 devices out of acceptance order (e.g. dev-a)",
    ]
    assert delivery_problems(journal[:1], [("dev-a", "a1"), ("dev-c", "c9")]) == [
        "1 in Kafka that the journal never accepted (e.g. c9)"
    ]
