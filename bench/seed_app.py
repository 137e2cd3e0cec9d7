"""The seed plan's design, as users would otherwise write it: FastAPI + pydantic, one kafka-python producer,
and `producer.send(...).get()` inside the async handler (SEED_FIRE_AND_FORGET=1 drops the `.get()`, and with
it any durability). A reference for the benchmark only; it is not part of the service."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, HTTPException
from kafka import KafkaProducer
from pydantic import BaseModel

FIRE_AND_FORGET = os.environ.get("SEED_FIRE_AND_FORGET") == "1"
TOPIC = os.environ["KAFKA_COMMAND_TOPIC"]


class CommandRequest(BaseModel):
    """The plan's request model."""

    device_id: str
    command_type: str
    payload: dict[str, Any]
    protocol: str
    parser_script_ref: str | None = None
    metadata: dict[str, Any] | None = None
    qos: int | None = None
    retain: bool | None = None
    confirmable: bool | None = None


class CommandResponse(BaseModel):
    """The plan's response model."""

    success: bool
    request_id: str
    message: str
    timestamp: datetime


app = FastAPI(title="seed plan")
producer = KafkaProducer(
    bootstrap_servers=os.environ["KAFKA_BOOTSTRAP_SERVERS"],
    acks="all",
    enable_idempotence=True,
    linger_ms=5,
    key_serializer=str.encode,
    value_serializer=lambda v: json.dumps(v).encode(),
)


@app.post("/api/v1/commands", response_model=CommandResponse)
async def push_command(command: CommandRequest) -> CommandResponse:
    """Build the CommandMessage and send it, as the plan's PusherService does."""
    request_id = str(uuid.uuid4())
    message = {"request_id": request_id, "timestamp": datetime.now(UTC).isoformat(), **command.model_dump()}
    try:
        future = producer.send(TOPIC, key=command.device_id, value=message)
        if not FIRE_AND_FORGET:
            future.get(timeout=30)
    except Exception as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    return CommandResponse(success=True, request_id=request_id, message="sent", timestamp=datetime.now(UTC))
