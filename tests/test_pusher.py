"""The HTTP layer in process: error bodies, limits, content types, ids — Kafka deliberately unreachable."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time
import uuid

import msgspec
import pytest
from helpers import ROOT, command
from kafka_local import free_port
from starlette.routing import Route
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from dispatch import wait_done
from journal import Journal
from pusher import create_app
from pusher_client.wire import new_id
from settings import load_settings

PROBLEM = "application/problem+json"


async def _boom(request):
    raise RuntimeError("secret internal detail /etc/passwd")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The app with its lifespan running, pointed at a port where no Kafka listens."""
    settings = load_settings(
        {
            "JOURNAL_PATH": str(tmp_path_factory.mktemp("journal") / "journal.db"),
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "KAFKA_PRODUCER_TIMEOUT": "1",
            "PUBLISH_TIMEOUT": "1",
            "MAX_BATCH": "3",
            "MAX_BODY_BYTES": "4096",
            "DEFAULT_TTL": "3600",
        },
        env_file="/nonexistent",
    )
    app = create_app(settings)
    app.router.routes.append(Route("/boom", _boom))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"].startswith("/problems/")
    assert body["http_request_id"] == response.headers["x-request-id"]
    return body


def test_validation_error_names_the_field(client):
    """A 422 lists each broken field with its path and a readable message."""
    body = _problem(client.post("/api/v1/commands", json=command(qos=9, protocol="mqtt")), 422)
    assert body["errors"] == [{"loc": "$.qos", "msg": "Expected `int` <= 2"}]
    body = _problem(client.post("/api/v1/commands", json=command(protocol="coap", qos=1, retain=True)), 422)
    assert [e["loc"] for e in body["errors"]] == ["$.qos", "$.retain"]


