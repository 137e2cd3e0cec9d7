"""Python client for the Preservarium Pusher HTTP API, synchronous and asyncio, with retries that never double-send.

    from pusher_client import PusherClient             # or AsyncPusherClient: the same methods, as coroutines

    with PusherClient("http://pusher:8000", api_key) as client:
        result = client.push_command("efento_device_001", "config_update", {"measurement_interval": 600}, "coap")

Reading path: client.py (the two clients), _core.py (what they share, without I/O), errors.py (what they
raise), wire.py (the request and answer Structs, shared with the service). compat.py is the old in-process
`preservarium_pusher` API on top of the client; cli.py is the `pusher` command. Needs only httpx and msgspec.
"""

from __future__ import annotations

from pusher_client._core import STAGES, BatchResult, CommandResult, RetryPolicy
from pusher_client.client import AsyncPusherClient, PusherClient
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
