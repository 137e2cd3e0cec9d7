"""The Python client and the compatibility shim, against the service as a process and a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from helpers import (
    KEYS,
    ROOT,
    AnswerDropper,
    ServiceProcess,
    command,
    new_topic,
    read_topic,
    ready,
    service_on,
    wait_for,
)
from kafka_local import free_port

from pusher_client import (
    AsyncPusherClient,
    CommandFailed,
    CommandRequest,
    Conflict,
    Forbidden,
    NotFound,
    PusherClient,
    RateLimited,
    RetryPolicy,
    ServerError,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    WaitTimeout,
    compat,
)


def _values(records) -> list[dict]:
    return [json.loads(r.value) for r in records]


def test_push_command_is_published_once_with_every_field(kafka_bootstrap, topic, service):
    """push_command answers a typed CommandResult and Kafka holds exactly that command, once."""
    with PusherClient(service.url) as client:
        result = client.push_command(
            "efento_device_001",
            "config_update",
            {"measurement_interval": 600},
            "coap",
            parser_script_ref="efento_bidirectional_parser.py",
            metadata={"path": "/config"},
            confirmable=True,
            request_id="client-full-1",
            ttl_seconds=600,
        )
    assert result.success and result.status == "published" and result.request_id == "client-full-1"
    assert result.topic == topic and result.offset is not None and result.expires_at is not None
    [record] = read_topic(kafka_bootstrap, topic, 1)
    value = json.loads(record.value)
    assert record.key == b"efento_device_001" and value["request_id"] == "client-full-1"
    assert value["payload"] == {"measurement_interval": 600}
    assert value["metadata"] == {"path": "/config", "confirmable": True}
    assert value["parser_script_ref"] == "efento_bidirectional_parser.py"


def test_sync_client_batch_status_list_and_wait(kafka_bootstrap, topic, service):
    """push_commands, get_status, list_commands and wait_for of the blocking client, and a 207 item error."""
    with PusherClient(service.url) as client:
        assert client.health().status == "healthy"
        batch = client.push_commands(
            [
                CommandRequest(device_id="batch-dev", command_type="a", payload={}, protocol="mqtt"),
                command("batch-dev", command_type="b", payload={"n": 1}),
                command("batch-dev", command_type="c", protocol="telnet"),
            ]
        )
        assert (batch.total_commands, batch.successful, batch.failed) == (3, 2, 1)
        assert batch.results[2].error is not None and batch.results[2].error.errors[0].loc == "$.commands[2].protocol"
        first = batch.results[0].request_id
        status = client.wait_for(first, until="published", timeout=10)
        assert status.status == "published" and [t.status for t in status.history] == ["accepted", "published"]
        assert client.get_status(first).offset == status.offset
        listed = client.list_commands("batch-dev")
        assert [c.command_type for c in listed.items] == ["b", "a"]
        # the two `published` marks may land in different commits: a page of one has a next page once both have
        client.wait_for(batch.results[1].request_id, until="published", timeout=10)
        assert client.list_commands("batch-dev", "published", limit=1).next_before is not None
        with pytest.raises(NotFound):
            client.get_status("no-such-command")
    assert sorted(v["command_type"] for v in _values(read_topic(kafka_bootstrap, topic, 2))) == ["a", "b"]


def test_async_client_has_every_method(kafka_bootstrap, topic, service):
    """AsyncPusherClient: push_command, send, push_commands, get_status, list_commands, wait_for, health."""

    async def scenario() -> list[str]:
        async with AsyncPusherClient(service.url) as client:
            assert (await client.health()).status == "healthy"
            one = await client.push_command("async-dev", "one", {}, "mqtt", qos=1)
            two = await client.send(command("async-dev", command_type="two"))
            queued = await client.push_command("async-dev", "three", {}, "mqtt", respond_async=True)
            batch = await client.push_commands([command("async-dev", command_type=t) for t in "xyz"])
            assert one.status == two.status == "published" and queued.status == "accepted"
            assert batch.successful == 3
            assert (await client.wait_for(queued.request_id, timeout=10)).status == "published"
            assert (await client.get_status(one.request_id)).status == "published"
            listed = await client.list_commands(device_id="async-dev", limit=10)
            with pytest.raises(ValidationFailed) as invalid:
                await client.push_command("async-dev", "bad", {}, "mqtt", confirmable=True)
            assert [e.loc for e in invalid.value.errors] == ["$.confirmable"]
            return [c.command_type for c in listed.items]

    assert asyncio.run(scenario()) == ["z", "y", "x", "three", "two", "one"]
    assert len(read_topic(kafka_bootstrap, topic, 6)) == 6


def test_a_lost_answer_is_retried_and_published_once(kafka_bootstrap, topic, service):
    """The service publishes, the answer is lost on the way back; the retry carries the same Idempotency-Key,
    so the service answers from its journal and Kafka holds the command once."""
    proxy = AnswerDropper(service.port, drops=2)
    try:
        with PusherClient(proxy.url) as client:  # a new client each, so each starts on a new connection
            result = client.push_command("flaky-link-dev", "reboot", {}, "mqtt")
        with PusherClient(proxy.url) as client:
            batch = client.push_commands([command("flaky-link-dev", command_type=f"b{i}") for i in range(3)])
    finally:
        proxy.close()
    assert proxy.dropped == 2
    assert result.status == "published" and result.replayed
    assert all(r.replayed for r in batch.results)
    values = _values(read_topic(kafka_bootstrap, topic, 4))
    assert sorted(v["command_type"] for v in values) == ["b0", "b1", "b2", "reboot"]


def test_a_restart_of_the_service_is_ridden_out(kafka_bootstrap, topic, tmp_path):
    """A call made while the service is down keeps retrying and lands once when it is back."""
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic).start()
    client = PusherClient(service.url, retry=RetryPolicy(deadline=60))
    try:
        client.push_command("restart-dev", "before", {}, "mqtt")
        service.stop()
        restarter = threading.Timer(1.5, service.start)
        restarter.start()
        result = client.push_command("restart-dev", "during", {}, "mqtt")
        restarter.join()
        # A restarted service may answer before its producer has reached Kafka: 202 keeps the promise too.
        assert result.status in ("accepted", "published")
        assert client.wait_for(result.request_id, timeout=30).status == "published"
    finally:
        client.close()
        service.stop()
    values = _values(read_topic(kafka_bootstrap, topic, 2))
    assert [v["command_type"] for v in values] == ["before", "during"]


def test_kafka_outage_accepted_then_published_and_expiry_reported(own_broker, tmp_path):
    """During a Kafka outage the client gets `accepted`; wait_for follows it to `published` once Kafka is
    back; a command that expired meanwhile raises CommandFailed; WaitTimeout when the stage is not reached."""
    topic, service = service_on(own_broker, tmp_path, PUBLISH_TIMEOUT="0.5")
    client = PusherClient(service.url)
    try:
        own_broker.stop()
        # Posted before the service saw Kafka go, both could be in the producer: of unknown fate, and not
        # expired until Kafka is back to say whether they got there.
        wait_for(lambda: ready(service.url)["kafka_connected"] is False, timeout=30)
        kept = client.push_command("outage-dev", "kept", {}, "mqtt")
        doomed = client.push_command("outage-dev", "doomed", {}, "mqtt", ttl_seconds=1)
        assert kept.status == doomed.status == "accepted"
        with pytest.raises(WaitTimeout) as waited:
            client.wait_for(kept.request_id, timeout=0.5)
        assert waited.value.command.status == "accepted"
        with pytest.raises(CommandFailed) as failed:
            client.wait_for(doomed.request_id, timeout=30)
        assert failed.value.command.status == "expired"
        own_broker.start()
        assert client.wait_for(kept.request_id, timeout=60).status == "published"
    finally:
        client.close()
        service.stop()
    assert [v["command_type"] for v in _values(read_topic(own_broker.bootstrap, topic, 1))] == ["kept"]


def test_a_refused_command_is_never_reported_as_sent(kafka_bootstrap, tmp_path):
    """Kafka refuses an oversized command: 502, ServerError. Sending it again with the same key replays that
    end as a 200 with success false, which the client raises as CommandFailed rather than returning it."""
    topic = new_topic(kafka_bootstrap, configs={"max.message.bytes": "2000"})
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic).start()
    try:
        with PusherClient(service.url) as client:
            big = {"blob": "x" * 5000}
            with pytest.raises(ServerError, match="502"):
                client.push_command("big-dev", "t", big, "mqtt", idempotency_key="big-1")
            with pytest.raises(CommandFailed) as failed:
                client.push_command("big-dev", "t", big, "mqtt", idempotency_key="big-1")
        assert failed.value.command.status == "failed" and failed.value.command.replayed
    finally:
        service.stop()


def test_typed_errors_for_keys_scopes_and_conflicts(keyed_service):
    """401 → Unauthorized, 403 → Forbidden, another key's command → NotFound, a reused id → Conflict."""
    keys = ("ppk_wrong", KEYS["reader"][0], KEYS["site-a"][0], KEYS["writer"][0])
    with contextlib.ExitStack() as clients:
        wrong, reader, site_a, writer = (
            clients.enter_context(PusherClient(keyed_service.url, api_key=key)) for key in keys
        )
        with pytest.raises(Unauthorized):
            wrong.push_command("d", "t", {}, "mqtt")
        with pytest.raises(Forbidden):
            reader.push_command("d", "t", {}, "mqtt")
        with pytest.raises(Forbidden):
            site_a.push_command("site-b/d", "t", {}, "mqtt")
        mine = writer.push_command("d", "t", {}, "mqtt", request_id="keyed-1")
        with pytest.raises(Conflict):
            writer.push_command("d", "other", {}, "mqtt", request_id="keyed-1")
        with pytest.raises(NotFound):
            site_a.get_status(mine.request_id)