def test_malformed_body_is_400_with_position(client):
    """Broken JSON is a 400 that says where."""
    body = _problem(
        client.post("/api/v1/commands", content=b'{"device_id": }', headers={"content-type": "application/json"}), 400
    )
    assert "byte 14" in body["detail"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_other_content_types_are_415(client, content_type):
    """Only JSON and MessagePack bodies are read."""
    headers = {"content-type": content_type} if content_type else {}
    _problem(client.post("/api/v1/commands", content=b"{}", headers=headers), 415)


def test_json_with_charset_is_accepted(client):
    """`application/json; charset=utf-8` is JSON (the 422 proves the body was read)."""
    response = client.post(
        "/api/v1/commands", content=b'{"device_id": ""}', headers={"content-type": "application/json; charset=utf-8"}
    )
    _problem(response, 422)


def test_oversized_body_is_413_before_reading(client):
    """A Content-Length over MAX_BODY_BYTES is refused without reading the body."""
    big = json.dumps(command(payload={"blob": "x" * 5000})).encode()
    body = _problem(client.post("/api/v1/commands", content=big, headers={"content-type": "application/json"}), 413)
    assert "4096" in body["detail"]


def test_oversized_chunked_body_is_413(client):
    """A chunked body is counted as it streams and stopped at the limit."""

    def chunks():
        yield b'{"device_id": "d", "payload": {"blob": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}}'

    response = client.post("/api/v1/commands", content=chunks(), headers={"content-type": "application/json"})
    _problem(response, 413)


def test_unknown_route_and_method_are_problems(client):
    """404 and 405 answer problem+json too."""
    _problem(client.get("/api/v2/nothing"), 404)
    response = client.delete("/api/v1/commands")
    _problem(response, 405)
    assert "POST" in response.headers["allow"]


def test_unexpected_error_is_a_fixed_500_with_the_traceback_only_in_the_log(client):
    """An internal error never leaks its text; the log has the traceback under the request id."""
    with capture_logs() as logs:
        response = client.get("/boom", headers={"x-request-id": "trace-me-1"})
    body = _problem(response, 500)
    assert "secret" not in response.text and "passwd" not in response.text
    assert body["http_request_id"] == "trace-me-1"
    [error] = [entry for entry in logs if entry["event"] == "unhandled error"]
    assert error["log_level"] == "error" and error["exc_info"]


def test_request_id_is_echoed_or_generated(client):
    """A sane X-Request-ID comes back; an unsafe one is replaced."""
    assert client.get("/health", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = client.get("/health", headers={"x-request-id": "bad id\r\n"}).headers["x-request-id"]
    assert len(generated) == 32


def test_one_summary_line_per_request(client):
    """Each request logs method, route template, status and duration."""
    with capture_logs() as logs:
        client.get("/api/v1/commands/abc/status")
    [line] = [entry for entry in logs if entry["event"] == "request"]
    assert line["method"] == "GET" and line["route"] == "/api/v1/commands/{request_id}/status"
    assert line["status"] == 404 and line["duration_ms"] >= 0


def test_kafka_unreachable_is_202_stored_at_once(client):
    """With no broker, a valid command is journaled and answered 202 at once (no wait for Kafka)."""
    response = client.post("/api/v1/commands", json=command())
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["success"] is True and body["status"] == "accepted" and body["request_id"]
    assert float(client.get(f"/api/v1/commands/{body['request_id']}/status").json()["history"][0]["at"][:4]) > 2000


def test_msgpack_body_reaches_the_send_path(client):
    """A valid MessagePack command passes validation and is stored."""
    response = client.post(
        "/api/v1/commands", content=msgspec.msgpack.encode(command()), headers={"content-type": "application/msgpack"}
    )
    assert response.status_code == 202
    response = client.post("/api/v1/commands", content=b"\xc1", headers={"content-type": "application/msgpack"})
    _problem(response, 400)


def test_batch_envelope_errors(client):
    """An invalid envelope, an empty list or more than MAX_BATCH commands is a 422 for the whole batch."""
    _problem(client.post("/api/v1/commands/batch", json={"commands": "x"}), 422)
    body = _problem(client.post("/api/v1/commands/batch", json={"commands": []}), 422)
    assert body["errors"][0]["loc"] == "$.commands"
    body = _problem(client.post("/api/v1/commands/batch", json={"commands": [command()] * 4}), 422)
    assert "MAX_BATCH=3" in body["errors"][0]["msg"]


def test_batch_items_fail_alone_when_kafka_is_down(client):
    """Each item gets its own result: valid ones stored ('accepted'), invalid ones 'rejected' with field errors."""
    response = client.post("/api/v1/commands/batch", json={"commands": [command(), command(protocol="x")]})
    assert response.status_code == 207
    body = response.json()
    assert (body["successful"], body["failed"]) == (1, 1)
    first, second = body["results"]
    assert first["status"] == "accepted" and first["success"] and first["request_id"]
    assert second["status"] == "rejected" and second["error"]["errors"][0]["loc"] == "$.commands[1].protocol"


def test_batch_all_stored_is_202(client):
    """A batch whose items are all stored but not yet in Kafka answers 202."""
    response = client.post("/api/v1/commands/batch", json={"commands": [command("b1"), command("b2")]})
    assert response.status_code == 202
    assert [r["status"] for r in response.json()["results"]] == ["accepted", "accepted"]


def test_probes_without_kafka(client):
    """Liveness and readiness stay 200 (the journal accepts); readiness says Kafka is down and why."""
    assert client.get("/health").json() == {"status": "healthy"}
    body = client.get("/ready").json()
    assert body["ready"] is True and body["kafka_connected"] is False and body["journal_writable"] is True
    assert "Kafka unavailable" in body["reason"] and body["backlog"] >= 1


def test_security_headers_and_no_server_banner(client):
    """Every answer carries nosniff; problem bodies never carry a server version."""
    response = client.get("/health")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "server" not in response.headers


def test_openapi_and_docs_are_served(client):
    """/openapi.json is the document; /docs and its assets come from the app itself, no CDN."""
    doc = client.get("/openapi.json").json()
    assert doc["openapi"] == "3.1.0" and "/api/v1/commands" in doc["paths"]
    page = client.get("/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in page and "http" not in page.split("<body>")[1]
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert "SwaggerUIBundle" in client.get("/docs/init.js").text


def test_default_ttl_applies_when_none_is_given(client):
    """DEFAULT_TTL gives a command without ttl_seconds/expires_at an expiry."""
    body = client.post("/api/v1/commands", json=command("ttl")).json()
    assert body["expires_at"] > body["timestamp"]
    assert client.get(f"/api/v1/commands/{body['request_id']}/status").json()["expires_at"] == body["expires_at"]


def test_replay_and_conflict_work_without_kafka(client):
    """The journal decides idempotency: a replay is marked, another body is a 409 problem."""
    first = client.post("/api/v1/commands", json=command("rp"), headers={"Idempotency-Key": "unit-1"})
    again = client.post("/api/v1/commands", json=command("rp"), headers={"Idempotency-Key": "unit-1"})
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.headers["idempotent-replayed"] == "true" and again.json()["replayed"] is True
    assert again.json()["request_id"] == first.json()["request_id"]
    body = _problem(client.post("/api/v1/commands", json=command("x"), headers={"Idempotency-Key": "unit-1"}), 409)
    assert first.json()["request_id"] in body["detail"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "tab\there"])
def test_bad_idempotency_key_is_422(client, key):
    """An Idempotency-Key must be 1–255 visible ASCII characters."""
    body = _problem(client.post("/api/v1/commands", json=command(), headers={"Idempotency-Key": key}), 422)
    assert body["errors"][0]["loc"] == "header Idempotency-Key"


def test_prefer_respond_async_is_acknowledged(client):
    """`Prefer: respond-async` answers 202 with Preference-Applied."""
    response = client.post("/api/v1/commands", json=command(), headers={"Prefer": "wait=5, respond-async"})
    assert response.status_code == 202 and response.headers["preference-applied"] == "respond-async"


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"limit": "0"}, "query.limit"),
        ({"status": "lost"}, "query.status"),
        ({"status": "null"}, "query.status"),
        ({"before": "x"}, "query.before"),
        ({"before": str(2**64)}, "query.before"),
    ],
)
def test_list_query_is_validated(client, params, loc):
    """Bad list parameters are a 422 naming the parameter."""
    body = _problem(client.get("/api/v1/commands", params=params), 422)
    assert body["errors"][0]["loc"] == loc


