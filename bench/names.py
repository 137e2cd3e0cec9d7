"""The rows' names, which the run writes and the goals read (one place, so that neither imports the other)."""

from __future__ import annotations

from settings import Settings

NOOP = "no-op Starlette route"
RAW = "kafka-python producer, no HTTP"
FLOOR = "floor: Starlette + kafka-python, 200 after ack"
SINGLE = "pusher (200 after Kafka ack)"
ASYNC = "pusher, Prefer: respond-async (202)"
PUSHER = "pusher"  # the service's rows named by their load
BATCH = "batch of 100"
TWO_PROCESSES = "pusher, 2 processes (one per core)"
SEED_GET = "seed plan: FastAPI + .get()"
SEED_NO_GET = "seed plan without .get()"
PREFILLED_LOAD = "single + 5 % status, 1 % list reads"
FANOUT = Settings().max_fanout  # devices per fan-out: the most the service takes by default
FANOUT_LOAD = f"fan-out to {FANOUT:,} devices"


def prefilled_target(count: int) -> str:
    """The prefilled rows' target: the service over `count` finished commands."""
    return f"pusher over {count:,} finished commands"
