"""API keys, scopes, device patterns, object-level authorization, rate limits and CORS (app in process)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from helpers import KEYS, ROOT, ServiceProcess, command, keys_file, wait_for
from kafka_local import free_port
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from pusher import create_app
from security import RateLimiter, hash_key
from settings import SettingsError, load_settings


def auth(key_id: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[key_id][0]}


def make_client(tmp_path, keys=KEYS, **env) -> TestClient:
    settings = load_settings(
        {
            "JOURNAL_PATH": str(tmp_path / "journal.db"),
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "KAFKA_PRODUCER_TIMEOUT": "1",
            "PUBLISH_TIMEOUT": "1",
            "API_KEYS_FILE": keys_file(tmp_path / "keys.toml", keys),
            **env,
        },
        env_file="/nonexistent",
    )
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with make_client(tmp_path_factory.mktemp("sec")) as test_client:
        yield test_client


def _problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


def test_missing_unknown_and_wrong_keys_get_the_same_401(client):
    """No key, an unknown key and a key in the query string: one identical 401 with WWW-Authenticate."""
    answers = [
        client.post("/api/v1/commands", json=command()),
        client.post("/api/v1/commands", json=command(), headers={"X-API-Key": "ppk_nope"}),
        client.post("/api/v1/commands", json=command(), headers={"X-API-Key": KEYS["writer"][0] + "x"}),
        client.post(f"/api/v1/commands?api_key={KEYS['writer'][0]}", json=command()),
        client.post("/api/v1/commands", json=command(), headers={"Authorization": "Basic abc"}),
    ]
    bodies = [_problem(r, 401) for r in answers]
    assert len({(b["title"], b["detail"]) for b in bodies}) == 1
    assert all(r.headers["www-authenticate"].startswith("Bearer") for r in answers)


def test_header_and_bearer_both_work(client):
    """X-API-Key and Authorization: Bearer are both accepted."""
    assert client.post("/api/v1/commands", json=command(), headers=auth("writer")).status_code == 202
    bearer = {"Authorization": f"Bearer {KEYS['writer'][0]}"}
    assert client.post("/api/v1/commands", json=command(), headers=bearer).status_code == 202


def test_scopes_are_enforced(client):
    """A read-only key cannot send (403); a write key cannot read metrics (403); admin can do all."""
    _problem(client.post("/api/v1/commands", json=command(), headers=auth("reader")), 403)
    _problem(client.get("/api/v1/metrics", headers=auth("writer")), 403)
    _problem(client.get("/api/v1/status", headers=auth("writer")), 403)
    assert client.get("/api/v1/metrics", headers=auth("admin")).status_code == 200
    assert client.post("/api/v1/commands", json=command(), headers=auth("admin")).status_code == 202


def test_probes_and_docs_stay_open(client):
    """/health, /ready, /openapi.json and /docs need no key."""
    for path in ("/health", "/ready", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path


def test_device_patterns_limit_a_key(client):
    """A key limited to site-a/* gets 403 for other devices, per item in a batch."""
    assert client.post("/api/v1/commands", json=command("site-a/pump-1"), headers=auth("site-a")).status_code == 202
    _problem(client.post("/api/v1/commands", json=command("site-b/pump-1"), headers=auth("site-a")), 403)
    batch = {"commands": [command("site-a/x"), command("site-b/y")]}
    response = client.post("/api/v1/commands/batch", json=batch, headers=auth("site-a"))
    assert response.status_code == 207
    first, second = response.json()["results"]
    assert first["success"] and second["error"]["status"] == 403


def test_other_keys_commands_do_not_exist(client):
    """A status lookup for another key's command is 404; lists show only the key's own commands; admin sees all."""
    mine = client.post("/api/v1/commands", json=command("obj-1"), headers=auth("writer")).json()["request_id"]
    url = f"/api/v1/commands/{mine}/status"
    assert client.get(url, headers=auth("writer")).status_code == 200
    _problem(client.get(url, headers=auth("site-a")), 404)
    assert client.get(url, headers=auth("admin")).status_code == 200
    listed = client.get("/api/v1/commands", params={"device_id": "obj-1"}, headers=auth("site-a")).json()
    assert listed["items"] == []
    assert len(client.get("/api/v1/commands", params={"device_id": "obj-1"}, headers=auth("writer")).json()["items"])


@pytest.mark.parametrize("path", ["/api/v1/commands", "/api/v1/commands/some-id/status"])
def test_authorization_comes_before_the_query_is_read(tmp_path, path):
    """A key without commands:read gets 403 for a list or a status read, whatever its query: who asks is
    decided before what is asked, so a refused key learns nothing from a 422."""
    keys = {"sender": ("ppk_sender-secret", ["commands:write"], None)}
    with make_client(tmp_path, keys=keys) as sender:
        response = sender.get(
            path, params={"limit": "0", "wait_for": "lost"}, headers={"X-API-Key": "ppk_sender-secret"}
        )
        assert _problem(response, 403)["type"] == "/problems/forbidden"


def test_idempotency_keys_are_per_api_key(client):
    """The same Idempotency-Key from two API keys makes two commands; a used request_id is a bare 409 to others."""
    one = client.post("/api/v1/commands", json=command(), headers={**auth("writer"), "Idempotency-Key": "k"}).json()
    two = client.post("/api/v1/commands", json=command(), headers={**auth("admin"), "Idempotency-Key": "k"}).json()
    assert one["request_id"] != two["request_id"]
    client.post("/api/v1/commands", json=command(request_id="shared-id"), headers=auth("writer"))
    other = _problem(client.post("/api/v1/commands", json=command(request_id="shared-id"), headers=auth("admin")), 409)
    assert "shared-id" not in json.dumps(other["detail"]) or "already used" in other["detail"]


def test_key_id_is_logged_the_key_never(client):
    """Log lines carry the key id; the secret appears nowhere."""
    with capture_logs() as logs:
        client.post("/api/v1/commands", json=command(), headers=auth("writer"))
    text = json.dumps(logs, default=str)
    assert KEYS["writer"][0] not in text
    assert any(entry.get("key_id") == "writer" for entry in logs)


def test_metrics_public_opens_metrics_only(tmp_path):
    """METRICS_PUBLIC=true opens /api/v1/metrics and /api/v1/status, nothing else."""
    with make_client(tmp_path, METRICS_PUBLIC="true") as public:
        assert public.get("/api/v1/metrics").status_code == 200
        assert public.get("/api/v1/status").status_code == 200
        _problem(public.post("/api/v1/commands", json=command()), 401)


def test_rate_limit_per_key_with_headers(tmp_path):
    """Over RATE_LIMIT: 429 with Retry-After and RateLimit-*; a batch costs one unit per command; keys are apart."""
    with make_client(tmp_path, RATE_LIMIT="4/minute") as limited:
        first = limited.post("/api/v1/commands", json=command(), headers=auth("writer"))
        assert first.headers["ratelimit-limit"] == "4" and first.headers["ratelimit-remaining"] == "3"
        batch = limited.post("/api/v1/commands/batch", json={"commands": [command()] * 3}, headers=auth("writer"))
        assert batch.status_code == 202 and batch.headers["ratelimit-remaining"] == "0"
        refused = limited.post("/api/v1/commands", json=command(), headers=auth("writer"))
        body = _problem(refused, 429)
        assert body["type"] == "/problems/rate-limited"
        assert int(refused.headers["retry-after"]) >= 1 and refused.headers["ratelimit-remaining"] == "0"
        assert limited.post("/api/v1/commands", json=command(), headers=auth("admin")).status_code == 202


def test_rate_limit_per_address_without_auth(tmp_path):
    """Without API keys the limit applies per client address."""
    settings = load_settings(
        {
            "JOURNAL_PATH": str(tmp_path / "j.db"),
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "KAFKA_PRODUCER_TIMEOUT": "1",
            "RATE_LIMIT": "2/minute",
        },
        env_file="/nonexistent",
    )
    with TestClient(create_app(settings)) as open_client:
        codes = [open_client.post("/api/v1/commands", json=command()).status_code for _ in range(3)]
    assert codes == [202, 202, 429]


@pytest.fixture
def redis_url(tmp_path):
    """A real redis-server (Debian's package) on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def test_rate_limit_shared_through_redis(tmp_path, redis_url):
    """Two instances sharing RATE_LIMIT_STORAGE=redis:// share one limit."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env = {"RATE_LIMIT": "3/minute", "RATE_LIMIT_STORAGE": redis_url}
    with make_client(tmp_path / "a", **env) as one, make_client(tmp_path / "b", **env) as two:
        codes = [
            c.post("/api/v1/commands", json=command(), headers=auth("writer")).status_code for c in (one, two, one)
        ]
        assert codes == [202, 202, 202]
        _problem(two.post("/api/v1/commands", json=command(), headers=auth("writer")), 429)


def test_cors_allow_list(tmp_path):
    """CORS is off by default; CORS_ORIGINS allows exactly those origins; '*' is refused."""
    with make_client(tmp_path, CORS_ORIGINS="https://console.example") as cors:
        allowed = cors.options(
            "/api/v1/commands",
            headers={"Origin": "https://console.example", "Access-Control-Request-Method": "POST"},
        )
        assert allowed.headers["access-control-allow-origin"] == "https://console.example"
        other = cors.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with pytest.raises(SettingsError, match="CORS_ORIGINS"):
        load_settings({"CORS_ORIGINS": "*"}, env_file="/nonexistent")


def test_keygen_prints_a_key_that_works(tmp_path):
    """`python -m pusher keygen ID SCOPES` prints a ≥256-bit key once and a keys-file entry that accepts it."""
    result = subprocess.run(
        [sys.executable, "-m", "pusher", "keygen", "gw-1", "commands:write"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    secret = next(line.strip() for line in result.stdout.splitlines() if line.strip().startswith("ppk_"))
    assert len(secret) >= 4 + 43
    entry = result.stdout.split("Add to API_KEYS_FILE:")[1]
    assert f'sha256 = "{hash_key(secret)}"' in entry and 'scopes = ["commands:write"]' in entry


def test_sighup_rotates_keys_without_restart(tmp_path):
    """Rewriting API_KEYS_FILE and sending SIGHUP swaps the keys in the running process."""
    path = tmp_path / "keys.toml"
    keys_file(path, {"old": ("ppk_old-secret", ["commands:write"], None)})
    service = ServiceProcess(
        tmp_path, API_KEYS_FILE=str(path), KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}"
    ).start(wait_ready=False)
    try:
        url = service.url + "/api/v1/commands"
        assert httpx.post(url, json=command(), headers={"X-API-Key": "ppk_old-secret"}).status_code == 202
        keys_file(path, {"new": ("ppk_new-secret", ["commands:write"], None)})
        os.kill(service.process.pid, signal.SIGHUP)
        wait_for(lambda: httpx.post(url, json=command(), headers={"X-API-Key": "ppk_new-secret"}).status_code == 202)
        assert httpx.post(url, json=command(), headers={"X-API-Key": "ppk_old-secret"}).status_code == 401
        path.write_text("not toml [")
        os.kill(service.process.pid, signal.SIGHUP)
        wait_for(lambda: "api keys not reloaded" in service.log())
        assert httpx.post(url, json=command(), headers={"X-API-Key": "ppk_new-secret"}).status_code == 202
    finally:
        service.stop()


def test_network_bind_without_keys_refuses_to_start(tmp_path):
    """No API keys on a non-loopback address: the process refuses to start, with one line naming the fix."""
    env = {**os.environ, "API_HOST": "0.0.0.0", "ENV_FILE": "/nonexistent", "JOURNAL_PATH": str(tmp_path / "j.db")}
    env.pop("API_KEYS_FILE", None)
    env.pop("AUTH_ENABLED", None)
    result = subprocess.run(
        [sys.executable, "-m", "pusher"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pusher: API_HOST=0.0.0.0 serves the network without API keys: set API_KEYS_FILE (`make keygen` writes "
        "one), or AUTH_ENABLED=false to run it open on purpose"
    ]
    assert not (tmp_path / "j.db").exists()  # nothing was opened


def test_network_bind_open_on_purpose_starts_and_says_so(tmp_path):
    """AUTH_ENABLED=false, said explicitly, runs open on a network address, with a warning line at start."""
    service = ServiceProcess(
        tmp_path, API_HOST="0.0.0.0", AUTH_ENABLED="false", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}"
    )
    service.url = f"http://127.0.0.1:{service.port}"
    service.start(wait_ready=False)
    try:
        assert "AUTH_ENABLED=false: anyone who reaches this port can command every device" in service.log()
        assert httpx.post(service.url + "/api/v1/commands", json=command()).status_code == 202
    finally:
        service.stop()


def test_slow_body_is_408(tmp_path):
    """A body that trickles in slower than BODY_TIMEOUT is cut off with 408."""
    service = ServiceProcess(tmp_path, BODY_TIMEOUT="1", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}").start(
        wait_ready=False
    )
    try:
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
            sock.sendall(
                b"POST /api/v1/commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"device_id"'
            )
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408")
    finally:
        service.stop()


def test_concurrency_limit_answers_503(tmp_path):
    """Past LIMIT_CONCURRENCY open requests the next answers 503 problem+json at once instead of queueing
    without bound; the liveness probe still answers."""
    service = ServiceProcess(
        tmp_path, LIMIT_CONCURRENCY="2", BODY_TIMEOUT="5", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}"
    ).start(wait_ready=False)
    slow = []
    try:
        for _ in range(2):  # two requests whose bodies never finish hold both slots
            sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
            sock.sendall(b"POST /api/v1/commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")  # fmt: skip
            slow.append(sock)
        refused = wait_for(lambda: (r := httpx.get(service.url + "/api/v1/status")).status_code == 503 and r)
        assert refused.headers["content-type"] == "application/problem+json" and refused.headers["retry-after"]
        assert httpx.get(service.url + "/health").status_code == 200
    finally:
        for sock in slow:
            sock.close()
        service.stop()


def test_refused_requests_spend_nothing_and_oversized_batches_are_422(tmp_path):
    """A request refused by one limit does not use up another; a batch larger than a window can never fit (422)."""
    with make_client(tmp_path, RATE_LIMIT="3/minute;1/second") as limited:
        post = lambda: limited.post("/api/v1/commands", json=command(), headers=auth("writer")).status_code  # noqa: E731
        assert post() == 202
        assert [post() for _ in range(3)] == [429, 429, 429]
        time.sleep(1.1)
        assert post() == 202
        time.sleep(1.1)
        assert post() == 202  # the minute had room for three: the refused ones spent nothing
        batch = limited.post("/api/v1/commands/batch", json={"commands": [command()] * 5}, headers=auth("admin"))
        assert _problem(batch, 422)["errors"][0]["msg"].startswith("More commands than RATE_LIMIT")
        # One more than a window holds can never fit either: 422, not a 429 a client would retry for ever.
        two = [command("site-a/two")] * 2
        over = limited.post("/api/v1/commands/batch", json={"commands": two}, headers=auth("site-a"))
        assert _problem(over, 422)["errors"][0]["loc"] == "$.commands"


def test_unreachable_redis_is_a_503_not_a_500(tmp_path):
    """When RATE_LIMIT_STORAGE does not answer, requests get a retriable 503."""
    with make_client(tmp_path, RATE_LIMIT="10/second", RATE_LIMIT_STORAGE=f"redis://127.0.0.1:{free_port()}") as c:
        response = c.post("/api/v1/commands", json=command(), headers=auth("writer"))
        assert _problem(response, 503)["type"] == "/problems/rate-limiter-unavailable"
        assert response.headers["retry-after"]


def test_a_bug_in_the_rate_limiter_is_not_blamed_on_its_storage():
    """Only the storage's own errors become 503 rate-limiter-unavailable: any other error stays the bug it is."""
    limiter = RateLimiter("10/second", "memory://")

    async def broken(*args, **kwargs):
        raise KeyError("a bug, not an outage")

    limiter.limiter.test = broken
    with pytest.raises(KeyError):
        asyncio.run(limiter.hit("key:writer", 1))


def test_ready_shows_figures_only_to_operators(client, tmp_path):
    """With keys on, /ready tells anyone whether it is ready, but not the topic or the backlog."""
    body = client.get("/ready").json()
    assert set(body) <= {"ready", "kafka_connected", "journal_writable", "reason"}
    with make_client(tmp_path, METRICS_PUBLIC="true") as public:
        assert "backlog" in public.get("/ready").json()


def test_invisible_characters_in_device_ids_are_refused(client):
    """Bidi overrides and other format characters cannot disguise a device id."""
    body = _problem(client.post("/api/v1/commands", json=command("site-a/\u202esite-b"), headers=auth("site-a")), 422)
    assert body["errors"][0]["loc"] == "$.device_id"


def test_open_paths_are_exact(client):
    """Only the probe and docs paths are open: near misses need a key like everything else."""
    for path in ("/healthz", "/ready/", "/openapi.jsonx", "/docsx"):
        assert client.get(path).status_code in (401, 307), path


@pytest.mark.parametrize(
    "topic",
    [
        "devices/site-b/pump-1/commands",
        "devices/+/commands",
        "devices/site-a/pump-1/commands/#",
        "$SYS/broker/clients",
        "devices/site-a/pump-1/commands//x",
        "devices/site-a/pump-1/commands/a\x00b",
    ],
)
def test_a_key_reaches_only_its_devices_topics(client, topic):
    """A key limited to site-a/* cannot reach another device through metadata.topic, retained or not: another
    device's topic, a wildcard, a broker topic, an empty level or a NUL is a 422 naming $.metadata.topic."""
    body = command("site-a/pump-1", retain=True, metadata={"topic": topic})
    problem = _problem(client.post("/api/v1/commands", json=body, headers=auth("site-a")), 422)
    assert [error["loc"] for error in problem["errors"]] == ["$.metadata.topic"]


def test_topic_rule_applies_per_batch_item_and_follows_the_template(client, tmp_path):
    """In a batch the bad item alone fails, its path carrying its index; MQTT_TOPIC_TEMPLATE moves the device's
    topic, and a topic below it is accepted."""
    batch = {
        "commands": [
            command("site-a/x", metadata={"topic": "devices/site-a/x/commands/led"}),
            command("site-a/y", metadata={"topic": "devices/site-a/x/commands"}),
        ]
    }
    response = client.post("/api/v1/commands/batch", json=batch, headers=auth("site-a"))
    assert response.status_code == 207
    first, second = response.json()["results"]
    assert first["success"] and second["error"]["errors"][0]["loc"] == "$.commands[1].metadata.topic"
    with make_client(tmp_path, MQTT_TOPIC_TEMPLATE="plant/{device_id}/in") as custom:
        good = command("site-a/x", metadata={"topic": "plant/site-a/x/in/led"})
        assert custom.post("/api/v1/commands", json=good, headers=auth("site-a")).status_code == 202
        old = command("site-a/x", metadata={"topic": "devices/site-a/x/commands"})
        _problem(custom.post("/api/v1/commands", json=old, headers=auth("site-a")), 422)
