"""Connections: idle, slow or endless request heads are cut off, and never lock other clients out."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import ServiceProcess, command, wait_for

HEADER_TIMEOUT = 1.0
LIMIT = 20
# Every wait below is bounded by many times the deadline: a busy machine is slow, never wrong.
BOUND = 30 * HEADER_TIMEOUT


@pytest.fixture
def guarded(kafka_bootstrap: str, topic: str, tmp_path) -> Iterator[ServiceProcess]:
    """The service with a 1 s head deadline, a 1 s keep-alive and room for 20 requests at once."""
    proc = ServiceProcess(
        tmp_path,
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        KAFKA_COMMAND_TOPIC=topic,
        HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        KEEPALIVE_TIMEOUT="1",
        LIMIT_CONCURRENCY=str(LIMIT),
    ).start()
    yield proc
    proc.stop()


def _connect(service: ServiceProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=BOUND)


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length body: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_idle_sockets_are_closed_and_lock_nobody_out(guarded):
    """Twice LIMIT_CONCURRENCY sockets that never send a byte: /health and a command get through once the head
    deadline passes, and the server closes every idle socket."""
    idle = [_connect(guarded) for _ in range(2 * LIMIT)]
    try:

        def served() -> bool:
            try:
                health = httpx.get(guarded.url + "/health", timeout=5)
                sent = httpx.post(guarded.url + "/api/v1/commands", json=command(), timeout=10)
            except httpx.TransportError:
                return False
            return health.status_code == 200 and sent.status_code in (200, 202)

        wait_for(served, timeout=BOUND)
        assert [sock.recv(1) for sock in idle] == [b""] * len(idle)
    finally:
        for sock in idle:
            sock.close()


def test_oversized_head_is_431_problem_json(guarded):
    """A head over MAX_HEADER_BYTES is answered 431 with a problem+json body naming the limit, then closed."""
    with _connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 20_000 + b"\r\n\r\n")
        status, headers, body = _read_answer(sock)
        assert sock.recv(1) == b""
    assert status == 431 and headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    problem = json.loads(body)
    assert problem["type"] == "/problems/headers-too-large" and "MAX_HEADER_BYTES (16384 bytes)" in problem["detail"]


def test_heads_within_the_budget_and_large_bodies_are_served(kafka_bootstrap, topic, tmp_path):
    """A head just under the budget is served; a body larger than the budget in the same packet is a body, not
    a head; each later request on the connection gets a budget of its own. (The byte budget is tested here: the
    time limits are roomy, so a busy machine that answers the batch slowly does not close the connection.)"""
    roomy = ServiceProcess(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic, KEEPALIVE_TIMEOUT="60"
    ).start()
    try:
        _serve_heads_within_the_budget(roomy)
    finally:
        roomy.stop()


def _serve_heads_within_the_budget(service: ServiceProcess) -> None:
    with _connect(service) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 15_000 + b"\r\n\r\n")
        assert _read_answer(sock)[0] == 200
        batch = json.dumps({"commands": [command(f"dev-{i}") for i in range(300)]}).encode()
        assert len(batch) > 16384
        post = b"POST /api/v1/commands/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(post + b"Content-Length: %d\r\n\r\n" % len(batch) + batch)
        status, _, body = _read_answer(sock)
        assert status in (200, 202, 207), body
        assert len(json.loads(body)["results"]) == 300
        for _ in range(2):  # each later request on the connection gets a budget of its own
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 15_000 + b"\r\n\r\n")
            assert _read_answer(sock)[0] == 200


def test_endless_header_lines_get_431_and_memory_stays_flat(guarded):
    """10 MB of header lines that never end: 431 (or a closed connection) after the first MAX_HEADER_BYTES, and
    the service's memory does not grow with what was sent."""
    pid = guarded.process.pid
    before = _rss_mb(pid)
    lines = b"a: b\r\n" * 10_000
    sent = 0
    with _connect(guarded) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            while sent < 10_000_000:
                sock.sendall(lines)
                sent += len(lines)
        except OSError:
            pass  # the server stopped reading and closed: what this test wants
        try:
            answer = _read_to_end(sock)
        except ConnectionResetError:
            answer = b""
    grown = _rss_mb(pid) - before
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert grown < 20, f"RSS grew by {grown:.1f} MB after {sent} bytes of header lines"


def test_slow_head_is_cut_at_the_deadline(guarded):
    """One header byte every 200 ms (slowloris): past HEADER_TIMEOUT the answer is 408 and the connection ends."""
    with _connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + BOUND
        for byte in (b"X-Slow: " + b"s" * 1000)[: int(BOUND / 0.2)]:
            if select.select([sock], [], [], 0.2)[0] or time.monotonic() > deadline:
                break
            sock.send(bytes([byte]))
        answer = _read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"HEADER_TIMEOUT" in answer


def test_keep_alive_serves_requests_then_closes_idle_and_slow_connections(guarded):
    """Two requests on one connection; the idle connection is closed after KEEPALIVE_TIMEOUT; a later request
    whose head stalls gets 408 at the head deadline."""
    with _connect(guarded) as sock:
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = _read_answer(sock)
            assert status == 200 and headers.get("connection") != "close"
        assert sock.recv(1) == b""
    with _connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_answer(sock)[0] == 200
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        answer = _read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