def test_huge_content_length_is_413_not_500(client):
    """A Content-Length of thousands of digits is refused as too large."""
    response = client.post(
        "/api/v1/commands",
        content=b"{}",
        headers={"content-type": "application/json", "content-length": "0" * 5000 + "2"},
    )
    assert response.status_code in (400, 413)


def test_one_line_per_command_without_payload(client):
    """A single command's id, device, type, outcome and traceparent join its request's line; a batch adds a
    line per command; the payload stays out of the log."""
    with capture_logs() as logs:
        client.post("/api/v1/commands", json=command("logged", payload={"secret_value": 42}))
        client.post("/api/v1/commands/batch", json={"commands": [command("b1"), command("b2")]})
    single, batch = [entry for entry in logs if entry["event"] == "request"]
    assert single["device_id"] == "logged" and single["command_type"] == "reboot" and single["outcome"] == "accepted"
    assert single["status"] == 202 and single["command_id"] and single["traceparent"].startswith("00-")
    assert "device_id" not in batch
    lines = [entry for entry in logs if entry["event"] == "command"]
    assert [(line["device_id"], line["outcome"]) for line in lines] == [("b1", "accepted"), ("b2", "accepted")]
    assert "secret_value" not in json.dumps(logs, default=str)


def test_log_lines_of_one_loop_pass_are_written_together_and_in_order(tmp_path):
    """Lines logged on a running event loop reach stdout whole and in order at the end of the loop's pass, one
    write for all of them; lines logged off the loop go at once, after any still held; none is lost at exit."""
    script = """
import asyncio, os, structlog
from logs import configure_logging
configure_logging("INFO", "json")
log = structlog.get_logger("t")
log.info("before")
sizes = {}

async def main():
    sizes["start"] = os.fstat(1).st_size
    for n in range(3):
        log.info("command", n=n)
    sizes["held"] = os.fstat(1).st_size
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    sizes["written"] = os.fstat(1).st_size
    log.info("last on the loop")

asyncio.run(main())
log.info("after")
print("sizes", sizes["start"], sizes["held"], sizes["written"], flush=True)
"""
    out = tmp_path / "out.log"
    with out.open("wb") as stdout:
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, stdout=stdout, check=True, timeout=30)
    *lines, sizes = out.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert [(e["event"], e.get("n")) for e in events] == [("before", None)] + [("command", n) for n in range(3)] + [
        ("last on the loop", None),
        ("after", None),
    ]
    start, held, written = map(int, sizes.split()[1:])
    assert start == held == len(lines[0]) + 1  # nothing of the three was written inside the pass
    assert written == sum(len(line) + 1 for line in lines[:4])