def test_rate_limit_is_waited_out_with_retry_after(kafka_bootstrap, topic, tmp_path):
    """429 is retried after Retry-After until it passes; without retries it raises RateLimited."""
    service = ServiceProcess(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic, RATE_LIMIT="2/second"
    ).start()
    try:
        with PusherClient(service.url) as client:
            results = [client.push_command("limited-dev", f"c{i}", {}, "mqtt") for i in range(5)]
        assert all(r.success for r in results)
        impatient = PusherClient(service.url, retry=RetryPolicy(attempts=1))
        with impatient, pytest.raises(RateLimited) as limited:
            for i in range(5):
                impatient.push_command("limited-dev", f"x{i}", {}, "mqtt")
        assert limited.value.status == 429 and limited.value.retry_after >= 1
    finally:
        service.stop()


def test_no_service_is_unavailable_after_the_retry_budget():
    """Nobody listening: retried within the budget, then Unavailable."""
    started = time.monotonic()
    client = PusherClient(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(deadline=1.0))
    with client, pytest.raises(Unavailable, match="ConnectError"):
        client.push_command("d", "t", {}, "mqtt")
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------- the compatibility shim

_EXAMPLE = re.compile(r"<!-- (before|after): ([\w-]+) -->\s*```python\n(.*?)```", re.S)
_FACTORY_ARGS = re.compile(r"\b(create_pusher_service(?:_sync)?|PusherService)\((.*?)\)", re.S)


