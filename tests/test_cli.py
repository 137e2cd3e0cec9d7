"""The `pusher` command's output and exit codes, and the client package (`pip install ./client`)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
import venv
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import KEYS, ROOT, read_to_end, read_topic, run_cli, service_on
from kafka_local import free_port


def lines(result: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_send_status_list_and_their_exit_codes(kafka_bootstrap, topic, service):
    """send → 0 and the result; --wait → the published status; 1 refused, 2 usage, 4 unknown id, 5 no service."""
    sent = run_cli("send", "--device", "cli-dev", "--type", "set_led", "--protocol", "mqtt",
                  "--payload", '{"state": "on"}', "--metadata", '{"topic": "devices/cli-dev/commands"}', "--qos", "1",
                  url=service.url)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    [result] = lines(sent)
    assert result["status"] == "published" and result["topic"] == topic

    waited = run_cli("send", "--device", "cli-dev", "--type", "reboot", "--protocol", "mqtt", "--async", "--wait",
                    url=service.url)  # fmt: skip
    assert waited.returncode == 0, waited.stderr
    assert [t["status"] for t in lines(waited)[0]["history"]] == ["accepted", "published"]

    refused = run_cli("send", "--device", "cli-dev", "--type", "t", "--protocol", "telnet", url=service.url)
    assert refused.returncode == 1 and "$.protocol" in refused.stderr and refused.stdout == ""
    bad_json = run_cli("send", "--device", "d", "--type", "t", "--protocol", "mqtt", "--payload", "{", url=service.url)
    assert bad_json.returncode == 2 and "--payload is not JSON" in bad_json.stderr

    status = run_cli("status", result["request_id"], url=service.url)
    assert status.returncode == 0 and lines(status)[0]["offset"] == result["offset"]
    assert run_cli("status", "no-such-id", url=service.url).returncode == 4
    listed = run_cli("list", "--device", "cli-dev", "--limit", "1", "--all", url=service.url)
    assert listed.returncode == 0 and [c["command_type"] for c in lines(listed)] == ["reboot", "set_led"]

    nobody = run_cli("status", "x", "--retry-for", "0.5", url=f"http://127.0.0.1:{free_port()}")
    assert nobody.returncode == 5 and "No answer" in nobody.stderr
    values = [json.loads(r.value) for r in read_topic(kafka_bootstrap, topic, 2)]
    assert sorted(v["command_type"] for v in values) == ["reboot", "set_led"]


def test_a_rerun_with_the_same_idempotency_key_sends_once(kafka_bootstrap, topic, service):
    """A script that reruns `pusher send --idempotency-key K` after a failure cannot publish twice."""
    args = ("send", "--device", "rerun-dev", "--type", "reboot", "--protocol", "mqtt", "--idempotency-key", "job-42")
    first, second = run_cli(*args, url=service.url), run_cli(*args, url=service.url)
    assert first.returncode == second.returncode == 0
    assert lines(first)[0]["request_id"] == lines(second)[0]["request_id"] and lines(second)[0]["replayed"]
    assert len(read_to_end(kafka_bootstrap, topic)) == 1  # both answered 200: whatever was sent is in the topic


def test_batch_reports_every_line_and_streams_stdin(kafka_bootstrap, topic, service, tmp_path):
    """batch FILE.jsonl prints one result per input line (its number), sends the good ones, exits 1 if any
    failed; `-` reads standard input."""
    good = {"device_id": "batch-cli", "command_type": "reboot", "payload": {}, "protocol": "mqtt"}
    path = tmp_path / "commands.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(good),
                "{not json",
                json.dumps({**good, "protocol": "telnet"}),
                "",
                json.dumps({**good, "command_type": "second"}),
                json.dumps({**good, "command_type": "third"}),
            ]
        )
        + "\n"
    )
    result = run_cli("batch", str(path), "--chunk-size", "2", url=service.url)
    assert result.returncode == 1
    reported = lines(result)
    assert [(r["line"], r["success"]) for r in reported] == [(1, True), (2, False), (3, False), (5, True), (6, True)]
    assert "not a JSON command" in reported[1]["error"] and "protocol" in reported[2]["error"]
    assert "3 sent, 2 failed" in result.stderr

    piped = run_cli("batch", "-", url=service.url, stdin=json.dumps({**good, "command_type": "piped"}) + "\n")
    assert piped.returncode == 0 and lines(piped)[0]["status"] == "published"
    values = [json.loads(r.value) for r in read_topic(kafka_bootstrap, topic, 4)]
    assert sorted(v["command_type"] for v in values) == ["piped", "reboot", "second", "third"]


def test_batch_names_the_input_line_of_a_refused_item(service, tmp_path):
    """After a line that is not JSON, the service's path of a refused item ($.commands[1]) is given as its input
    line (line 3), in the item's error and in no other numbering."""
    good = {"device_id": "batch-lines", "command_type": "reboot", "payload": {}, "protocol": "mqtt"}
    path = tmp_path / "commands.jsonl"
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps({**good, "protocol": "telnet"})]) + "\n")
    result = run_cli("batch", str(path), url=service.url)
    assert result.returncode == 1
    refused = lines(result)[2]
    assert refused["line"] == 3 and refused["error"].startswith("line 3: $.protocol: "), refused
    assert "commands[" not in result.stdout + result.stderr


