"""Who is served under load: requests and waiters on budgets of their own, streams that end, revoked keys that
stop waiting, and an anonymous status page that shows no configuration. Every test runs the real process."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from helpers import KEYS, ServiceProcess, command, keys_file, wait_for
from kafka_local import free_port


def _offline(tmp_path, **env: str) -> ServiceProcess:
    """The service with Kafka unreachable: every command waits in the journal (202), so waiters really wait."""
    return ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}", **env).start(wait_ready=False)


def _pending(service: ServiceProcess, headers: dict | None = None) -> str:
    """A command that stays pending (Kafka is down); its request id."""
    response = httpx.post(service.url + "/api/v1/commands", json=command(), headers=headers or {})
    assert response.status_code == 202, response.text
    return response.json()["request_id"]


def _long_poll(service: ServiceProcess, request_id: str, secret: str | None = None) -> socket.socket:
    """A raw long poll for `published`, sent and left open."""
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=30)
    key = f"X-API-Key: {secret}\r\n" if secret else ""
    sock.sendall(
        f"GET /api/v1/commands/{request_id}/status?wait_for=published&timeout=600 HTTP/1.1\r\n"
        f"Host: x\r\n{key}\r\n".encode()
    )
    return sock


def _gauge(service: ServiceProcess, name: str, secret: str | None = None) -> float:
    """One unlabelled sample of /metrics (read with `secret` when metrics need a key)."""
    headers = {"X-API-Key": secret} if secret else {}
    for line in httpx.get(service.url + "/metrics", headers=headers).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _is_problem(response: httpx.Response, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith(slug) and int(response.headers["retry-after"]) >= 1


def test_a_full_waiter_budget_never_locks_out_probes_or_commands(tmp_path):
    """1,000 open long polls (MAX_WAITERS) do not take request slots: /health, /ready and a command POST still
    answer, and only the waiter over the budget is refused, with problem+json and Retry-After."""
    service = _offline(tmp_path, MAX_WAITERS="1000", MAX_WAITERS_PER_KEY="5000", LIMIT_CONCURRENCY="1000")
    polls: list[socket.socket] = []
    try:
        request_id = _pending(service)
        for _ in range(1000):
            polls.append(_long_poll(service, request_id))
        wait_for(lambda: _gauge(service, "pusher_waiters") == 1000, timeout=60)
        assert httpx.get(service.url + "/health").status_code == 200
        assert httpx.get(service.url + "/ready").status_code == 200
        assert httpx.post(service.url + "/api/v1/commands", json=command()).status_code == 202
        over = httpx.get(service.url + f"/api/v1/commands/{request_id}/status?wait_for=published&timeout=600")
        _is_problem(over, 503, "overloaded")
        assert "MAX_WAITERS" in over.json()["detail"]
        # a plain status read is no waiter: it is answered
        assert httpx.get(service.url + f"/api/v1/commands/{request_id}/status").json()["status"] == "accepted"
        assert _gauge(service, "pusher_waiters") == 1000
    finally:
        for sock in polls:
            sock.close()
        service.stop()


def test_a_burst_over_the_request_limit_refuses_only_what_is_over_it(tmp_path):
    """With LIMIT_CONCURRENCY requests in flight, the next ones get 503 problem+json with Retry-After, probes
    still answer, and as soon as a slot is free a request is served again."""
    service = _offline(tmp_path, LIMIT_CONCURRENCY="5", BODY_TIMEOUT="60")
    held = []
    try:
        for _ in range(5):  # five requests whose bodies have not finished hold the five slots
            sock = socket.create_connection(("127.0.0.1", service.port), timeout=30)
            body = json.dumps(command()).encode()
            sock.sendall(
                b"POST /api/v1/commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body[:5]
            )
            held.append((sock, body))
        # every slot is taken once even a scrape of /metrics is refused
        wait_for(lambda: httpx.get(service.url + "/metrics").status_code == 503, timeout=30)
        refused = [httpx.post(service.url + "/api/v1/commands", json=command()) for _ in range(3)]
        for response in refused:
            _is_problem(response, 503, "overloaded")
        assert httpx.get(service.url + "/health").status_code == 200
        assert httpx.get(service.url + "/ready").status_code == 200
        sock, body = held.pop()
        sock.sendall(body[5:])  # one held request completes: it was admitted, so it is served
        assert sock.recv(4096).startswith(b"HTTP/1.1 202")
        sock.close()
        assert httpx.post(service.url + "/api/v1/commands", json=command()).status_code == 202
    finally:
        for sock, _ in held:
            sock.close()
        service.stop()


def test_waiters_per_key_are_capped_with_429(tmp_path):
    """MAX_WAITERS_PER_KEY open waits per key; the next is 429 problem+json, and another key still waits."""
    keys = keys_file(tmp_path / "keys.toml")
    service = _offline(tmp_path, API_KEYS_FILE=keys, MAX_WAITERS_PER_KEY="2")
    writer, admin = KEYS["writer"][0], KEYS["admin"][0]
    polls = []
    try:
        request_id = _pending(service, {"X-API-Key": writer})
        polls += [_long_poll(service, request_id, writer) for _ in range(2)]
        wait_for(lambda: _gauge(service, "pusher_waiters", admin) == 2, timeout=30)
        url = service.url + f"/api/v1/commands/{request_id}/status?wait_for=published&timeout=600"
        _is_problem(httpx.get(url, headers={"X-API-Key": writer}), 429, "too-many-waiters")
        with httpx.stream("GET", service.url + f"/api/v1/commands/{request_id}/events",
                          headers={"X-API-Key": writer}) as stream:  # fmt: skip
            stream.read()
            _is_problem(stream, 429, "too-many-waiters")
        polls.append(_long_poll(service, request_id, admin))
        wait_for(lambda: _gauge(service, "pusher_waiters", admin) == 3, timeout=30)
        polls.pop(0).close()  # one of the writer's waits ends: the writer may wait again
        wait_for(lambda: _gauge(service, "pusher_waiters", admin) == 2, timeout=30)
        polls.append(_long_poll(service, request_id, writer))
        wait_for(lambda: _gauge(service, "pusher_waiters", admin) == 3, timeout=30)
    finally:
        for sock in polls:
            sock.close()
        service.stop()


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Read from `sock` until `marker` has arrived (fail if the server closes first)."""
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}: {received!r}"
        received += chunk
    return received