def _migration_examples() -> dict[str, dict[str, str]]:
    pairs: dict[str, dict[str, str]] = {}
    for side, name, code in _EXAMPLE.findall((ROOT / "MIGRATION.md").read_text()):
        pairs.setdefault(name, {})[side] = code
    return pairs


def _without_imports_and_factory_args(code: str) -> str:
    lines = [line for line in code.splitlines() if not line.startswith(("from ", "import "))]
    return _FACTORY_ARGS.sub(r"\1(…)", "\n".join(lines)).strip()


def _run_example(code: str) -> str:
    if "asyncio.run(" not in code and "run_until_complete(" not in code:  # top-level await, as in a notebook
        code = "import asyncio\nasync def _example():\n" + textwrap.indent(code, "    ") + "\nasyncio.run(_example())\n"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "MIGRATION.md", "exec"), {"__name__": "__main__"})
    return out.getvalue()


def test_the_old_modules_examples_run_with_only_the_import_and_factory_changed(kafka_bootstrap, topic, service):
    """MIGRATION.md's old-module examples and their migrated twins differ only in imports and the factory's
    arguments; every migrated one runs against the service and its commands arrive in Kafka once each."""
    pairs = _migration_examples()
    assert len(pairs) == 6 and all(set(p) == {"before", "after"} for p in pairs.values())
    expected = []
    for name, pair in pairs.items():
        assert _without_imports_and_factory_args(pair["before"]) == _without_imports_and_factory_args(pair["after"]), (
            name
        )
        assert "preservarium_pusher" not in pair["after"]
        after = pair["after"].replace("http://localhost:8000", service.url)
        _run_example(after)
        expected += re.findall(r'device_id(?:=|": )\(?"(\w+)"', after)
        expected += re.findall(r'control_temperature\("(\w+)"', after)
    values = _values(read_topic(kafka_bootstrap, topic, len(expected)))
    assert sorted(v["device_id"] for v in values) == sorted(expected)
    by_device = {v["device_id"]: v for v in values}
    assert by_device["mqtt_device_002"]["protocol"] == "mqtt"  # lower-cased, as the old model did
    assert by_device["mqtt_device_001"]["metadata"] == {"topic": "devices/mqtt_device_001/commands", "qos": 1}
    assert by_device["thermostat_001"]["payload"] == {"temperature": 21.5}


