"""Configuration: read once from the environment (and an optional `.env`) into a frozen Struct."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from dotenv import dotenv_values
from msgspec import Meta

import mqtt_topics

Positive = Annotated[float, Meta(gt=0)]
_HOST_PORT = r"(\[[0-9A-Fa-f:.]+\]|[^\s,:\[\]]+):\d{1,5}"
_HOST_PORTS = rf"^{_HOST_PORT}(,{_HOST_PORT})*$"
_HINTS = {"kafka_bootstrap_servers": "expected host:port[,host:port…]"}
# Settings in bytes: a number, or one with a unit (512MB, 1GiB): kB, MB, GB are powers of 1000, KiB, MiB, GiB of 1024.
_SIZE_FIELDS = {"max_body_bytes", "max_header_bytes", "journal_max_bytes", "journal_max_disk", "kafka_batch_size"}
_SIZE = re.compile(r"^(\d+)\s*([kmgt]i?b|b)?$", re.IGNORECASE)
_UNITS = (
    {"b": 1}
    | {f"{p}b": 1000**n for n, p in enumerate("kmgt", 1)}
    | {f"{p}ib": 1024**n for n, p in enumerate("kmgt", 1)}
)
_MIN_DISK = 1024 * 1024  # the least JOURNAL_MAX_DISK: the schema, the WAL's share and a few commands
Port = Annotated[int, Meta(ge=0, le=65535)]
_DEFAULT_INSTANCE = re.sub(r"[^A-Za-z0-9._:-]", "-", socket.gethostname())[:128] or "pusher"


class SettingsError(Exception):
    """A setting has a bad value; the message names the variable."""


class Secret:
    """A value that must never be printed: repr and str show stars; `.value` gives it out."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