def test_status_shows_the_effective_configuration(client):
    """/api/v1/status includes the configuration in force (secrets would be masked) and brokers seen."""
    body = client.get("/api/v1/status").json()
    assert body["configuration"]["max_batch"] == 3 and body["configuration"]["publish_timeout"] == 1.0
    assert body["brokers"] == 0 and body["kafka_connected"] is False


def test_generated_ids_are_version_7_uuids_that_sort_by_when_they_were_made():
    """Request ids, fan-out ids and the client's idempotency keys: what uuid.UUID would print, version 7 with
    the time of making in the first 48 bits, never repeating, and a later millisecond sorts later."""
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(10_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 10_000
    for text in ids[:200]:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 7, uuid.RFC_4122)
        assert before <= parsed.int >> 80 <= after
    # as text they sort by the millisecond they were made in: the journal's index order is time order
    stamps = [uuid.UUID(text).int >> 80 for text in sorted(ids)]
    assert stamps == sorted(stamps)
    time.sleep(0.002)
    assert new_id() > max(ids)


def test_wait_done_returns_when_all_are_done_or_at_the_timeout_and_cancels_nothing():
    """The send path's wait: all done ends it early; the timeout ends it without touching the futures."""

    async def scenario() -> tuple[float, float, bool, bool]:
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        loop.call_later(0.05, first.set_result, 1)
        loop.call_later(0.1, second.set_result, 2)
        started = loop.time()
        await wait_done((first, second), timeout=5)
        early = loop.time() - started
        never = loop.create_future()
        started = loop.time()
        await wait_done((never, first), timeout=0.2)
        late = loop.time() - started
        await wait_done((), timeout=5)
        return early, late, never.cancelled(), never.done()

    early, late, cancelled, done = asyncio.run(scenario())
    assert 0.09 <= early < 1
    assert 0.19 <= late < 1
    assert not cancelled and not done


def test_a_202_says_where_to_follow_the_command(client):
    """A command stored for later answers 202 with Location: its status URL, which answers; a replayed 202 says
    the same; a batch's 202 names no single resource, so it carries no Location."""
    response = client.post("/api/v1/commands", json=command("located"), headers={"Idempotency-Key": "loc-1"})
    assert response.status_code == 202
    request_id = response.json()["request_id"]
    assert response.headers["location"] == f"/api/v1/commands/{request_id}/status"
    assert client.get(response.headers["location"]).json()["request_id"] == request_id
    again = client.post("/api/v1/commands", json=command("located"), headers={"Idempotency-Key": "loc-1"})
    assert again.status_code == 202 and again.headers["location"] == response.headers["location"]
    batch = client.post("/api/v1/commands/batch", json={"commands": [command("lb1"), command("lb2")]})
    assert batch.status_code == 202 and "location" not in batch.headers


@pytest.mark.parametrize("media_type", ["application/msgpack", "application/x-msgpack", "application/vnd.msgpack"])
def test_command_answers_come_in_msgpack_when_asked(client, media_type):
    """Accept naming a MessagePack type the service reads gets the command, batch, status and list answers in
    it, with that type; problems stay problem+json."""
    accept = {"accept": media_type}
    sent = client.post("/api/v1/commands", json=command("packed"), headers=accept)
    assert (sent.status_code, sent.headers["content-type"]) == (202, media_type)
    assert "accept" in sent.headers["vary"].lower()
    body = msgspec.msgpack.decode(sent.content)
    assert body["status"] == "accepted" and body["success"] is True
    status = client.get(f"/api/v1/commands/{body['request_id']}/status", headers=accept)
    assert status.headers["content-type"] == media_type
    assert msgspec.msgpack.decode(status.content)["request_id"] == body["request_id"]
    listed = client.get("/api/v1/commands", params={"device_id": "packed"}, headers=accept)
    assert listed.headers["content-type"] == media_type
    assert body["request_id"] in [item["request_id"] for item in msgspec.msgpack.decode(listed.content)["items"]]
    batch = client.post("/api/v1/commands/batch", json={"commands": [command(), command(protocol="x")]}, headers=accept)
    assert (batch.status_code, batch.headers["content-type"]) == (207, media_type)
    assert [r["status"] for r in msgspec.msgpack.decode(batch.content)["results"]] == ["accepted", "rejected"]
    _problem(client.post("/api/v1/commands", json=command(protocol="x"), headers=accept), 422)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("application/json", "application/json"),
        ("application/json, application/msgpack", "application/json"),
        ("application/msgpack;q=0.5, application/json", "application/json"),
        ("application/msgpack;q=0", "application/json"),
        ("text/html", "application/json"),
        ("application/msgpack, application/json;q=0.9", "application/msgpack"),
        ("application/msgpack, */*", "application/msgpack"),
    ],
)
def test_json_stays_the_answer_unless_msgpack_is_preferred(client, accept, expected):
    """JSON answers unless the Accept header prefers a MessagePack type (by q) to application/json."""
    headers = {"accept": accept} if accept else {}
    response = client.post("/api/v1/commands", json=command(), headers=headers)
    assert response.status_code == 202 and response.headers["content-type"] == expected
    decoded = response.json() if expected == "application/json" else msgspec.msgpack.decode(response.content)
    assert decoded["status"] == "accepted"


