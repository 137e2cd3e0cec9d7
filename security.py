"""API keys with scopes and device patterns, and per-key rate limits, as plain ASGI middleware.

Keys live only as SHA-256 hashes in a TOML file (API_KEYS_FILE):

    [[keys]]
    id = "gateway-a"                      # logged; never the key itself
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    scopes = ["commands:write", "commands:read"]
    devices = ["site-a/*"]                # optional: fnmatch patterns of device ids

A key is accepted from the X-API-Key header (API_KEY_HEADER) or `Authorization: Bearer`,
never from the query string. An unknown key and a wrong one get the same 401.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import math
import secrets
import time
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import structlog
from limits import RateLimitItem, parse_many
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from starlette.types import ASGIApp, Receive, Scope, Send

from errors import FieldProblem, Forbidden, RateLimited, RateLimiterUnavailable, Unauthorized, ValidationFailed

log = structlog.get_logger("security")

# What a storage that does not answer raises: limits' wrapper and the socket's own; with Redis, redis-py's errors
# too (imported only then: redis-py costs ~4 MB of memory a process with in-memory limits never uses).
_STORAGE_ERRORS: tuple[type[BaseException], ...] = (StorageError, OSError)

KeyScope = Literal["commands:write", "commands:read", "admin"]  # what a key may do
KEY_PREFIX = "ppk_"


class ApiKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One key's identity and rights (its secret is only ever a hash)."""

    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    scopes: list[KeyScope]
    devices: list[Annotated[str, msgspec.Meta(min_length=1, max_length=255)]] | None = None

    def allows(self, scope: str) -> bool:
        """True when the key has `scope` (admin has every scope)."""
        return scope in self.scopes or "admin" in self.scopes

    def may_command(self, device_id: str) -> bool:
        """True when the key's device patterns (if any) cover `device_id`."""
        return self.devices is None or any(fnmatch.fnmatchcase(device_id, p) for p in self.devices)


class _KeysFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[ApiKey]


def hash_key(secret: str) -> str:
    """The hex SHA-256 of a key, as stored in the keys file."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(key_id: str, scopes: list[str]) -> tuple[str, str]:
    """A fresh random key (256 bits) and the TOML entry to put in the keys file."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = (
        f'[[keys]]\nid = "{key_id}"\nsha256 = "{hash_key(secret)}"\nscopes = {msgspec.json.encode(scopes).decode()}\n'
    )
    return secret, entry


class Keyring:
    """The keys of API_KEYS_FILE; `reload()` swaps them atomically (SIGHUP)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._keys: tuple[ApiKey, ...] = ()
        self.reload()

    def reload(self) -> int:
        """Read the file again; a bad file keeps the old keys and raises."""
        try:
            decoded = msgspec.toml.decode(self.path.read_bytes(), type=_KeysFile)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"API_KEYS_FILE {self.path}: {exc}") from None
        ids = [k.id for k in decoded.keys]
        if len(ids) != len(set(ids)):
            raise ValueError(f"API_KEYS_FILE {self.path}: key ids must be unique")
        self._keys = tuple(decoded.keys)
        log.info("api keys loaded", path=str(self.path), keys=len(self._keys))
        return len(self._keys)

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        """The keys in force now."""
        return self._keys

    def find(self, secret: str) -> ApiKey | None:
        """The key matching `secret`, comparing every stored hash in constant time."""
        digest = hash_key(secret)
        found = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found


class ApiKeyMiddleware:
    """Authenticates every request except the open paths; puts the key in scope['state']['principal']."""

    def __init__(self, app: ASGIApp, keyring: Keyring, header: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.keyring = keyring
        self.header = header.lower().encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["auth_required"] = True
        path = scope["path"]
        secret = None
        for name, value in scope["headers"]:
            if name == self.header:
                secret = value.decode("latin-1").strip()
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                secret = value[7:].decode("latin-1").strip()
        key = self.keyring.find(secret) if secret else None
        if path in self.open_paths or path.startswith("/docs/"):  # exact paths, and the docs' static assets
            if key is not None:  # open to anyone, but a key still says who asks (an admin sees more)
                scope["state"]["principal"] = key
            await self.app(scope, receive, send)
            return
        if key is None:
            raise Unauthorized("A valid API key is required (X-API-Key header or Authorization: Bearer)")
        scope.setdefault("state", {})["principal"] = key
        structlog.contextvars.bind_contextvars(key_id=key.id)
        await self.app(scope, receive, send)


def require(state: dict, scope: str) -> ApiKey | None:
    """Raise 403 unless the request's key has `scope`; None when authentication is off."""
    key: ApiKey | None = state.get("principal")
    if key is None and state.get("auth_required"):  # an open path reaching a guarded handler: never allow
        raise Unauthorized("A valid API key is required (X-API-Key header or Authorization: Bearer)")
    if key is not None and not key.allows(scope):
        raise Forbidden(f"This API key lacks the {scope!r} scope")
    return key


