"""The service against Apache Kafka with a SASL_SSL listener and SCRAM users (certificates made here)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
from helpers import ServiceProcess, command, new_topic, read_topic, ready, wait_for
from kafka_local import LocalKafka

KEY_PASSWORD = "keystore-pass"


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, and a broker certificate for 127.0.0.1 signed by it (broker key: PKCS#8 PEM, encrypted the way
    Java 17 can read: PBES2 is not available to it)."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=pusher-test-ca", cwd=folder)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
             "-subj", "/CN=localhost", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "broker.pem", "-days", "2", "-extfile", "san.ext", cwd=folder)  # fmt: skip
    _openssl("pkcs8", "-topk8", "-in", "broker.key", "-out", "broker.p8", "-v1", "PBE-SHA1-3DES",
             "-passout", f"pass:{KEY_PASSWORD}", cwd=folder)  # fmt: skip
    keystore = folder / "keystore.pem"
    keystore.write_text((folder / "broker.p8").read_text() + (folder / "broker.pem").read_text())
    return {"ca": folder / "ca.pem", "keystore": keystore}


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    """A broker with PLAINTEXT (for the test's own reads) and SASL_SSL + SCRAM (for the service)."""
    base = tmp_path_factory.mktemp("secure-kafka")
    certs = make_certificates(base / "certs")
    broker = LocalKafka(
        base / "kafka",
        sasl_ssl={"users": {"pusher": "right-password"}, "keystore": certs["keystore"], "key_password": KEY_PASSWORD},
    ).start()
    yield broker, certs
    broker.stop()


def _secure_env(broker: LocalKafka, certs: dict, topic: str, password: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": broker.sasl_bootstrap,
        "KAFKA_COMMAND_TOPIC": topic,
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "KAFKA_SASL_USERNAME": "pusher",
        "KAFKA_SASL_PASSWORD": password,
        "KAFKA_SSL_CAFILE": str(certs["ca"]),
    }


def test_right_credentials_publish_over_sasl_ssl(secure_broker, tmp_path):
    """With the right SCRAM password over TLS the command is published; the password is never logged."""
    broker, certs = secure_broker
    topic = new_topic(broker.bootstrap)
    service = ServiceProcess(tmp_path, **_secure_env(broker, certs, topic, "right-password")).start()
    try:
        response = httpx.post(service.url + "/api/v1/commands", json=command("tls-dev"))
        assert response.status_code == 200, response.text
        [record] = read_topic(broker.bootstrap, topic, 1)
        assert record.key == b"tls-dev"
        assert "right-password" not in service.log()
    finally:
        service.stop()


def test_wrong_password_keeps_the_service_up_not_ready_and_calm(secure_broker, tmp_path):
    """A wrong password: the process stays up, /ready is false with the reason, and reconnects back off."""
    broker, certs = secure_broker
    topic = new_topic(broker.bootstrap)
    service = ServiceProcess(tmp_path, **_secure_env(broker, certs, topic, "wrong-password")).start(wait_ready=False)
    try:
        body = wait_for(lambda: (b := ready(service.url))["reason"] and "credentials" in b["reason"] and b, timeout=90)
        assert body["ready"] is False and body["kafka_connected"] is False
        assert httpx.get(service.url + "/ready").status_code == 503
        assert httpx.post(service.url + "/api/v1/commands", json=command()).status_code == 202  # still stored
        started = service.log().count("kafka producer not connected")
        time.sleep(8)
        attempts = service.log().count("kafka producer not connected") - started
        assert attempts <= 6, f"{attempts} connection attempts in 8 s"
        assert "credentials" in service.log() and "wrong-password" not in service.log()
        assert service.process.poll() is None
    finally:
        service.stop()
