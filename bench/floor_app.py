"""The floor for "200 after Kafka's ack" on this stack: a Starlette route that decodes the command with msgspec,
sends it with one kafka-python producer (the service's producer settings), waits for the acknowledgement without
blocking the event loop, and answers. No journal, no keys, no limits, no metrics, no logs, no validation beyond
decoding. Whatever the service does on top of this costs more, so this row bounds what the service can reach.

A reference for the benchmark only; it is not part of the service."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import msgspec
from kafka import KafkaProducer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

TOPIC = os.environ["KAFKA_COMMAND_TOPIC"]


class Command(msgspec.Struct):
    """The plan's request fields the floor needs."""

    device_id: str
    command_type: str
    payload: dict[str, Any]
    protocol: str
    metadata: dict[str, Any] | None = None


class Batch(msgspec.Struct):
    """The plan's batch envelope."""

    commands: list[Command]


_DECODER = msgspec.json.Decoder(Command)
_BATCH_DECODER = msgspec.json.Decoder(Batch)
_ENCODER = msgspec.json.Encoder()
producer = KafkaProducer(
    bootstrap_servers=os.environ["KAFKA_BOOTSTRAP_SERVERS"], acks="all", enable_idempotence=True, linger_ms=0
)


class _Acks:
    """Acknowledgements from kafka-python's thread, handed to the loop in bursts (one wake-up per burst)."""

    def __init__(self) -> None:
        self.done: list[tuple[asyncio.Future[None], BaseException | None]] = []
        self.lock = threading.Lock()

    def settle(self, future: asyncio.Future[None], error: BaseException | None) -> None:
        """Called on kafka-python's thread."""
        with self.lock:
            self.done.append((future, error))
            if len(self.done) > 1:
                return
        future.get_loop().call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self.lock:
            done, self.done = self.done, []
        for future, error in done:
            if not future.done():
                future.set_exception(error) if error else future.set_result(None)


_ACKS = _Acks()


def _send(command: Command) -> asyncio.Future[None]:
    acked = asyncio.get_running_loop().create_future()
    sent = producer.send(TOPIC, key=command.device_id.encode(), value=_ENCODER.encode(command))
    sent.add_callback(lambda _: _ACKS.settle(acked, None))
    sent.add_errback(lambda exc: _ACKS.settle(acked, exc))
    return acked


async def push_command(request: Request) -> Response:
    """Decode, send, await Kafka's acknowledgement, answer 200 (503 if Kafka refused)."""
    command = _DECODER.decode(await request.body())
    request_id = os.urandom(16).hex()
    try:
        await _send(command)
    except Exception:
        return Response(b'{"success":false}', 503, media_type="application/json")
    return Response(b'{"success":true,"request_id":"%s"}' % request_id.encode(), media_type="application/json")


async def push_batch(request: Request) -> Response:
    """Decode the batch, send every command, await all acknowledgements, answer 200 (503 if any was refused)."""
    batch = _BATCH_DECODER.decode(await request.body())
    results = await asyncio.gather(*(_send(command) for command in batch.commands), return_exceptions=True)
    if any(isinstance(result, BaseException) for result in results):
        return Response(b'{"success":false}', 503, media_type="application/json")
    return Response(b'{"success":true,"total_commands":%d}' % len(results), media_type="application/json")


app = Starlette(
    routes=[
        Route("/api/v1/commands", push_command, methods=["POST"]),
        Route("/api/v1/commands/batch", push_batch, methods=["POST"]),
    ]
)