def _samples(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and labels."""
    samples = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        name, _, labels = metric.partition("{")
        pairs = tuple(sorted(tuple(pair.split("=", 1)) for pair in labels.rstrip("}").split(",") if pair))
        samples[(name, tuple((k, v.strip('"')) for k, v in pairs))] = float(value)
    return samples


def _requests(samples: dict, route: str, status: str) -> float:
    return samples.get(("pusher_http_requests_total", (("method", "POST"), ("route", route), ("status", status))), 0.0)


def test_every_refused_command_request_counts_once_under_its_route(client):
    """A 413 decided by Content-Length counts under its route as a chunked one does; 413, 415, 422, 400 and 409
    each count one rejected command, a batch refused whole counts one, a batch counts each refused item."""
    rejected = ("pusher_commands_total", (("outcome", "rejected"),))
    before = _samples(client)
    json_type = {"content-type": "application/json"}
    big = json.dumps(command(payload={"blob": "x" * 5000})).encode()

    def chunks():
        yield big[:100]
        yield big[100:]

    client.post("/api/v1/commands", content=big, headers=json_type)  # 413 by Content-Length
    client.post("/api/v1/commands", content=chunks(), headers=json_type)  # 413 while streaming
    client.post("/api/v1/commands", content=b"{}", headers={"content-type": "text/plain"})  # 415
    client.post("/api/v1/commands", json=command(protocol="x"))  # 422
    client.post("/api/v1/commands", content=b"{", headers=json_type)  # 400
    client.post("/api/v1/commands", json=command("c1", request_id="counted-once"))
    client.post("/api/v1/commands", json=command("c2", request_id="counted-once"))  # 409
    client.post("/api/v1/commands/batch", content=big, headers=json_type)  # 413, the batch whole
    items = [command(), command(protocol="x"), command("c3", request_id="counted-once")]
    assert client.post("/api/v1/commands/batch", json={"commands": items}).status_code == 207  # two refused items
    after = _samples(client)
    assert _requests(after, "/api/v1/commands", "413") - _requests(before, "/api/v1/commands", "413") == 2
    assert _requests(after, "unmatched", "413") == _requests(before, "unmatched", "413")
    assert _requests(after, "/api/v1/commands/batch", "413") - _requests(before, "/api/v1/commands/batch", "413") == 1
    assert after[rejected] - before.get(rejected, 0.0) == 6 + 1 + 2


def test_nothing_but_the_forwarder_holds_the_commands_recovered_at_start(tmp_path, monkeypatch):
    """The commands a start recovers from the journal are the forwarder's alone: once it lets one go (published,
    expired), it is freed. A list kept by the start-up for the life of the process held every one of them, with
    the record read back into it to be sent: RSS grew by ~1.6 KB per command as a 100,000-command backlog
    drained (116 -> 275 MB)."""
    settings = load_settings(
        {"JOURNAL_PATH": str(tmp_path / "journal.db"), "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"},
        env_file="/nonexistent",
    )
    with TestClient(create_app(settings)) as client:  # no Kafka: the commands wait in the journal
        for i in range(20):
            assert client.post("/api/v1/commands", json=command(f"device_{i}")).status_code == 202
    opened = []
    original = Journal.open

    def open_and_keep(journal):
        opened.append(original(journal))
        return opened[-1]

    monkeypatch.setattr(Journal, "open", open_and_keep)
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").status_code == 200
        [recovered] = opened
        assert len(recovered) == 20
        gc.collect()
        here = sys._getframe()
        holders = [r for r in gc.get_referrers(recovered) if r is not opened and r is not here]
        assert holders == [], f"the recovered commands are still held by {holders!r:.300}"
