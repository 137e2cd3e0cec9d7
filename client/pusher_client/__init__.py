"""Python client for the Preservarium Pusher HTTP API, synchronous and asyncio, with retries that never double-send.

    from pusher_client import PusherClient             # or AsyncPusherClient: the same methods, as coroutines

    with PusherClient("http://pusher:8000", api_key) as client:
        result = client.push_command("efento_device_001", "config_update", {"measurement_interval": 600}, "coap")

Reading path: client.py (the two clients), _core.py (what they share, without I/O), errors.py (what they
raise), wire.py (the request and answer Structs, shared with the service). compat.py is the old in-process
`preservarium_pusher` API on top of the client; cli.py is the `pusher` command. Needs only httpx and msgspec.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pusher_client.errors import (
    CommandFailed,
    Conflict,
    Forbidden,
    NotFound,
    PusherClientError,
    RateLimited,
    RequestRejected,
    ServerError,
    TLSFailed,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    WaitTimeout,
)
from pusher_client.wire import (
    BatchCommandResponse,
    CommandList,
    CommandRequest,
    CommandResponse,
    CommandStatus,
    FanoutRequest,
    FanoutResponse,
    FanoutStatus,
    FieldError,
    Health,
    Problem,
    Transition,
)

if TYPE_CHECKING:
    from pusher_client._core import STAGES, BatchResult, CommandResult, RetryPolicy
    from pusher_client.client import AsyncPusherClient, PusherClient

# The clients and what they return are imported on first use: the service imports this package for its wire
# types alone, and httpx (the clients' transport) would cost it ~1 MB of memory it never uses.
_LAZY = {
    "STAGES": "_core",
    "BatchResult": "_core",
    "CommandResult": "_core",
    "RetryPolicy": "_core",
    "AsyncPusherClient": "client",
    "PusherClient": "client",
}


def __getattr__(name: str) -> Any:
    """`pusher_client.PusherClient` and the rest of _LAZY, imported when first asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pusher_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pusher_client.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "STAGES",
    "AsyncPusherClient",
    "BatchCommandResponse",
    "BatchResult",
    "CommandFailed",
    "CommandList",
    "CommandRequest",
    "CommandResponse",
    "CommandResult",
    "CommandStatus",
    "Conflict",
    "FanoutRequest",
    "FanoutResponse",
    "FanoutStatus",
    "FieldError",
    "Forbidden",
    "Health",
    "NotFound",
    "Problem",
    "PusherClient",
    "PusherClientError",
    "RateLimited",
    "RequestRejected",
    "RetryPolicy",
    "ServerError",
    "TLSFailed",
    "Transition",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "WaitTimeout",
]
