"""HTTPS and client certificates (mutual TLS) on the service's own port, with certificates made here (trustme):
the service as a process against a real broker, the client, the `pusher` command and the healthcheck."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from helpers import KEYS, ROOT, ServiceProcess, command, keys_file, read_topic, run_cli, wait_for

import server
from pusher_client import AsyncPusherClient, PusherClient, RetryPolicy, TLSFailed, Unavailable
from pusher_client._core import _Core
from settings import SettingsError, load_settings

HEADER_TIMEOUT = 1.0
# Every wait below is bounded by many times the deadline (and by half asyncio's own 60 s handshake timeout, so
# that only the service's bound can pass): a busy machine is slow, never wrong.
BOUND = 30 * HEADER_TIMEOUT
KEY_PASSWORD = "key-password-for-the-tests"
WRITER = KEYS["writer"][0]


@dataclass(frozen=True)
class Pki:
    """The test's certificates: a CA, its server certificate for 127.0.0.1 and localhost, its client certificate;
    and an unrelated CA with a client certificate of its own."""

    ca: Path
    server_cert: Path
    server_key: Path
    server_key_encrypted: Path  # the same key, encrypted with KEY_PASSWORD
    client_cert: Path
    client_key: Path
    client_both: Path  # the client's certificate and key in one file
    other_ca: Path
    other_cert: Path
    other_key: Path

    def context(self, cert: bool = True, ca: Path | None = None, tls: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """A client's TLS context trusting `ca` (the test CA), presenting the client certificate unless told not
        to, at most `tls` when given."""
        context = ssl.create_default_context(cafile=ca or self.ca)
        if cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        if tls is not None:
            context.maximum_version = tls
        return context

    def other_context(self, tls: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """A client trusting the test CA but presenting the unrelated CA's certificate."""
        context = self.context(cert=False, tls=tls)
        context.load_cert_chain(self.other_cert, self.other_key)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates made for this module, in files as an operator would have them."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(organization_name="pusher test CA"), trustme.CA(organization_name="another CA")
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("gateway-app.example", common_name="gateway-app")
    other_cert = other_ca.issue_cert("intruder.example", common_name="intruder")
    files = {
        "ca": ca.cert_pem,
        "server_cert": server_cert.cert_chain_pems[0],
        "server_key": server_cert.private_key_pem,
        "client_cert": client_cert.cert_chain_pems[0],
        "client_key": client_cert.private_key_pem,
        "client_both": client_cert.private_key_and_cert_chain_pem,
        "other_ca": other_ca.cert_pem,
        "other_cert": other_cert.cert_chain_pems[0],
        "other_key": other_cert.private_key_pem,
    }
    paths = {name: folder / f"{name}.pem" for name in files}
    for name, blob in files.items():
        blob.write_to_path(str(paths[name]))
    key = serialization.load_pem_private_key(server_cert.private_key_pem.bytes(), password=None)
    paths["server_key_encrypted"] = folder / "server_key_encrypted.pem"
    paths["server_key_encrypted"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(KEY_PASSWORD.encode()),
        )
    )
    return Pki(**paths)


def _tls_env(pki: Pki, client_ca: bool = False, **extra: str) -> dict[str, str]:
    env = {"API_TLS_CERTFILE": str(pki.server_cert), "API_TLS_KEYFILE": str(pki.server_key), **extra}
    if client_ca:
        env["API_TLS_CLIENT_CAFILE"] = str(pki.ca)
    return env


@pytest.fixture
def https_service(kafka_bootstrap: str, topic: str, tmp_path: Path, pki: Pki) -> Iterator[ServiceProcess]:
    """The service over HTTPS (no client certificates), keys off, publishing to `topic`."""
    env = _tls_env(pki, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic)
    proc = ServiceProcess(tmp_path, ssl_context=pki.context(cert=False), **env).start()
    yield proc
    proc.stop()


