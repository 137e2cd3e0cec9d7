"""Shutting down as operators need it: drain on the first signal, exit at once on the second (real processes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from helpers import ROOT, ServiceProcess, command, status_of, wait_for
from kafka_local import free_port, stop_process
from structlog._output import _get_lock_for_file
from structlog.testing import capture_logs

from pusher import create_app
from server import DrainingServer
from settings import load_settings


def test_first_sigterm_drains_then_exits(tmp_path):
    """SIGTERM: /ready false and new commands 503 (health still 200) for SHUTDOWN_DRAIN, then a clean exit."""
    service = ServiceProcess(tmp_path, SHUTDOWN_DRAIN="2", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}").start(
        wait_ready=False
    )
    assert httpx.post(service.url + "/api/v1/commands", json=command()).status_code == 202
    service.process.send_signal(signal.SIGTERM)
    ready = wait_for(lambda: (r := httpx.get(service.url + "/ready")).status_code == 503 and r, timeout=5)
    assert ready.json()["reason"] == "shutting down"
    refused = httpx.post(service.url + "/api/v1/commands", json=command())
    assert refused.status_code == 503 and refused.json()["type"] == "/problems/shutting-down"
    assert refused.headers["retry-after"]
    assert httpx.get(service.url + "/health").status_code == 200
    started = time.monotonic()
    code = service.process.wait(30)
    assert code == 0 and time.monotonic() - started < 15
    assert '"stopped"' in service.log()


def test_second_sigterm_exits_at_once(tmp_path):
    """A second signal does not wait for the drain or the graceful shutdown."""
    service = ServiceProcess(tmp_path, SHUTDOWN_DRAIN="30", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}").start(
        wait_ready=False
    )
    service.process.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(service.url + "/ready").status_code == 503, timeout=5)
    started = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    service.process.wait(10)
    assert time.monotonic() - started < 20  # far below the 30 s drain it skipped
    assert "second signal: exiting now" in service.log()


def test_sigterm_under_load_keeps_every_answered_command(tmp_path):
    """Clients keep sending through a drain: answers are 2xx or 503, and every 2xx is in the journal after restart."""
    env = {"SHUTDOWN_DRAIN": "1", "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    service = ServiceProcess(tmp_path, **env).start(wait_ready=False)
    accepted: list[str] = []
    codes: set[int] = set()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=service.url, timeout=10) as http:
            while not stop.is_set():
                try:
                    response = http.post("/api/v1/commands", json=command("drain"))
                except httpx.TransportError:
                    return
                codes.add(response.status_code)
                if response.status_code == 202:
                    accepted.append(response.json()["request_id"])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(accepted) > 100, timeout=30, interval=0.05)
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(30) == 0
    stop.set()
    for thread in threads:
        thread.join(10)
    assert codes <= {202, 503} and 503 in codes, codes
    again = ServiceProcess(tmp_path, JOURNAL_PATH=service.env["JOURNAL_PATH"], **env).start(wait_ready=False)
    try:
        assert all(status_of(again.url, rid)["status"] == "accepted" for rid in accepted)
    finally:
        again.stop()


def test_the_signal_handler_takes_no_lock(tmp_path):
    """A SIGTERM can land while the event loop is writing a log line, inside the log writer's non-reentrant
    lock; a handler that logged there would wait for that lock forever, and the service would never exit. The
    handler must return with that lock held, and the loop then logs and stops."""
    settings = load_settings({"JOURNAL_PATH": str(tmp_path / "j.db")}, env_file="/nonexistent")
    server = DrainingServer(uvicorn.Config(create_app(settings)), create_app(settings), drain=0)
    server.loop = asyncio.new_event_loop()
    lock = _get_lock_for_file(sys.stdout)  # the lock structlog's PrintLogger takes around every line
    try:
        with lock:
            handler = threading.Thread(target=server.handle_exit, args=(signal.SIGTERM, None), daemon=True)
            handler.start()
            handler.join(2)
            assert not handler.is_alive(), "the signal handler waits for the log writer's lock"
        with capture_logs() as logs:
            server.loop.run_until_complete(asyncio.sleep(0.01))
        assert server.should_exit and not server.force_exit
        assert [e["event"] for e in logs] == ["signal received: refusing new commands"]
    finally:
        server.loop.close()


def _invalid_request(port: int) -> None:
    """A request line uvicorn cannot parse: uvicorn itself logs a warning about it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP\r\n\r\n")
        sock.recv(4096)


def _uvicorn(tmp_path, port: int, **env: str) -> subprocess.Popen:
    """`uvicorn pusher:app` as a process of its own, stdout and stderr each into a file."""
    env = {
        **os.environ,
        "LOG_FORMAT": "json",
        "ENV_FILE": "/nonexistent",
        "JOURNAL_PATH": str(tmp_path / "journal.db"),
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        **env,
    }
    with open(tmp_path / "stdout", "wb") as out, open(tmp_path / "stderr", "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "pusher:app", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
        )


def _answers(url: str) -> bool:
    """Whether `url` answers 200 now."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _json_lines(text: str) -> list[dict]:
    """Every line of `text` as JSON (a line that is not fails the test, naming it)."""
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return events


def test_every_line_is_json_under_python_m_pusher(tmp_path):
    """With LOG_FORMAT=json, `python -m pusher` prints nothing but JSON lines, uvicorn's own among them."""
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}").start(wait_ready=False)
    httpx.post(service.url + "/api/v1/commands", json=command())
    _invalid_request(service.port)
    assert service.stop() == 0
    events = [event["event"] for event in _json_lines(service.log())]
    assert "Application startup complete." in events and "Invalid HTTP request received." in events
    assert "stopped" in events and "request" in events