def _decode_secret(type_: type, value: object) -> object:
    if type_ is Secret and isinstance(value, str):
        return Secret(value)
    raise NotImplementedError


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Every setting of the service; field `kafka_bootstrap_servers` is read from KAFKA_BOOTSTRAP_SERVERS."""

    kafka_bootstrap_servers: Annotated[str, Meta(pattern=_HOST_PORTS)] = "localhost:9092"
    kafka_command_topic: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = "device_commands"
    kafka_client_id: str = "preservarium-pusher"
    kafka_producer_timeout: Positive = 30.0
    # 0: a record goes at once; what arrives while a request is in flight is batched anyway. Waiting 5 ms
    # cost a third of the throughput at 16 connections (each answer waits for its ack).
    kafka_linger_ms: Annotated[int, Meta(ge=0, le=1000)] = 0
    # With idempotence a partition has one batch in flight, so a batch's size bounds what one round trip carries:
    # kafka-python's 16 KiB held a drain to ~25 commands a partition per round trip. Capped by the topic's
    # max.message.bytes once known; a batch the broker finds too large is split by kafka-python and sent again.
    kafka_batch_size: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 256 * 1024
    kafka_compression: Literal["none", "gzip"] = "none"
    kafka_create_topic: bool = False
    kafka_topic_partitions: Annotated[int, Meta(ge=1)] = 3
    kafka_topic_replication: Annotated[int, Meta(ge=1)] = 1
    # The shared status topic (compacted, key = request_id); empty: statuses stay local to this instance.
    kafka_status_topic: Annotated[str, Meta(pattern=r"^([A-Za-z0-9._-]{1,249})?$")] = ""
    instance_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:-]{1,128}$")] = _DEFAULT_INSTANCE
    # Instances sign their status events with it (HMAC-SHA256); _PREVIOUS only verifies, during a rotation.
    status_topic_secret: Secret | None = None
    status_topic_secret_previous: Secret | None = None
    long_poll_max: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    event_stream_max: Annotated[float, Meta(gt=0, le=86400)] = 300.0
    publish_timeout: Positive = 5.0
    max_batch: Annotated[int, Meta(ge=1, le=10_000)] = 500
    max_fanout: Annotated[int, Meta(ge=1, le=100_000)] = 10_000
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 1_048_576
    max_payload_depth: Annotated[int, Meta(ge=1, le=256)] = 32
    mqtt_topic_template: str = mqtt_topics.DEFAULT_TEMPLATE  # checked in load_settings (mqtt_topics)
    allowed_protocols: Annotated[
        tuple[Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,32}$")], ...], Meta(min_length=1)
    ] = ("mqtt", "coap")
    journal_path: str = "./data/journal.db"
    journal_sync: Literal["full", "normal"] = "full"
    journal_max_pending: Annotated[int, Meta(ge=1)] = 100_000
    journal_max_bytes: Annotated[int, Meta(ge=65536)] = 256 * 1024 * 1024
    # The journal's files on disk (database and WAL), finished commands pruned to stay under it; 0: no ceiling.
    journal_max_disk: Annotated[int, Meta(ge=0)] = 512 * 1024 * 1024
    journal_retention: Annotated[float, Meta(ge=0)] = 7 * 86400.0
    default_ttl: Annotated[int, Meta(ge=0, le=30 * 86400)] = 0
    forward_backoff_max: Positive = 30.0
    auth_enabled: bool | None = None  # default: on exactly when API_KEYS_FILE is set
    api_keys_file: str | None = None
    api_key_header: Annotated[str, Meta(pattern=r"^[A-Za-z0-9-]{1,64}$")] = "X-API-Key"
    metrics_public: bool = False
    rate_limit: str = ""
    rate_limit_storage: str = "memory://"
    cors_origins: tuple[str, ...] = ()
    body_timeout: Positive = 10.0
    # From accept (and from a kept-alive request's first byte) to the end of the request head.
    header_timeout: Positive = 10.0
    keepalive_timeout: Positive = 5.0
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 16384
    limit_concurrency: Annotated[int, Meta(ge=1)] = 1000
    max_waiters: Annotated[int, Meta(ge=1)] = 1000
    max_waiters_per_key: Annotated[int, Meta(ge=1)] = 100
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: Secret | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_password: Secret | None = None

    @property
    def auth(self) -> bool:
        """Whether API keys are required."""
        return self.auth_enabled if self.auth_enabled is not None else self.api_keys_file is not None

    @property
    def https(self) -> bool:
        """Whether the service serves HTTPS (API_TLS_CERTFILE and API_TLS_KEYFILE)."""
        return bool(self.api_tls_certfile)

    def masked(self) -> dict[str, object]:
        """The effective configuration with every credential masked: Secrets, and the userinfo of URLs."""
        return {k: _mask(v) for k, v in msgspec.structs.asdict(self).items()}

    api_host: str = "127.0.0.1"
    api_port: Port = 8000
    # HTTPS: a PEM certificate chain and its private key, both or neither; with a client CA, mutual TLS too.
    api_tls_certfile: str | None = None
    api_tls_keyfile: str | None = None
    api_tls_keyfile_password: Secret | None = None
    api_tls_client_cafile: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_payloads: bool = False
    shutdown_timeout: Positive = 10.0
    shutdown_drain: Annotated[float, Meta(ge=0, le=300)] = 0.0


_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")  # scheme://user:password@host: all up to the last @


def _mask(value: object) -> object:
    """A setting's value as it may be shown: credentials become ***."""
    if isinstance(value, Secret):
        return "***"
    if isinstance(value, str):
        return _USERINFO.sub("***@", value)
    return value


_LOOPBACK = re.compile(r"^(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|::1|\[::1\]|localhost)$")
_LIST_FIELDS = {"allowed_protocols", "cors_origins"}
_SECRETS = {
    "kafka_sasl_password",
    "kafka_ssl_password",
    "status_topic_secret",
    "status_topic_secret_previous",
    "api_tls_keyfile_password",
}
_TLS_FILES = ("api_tls_certfile", "api_tls_keyfile", "api_tls_client_cafile")
_MIN_SECRET = 32  # characters of STATUS_TOPIC_SECRET: `openssl rand -hex 32` gives 64


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
        elif name in ("kafka_security_protocol", "kafka_sasl_mechanism"):
            raw[name] = value.strip().upper()
        elif name in _SECRETS:
            raw[name] = value  # secrets keep their spaces
        elif name in _SIZE_FIELDS:
            raw[name] = _bytes(value.strip())
        else:
            raw[name] = value.strip()
    try:
        settings = msgspec.convert(raw, Settings, strict=False, dec_hook=_decode_secret)
    except msgspec.ValidationError as exc:
        raise SettingsError(_name_the_variable(str(exc), raw)) from None
    if settings.auth and not settings.api_keys_file:
        raise SettingsError("AUTH_ENABLED=true needs API_KEYS_FILE (the TOML file of key hashes)")
    if not settings.auth and settings.auth_enabled is None and not _LOOPBACK.match(settings.api_host):
        raise SettingsError(
            f"API_HOST={settings.api_host} serves the network without API keys: set API_KEYS_FILE "
            "(`make keygen` writes one), or AUTH_ENABLED=false to run it open on purpose"
        )
    problem = mqtt_topics.template_problem(settings.mqtt_topic_template)
    if problem:
        raise SettingsError(f"MQTT_TOPIC_TEMPLATE={settings.mqtt_topic_template!r} is invalid: {problem}")
    if "*" in settings.cors_origins:
        raise SettingsError("CORS_ORIGINS='*' is refused: list the origins that may call the API")
    if settings.kafka_security_protocol.startswith("SASL") and not (
        settings.kafka_sasl_mechanism and settings.kafka_sasl_username and settings.kafka_sasl_password
    ):
        raise SettingsError(
            f"KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol} needs KAFKA_SASL_MECHANISM, "
            "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
        )
    if settings.kafka_status_topic and settings.status_topic_secret is None:
        raise SettingsError("KAFKA_STATUS_TOPIC needs STATUS_TOPIC_SECRET, shared by every instance")
    for name in ("status_topic_secret", "status_topic_secret_previous"):
        secret = getattr(settings, name)
        if secret is not None and len(secret.value) < _MIN_SECRET:
            raise SettingsError(f"{name.upper()}=*** is invalid: at least {_MIN_SECRET} characters")
    problem = _tls_problem(settings)
    if problem:
        raise SettingsError(problem)
    problem = _disk_problem(settings)
    if problem:
        raise SettingsError(problem)
    return settings