def test_revoking_a_key_ends_its_streams_and_long_polls(tmp_path):
    """SIGHUP with a keys file that no longer holds the key: its open event stream ends and its long poll
    answers 401; another key's wait goes on."""
    path = tmp_path / "keys.toml"
    keys_file(path)
    service = _offline(tmp_path, API_KEYS_FILE=str(path))
    writer, admin = KEYS["writer"][0], KEYS["admin"][0]
    poll = other = stream = socket.socket()
    try:
        request_id = _pending(service, {"X-API-Key": writer})
        poll = _long_poll(service, request_id, writer)
        other = _long_poll(service, request_id, admin)
        stream = socket.create_connection(("127.0.0.1", service.port), timeout=30)
        stream.sendall(f"GET /api/v1/commands/{request_id}/events HTTP/1.1\r\nHost: x\r\n"
                       f"X-API-Key: {writer}\r\n\r\n".encode())  # fmt: skip
        _read_until(stream, b"event: accepted")
        wait_for(lambda: _gauge(service, "pusher_waiters", admin) == 3, timeout=30)
        keys_file(path, {k: v for k, v in KEYS.items() if k != "writer"})
        os.kill(service.process.pid, signal.SIGHUP)
        answer = _read_until(poll, b"revoked")
        assert answer.startswith(b"HTTP/1.1 401"), answer
        _read_until(stream, b"0\r\n\r\n")  # the chunked stream's end
        wait_for(lambda: _gauge(service, "pusher_waiters", admin) == 1, timeout=30)
        other.settimeout(0.5)
        with pytest.raises(TimeoutError):  # the admin's long poll is still waiting
            other.recv(1)
    finally:
        for sock in (poll, other, stream):
            sock.close()
        service.stop()


