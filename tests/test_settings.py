"""Settings: names from the plan, .env support, and one clear line for a bad value."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT

from settings import Settings, SettingsError, load_settings


def test_defaults():
    """With nothing set, the documented defaults apply."""
    settings = load_settings({}, env_file="/nonexistent")
    assert settings == Settings()
    assert settings.kafka_command_topic == "device_commands"
    assert settings.publish_timeout == 5.0 and settings.max_batch == 500 and settings.max_body_bytes == 1_048_576
    assert settings.allowed_protocols == ("mqtt", "coap")
    assert settings.mqtt_topic_template == "devices/{device_id}/commands"


def test_environment_values_are_converted():
    """Strings from the environment become numbers, booleans and lists."""
    settings = load_settings(
        {
            "API_PORT": "9000",
            "PUBLISH_TIMEOUT": "2.5",
            "HEADER_TIMEOUT": "1.5",
            "KEEPALIVE_TIMEOUT": "30",
            "KAFKA_CREATE_TOPIC": "true",
            "ALLOWED_PROTOCOLS": "mqtt, coap ,lwm2m",
            "LOG_LEVEL": "debug",
            "JOURNAL_SYNC": "NORMAL",
            "KAFKA_BOOTSTRAP_SERVERS": "[::1]:9092,kafka-2:9093",
            "UNRELATED": "ignored",
        },
        env_file="/nonexistent",
    )
    assert settings.api_port == 9000 and settings.publish_timeout == 2.5 and settings.kafka_create_topic is True
    assert settings.allowed_protocols == ("mqtt", "coap", "lwm2m") and settings.log_level == "DEBUG"
    assert settings.journal_sync == "normal" and settings.kafka_bootstrap_servers == "[::1]:9092,kafka-2:9093"
    assert settings.header_timeout == 1.5 and settings.keepalive_timeout == 30.0


def test_env_file_is_read_and_environment_wins(tmp_path):
    """A .env file supplies values; the real environment overrides it."""
    env_file = tmp_path / ".env"
    env_file.write_text("KAFKA_COMMAND_TOPIC=from_file\nAPI_PORT=7000\n")
    settings = load_settings({"API_PORT": "7001"}, env_file=env_file)
    assert settings.kafka_command_topic == "from_file" and settings.api_port == 7001


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("API_PORT", "eighty"),
        ("API_PORT", "70000"),
        ("PUBLISH_TIMEOUT", "0"),
        ("KAFKA_CREATE_TOPIC", "maybe"),
        ("LOG_LEVEL", "LOUD"),
        ("MAX_BATCH", "0"),
        ("KAFKA_COMMAND_TOPIC", "bad topic"),
        ("ALLOWED_PROTOCOLS", "MQTT"),
        ("ALLOWED_PROTOCOLS", " , "),
        ("KAFKA_BOOTSTRAP_SERVERS", "localhost"),
        ("KAFKA_BOOTSTRAP_SERVERS", ""),
        ("JOURNAL_SYNC", "sometimes"),
        ("JOURNAL_MAX_PENDING", "0"),
        ("DEFAULT_TTL", "-1"),
        ("MQTT_TOPIC_TEMPLATE", "devices/commands"),
        ("MQTT_TOPIC_TEMPLATE", "devices/+/{device_id}"),
        ("MQTT_TOPIC_TEMPLATE", "$SYS/{device_id}"),
        ("MQTT_TOPIC_TEMPLATE", "devices//{device_id}"),
        ("HEADER_TIMEOUT", "0"),
        ("HEADER_TIMEOUT", "soon"),
        ("KEEPALIVE_TIMEOUT", "-1"),
        ("JOURNAL_MAX_DISK", "1 zillion"),
        ("JOURNAL_MAX_DISK", "1.5GB"),
        ("JOURNAL_MAX_DISK", "4096"),
        ("JOURNAL_MAX_BYTES", "64KB"),
        ("KAFKA_BATCH_SIZE", "100"),
        ("KAFKA_BATCH_SIZE", "lots"),
    ],
)
def test_bad_value_names_the_variable(name, value):
    """The error message starts with the variable's name and its value."""
    with pytest.raises(SettingsError) as caught:
        load_settings({name: value}, env_file="/nonexistent")
    assert str(caught.value).startswith(f"{name}=")