class RateLimiter:
    """RATE_LIMIT (e.g. `100/minute;20/second`) per API key, or per client address without auth."""

    def __init__(self, spec: str, storage_uri: str) -> None:
        self.items: list[RateLimitItem] = parse_many(spec)
        uri = storage_uri if "://" in storage_uri else "memory://"
        self.storage_errors = _STORAGE_ERRORS
        if uri.startswith(("redis://", "rediss://")):
            from redis.exceptions import RedisError

            self.storage_errors = (RedisError, *_STORAGE_ERRORS)
            uri = "async+" + uri
        elif uri == "memory://":
            uri = "async+memory://"
        # Short timeouts: a Redis that stops answering must not hold requests up.
        options = (
            {"implementation": "redispy", "socket_connect_timeout": 1, "socket_timeout": 1} if "redis" in uri else {}
        )
        self.storage = storage_from_string(uri, **options)
        # Sliding window counter: two counters per key, O(1) per hit at any limit; a moving window keeps one
        # timestamp per unit, so a generous limit would make every request scan thousands of entries.
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)

    async def close(self) -> None:
        """Close the Redis connections, if any (limits keeps its redis-py client on `bridge.storage`)."""
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        if client is not None:
            await client.aclose()

    async def hit(self, who: str, cost: int, counted: str = "$.commands", spent: int = 0) -> dict[str, str]:
        """Spend `cost` units for `who` in every limit, or in none: a refused request spends nothing.

        Raises RateLimited (429) when a limit is exhausted, ValidationFailed when `cost` plus the `spent` units the
        same request spent before can never fit a window (naming the field `counted`: no retry could get past it),
        RateLimiterUnavailable (503) when the storage does not answer. Returns RateLimit-* headers."""
        try:
            for item in self.items:
                if cost + spent > item.amount:  # `spent`: what the same request spent before
                    raise ValidationFailed([FieldProblem(counted, f"More commands than RATE_LIMIT {item} allows")])
                if not await self.limiter.test(item, who, cost=cost):
                    stats = await self.limiter.get_window_stats(item, who)
                    reset = max(0.0, stats.reset_time - time.time())
                    headers = _ratelimit_headers(item.amount, stats.remaining, reset) | {
                        "Retry-After": str(math.ceil(reset) or 1)
                    }
                    raise RateLimited(f"Rate limit {item} exceeded", headers=headers)
            tightest: tuple[int, int, float] | None = None
            for item in self.items:
                await self.limiter.hit(item, who, cost=cost)
                stats = await self.limiter.get_window_stats(item, who)
                if tightest is None or stats.remaining < tightest[1]:
                    tightest = (item.amount, stats.remaining, max(0.0, stats.reset_time - time.time()))
        except self.storage_errors as exc:  # the storage (Redis) is unreachable: refuse, retriably, rather than 500
            log.warning("rate limit storage unavailable", error=type(exc).__name__)
            raise RateLimiterUnavailable("The rate limiter's storage does not answer") from None
        return _ratelimit_headers(*tightest) if tightest else {}


def _ratelimit_headers(limit: int, remaining: int, reset: float) -> dict[str, str]:
    """The RateLimit-Limit, -Remaining and -Reset headers of one limit."""
    return {
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(remaining),
        "RateLimit-Reset": str(math.ceil(reset)),
    }
