"""Configuration: read once from the environment (and an optional `.env`) into a frozen Struct."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from dotenv import dotenv_values
from msgspec import Meta

Positive = Annotated[float, Meta(gt=0)]
_HOST_PORT = r"(\[[0-9A-Fa-f:.]+\]|[^\s,:\[\]]+):\d{1,5}"
_HOST_PORTS = rf"^{_HOST_PORT}(,{_HOST_PORT})*$"
_HINTS = {"kafka_bootstrap_servers": "expected host:port[,host:port…]"}
Port = Annotated[int, Meta(ge=0, le=65535)]


class SettingsError(Exception):
    """A setting has a bad value; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Every setting of the service; field `kafka_bootstrap_servers` is read from KAFKA_BOOTSTRAP_SERVERS."""

    kafka_bootstrap_servers: Annotated[str, Meta(pattern=_HOST_PORTS)] = "localhost:9092"
    kafka_command_topic: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = "device_commands"
    kafka_client_id: str = "preservarium-pusher"
    kafka_producer_timeout: Positive = 30.0
    kafka_linger_ms: Annotated[int, Meta(ge=0, le=1000)] = 5
    kafka_compression: Literal["none", "gzip"] = "none"
    kafka_create_topic: bool = False
    kafka_topic_partitions: Annotated[int, Meta(ge=1)] = 3
    kafka_topic_replication: Annotated[int, Meta(ge=1)] = 1
    publish_timeout: Positive = 5.0
    max_batch: Annotated[int, Meta(ge=1, le=10_000)] = 500
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 1_048_576
    max_payload_depth: Annotated[int, Meta(ge=1, le=256)] = 32
    allowed_protocols: Annotated[
        tuple[Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,32}$")], ...], Meta(min_length=1)
    ] = ("mqtt", "coap")
    journal_path: str = "./data/journal.db"
    journal_sync: Literal["full", "normal"] = "full"
    journal_max_pending: Annotated[int, Meta(ge=1)] = 100_000
    journal_max_bytes: Annotated[int, Meta(ge=65536)] = 256 * 1024 * 1024
    journal_retention: Annotated[float, Meta(ge=0)] = 7 * 86400.0
    default_ttl: Annotated[int, Meta(ge=0, le=30 * 86400)] = 0
    forward_backoff_max: Positive = 30.0
    api_host: str = "127.0.0.1"
    api_port: Port = 8000
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"


_LIST_FIELDS = {"allowed_protocols"}


def load_settings(environ: Mapping[str, str] | None = None, env_file: str | Path | None = None) -> Settings:
    """Decode the settings from `.env` (ENV_FILE, default ./.env) overlaid by the environment."""
    environ = os.environ if environ is None else environ
    env_file = Path(env_file or environ.get("ENV_FILE", ".env"))
    merged: dict[str, str] = {}
    if env_file.is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(environ)

    raw: dict[str, object] = {}
    for name in Settings.__struct_fields__:
        value = merged.get(name.upper())
        if value is None:
            continue
        if name in _LIST_FIELDS:
            raw[name] = [part.strip() for part in value.split(",") if part.strip()]
        elif name in ("log_level",):
            raw[name] = value.strip().upper()
        elif name in ("journal_sync", "kafka_compression"):
            raw[name] = value.strip().lower()
        else:
            raw[name] = value.strip()
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_name_the_variable(str(exc), raw)) from None


def _name_the_variable(message: str, raw: Mapping[str, object]) -> str:
    """Turn msgspec's `... - at `$.api_port`` into `API_PORT=...: ...`."""
    text, _, where = message.rpartition(" - at `$.")
    if not where:
        return f"invalid configuration: {message}"
    field = where.split("`")[0].split("[")[0]
    if "matching regex" in text:
        text = _HINTS.get(field, "not an allowed value")
    return f"{field.upper()}={raw.get(field)!r} is invalid: {text}"