def test_bad_value_stops_the_start_with_one_line():
    """`python -m pusher` with a bad setting exits 2 and prints one line naming it."""
    result = subprocess.run(
        [sys.executable, "-m", "pusher"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "API_PORT": "eighty", "ENV_FILE": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pusher: API_PORT='eighty' is invalid")


def test_secrets_never_show():
    """Passwords are masked in the settings' repr, in masked(), and in kafka-python's DEBUG lines."""
    import logging

    from logs import redact_secrets

    settings = load_settings(
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "u",
            "KAFKA_SASL_PASSWORD": "hunter2",
        },
        env_file="/nonexistent",
    )
    assert "hunter2" not in repr(settings) and settings.masked()["kafka_sasl_password"] == "***"
    assert settings.kafka_sasl_password.value == "hunter2"
    record = logging.LogRecord(
        "kafka.producer", logging.DEBUG, "x", 1, "config: %s", ({"sasl_plain_password": "hunter2", "a": 1},), None
    )
    redact_secrets(record)
    assert "hunter2" not in record.getMessage() and "'sasl_plain_password': '***'" in record.getMessage()
    for password in ("it's", "a'b\"c", "back\\slash"):
        record = logging.LogRecord("kafka.x", logging.DEBUG, "x", 1, "%s", ({"sasl_plain_password": password},), None)
        redact_secrets(record)
        assert record.getMessage() == "{'sasl_plain_password': '***'}", record.getMessage()


def test_sasl_without_credentials_stops_the_start():
    """SASL without mechanism, user and password is one clear error."""
    with pytest.raises(SettingsError, match="KAFKA_SASL_MECHANISM"):
        load_settings({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, env_file="/nonexistent")
    with pytest.raises(SettingsError, match="API_KEYS_FILE"):
        load_settings({"AUTH_ENABLED": "true"}, env_file="/nonexistent")


def test_settings_mask_credentials_wherever_they_are_shown():
    """Every Secret and every URL's userinfo is masked in the configuration the service shows and logs."""
    settings = load_settings(
        {
            "RATE_LIMIT_STORAGE": "redis+sentinel://user:p@ss@h1:26379,h2:26379/mymaster",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "PLAIN",
            "KAFKA_SASL_USERNAME": "u",
            "KAFKA_SASL_PASSWORD": "kafka-pw",
            "KAFKA_SSL_PASSWORD": "ssl-pw",
        },
        env_file="/nonexistent",
    )
    masked = settings.masked()
    assert masked["rate_limit_storage"] == "redis+sentinel://***@h1:26379,h2:26379/mymaster"
    assert masked["kafka_sasl_password"] == masked["kafka_ssl_password"] == "***"
    assert not any(word in json.dumps(masked) for word in ("p@ss", "kafka-pw", "ssl-pw"))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "gateway.lan"])
def test_a_network_address_without_keys_is_refused(host, tmp_path):
    """Serving beyond loopback without API keys fails closed, unless AUTH_ENABLED=false says it on purpose."""
    with pytest.raises(SettingsError, match=rf"API_HOST={host} serves the network without API keys"):
        load_settings({"API_HOST": host}, env_file="/nonexistent")
    assert load_settings({"API_HOST": host, "AUTH_ENABLED": "false"}, env_file="/nonexistent").auth is False
    keys = tmp_path / "keys.toml"
    assert load_settings({"API_HOST": host, "API_KEYS_FILE": str(keys)}, env_file="/nonexistent").auth is True


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_loopback_without_keys_starts(host):
    """Loopback is the sidecar's and the developer's address: no keys needed there."""
    assert load_settings({"API_HOST": host}, env_file="/nonexistent").api_host == host


def test_topic_template_is_checked_and_its_reason_given():
    """MQTT_TOPIC_TEMPLATE takes any topic name holding {device_id} once; a bad one says why."""
    assert load_settings({"MQTT_TOPIC_TEMPLATE": "plant/{device_id}/in"}, env_file="/nonexistent").mqtt_topic_template
    with pytest.raises(SettingsError, match=r"^MQTT_TOPIC_TEMPLATE='\$SYS/\{device_id\}' is invalid: .*Must not start"):
        load_settings({"MQTT_TOPIC_TEMPLATE": "$SYS/{device_id}"}, env_file="/nonexistent")


def test_a_status_topic_needs_a_long_secret_that_never_shows():
    """KAFKA_STATUS_TOPIC without STATUS_TOPIC_SECRET, or a secret (current or previous) under 32 characters, stops
    the start naming the variable and never the value; a good one keeps its spaces and is masked everywhere."""
    topic = {"KAFKA_STATUS_TOPIC": "device_commands.status"}
    with pytest.raises(SettingsError, match="STATUS_TOPIC_SECRET") as missing:
        load_settings(topic, env_file="/nonexistent")
    assert "KAFKA_STATUS_TOPIC" in str(missing.value)
    for name in ("STATUS_TOPIC_SECRET", "STATUS_TOPIC_SECRET_PREVIOUS"):
        short = {"STATUS_TOPIC_SECRET": "s" * 40, name: "too-short-secret"}
        with pytest.raises(SettingsError, match=f"^{name}=") as refused:
            load_settings(topic | short, env_file="/nonexistent")
        assert "too-short-secret" not in str(refused.value)
    good = " " + "k" * 31
    settings = load_settings(topic | {"STATUS_TOPIC_SECRET": good}, env_file="/nonexistent")
    assert settings.status_topic_secret.value == good and settings.status_topic_secret_previous is None
    assert good not in repr(settings) and settings.masked()["status_topic_secret"] == "***"


