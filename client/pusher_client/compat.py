"""The old in-process `preservarium_pusher` API, speaking to the HTTP service: switch by changing the import.

    from preservarium_pusher import create_pusher_service          # before
    from pusher_client.compat import create_pusher_service          # after

The class, method names, signatures and `bool` results are the old module's; failures are logged, never
raised. The factory takes the service's URL (default $PUSHER_URL) and API key (default $PUSHER_API_KEY)
where the old one took Kafka settings: the topic is the service's to decide.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from datetime import UTC, datetime
from typing import Any

import msgspec

from pusher_client import AsyncPusherClient, CommandRequest, RetryPolicy
from pusher_client.wire import new_id

__all__ = [
    "CommandMessage",
    "DeviceCommand",
    "DeviceSettings",
    "PusherService",
    "create_pusher_service",
    "create_pusher_service_sync",
]

log = logging.getLogger("pusher_client.compat")
# initialize() waits this long for a service that is still starting (a sidecar started with the app).
STARTUP_RETRY = RetryPolicy(deadline=5.0)

# Fields the service takes as they are; anything else a command carries travels in `metadata`.
_SERVICE_FIELDS = CommandRequest.__struct_fields__


class CommandMessage(msgspec.Struct, kw_only=True):
    """A command as the old module built it; `request_id` and `timestamp` are made when absent."""

    device_id: str
    command_type: str
    payload: dict[str, Any]
    protocol: str
    parser_script_ref: str | None = None
    metadata: dict[str, Any] | None = None
    qos: int | None = None
    retain: bool | None = None
    confirmable: bool | None = None
    expires_at: datetime | None = None
    request_id: str = msgspec.field(default_factory=new_id)
    timestamp: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))


class DeviceCommand(CommandMessage, kw_only=True):
    """A one-time command; `priority` travels in metadata."""

    command_type: str = "command"
    priority: int | None = None


class DeviceSettings(CommandMessage, kw_only=True):
    """A persistent setting; `persistent` and `version` travel in metadata."""

    command_type: str = "settings"
    persistent: bool = True
    version: int | None = None


def _as_request(fields: dict[str, Any]) -> dict[str, Any]:
    """The service's command body for the old module's fields (protocol lower-cased, as the old model did)."""
    body = {name: fields[name] for name in _SERVICE_FIELDS if fields.get(name) is not None}
    extra = {name: value for name, value in fields.items() if name not in _SERVICE_FIELDS and name != "timestamp"}
    extra = {name: value for name, value in extra.items() if value is not None}
    if extra:
        body["metadata"] = {**extra, **(body.get("metadata") or {})}
    if isinstance(body.get("protocol"), str):
        body["protocol"] = body["protocol"].lower()
    return body


class PusherService:
    """The old module's service object, sending over HTTP instead of holding a Kafka producer."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 10.0) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.timeout = timeout
        # One client per event loop: the old sync factory initialised on one loop and pushed on another, and
        # threads may each run their own. A client's connections belong to the loop that opened them.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncPusherClient] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    @property
    def client(self) -> AsyncPusherClient:
        """The AsyncPusherClient underneath (for this event loop), for code that wants statuses and typed errors."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.get(loop)
            if client is None:
                client = self._clients[loop] = AsyncPusherClient(self.base_url, self.api_key, timeout=self.timeout)
            return client

    async def initialize(self) -> bool:
        """Check that the service answers; False (logged) when it does not."""
        try:
            await self.client.health(STARTUP_RETRY)
        except Exception as exc:  # the old module returned False, whatever went wrong
            log.error("Pusher service at %s is not reachable: %s", self.client.base_url, exc)
            return False
        return True

    async def push_command(self, command: CommandMessage) -> bool:
        """Send a CommandMessage; True once the service has it durably (published, or journaled to follow)."""
        fields = msgspec.structs.asdict(command) if isinstance(command, msgspec.Struct) else dict(command)
        return await self._push(fields)

    async def push_command_dict(self, command_dict: dict[str, Any]) -> bool:
        """Send a command given as a dict of CommandMessage fields."""
        return await self._push(dict(command_dict))

    async def create_and_push_command(
        self,
        device_id: str,
        command_type: str,
        payload: dict[str, Any],
        protocol: str,
        parser_script_ref: str | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> bool:
        """Build a command from its fields and send it; other keyword fields (qos, retain, …) pass through."""
        fields = {
            "device_id": device_id,
            "command_type": command_type,
            "payload": payload,
            "protocol": protocol,
            "parser_script_ref": parser_script_ref,
            "metadata": metadata,
        }
        return await self._push(fields | kwargs)

    async def close(self, timeout: float | None = None) -> None:
        """Close this loop's HTTP connections (nothing is buffered here: the service holds what it accepted)."""
        with self._lock:
            client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    async def stop(self) -> None:
        """Same as close(), as in the old module."""
        await self.close()

    async def _push(self, fields: dict[str, Any]) -> bool:
        request_id = fields.get("request_id") or "unknown"
        try:
            result = await self.client.send(_as_request(fields))
        except Exception as exc:  # failures are logged, never raised, as the old module did
            log.error("[%s] Error pushing command: %s", request_id, exc)
            return False
        log.debug("[%s] Command %s", result.request_id, result.status)
        return True


async def create_pusher_service(base_url: str | None = None, api_key: str | None = None) -> PusherService | None:
    """A PusherService for the service at `base_url`, or None (logged) when it does not answer."""
    service = PusherService(base_url, api_key)
    if await service.initialize():
        return service
    await service.close()
    return None


def create_pusher_service_sync(base_url: str | None = None, api_key: str | None = None) -> PusherService | None:
    """create_pusher_service for code without a running event loop."""
    loop = asyncio.new_event_loop()
    try:
        service = loop.run_until_complete(create_pusher_service(base_url, api_key))
        if service is not None:
            loop.run_until_complete(service.close())  # its connections belong to this loop, closed below
        return service
    finally:
        loop.close()