def test_the_shim_returns_false_and_logs_instead_of_raising(kafka_bootstrap, topic, service, caplog):
    """Refused commands and an unreachable service give False / None and a log line, never an exception."""

    async def scenario() -> tuple:
        pusher = compat.PusherService(service.url)
        refused = await pusher.create_and_push_command("d", "t", {}, "carrier-pigeon")
        device_command = compat.DeviceCommand(device_id="d", payload={}, protocol="mqtt", priority=3)
        extra = await pusher.push_command(device_command)
        again = compat.CommandMessage(device_id="d", command_type="once", payload={}, protocol="mqtt")
        twice = [await pusher.push_command(again), await pusher.push_command(again)]
        await pusher.stop()
        nobody = await compat.create_pusher_service(f"http://127.0.0.1:{free_port()}")
        return refused, extra, twice, nobody

    refused, extra, twice, nobody = asyncio.run(scenario())
    assert refused is False and "$.protocol" in caplog.text
    assert extra is True and twice == [True, True]
    assert nobody is None and "not reachable" in caplog.text
    values = _values(read_topic(kafka_bootstrap, topic, 2))
    assert [(v["command_type"], v["metadata"]) for v in values] == [("command", {"priority": 3}), ("once", {})]


def test_fanout_coalesce_not_before_and_cancel_through_the_clients(kafka_bootstrap, topic, service):
    """push_fanout/get_fanout/list_commands(fanout_id=) and the scheduling fields, in both clients; cancel of a held
    command never sends it, and a cancel after hand-over is a Conflict naming the status."""
    later = datetime.now(UTC) + timedelta(seconds=3600)
    with PusherClient(service.url) as client:
        fanout = client.push_fanout([f"fleet-{i}" for i in range(25)], "reboot", {}, "mqtt", fanout_id="fleet-a")
        assert (fanout.fanout_id, fanout.total, fanout.status) == ("fleet-a", 25, "accepted")
        again = client.push_fanout([f"fleet-{i}" for i in range(25)], "reboot", {}, "mqtt", fanout_id="fleet-a")
        assert again.replayed and again.total == 25
        done = wait_for(lambda: (s := client.get_fanout("fleet-a")).done and s)
        assert done.counts == {"published": 25} and done.finished == 25
        page = client.list_commands(fanout_id="fleet-a", limit=500)
        assert sorted(c.device_id for c in page.items) == sorted(f"fleet-{i}" for i in range(25))
        assert {c.fanout_id for c in page.items} == {"fleet-a"}

        first = client.push_command("client-sp", "set", {"sp": 1}, "mqtt", coalesce_key="sp", not_before=later)
        second = client.push_command("client-sp", "set", {"sp": 2}, "mqtt", coalesce_key="sp", not_before=later)
        assert first.status == "accepted" and first.not_before == later
        assert second.superseded == [first.request_id]
        replaced = client.get_status(first.request_id)
        assert replaced.status == "superseded" and replaced.superseded_by == second.request_id
        cancelled = client.cancel(second.request_id)
        assert cancelled.status == "cancelled" and client.cancel(second.request_id).status == "cancelled"
        sent = client.push_command("client-sp", "now", {}, "mqtt")
        with pytest.raises(Conflict) as too_late:
            client.cancel(sent.request_id)
        assert "published" in str(too_late.value)
        with pytest.raises(NotFound):
            client.cancel("no-such-command")

    async def scenario() -> tuple[int, str]:
        async with AsyncPusherClient(service.url) as client:
            fanout = await client.push_fanout(["async-f1", "async-f2"], "reboot", {}, "mqtt", coalesce_key="boot")
            held = await client.push_command("async-held", "reboot", {}, "mqtt", not_before=later)
            gone = await client.cancel(held.request_id)
            status = await client.get_fanout(fanout.fanout_id)
            listed = await client.list_commands(fanout_id=fanout.fanout_id)
            return status.total + len(listed.items), gone.status

    assert asyncio.run(scenario()) == (4, "cancelled")
    records = read_topic(kafka_bootstrap, topic, 25 + 1 + 2, timeout=10)
    keys = [r.key.decode() for r in records]
    assert len(records) == 28 and "client-sp" in keys and keys.count("client-sp") == 1
    assert "async-held" not in keys