def _run_with_closed_output(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    """Run `pusher ARGS` writing into a pipe its reader has already closed (`pusher list | head`, once head quit)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            [sys.executable, "-m", "pusher_client.cli", *args],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, "PUSHER_URL": url, "PUSHER_API_KEY": ""},
        )
    finally:
        os.close(writer)


def test_a_reader_that_leaves_early_ends_the_command_quietly(service, tmp_path):
    """`pusher list | head`: once the reader is gone, list exits 0 with nothing on stderr (no BrokenPipeError);
    batch stops sending there, says which lines were not sent, and exits 1."""
    for n in range(3):
        sent = run_cli("send", "--device", "early", "--type", f"t{n}", "--protocol", "mqtt", url=service.url)
        assert sent.returncode == 0, sent.stderr
    listed = _run_with_closed_output("list", "--device", "early", url=service.url)
    assert (listed.returncode, listed.stderr) == (0, "")

    good = {"device_id": "early-batch", "command_type": "reboot", "payload": {}, "protocol": "mqtt"}
    path = tmp_path / "commands.jsonl"
    path.write_text("".join(json.dumps({**good, "command_type": f"c{n}"}) + "\n" for n in range(1, 4)))
    batch = _run_with_closed_output("batch", str(path), "--chunk-size", "1", url=service.url)
    assert batch.returncode == 1 and batch.stderr == "pusher: the output was closed; nothing after line 1 was sent\n"
    sent = run_cli("list", "--device", "early-batch", url=service.url)
    assert [c["command_type"] for c in lines(sent)] == ["c1"]


def test_api_key_from_the_environment_and_exit_code_3(keyed_service):
    """PUSHER_API_KEY is used; a missing or read-only key exits 3."""
    args = ("send", "--device", "d", "--type", "t", "--protocol", "mqtt")
    assert run_cli(*args, url=keyed_service.url).returncode == 3
    assert run_cli(*args, url=keyed_service.url, PUSHER_API_KEY=KEYS["reader"][0]).returncode == 3
    assert run_cli(*args, url=keyed_service.url, PUSHER_API_KEY=KEYS["writer"][0]).returncode == 0


def test_wait_that_runs_out_exits_6_and_the_command_still_arrives(own_broker, tmp_path):
    """With Kafka down, `send --wait --timeout 1` exits 6 after printing the `accepted` status; the command
    is published when Kafka returns."""
    topic, service = service_on(own_broker, tmp_path, PUBLISH_TIMEOUT="0.5")
    try:
        own_broker.stop()
        waited = run_cli("send", "--device", "d", "--type", "late", "--protocol", "mqtt", "--wait", "--timeout", "1",
                        url=service.url)  # fmt: skip
        assert waited.returncode == 6 and lines(waited)[0]["status"] == "accepted"
        own_broker.start()
        service.wait_drained()
    finally:
        service.stop()
    assert [json.loads(r.value)["command_type"] for r in read_topic(own_broker.bootstrap, topic, 1)] == ["late"]


def test_help_shows_examples_and_exit_codes():
    """`pusher --help` and `pusher send --help` carry examples, the environment and the exit codes."""
    for args in (["--help"], ["send", "--help"]):
        shown = subprocess.run([sys.executable, "-m", "pusher_client.cli", *args], capture_output=True, text=True)
        assert shown.returncode == 0
        assert "examples:" in shown.stdout and "exit codes:" in shown.stdout and "PUSHER_API_KEY" in shown.stdout


# ---------------------------------------------------------------- packages


def _venv(path: Path) -> Path:
    venv.create(path, with_pip=True)
    return path / "bin"


def _pip_install(bin_dir: Path, target: Path) -> None:
    env = {**os.environ, "PIP_CACHE_DIR": str(ROOT / ".cache" / "pip"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env["PYTHONPATH"] = ""  # pip sees only the new venv
    done = subprocess.run([bin_dir / "pip", "install", "-q", str(target)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_client_only_install_needs_no_kafka_library(kafka_bootstrap, topic, service, tmp_path):
    """`pip install ./client` gives the package pusher_client (compat and cli inside it) and `pusher`, with only
    httpx and msgspec, and puts no other module into site-packages."""
    bin_dir = _venv(tmp_path / "venv")
    _pip_install(bin_dir, ROOT / "client")
    probe = "import pusher_client, pusher_client.compat, pusher_client.cli\n" \
            "for name in ('kafka', 'starlette', 'uvicorn'):\n" \
            "    try:\n        __import__(name)\n    except ImportError:\n        pass\n" \
            "    else:\n        raise SystemExit(name + ' is installed')\n" \
            "from importlib import metadata\n" \
            "tops = {f.parts[0] for f in metadata.files('preservarium-pusher-client')}\n" \
            "print(sorted(top for top in tops if top != '..' and not top.endswith('.dist-info')))\n"  # fmt: skip
    clean = {**os.environ, "PYTHONPATH": ""}  # nothing from this tree: only what pip installed
    imported = subprocess.run(
        [bin_dir / "python", "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=clean
    )
    assert imported.returncode == 0, imported.stderr + imported.stdout
    assert imported.stdout.strip() == "['pusher_client']"
    sent = subprocess.run(
        [bin_dir / "pusher", "send", "--device", "pip-client", "--type", "t", "--protocol", "mqtt"],
        capture_output=True, text=True, cwd=tmp_path, env={**clean, "PUSHER_URL": service.url},
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert json.loads(read_topic(kafka_bootstrap, topic, 1)[0].value)["device_id"] == "pip-client"


_CLIENT_MAY_IMPORT = {"httpx", "msgspec", "pusher_client"}


def test_the_client_package_stands_alone_and_the_server_installs_nothing():
    """client/pusher_client is real files (no links) importing only the standard library, httpx, msgspec and
    itself; the repository root is not a distribution (the server runs from its tree or its image)."""
    package = ROOT / "client" / "pusher_client"
    for path in package.rglob("*"):
        assert not path.is_symlink(), path
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in _CLIENT_MAY_IMPORT, f"{path.name} imports {name}"
    assert "project" not in tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_fanout_schedule_coalesce_and_cancel_from_the_shell(kafka_bootstrap, topic, service, tmp_path):
    """fanout (ids from a file, --wait) → 0 and every device's command in Kafka once; fanout-status and list
    --fanout; send --not-before/--coalesce-key; cancel → 0, too late → 1, unknown → 4; a bad fan-out → 1."""
    fleet = tmp_path / "fleet.txt"
    fleet.write_text("".join(f"shell-{i}\n" for i in range(30)))
    sent = run_cli("fanout", "--devices-file", str(fleet), "--type", "reboot", "--protocol", "mqtt",
                   "--fanout-id", "shell-fleet", "--wait", "--timeout", "60", url=service.url)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    answer, final = lines(sent)
    assert (answer["fanout_id"], answer["total"]) == ("shell-fleet", 30)
    assert final["done"] is True and final["counts"] == {"published": 30}
    status = run_cli("fanout-status", "shell-fleet", url=service.url)
    assert status.returncode == 0 and lines(status)[0]["total"] == 30
    assert run_cli("fanout-status", "no-such-fanout", url=service.url).returncode == 4
    listed = run_cli("list", "--fanout", "shell-fleet", "--limit", "7", "--all", url=service.url)
    assert sorted(c["device_id"] for c in lines(listed)) == sorted(f"shell-{i}" for i in range(30))
    duplicate = run_cli("fanout", "--devices", "a,b,a", "--type", "t", "--protocol", "mqtt", url=service.url)
    assert duplicate.returncode == 1 and "$.device_ids[2]" in duplicate.stderr

    held = ("send", "--device", "shell-held", "--type", "set", "--protocol", "mqtt", "--coalesce-key", "sp",
            "--not-before", "2099-01-01T00:00:00Z")  # fmt: skip
    too_far = run_cli(*held, url=service.url)
    assert too_far.returncode == 1 and "$.not_before" in too_far.stderr
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    first = lines(run_cli(*held[:-1], soon, url=service.url))[0]
    second = lines(run_cli(*held[:-1], soon, url=service.url))[0]
    assert first["status"] == "accepted" and second["superseded"] == [first["request_id"]]
    cancelled = run_cli("cancel", second["request_id"], url=service.url)
    assert cancelled.returncode == 0 and lines(cancelled)[0]["status"] == "cancelled"
    published = lines(run_cli("send", "--device", "shell-now", "--type", "t", "--protocol", "mqtt", url=service.url))
    too_late = run_cli("cancel", published[0]["request_id"], url=service.url)
    assert too_late.returncode == 1 and "published" in too_late.stderr
    assert run_cli("cancel", "no-such-command", url=service.url).returncode == 4
    keys = [r.key for r in read_topic(kafka_bootstrap, topic, 31, timeout=10)]
    assert len(keys) == 31 and b"shell-held" not in keys