def test_https_needs_the_certificate_and_its_key_both_and_files_that_are_there(tmp_path):
    """API_TLS_CERTFILE without API_TLS_KEYFILE (or the other way round), a client CA or key password without
    them, or a file that is not there: one error naming the variable. Both files: HTTPS, its password masked."""
    cert, key, ca = (tmp_path / name for name in ("cert.pem", "key.pem", "ca.pem"))
    for path in (cert, key, ca):
        path.write_text("PEM\n")
    cases = {
        "^API_TLS_CERTFILE is set without API_TLS_KEYFILE: ": {"API_TLS_CERTFILE": str(cert)},
        "^API_TLS_KEYFILE is set without API_TLS_CERTFILE: ": {"API_TLS_KEYFILE": str(key)},
        "^API_TLS_CLIENT_CAFILE needs API_TLS_CERTFILE and API_TLS_KEYFILE": {"API_TLS_CLIENT_CAFILE": str(ca)},
        "^API_TLS_KEYFILE_PASSWORD needs API_TLS_CERTFILE": {"API_TLS_KEYFILE_PASSWORD": "pw"},
        "^API_TLS_KEYFILE='.*absent.pem' is invalid: no such file$": {
            "API_TLS_CERTFILE": str(cert),
            "API_TLS_KEYFILE": str(tmp_path / "absent.pem"),
        },
        "^API_TLS_CLIENT_CAFILE='.*' is invalid: no such file$": {
            "API_TLS_CERTFILE": str(cert),
            "API_TLS_KEYFILE": str(key),
            "API_TLS_CLIENT_CAFILE": str(tmp_path),  # a directory
        },
    }
    for expected, env in cases.items():
        with pytest.raises(SettingsError, match=expected):
            load_settings(env, env_file="/nonexistent")
    assert not load_settings({}, env_file="/nonexistent").https
    both = {"API_TLS_CERTFILE": str(cert), "API_TLS_KEYFILE": str(key), "API_TLS_KEYFILE_PASSWORD": " key pw "}
    settings = load_settings(both | {"API_TLS_CLIENT_CAFILE": str(ca)}, env_file="/nonexistent")
    assert settings.https and settings.api_tls_client_cafile == str(ca)
    assert settings.api_tls_keyfile_password.value == " key pw " and " key pw " not in repr(settings)
    assert settings.masked()["api_tls_keyfile_password"] == "***"


def test_half_configured_https_stops_the_start_with_one_line(tmp_path):
    """`python -m pusher` with API_TLS_CERTFILE alone exits 2, one line naming API_TLS_KEYFILE."""
    (tmp_path / "cert.pem").write_text("PEM\n")
    result = subprocess.run(
        [sys.executable, "-m", "pusher"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "API_TLS_CERTFILE": str(tmp_path / "cert.pem"), "ENV_FILE": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pusher: API_TLS_CERTFILE is set without API_TLS_KEYFILE: HTTPS needs the certificate and its private key, both"
    ]


def test_sizes_take_units():
    """A setting in bytes takes a unit: kB, MB, GB in thousands, KiB, MiB, GiB in 1024s, in any case."""
    settings = load_settings(
        {
            "JOURNAL_MAX_DISK": "2GiB",
            "JOURNAL_MAX_BYTES": "512 mb",
            "MAX_BODY_BYTES": "1MiB",
            "MAX_HEADER_BYTES": "32768",
            "KAFKA_BATCH_SIZE": "1 MiB",
        },
        env_file="/nonexistent",
    )
    assert settings.kafka_batch_size == 1024**2
    assert settings.journal_max_disk == 2 * 1024**3 and settings.journal_max_bytes == 512_000_000
    assert settings.max_body_bytes == 1024**2 and settings.max_header_bytes == 32768
    with pytest.raises(SettingsError, match="expected a number of bytes, or one with a unit"):
        load_settings({"MAX_BODY_BYTES": "1M"}, env_file="/nonexistent")


def test_a_disk_ceiling_too_small_for_the_waiting_commands_stops_the_start():
    """JOURNAL_MAX_DISK below twice JOURNAL_MAX_BYTES is refused with a line naming both; 0 turns the ceiling off."""
    with pytest.raises(SettingsError) as caught:
        load_settings({"JOURNAL_MAX_DISK": "300MiB"}, env_file="/nonexistent")
    assert str(caught.value).startswith("JOURNAL_MAX_DISK=314572800 is below twice JOURNAL_MAX_BYTES=268435456")
    small = load_settings({"JOURNAL_MAX_DISK": "4MiB", "JOURNAL_MAX_BYTES": "2MiB"}, env_file="/nonexistent")
    assert small.journal_max_disk == 4 * 1024**2
    assert (
        load_settings({"JOURNAL_MAX_DISK": "0", "JOURNAL_MAX_BYTES": "10GiB"}, env_file="/nonexistent").journal_max_disk
        == 0
    )
