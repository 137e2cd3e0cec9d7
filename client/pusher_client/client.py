"""The blocking and asyncio clients: the same methods, each sending the requests the shared core (_core.py)
builds and sleeping as it says.

Every call that sends commands carries an Idempotency-Key, made once per call and reused by each of its
retries, so a retry after a lost answer is answered from the service's journal instead of publishing again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import httpx

from pusher_client._core import (
    BatchResult,
    Cert,
    Command,
    CommandResult,
    RetryPolicy,
    Verify,
    _Call,
    _command_arguments,
    _Core,
    _Wait,
)
from pusher_client.wire import CommandList, CommandStatus, FanoutRequest, FanoutResponse, FanoutStatus, Health


class PusherClient:
    """Blocking client; one per application, reused across calls and threads (httpx pools connections).

    base_url and api_key default to $PUSHER_URL and $PUSHER_API_KEY. Over https://, `verify` is the CA file to
    trust instead of the system's (default $PUSHER_CA_FILE), an ssl.SSLContext, or False to check nothing;
    `cert` is this client's certificate, for a service that requires one: a PEM file with its key, or (cert, key)
    (default $PUSHER_CLIENT_CERT and $PUSHER_CLIENT_KEY). A file that does not load is a ValueError."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        verify: Verify | None = None,
        cert: Cert | None = None,
    ) -> None:
        self._core = _Core(base_url, api_key, retry or RetryPolicy(), verify, cert)
        self.base_url = self._core.base_url
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._core.headers, timeout=timeout, verify=self._core.ssl_context
        )

    def __enter__(self) -> PusherClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def push_command(
        self,
        device_id: str,
        command_type: str,
        payload: Mapping[str, Any],
        protocol: str,
        *,
        parser_script_ref: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        qos: int | None = None,
        retain: bool | None = None,
        confirmable: bool | None = None,
        request_id: str | None = None,
        ttl_seconds: int | None = None,
        expires_at: datetime | None = None,
        coalesce_key: str | None = None,
        not_before: datetime | None = None,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> CommandResult:
        """Send one command: `status` is "published" (Kafka acknowledged) or "accepted" (journaled, to follow)."""
        command = _command_arguments(locals())
        return self.send(command, idempotency_key=idempotency_key, respond_async=respond_async)

    def send(
        self,
        command: Command,
        *,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> CommandResult:
        """Send one command given as a CommandRequest or a dict of its fields."""
        return self._request(self._core.push(command, idempotency_key, respond_async))

    def push_commands(
        self,
        commands: Iterable[Command],
        *,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> BatchResult:
        """Send several commands in one request; each item succeeds or fails on its own (see `results`)."""
        return self._request(self._core.push_batch(commands, idempotency_key, respond_async))

    def push_fanout(
        self,
        device_ids: Iterable[str],
        command_type: str,
        payload: Mapping[str, Any],
        protocol: str,
        *,
        parser_script_ref: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        qos: int | None = None,
        retain: bool | None = None,
        confirmable: bool | None = None,
        fanout_id: str | None = None,
        ttl_seconds: int | None = None,
        expires_at: datetime | None = None,
        coalesce_key: str | None = None,
        not_before: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> FanoutResponse:
        """Send one command to many devices: one command each, journaled together (all or none); follow it with
        get_fanout(result.fanout_id) or list_commands(fanout_id=…)."""
        fields = _command_arguments(locals(), FanoutRequest) | {"device_ids": list(device_ids)}
        return self.send_fanout(fields, idempotency_key=idempotency_key)

    def send_fanout(
        self, fanout: FanoutRequest | Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> FanoutResponse:
        """Send a fan-out given as a FanoutRequest or a dict of its fields."""
        return self._request(self._core.fanout(fanout, idempotency_key))

    def get_fanout(self, fanout_id: str) -> FanoutStatus:
        """A fan-out's commands counted by status, and whether every one has ended."""
        return self._request(self._core.fanout_status(fanout_id))

    def cancel(self, request_id: str) -> CommandStatus:
        """Cancel a command still waiting in the service's journal: its status, `cancelled`. Raises Conflict (409)
        once it was handed to Kafka or ended otherwise, NotFound for an unknown one."""
        return self._request(self._core.cancel(request_id))

    def get_status(self, request_id: str) -> CommandStatus:
        """A command's current status and history."""
        return self._request(self._core.status(request_id))

    def list_commands(
        self,
        device_id: str | None = None,
        status: str | None = None,
        *,
        fanout_id: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> CommandList:
        """Recent commands, newest first (of one device, status or fan-out); pass `next_before` as `before` for the
        next page."""
        return self._request(self._core.list(device_id, status, limit, before, fanout_id))

    def wait_for(self, request_id: str, until: str = "published", timeout: float = 30.0) -> CommandStatus:
        """Wait (long polls) until the command reaches `until`; raises CommandFailed or WaitTimeout otherwise."""
        wait = _Wait(self._core, request_id, until, timeout)
        while True:
            command = self._request(wait.next_poll())
            pause = wait.pause_after(command)
            if pause is None:
                return command
            time.sleep(pause)

    def health(self, retry: RetryPolicy | None = None) -> Health:
        """GET /health: the service answers (retrying as `retry` says, default the client's policy)."""
        return self._request(_Call("GET", "/health", Health), retry)

    def _request(self, call: _Call, retry: RetryPolicy | None = None) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                response = self._http.request(**call.arguments())
            except httpx.TransportError as exc:
                wait = self._core.retry_wait(attempt, started, exc, retry)
                if wait is None:
                    raise self._core.unreachable(call, exc) from exc
            else:
                wait = self._core.retry_wait(attempt, started, response, retry)
                if wait is None:
                    return self._core.result(call, response)
            time.sleep(wait)
            attempt += 1


class AsyncPusherClient:
    """asyncio client with the same arguments and methods as PusherClient, each method a coroutine."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        verify: Verify | None = None,
        cert: Cert | None = None,
    ) -> None:
        self._core = _Core(base_url, api_key, retry or RetryPolicy(), verify, cert)
        self.base_url = self._core.base_url
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._core.headers, timeout=timeout, verify=self._core.ssl_context
        )

    async def __aenter__(self) -> AsyncPusherClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    async def push_command(
        self,
        device_id: str,
        command_type: str,
        payload: Mapping[str, Any],
        protocol: str,
        *,
        parser_script_ref: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        qos: int | None = None,
        retain: bool | None = None,
        confirmable: bool | None = None,
        request_id: str | None = None,
        ttl_seconds: int | None = None,
        expires_at: datetime | None = None,
        coalesce_key: str | None = None,
        not_before: datetime | None = None,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> CommandResult:
        """Send one command: `status` is "published" (Kafka acknowledged) or "accepted" (journaled, to follow)."""
        command = _command_arguments(locals())
        return await self.send(command, idempotency_key=idempotency_key, respond_async=respond_async)

    async def send(
        self,
        command: Command,
        *,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> CommandResult:
        """Send one command given as a CommandRequest or a dict of its fields."""
        return await self._request(self._core.push(command, idempotency_key, respond_async))

    async def push_commands(
        self,
        commands: Iterable[Command],
        *,
        idempotency_key: str | None = None,
        respond_async: bool = False,
    ) -> BatchResult:
        """Send several commands in one request; each item succeeds or fails on its own (see `results`)."""
        return await self._request(self._core.push_batch(commands, idempotency_key, respond_async))

    async def push_fanout(
        self,
        device_ids: Iterable[str],
        command_type: str,
        payload: Mapping[str, Any],
        protocol: str,
        *,
        parser_script_ref: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        qos: int | None = None,
        retain: bool | None = None,
        confirmable: bool | None = None,
        fanout_id: str | None = None,
        ttl_seconds: int | None = None,
        expires_at: datetime | None = None,
        coalesce_key: str | None = None,
        not_before: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> FanoutResponse:
        """Send one command to many devices: one command each, journaled together (all or none); follow it with
        get_fanout(result.fanout_id) or list_commands(fanout_id=…)."""
        fields = _command_arguments(locals(), FanoutRequest) | {"device_ids": list(device_ids)}
        return await self.send_fanout(fields, idempotency_key=idempotency_key)

    async def send_fanout(
        self, fanout: FanoutRequest | Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> FanoutResponse:
        """Send a fan-out given as a FanoutRequest or a dict of its fields."""
        return await self._request(self._core.fanout(fanout, idempotency_key))

    async def get_fanout(self, fanout_id: str) -> FanoutStatus:
        """A fan-out's commands counted by status, and whether every one has ended."""
        return await self._request(self._core.fanout_status(fanout_id))

    async def cancel(self, request_id: str) -> CommandStatus:
        """Cancel a command still waiting in the service's journal: its status, `cancelled`. Raises Conflict (409)
        once it was handed to Kafka or ended otherwise, NotFound for an unknown one."""
        return await self._request(self._core.cancel(request_id))

    async def get_status(self, request_id: str) -> CommandStatus:
        """A command's current status and history."""
        return await self._request(self._core.status(request_id))

    async def list_commands(
        self,
        device_id: str | None = None,
        status: str | None = None,
        *,
        fanout_id: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> CommandList:
        """Recent commands, newest first (of one device, status or fan-out); pass `next_before` as `before` for the
        next page."""
        return await self._request(self._core.list(device_id, status, limit, before, fanout_id))

    async def wait_for(self, request_id: str, until: str = "published", timeout: float = 30.0) -> CommandStatus:
        """Wait (long polls) until the command reaches `until`; raises CommandFailed or WaitTimeout otherwise."""
        wait = _Wait(self._core, request_id, until, timeout)
        while True:
            command = await self._request(wait.next_poll())
            pause = wait.pause_after(command)
            if pause is None:
                return command
            await asyncio.sleep(pause)

    async def health(self, retry: RetryPolicy | None = None) -> Health:
        """GET /health: the service answers (retrying as `retry` says, default the client's policy)."""
        return await self._request(_Call("GET", "/health", Health), retry)

    async def _request(self, call: _Call, retry: RetryPolicy | None = None) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                response = await self._http.request(**call.arguments())
            except httpx.TransportError as exc:
                wait = self._core.retry_wait(attempt, started, exc, retry)
                if wait is None:
                    raise self._core.unreachable(call, exc) from exc
            else:
                wait = self._core.retry_wait(attempt, started, response, retry)
                if wait is None:
                    return self._core.result(call, response)
            await asyncio.sleep(wait)
            attempt += 1