def test_every_line_is_json_under_uvicorn_pusher_app(tmp_path):
    """With LOG_FORMAT=json, `uvicorn pusher:app` prints nothing but JSON lines too, on stdout: its start-up, its
    warnings and its access lines come out in the service's format, not in uvicorn's text on stderr."""
    port = free_port()
    process = _uvicorn(tmp_path, port)
    try:
        wait_for(lambda: process.poll() is not None or _answers(f"http://127.0.0.1:{port}/health"), timeout=30)
        assert process.poll() is None, (tmp_path / "stderr").read_text()
        httpx.post(f"http://127.0.0.1:{port}/api/v1/commands", json=command())
        _invalid_request(port)
    finally:
        assert stop_process(process, signal.SIGINT, 30) == 0
    assert (tmp_path / "stderr").read_text() == ""
    events = [event["event"] for event in _json_lines((tmp_path / "stdout").read_text())]
    assert any(event.startswith("Started server process") for event in events)
    assert "Invalid HTTP request received." in events and "stopped" in events and "request" in events


def test_a_long_poll_whose_client_leaves_ends_under_uvicorn_pusher_app(tmp_path):
    """Under `uvicorn pusher:app` (uvicorn's own connections, which do not report a client that goes away) a long
    poll whose client leaves still gives its waiter slot back at once, not at its timeout."""
    port = free_port()
    process = _uvicorn(tmp_path, port, MAX_WAITERS_PER_KEY="2")
    url = f"http://127.0.0.1:{port}"

    def waiters() -> float:
        text = httpx.get(url + "/metrics").text
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith("pusher_waiters ")))

    try:
        wait_for(lambda: process.poll() is not None or _answers(url + "/health"), timeout=30)
        assert process.poll() is None, (tmp_path / "stderr").read_text()
        accepted = httpx.post(url + "/api/v1/commands", json=command())
        assert accepted.status_code == 202, accepted.text  # Kafka is unreachable: it waits in the journal
        request = (
            f"GET /api/v1/commands/{accepted.json()['request_id']}/status?wait_for=published&timeout=600 HTTP/1.1\r\n"
            "Host: x\r\n\r\n"
        ).encode()
        for _ in range(2):
            polls = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
            for poll in polls:
                poll.sendall(request)
            wait_for(lambda: waiters() == 2, timeout=30)
            for poll in polls:
                poll.close()
            wait_for(lambda: waiters() == 0, timeout=30)
    finally:
        assert stop_process(process, signal.SIGINT, 30) == 0


@pytest.mark.parametrize("command_line", [["-m", "pusher"], ["-m", "uvicorn", "pusher:app"]])
def test_a_bad_setting_stops_the_start_with_its_one_line(tmp_path, command_line):
    """A bad value stops `python -m pusher` and `uvicorn pusher:app` at start with one line naming it, exit 2."""
    env = {**os.environ, "ENV_FILE": "/nonexistent", "API_PORT": "eighty", "JOURNAL_PATH": str(tmp_path / "j.db")}
    result = subprocess.run(
        [sys.executable, *command_line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["pusher: API_PORT='eighty' is invalid: Expected `int`, got `str`"]
    assert not (tmp_path / "j.db").exists()


def test_importing_the_app_module_builds_nothing(tmp_path):
    """`import pusher` reads no setting and builds no app (a bad setting does not stop it); `pusher.app` does."""
    env = {**os.environ, "ENV_FILE": "/nonexistent", "API_PORT": "eighty"}
    code = "import pusher; print(sorted(name for name in vars(pusher) if name == 'app'))"
    imported = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert (imported.returncode, imported.stdout, imported.stderr) == (0, "[]\n", "")
    built = subprocess.run(
        [sys.executable, "-c", "import pusher; pusher.app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert built.returncode == 2 and built.stderr.startswith("pusher: API_PORT='eighty' is invalid")


def _gc_collections(service: ServiceProcess) -> dict[str, float]:
    """python_gc_collections_total by generation, from the service's /metrics."""
    text = httpx.get(service.url + "/metrics").text
    return {
        line.split('"')[1]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("python_gc_collections_total{")
    }


def test_the_garbage_collector_stays_out_of_the_way_of_commands(tmp_path):
    """Once started, the service's start-up objects are frozen out of the collector's sight and young objects are
    collected every 10,000 allocations: 2,000 commands run no full collection and a handful of young ones
    (28 with the interpreter's defaults, a young collection every 70 commands, and full ones under load that held
    the event loop ~50 ms each)."""
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}").start(wait_ready=False)
    try:
        with httpx.Client(base_url=service.url, timeout=10) as client:
            for i in range(50):  # warm: the first requests build what every later one reuses
                assert client.post("/api/v1/commands", json=command(f"warm_{i}")).status_code == 202
            before = _gc_collections(service)
            for i in range(2000):
                assert client.post("/api/v1/commands", json=command(f"device_{i % 100}")).status_code == 202
            after = _gc_collections(service)
        assert set(before) == {"0", "1", "2"}
        assert after["2"] - before["2"] <= 1
        assert after["0"] - before["0"] <= 5, f"{after['0'] - before['0']} young collections in 2,000 commands"
    finally:
        service.stop()
