"""What a person sees and runs: /docs in a real headless Chromium, and the Containerfile's commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import KEYS, ROOT, ServiceProcess, keys_file, wait_for
from kafka_local import free_port

from settings import Settings

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_docs_page_lists_the_operations_in_chromium(tmp_path):
    """Swagger UI, served by the app from a PyPI package, renders every operation in a real browser; without API
    keys it offers no Authorize button."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed for this test (make test installs it)"
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}").start(wait_ready=False)
    try:
        result = subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=20000",
                "--dump-dom",
                service.url + "/docs",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        service.stop()
    dom = result.stdout
    assert "swagger-ui" in dom, result.stderr[-2000:]
    assert "Preservarium Pusher API" in dom
    operations = set(re.findall(r'data-path="([^"]+)"', dom))
    assert {"/api/v1/commands", "/api/v1/commands/batch", "/api/v1/commands/{request_id}/status"} <= operations
    assert {"/health", "/ready", "/api/v1/status", "/api/v1/metrics", "/metrics"} <= operations
    assert "Push a single command to a device" in dom
    assert "btn authorize" not in dom


def _containerfile() -> tuple[list[str], list[str], dict[str, str]]:
    """CMD, HEALTHCHECK CMD (exec forms) and what COPY puts into /app: its path there → its source here."""
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M)[1])
    health = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)[1])
    copied: dict[str, str] = {}
    for sources, target in re.findall(r"^COPY (?!--from)(.+) \./(\S*)$", text, re.M):
        if target:  # COPY client/pusher_client ./pusher_client/
            copied[target.rstrip("/")] = sources
        else:  # COPY a.py b.py ./
            copied |= {name: name for name in sources.split()}
    return cmd, health, copied


def _container_env() -> dict[str, str]:
    """The settings the image's ENV line sets (PATH and Python's own left out)."""
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    pairs = re.findall(r"([A-Z_]+)=(\S+)", re.search(r"^ENV (.+)$", text, re.M)[1])
    return {name: value for name, value in pairs if name.lower() in Settings.__struct_fields__}


def test_container_serves_the_network_only_with_keys(tmp_path):
    """The image binds every address and names a keys file; without that file mounted it refuses to start,
    with one line saying which setting is missing, instead of opening the port to anyone."""
    env = _container_env()
    assert env["API_HOST"] == "0.0.0.0" and env["API_KEYS_FILE"].startswith("/run/secrets/")
    common = {"PATH": os.environ["PATH"], "ENV_FILE": "/nonexistent", "JOURNAL_PATH": str(tmp_path / "j.db")}
    run = lambda **extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "pusher"], cwd=ROOT, env={**env, **common, **extra}, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    missing = run(API_KEYS_FILE=str(tmp_path / "absent.toml"))
    assert missing.returncode == 2 and "API_KEYS_FILE" in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    open_env = {k: v for k, v in env.items() if k != "API_KEYS_FILE"}
    refused = subprocess.run(
        [sys.executable, "-m", "pusher"], cwd=ROOT, env={**open_env, **common}, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "pusher: API_HOST=0.0.0.0 serves the network without API keys: set API_KEYS_FILE (`make keygen` writes "
        "one), or AUTH_ENABLED=false to run it open on purpose"
    ]


def test_container_cmd_and_healthcheck_run_on_the_built_tree(tmp_path, kafka_bootstrap, topic):
    """The tree the Containerfile copies is complete: its CMD serves, and its HEALTHCHECK passes (no curl)."""
    cmd, health, copied = _containerfile()
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    for target, source in copied.items():
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, app_dir / target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / source, app_dir / target)
    assert cmd == ["python", "-m", "pusher"] and health[0] == "python"
    port = free_port()
    cmd = [sys.executable, *cmd[1:]]
    keys = keys_file(tmp_path / "keys.toml")
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        **_container_env(),
        "API_HOST": "127.0.0.1",  # the image's 0.0.0.0 would open this test's port to the network
        "API_KEYS_FILE": keys,  # mounted at /run/secrets/pusher_keys in a container
        "API_PORT": str(port),
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_COMMAND_TOPIC": topic,
        "LOG_FORMAT": "json",
        "ENV_FILE": "/nonexistent",
        "JOURNAL_PATH": str(tmp_path / "data" / "journal.db"),
    }
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = subprocess.run([sys.executable, *health[1:]], cwd=app_dir, env=env, capture_output=True)
            if probe.returncode == 0:
                break
            assert server.poll() is None, log_path.read_text()
            time.sleep(0.3)
        else:
            pytest.fail("HEALTHCHECK never passed")
        # Healthy is not the same as connected: wait for Kafka before expecting a 200.
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/ready").json()["kafka_connected"], timeout=30)
        response = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/commands",
            json={"device_id": "c1", "command_type": "reboot", "payload": {}, "protocol": "mqtt"},
            headers={"X-API-Key": KEYS["writer"][0]},
        )
        assert response.status_code == 200, response.text
        assert "server" not in response.headers
    finally:
        server.terminate()
        server.wait(30)
    # a stopped service fails the HEALTHCHECK
    assert subprocess.run([sys.executable, *health[1:]], cwd=app_dir, env=env, capture_output=True).returncode != 0


def test_container_copies_every_module_the_app_imports():
    """Every top-level module of the project is in the image, and so is the client package, whose wire types
    the service imports (pusher_client.wire)."""
    _, _, copied = _containerfile()
    modules = {p.name for p in ROOT.glob("*.py")}
    assert modules <= set(copied), modules - set(copied)
    assert copied["pusher_client"] == "client/pusher_client"


def test_compose_file_wires_kafka_and_the_service():
    """compose.yaml builds the Containerfile, health-checks both services, and sets only real settings."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    kafka, pusher = compose["services"]["kafka"], compose["services"]["pusher"]
    assert kafka["image"].startswith("apache/kafka:4") and kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert "healthcheck" in kafka and "healthcheck" in pusher
    assert pusher["build"]["dockerfile"] == "Containerfile"
    assert pusher["depends_on"]["kafka"]["condition"] == "service_healthy"
    known = {name.upper() for name in Settings.__struct_fields__}
    assert set(pusher["environment"]) <= known
    assert any(volume.endswith(":/data") for volume in pusher["volumes"])
    assert os.path.basename(pusher["healthcheck"]["test"][1]) == "python"
    # the keys file is mounted where the image's API_KEYS_FILE looks, from the file `make keygen` writes
    assert pusher["secrets"] == ["pusher_keys"] and compose["secrets"]["pusher_keys"]["file"] == "./keys.toml"
    assert _container_env()["API_KEYS_FILE"] == "/run/secrets/pusher_keys"