def test_clients_that_leave_give_their_wait_back_at_once(tmp_path):
    """A long poll or event stream whose client closes the connection ends then, not at its timeout: waits
    closed while waiting and waits closed right after sending (before the service starts waiting on them)
    both give their slot back, round after round, so the per-client budget is never used up by the gone."""
    service = _offline(tmp_path, MAX_WAITERS_PER_KEY="8")
    try:
        request_id = _pending(service)

        def stream() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", service.port), timeout=30)
            sock.sendall(f"GET /api/v1/commands/{request_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            return sock

        for _ in range(3):
            waiting = [_long_poll(service, request_id) for _ in range(4)] + [stream() for _ in range(4)]
            wait_for(lambda: _gauge(service, "pusher_waiters") == 8, timeout=30)
            for sock in waiting:
                sock.close()
            for _ in range(8):  # gone at once: the close may arrive before the handler waits
                (_long_poll(service, request_id) if _ % 2 else stream()).close()
            wait_for(lambda: _gauge(service, "pusher_waiters") == 0, timeout=30)
        assert httpx.get(service.url + f"/api/v1/commands/{request_id}/status").json()["status"] == "accepted"
    finally:
        service.stop()


def test_event_stream_ends_at_published_without_a_status_topic(service):
    """Without KAFKA_STATUS_TOPIC nothing follows `published`: the stream sends it and ends rather than staying
    open with keep-alives for ever; a reconnect that has it all gets 204."""
    response = httpx.post(service.url + "/api/v1/commands", json=command())
    assert response.status_code == 200 and response.json()["status"] == "published"
    request_id = response.json()["request_id"]
    with httpx.stream("GET", service.url + f"/api/v1/commands/{request_id}/events", timeout=30) as stream:
        text = stream.read().decode()
    assert [line for line in text.splitlines() if line.startswith("event:")] == [
        "event: accepted",
        "event: published",
    ]
    again = httpx.get(service.url + f"/api/v1/commands/{request_id}/events", headers={"Last-Event-ID": "published"})
    assert again.status_code == 204


def test_waiters_wake_when_a_held_command_is_published(service):
    """A long poll and an event stream on a command held by `not_before` answer when it is published, not when
    their time is up: the poll may wait 60 s and the stream 300 s, the client gives them 30 s, the command goes
    out after 2 s."""
    due = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    response = httpx.post(service.url + "/api/v1/commands", json=command(not_before=due))
    assert response.status_code == 202 and response.json()["status"] == "accepted"
    request_id = response.json()["request_id"]
    url = service.url + f"/api/v1/commands/{request_id}"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        poll = pool.submit(httpx.get, url + "/status?wait_for=published&timeout=60", timeout=30)
        stream = pool.submit(_events_within, url + "/events", 30)
        answer, events = poll.result(), stream.result()
    assert answer.status_code == 200 and answer.json()["status"] == "published"
    assert events == ["event: accepted", "event: published"]


def _events_within(url: str, seconds: float) -> list[str]:
    """The `event:` lines a stream sends within `seconds` (keep-alives every 15 s let a silent one be given up)."""
    events, deadline = [], time.monotonic() + seconds
    with httpx.stream("GET", url, timeout=seconds) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                events.append(line)
            if time.monotonic() > deadline:
                break
    return events


def test_event_stream_lifetime_is_capped(tmp_path):
    """EVENT_STREAM_MAX ends a stream of a command that never moves; its waiter slot is given back."""
    service = _offline(tmp_path, EVENT_STREAM_MAX="1")
    try:
        request_id = _pending(service)
        with httpx.stream("GET", service.url + f"/api/v1/commands/{request_id}/events", timeout=30) as stream:
            text = stream.read().decode()  # returns only because the server ends the stream
        assert "event: accepted" in text and "event: published" not in text
        wait_for(lambda: _gauge(service, "pusher_waiters") == 0, timeout=30)
    finally:
        service.stop()


def test_anonymous_status_shows_no_configuration_or_paths(tmp_path):
    """METRICS_PUBLIC opens the figures, not the configuration: no credentials, keys-file or journal path for
    anyone without the admin scope; an admin sees the configuration with URL credentials masked."""
    keys = keys_file(tmp_path / "keys.toml")
    storage = "redis://:hunter2-password@127.0.0.1:6379/0"
    service = _offline(tmp_path, API_KEYS_FILE=keys, METRICS_PUBLIC="true", RATE_LIMIT_STORAGE=storage)
    try:
        secrets = ("hunter2", keys, str(tmp_path), service.env["JOURNAL_PATH"])
        for path in ("/api/v1/status", "/api/v1/metrics", "/metrics", "/ready", "/health"):
            for headers in ({}, {"X-API-Key": KEYS["writer"][0]}):
                response = httpx.get(service.url + path, headers=headers)
                assert response.status_code == 200, (path, response.text)
                assert not any(secret in response.text for secret in secrets), (path, response.text)
        assert httpx.get(service.url + "/api/v1/status").json()["configuration"] is None
        shown = httpx.get(service.url + "/api/v1/status", headers={"X-API-Key": KEYS["admin"][0]}).json()
        assert shown["configuration"]["rate_limit_storage"] == "redis://***@127.0.0.1:6379/0"
        assert "hunter2" not in json.dumps(shown)
    finally:
        service.stop()