@pytest.fixture
def mtls_service(kafka_bootstrap: str, topic: str, tmp_path: Path, pki: Pki) -> Iterator[ServiceProcess]:
    """The service over HTTPS requiring client certificates signed by the test CA, and API keys (helpers.KEYS)."""
    keys = keys_file(tmp_path / "keys.toml")
    env = _tls_env(pki, client_ca=True, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic)
    proc = ServiceProcess(tmp_path, ssl_context=pki.context(), API_KEYS_FILE=keys, **env).start()
    yield proc
    proc.stop()


def _exchange(port: int, context: ssl.SSLContext, request: bytes = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"):
    """Connect over TLS with `context` and send `request`: ("handshake", error) when the handshake fails, else
    ("answer", what came back until the server closed, or the error that ended the read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
        except (ssl.SSLError, OSError) as exc:
            return "handshake", exc
        with tls:
            data = b""
            try:
                tls.sendall(request)
                while chunk := tls.recv(65536):
                    data += chunk
                    if b"\r\n\r\n" in data and data.startswith(b"HTTP/1.1 200"):
                        break
            except (ssl.SSLError, OSError) as exc:
                return "answer", data or exc
            return "answer", data


def _request_lines(service: ServiceProcess) -> int:
    return sum('"event":"request"' in line for line in service.log().splitlines())


# --- settings and start-up, without a server ---


def test_tls_context_is_tls12_or_later_and_asks_client_certificates_only_with_a_client_ca(pki):
    """No API_TLS_*: plain HTTP. With certificate and key: TLS 1.2 at least, no client certificate asked. With
    API_TLS_CLIENT_CAFILE: a client certificate signed by it is required. An encrypted key loads with its
    password."""
    assert server.tls_context(load_settings({}, env_file="/nonexistent")) is None
    https = server.tls_context(load_settings(_tls_env(pki), env_file="/nonexistent"))
    assert https.minimum_version == ssl.TLSVersion.TLSv1_2 and https.verify_mode == ssl.CERT_NONE
    mutual = server.tls_context(load_settings(_tls_env(pki, client_ca=True), env_file="/nonexistent"))
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    assert [ca["subject"] for ca in mutual.get_ca_certs()] == [ca["subject"] for ca in pki.context().get_ca_certs()]
    encrypted = _tls_env(pki, API_TLS_KEYFILE=str(pki.server_key_encrypted), API_TLS_KEYFILE_PASSWORD=KEY_PASSWORD)
    assert server.tls_context(load_settings(encrypted, env_file="/nonexistent")) is not None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"API_TLS_KEYFILE": "other_key"},
            r"^API_TLS_CERTFILE='.*' with API_TLS_KEYFILE='.*other_key.pem': .*MISMATCH",
        ),
        ({"API_TLS_KEYFILE": "server_key_encrypted"}, r"an encrypted key needs API_TLS_KEYFILE_PASSWORD$"),
        (
            {"API_TLS_KEYFILE": "server_key_encrypted", "API_TLS_KEYFILE_PASSWORD": "wrong"},
            r"^API_TLS_CERTFILE=.* not a PEM certificate and its private key",
        ),
        ({"API_TLS_CERTFILE": "not_pem"}, r"^API_TLS_CERTFILE='.*not_pem.pem' with .*: not a PEM certificate"),
        ({"API_TLS_CLIENT_CAFILE": "server_key"}, r"^API_TLS_CLIENT_CAFILE='.*server_key.pem' is invalid: not PEM"),
    ],
    ids=[
        "another-key",
        "encrypted-key-no-password",
        "wrong-password",
        "certificate-not-pem",
        "ca-without-certificates",
    ],
)
def test_files_that_do_not_load_are_one_settings_error(pki, tmp_path, change, expected):
    """A key that is not the certificate's, an encrypted key without (or with the wrong) password, a file that is
    not PEM, a client CA that holds no certificate: a SettingsError naming the variable, never a prompt."""
    (tmp_path / "not_pem.pem").write_text("not a certificate\n")
    env = _tls_env(pki)
    for name, value in change.items():
        if name.endswith("PASSWORD"):
            env[name] = value
        else:
            env[name] = str(tmp_path / "not_pem.pem" if value == "not_pem" else getattr(pki, value))
    settings = load_settings(env, env_file="/nonexistent")
    with pytest.raises(SettingsError, match=expected) as caught:
        server.tls_context(settings)
    assert "wrong" not in str(caught.value) and "_ssl.c" not in str(caught.value)


def test_a_key_that_does_not_load_stops_the_start_with_one_line(pki):
    """`python -m pusher` with a key that is not the certificate's exits 2 with one line naming both settings,
    before it serves anything."""
    env = {"PATH": "/usr/bin:/bin", "ENV_FILE": "/nonexistent", **_tls_env(pki, API_TLS_KEYFILE=str(pki.other_key))}
    result = subprocess.run(
        [sys.executable, "-m", "pusher"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("pusher: API_TLS_CERTFILE=") and "API_TLS_KEYFILE=" in line and "MISMATCH" in line


def test_bare_uvicorn_refuses_tls_settings_it_would_ignore(pki):
    """`uvicorn pusher:app` makes its own listener: with API_TLS_* set the app refuses to load (exit 2, one line
    pointing at uvicorn's --ssl-* options) instead of serving plain HTTP."""
    env = {"PATH": "/usr/bin:/bin", "ENV_FILE": "/nonexistent", **_tls_env(pki)}
    result = subprocess.run(
        [sys.executable, "-c", "import pusher; pusher.app"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("pusher: API_TLS_CERTFILE is applied by `python -m pusher`") and "--ssl-certfile" in line


def test_client_tls_options_and_their_environment(pki, monkeypatch):
    """verify and cert default to PUSHER_CA_FILE and PUSHER_CLIENT_CERT/PUSHER_CLIENT_KEY; verify=False is only
    ever explicit; a file that does not load, or a key without a certificate, is a ValueError naming it."""
    for name in ("PUSHER_CA_FILE", "PUSHER_CLIENT_CERT", "PUSHER_CLIENT_KEY", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    test_ca = {ca["subject"] for ca in pki.context(cert=False).get_ca_certs()}
    system = _Core("https://box:8443", None, RetryPolicy()).ssl_context
    assert system.verify_mode == ssl.CERT_REQUIRED and not test_ca & {ca["subject"] for ca in system.get_ca_certs()}
    monkeypatch.setenv("PUSHER_CA_FILE", str(pki.ca))
    assert {ca["subject"] for ca in _Core(None, None, RetryPolicy()).ssl_context.get_ca_certs()} == test_ca
    unchecked = _Core(None, None, RetryPolicy(), verify=False).ssl_context
    assert unchecked.verify_mode == ssl.CERT_NONE and not unchecked.check_hostname
    own = pki.context(cert=False)
    assert _Core(None, None, RetryPolicy(), verify=own).ssl_context is own
    monkeypatch.setenv("PUSHER_CLIENT_KEY", str(pki.client_key))
    with pytest.raises(ValueError, match=r"^PUSHER_CLIENT_KEY is set without PUSHER_CLIENT_CERT$"):
        PusherClient("https://box:8443")
    monkeypatch.setenv("PUSHER_CLIENT_CERT", str(pki.client_cert))
    PusherClient("https://box:8443").close()
    with pytest.raises(ValueError, match=r"^CA file '/nonexistent/ca.pem': No such file"):
        PusherClient("https://box:8443", verify="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match=r"^client certificate '.*client_cert.pem': not PEM, or not a certificate"):
        PusherClient("https://box:8443", cert=str(pki.client_cert))  # its key is in another file
    PusherClient("https://box:8443", cert=str(pki.client_both)).close()


def test_only_tls_errors_that_retrying_cannot_cure_stop_the_retries():
    """A certificate that does not verify (or an alert, a protocol mismatch) is final and raised as TLSFailed; an
    end of stream in the handshake or a reset, which a restarting service causes too, is retried, and in the end
    reported with a word on client certificates."""
    core = _Core("https://box:8443", None, RetryPolicy())

    def failure(cause: BaseException) -> httpx.ConnectError:
        error = httpx.ConnectError(str(cause))
        error.__cause__ = cause
        return error

    unverified = ssl.SSLCertVerificationError(1, "certificate verify failed")
    unverified.verify_message = "unable to get local issuer certificate"
    final = [unverified, ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")]
    transient = [ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), ConnectionResetError(104, "reset")]
    started = time.monotonic()
    assert [core.retry_wait(0, started, failure(cause)) for cause in final] == [None, None]
    assert None not in [core.retry_wait(0, started, failure(cause)) for cause in transient]
    assert [type(core.unreachable(core.status("x"), failure(cause))) for cause in final + transient] == [
        TLSFailed, TLSFailed, Unavailable, Unavailable,
    ]  # fmt: skip
    assert "unable to get local issuer certificate" in str(core.unreachable(core.status("x"), failure(unverified)))
    # an end of stream in the handshake may be a refused client certificate, a refused connection is not
    assert "client certificates" in str(core.unreachable(core.status("x"), failure(transient[0])))
    refused = core.unreachable(core.status("x"), failure(ConnectionRefusedError(111, "Connection refused")))
    assert "client certificates" not in str(refused)


def test_cli_certificate_options_that_do_not_load_are_usage_errors(pki):
    """--client-key without --client-cert, or a --ca-file that is not there: exit 2, saying which, nothing sent."""
    args = ("status", "some-id", "--retry-for", "0")
    alone = run_cli(*args, "--client-key", str(pki.client_key), url="https://127.0.0.1:9")
    assert alone.returncode == 2 and "--client-key (PUSHER_CLIENT_KEY) needs --client-cert" in alone.stderr
    missing = run_cli(*args, "--ca-file", "/nonexistent/ca.pem", url="https://127.0.0.1:9")
    assert missing.returncode == 2 and "CA file '/nonexistent/ca.pem': No such file" in missing.stderr


# --- the service over HTTPS ---


def test_https_command_reaches_kafka(https_service, kafka_bootstrap, topic, pki):
    """A command POSTed over HTTPS, verified against the test CA, is answered 200 and is in Kafka as sent; the
    service says https:// when it starts; plain HTTP on that port gets no answer."""
    body = command("tls-dev", command_type="set_led", payload={"state": "on"})
    response = httpx.post(https_service.url + "/api/v1/commands", json=body, verify=pki.context(cert=False))
    assert response.status_code == 200, response.text
    answer = response.json()
    [record] = read_topic(kafka_bootstrap, topic, 1)
    value = json.loads(record.value)
    assert record.key == b"tls-dev" and (record.partition, record.offset) == (answer["partition"], answer["offset"])
    assert value["request_id"] == answer["request_id"] and value["command_type"] == "set_led"
    assert value["payload"] == body["payload"]
    assert f"Uvicorn running on https://127.0.0.1:{https_service.port}" in https_service.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{https_service.port}/health", timeout=BOUND)


def test_client_and_cli_verify_the_service_against_the_ca(https_service, kafka_bootstrap, topic, pki, monkeypatch):
    """PusherClient, AsyncPusherClient and `pusher` send over HTTPS when given the CA (argument, SSLContext or
    PUSHER_CA_FILE); against another CA, or the system's, they fail at once with TLSFailed (CLI: one line,
    exit 5) and send nothing."""
    monkeypatch.delenv("PUSHER_CA_FILE", raising=False)
    with PusherClient(https_service.url, verify=str(pki.ca)) as client:
        assert client.push_command("tls-client", "sync", {}, "mqtt").status == "published"

    async def push() -> str:
        async with AsyncPusherClient(https_service.url, verify=pki.context(cert=False)) as client:
            return (await client.push_command("tls-client", "async", {}, "mqtt")).status

    assert asyncio.run(push()) == "published"
    sent = run_cli("send", "--device", "tls-client", "--type", "cli", "--protocol", "mqtt",
                   url=https_service.url, PUSHER_CA_FILE=str(pki.ca))  # fmt: skip
    assert sent.returncode == 0, sent.stderr

    for verify in (str(pki.other_ca), None):
        with PusherClient(https_service.url, verify=verify) as client, pytest.raises(TLSFailed) as failed:
            client.push_command("tls-client", "never", {}, "mqtt")
        assert "the service's certificate does not verify" in str(failed.value)
    refused = run_cli("send", "--device", "tls-client", "--type", "never", "--protocol", "mqtt",
                      "--ca-file", str(pki.other_ca), url=https_service.url)  # fmt: skip
    assert refused.returncode == 5 and refused.stdout == ""
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith(f"pusher: TLS with {https_service.url}: the service's certificate does not verify")
    values = [json.loads(r.value) for r in read_topic(kafka_bootstrap, topic, 3)]
    assert sorted(v["command_type"] for v in values) == ["async", "cli", "sync"]


def test_handshake_and_request_head_share_the_header_deadline(kafka_bootstrap, topic, tmp_path, pki):
    """Over TLS a socket that never starts its handshake, one that stops inside it, and one that completes it but
    sends no request are all closed by the server (HEADER_TIMEOUT from accept, not asyncio's 60 s); the head
    budget still answers 431; a request after them is served."""
    env = _tls_env(pki, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic)
    service = ServiceProcess(
        tmp_path, ssl_context=pki.context(cert=False), HEADER_TIMEOUT=str(HEADER_TIMEOUT), **env
    ).start()
    try:
        silent = socket.create_connection(("127.0.0.1", service.port), timeout=BOUND)
        halfway = socket.create_connection(("127.0.0.1", service.port), timeout=BOUND)
        halfway.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello record, and no more
        shaken = pki.context(cert=False).wrap_socket(
            socket.create_connection(("127.0.0.1", service.port), timeout=BOUND), server_hostname="127.0.0.1"
        )
        with silent, halfway, shaken:
            for sock in (silent, halfway, shaken):
                with contextlib.suppress(ConnectionResetError):  # closed by the server within BOUND, else a timeout
                    assert sock.recv(1) == b""
        stage, answer = _exchange(
            service.port, pki.context(cert=False), b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
        )
        assert stage == "answer" and answer.startswith(b"HTTP/1.1 431"), answer
        assert httpx.get(service.url + "/health", verify=pki.context(cert=False)).status_code == 200
    finally:
        service.stop()


# --- client certificates (mutual TLS) ---


def test_mutual_tls_takes_a_certificate_of_the_ca_and_still_needs_the_key(mtls_service, kafka_bootstrap, topic, pki):
    """With the client CA's certificate and a key, a command is published (httpx, PusherClient, `pusher` with
    options or PUSHER_CLIENT_CERT/PUSHER_CLIENT_KEY); with the certificate but no key the answer is 401: a
    certificate never stands in for the key."""
    url = mtls_service.url
    with_key = httpx.post(url + "/api/v1/commands", json=command("mtls-dev"), headers={"X-API-Key": WRITER},
                          verify=pki.context())  # fmt: skip
    assert with_key.status_code == 200, with_key.text
    keyless = httpx.post(url + "/api/v1/commands", json=command("mtls-dev", command_type="x"), verify=pki.context())
    assert keyless.status_code == 401, keyless.text
    with PusherClient(url, WRITER, verify=str(pki.ca), cert=(str(pki.client_cert), str(pki.client_key))) as client:
        assert client.push_command("mtls-dev", "client", {}, "mqtt").status == "published"
    options = run_cli("send", "--device", "mtls-dev", "--type", "cli-options", "--protocol", "mqtt",
                      "--ca-file", str(pki.ca), "--client-cert", str(pki.client_cert),
                      "--client-key", str(pki.client_key), url=url, PUSHER_API_KEY=WRITER)  # fmt: skip
    assert options.returncode == 0, options.stderr
    from_env = {"PUSHER_CA_FILE": str(pki.ca), "PUSHER_CLIENT_CERT": str(pki.client_both)}
    environment = run_cli("send", "--device", "mtls-dev", "--type", "cli-env", "--protocol", "mqtt", url=url,
                          PUSHER_API_KEY=WRITER, **from_env)  # fmt: skip
    assert environment.returncode == 0, environment.stderr
    no_key = run_cli("send", "--device", "mtls-dev", "--type", "x", "--protocol", "mqtt", url=url, **from_env)
    assert no_key.returncode == 3, no_key.stderr
    values = [json.loads(r.value) for r in read_topic(kafka_bootstrap, topic, 4)]
    assert sorted(v["command_type"] for v in values) == ["cli-env", "cli-options", "client", "reboot"]


@pytest.mark.parametrize("tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_mutual_tls_refuses_a_client_without_a_certificate_of_its_ca(mtls_service, pki, tls):
    """No client certificate, or one from another CA: the handshake is refused and no request reaches the app
    (in TLS 1.2 the client's handshake fails; in 1.3 the refusal ends the connection before any answer). The
    client library reports it as no answer, naming client certificates."""
    served = _request_lines(mtls_service)
    for context in (pki.context(cert=False, tls=tls), pki.other_context(tls=tls)):
        stage, answer = _exchange(mtls_service.port, context)
        assert not answer or isinstance(answer, Exception), answer
        if tls == ssl.TLSVersion.TLSv1_2:
            assert stage == "handshake", answer
    # the right certificate, after them, is served; its line is the only one they all added to the log
    assert _exchange(mtls_service.port, pki.context(tls=tls))[1].startswith(b"HTTP/1.1 200")
    wait_for(lambda: _request_lines(mtls_service) > served, timeout=BOUND)
    assert _request_lines(mtls_service) == served + 1
    client = PusherClient(mtls_service.url, WRITER, verify=str(pki.ca), retry=RetryPolicy(attempts=1))
    with client, pytest.raises(Unavailable, match="closes connections without one it trusts"):
        client.get_status("any")


def _healthcheck(service: ServiceProcess, **extra: str) -> subprocess.CompletedProcess[str]:
    """`python -m healthcheck` (the image's HEALTHCHECK) with the service's settings."""
    env = {k: v for k, v in service.env.items() if not k.startswith("PUSHER_")}
    return subprocess.run([sys.executable, "-m", "healthcheck"], cwd=ROOT, env={**env, **extra},
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_healthcheck_speaks_https(https_service):
    """The healthcheck asks /health over HTTPS when the service serves it, and fails once the service is gone."""
    served = _healthcheck(https_service)
    assert served.returncode == 0, served.stderr
    https_service.stop()
    gone = _healthcheck(https_service)
    assert gone.returncode != 0 and gone.stderr.startswith("pusher healthcheck: ")


def test_healthcheck_presents_the_client_certificate_where_one_is_required(mtls_service, pki):
    """Where client certificates are required the healthcheck passes with PUSHER_CLIENT_CERT (and _KEY), and
    fails without."""
    given = _healthcheck(mtls_service, PUSHER_CLIENT_CERT=str(pki.client_cert), PUSHER_CLIENT_KEY=str(pki.client_key))
    assert given.returncode == 0, given.stderr
    refused = _healthcheck(mtls_service)
    assert refused.returncode != 0 and refused.stderr.startswith("pusher healthcheck: ")