def _bytes(value: str) -> int | str:
    """A size as a number of bytes: `512MB`, `1GiB`, `65536`. Anything else is left for msgspec to refuse."""
    match = _SIZE.match(value)
    return int(match[1]) * _UNITS[(match[2] or "b").lower()] if match else value


def _disk_problem(settings: Settings) -> str | None:
    """What is wrong with JOURNAL_MAX_DISK: too small for the journal, or for the waiting commands it must hold."""
    disk, waiting = settings.journal_max_disk, settings.journal_max_bytes
    if disk == 0:
        return None
    if disk < _MIN_DISK:
        return f"JOURNAL_MAX_DISK={disk} is invalid: 0 (no ceiling) or at least {_MIN_DISK} (1MiB)"
    # A waiting command takes more room than its record: its row, indexes, the WAL. Twice covers records from about
    # 700 bytes; with smaller ones the ceiling may answer 503 before JOURNAL_MAX_BYTES is reached.
    if disk < 2 * waiting:
        return (
            f"JOURNAL_MAX_DISK={disk} is below twice JOURNAL_MAX_BYTES={waiting}: the commands waiting for Kafka "
            "would not fit on disk. Raise JOURNAL_MAX_DISK (0: no ceiling) or lower JOURNAL_MAX_BYTES"
        )
    return None


def _tls_problem(settings: Settings) -> str | None:
    """What is wrong with the API_TLS_* settings: a half pair, a setting without the pair, a file not there."""
    cert, key = bool(settings.api_tls_certfile), bool(settings.api_tls_keyfile)
    if cert != key:
        given, missing = ("API_TLS_CERTFILE", "API_TLS_KEYFILE") if cert else ("API_TLS_KEYFILE", "API_TLS_CERTFILE")
        return f"{given} is set without {missing}: HTTPS needs the certificate and its private key, both"
    if not cert:
        for name in ("api_tls_client_cafile", "api_tls_keyfile_password"):
            if getattr(settings, name):
                return f"{name.upper()} needs API_TLS_CERTFILE and API_TLS_KEYFILE: it applies only to HTTPS"
        return None
    for name in _TLS_FILES:
        path = getattr(settings, name)
        if not path:
            continue
        if not os.path.isfile(path):
            return f"{name.upper()}={path!r} is invalid: no such file"
        if not os.access(path, os.R_OK):
            return f"{name.upper()}={path!r} is invalid: not readable by this user (uid {os.getuid()})"
    return None


def _name_the_variable(message: str, raw: Mapping[str, object]) -> str:
    """Turn msgspec's `... - at `$.api_port`` into `API_PORT=...: ...`."""
    text, _, where = message.rpartition(" - at `$.")
    if not where:
        return f"invalid configuration: {message}"
    field = where.split("`")[0].split("[")[0]
    if "matching regex" in text:
        text = _HINTS.get(field, "not an allowed value")
    elif field in _SIZE_FIELDS and isinstance(raw.get(field), str):  # not a size at all (else: msgspec's bound)
        text = "expected a number of bytes, or one with a unit: 512MB, 1GiB"
    shown = "***" if field.endswith("password") else repr(raw.get(field))
    return f"{field.upper()}={shown} is invalid: {text}"
