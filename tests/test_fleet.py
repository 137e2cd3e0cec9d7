"""Fleets and flaky links end to end: fan-out, latest wins (coalesce_key), cancel and deliver at (not_before), with
the service as a process, a real broker read back, real outages and real restarts."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise

import httpx
import pytest
from helpers import (
    KEYS,
    ServiceProcess,
    command,
    keys_file,
    new_topic,
    read_to_end,
    read_topic,
    ready,
    service_on,
    wait_for,
)
from test_connector import Mosquitto, Setup

COMMANDS = "/api/v1/commands"
FANOUT = "/api/v1/commands/fanout"


class Fleet:
    """A service with API keys on (helpers.KEYS), publishing to a topic of its own; shared by this module's tests,
    each of which uses device ids of its own."""

    def __init__(self, bootstrap: str, folder) -> None:
        self.bootstrap = bootstrap
        self.topic = new_topic(bootstrap)
        env = {"KAFKA_COMMAND_TOPIC": self.topic, "API_KEYS_FILE": keys_file(folder / "keys.toml")}
        self.service = ServiceProcess(folder, KAFKA_BOOTSTRAP_SERVERS=bootstrap, **env)

    @property
    def url(self) -> str:
        return self.service.url

    def records(self, device_id: str) -> list:
        """The device's records now in the topic, in order (one device: one partition)."""
        return [r for r in read_to_end(self.bootstrap, self.topic) if r.key == device_id.encode()]


@pytest.fixture(scope="module")
def fleet(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The shared keyed service."""
    built = Fleet(kafka_bootstrap, tmp_path_factory.mktemp("fleet"))
    built.service.start()
    yield built
    built.service.stop()


def auth(key_id: str | None) -> dict[str, str]:
    """The X-API-Key header of one of helpers.KEYS (none for None)."""
    return {"X-API-Key": KEYS[key_id][0]} if key_id else {}


def post(url: str, body: dict, key_id: str | None = None, path: str = COMMANDS, **headers: str) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=auth(key_id) | headers, timeout=60)


def cancel(url: str, request_id: str, key_id: str | None = None) -> httpx.Response:
    return httpx.delete(f"{url}{COMMANDS}/{request_id}", headers=auth(key_id), timeout=30)


def status(url: str, request_id: str, key_id: str | None = None) -> dict:
    response = httpx.get(f"{url}{COMMANDS}/{request_id}/status", headers=auth(key_id), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def listed(url: str, key_id: str | None = None, **query) -> list[dict]:
    """Every command the list shows for `query`, following next_before through all pages."""
    items, before = [], None
    while True:
        params = {**query, **({"before": before} if before else {})}
        page = httpx.get(url + COMMANDS, params=params, headers=auth(key_id), timeout=30)
        assert page.status_code == 200, page.text
        items += page.json()["items"]
        before = page.json()["next_before"]
        if before is None:
            return items


def fanout(device_ids: list[str], **extra) -> dict:
    """A valid fan-out body, overridable field by field."""
    return {"device_ids": device_ids, "command_type": "set", "payload": {}, "protocol": "mqtt", **extra}


def get_fanout(url: str, fanout_id: str, key_id: str | None = None) -> httpx.Response:
    return httpx.get(f"{url}/api/v1/fanouts/{fanout_id}", headers=auth(key_id), timeout=10)


def wait_status(url: str, request_id: str, wanted: str, key_id: str | None = None, timeout: float = 60) -> dict:
    """Wait until the command's status is `wanted`; its status body."""
    return wait_for(lambda: (s := status(url, request_id, key_id))["status"] == wanted and s, timeout=timeout)


def step(body: dict, name: str) -> dict:
    """The one history step `name` of a status body."""
    [found] = [s for s in body["history"] if s["status"] == name]
    return found


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def rfc3339(when: datetime) -> str:
    """`when` with an offset that is not UTC's, so that the service's conversion counts too."""
    return when.astimezone(timezone(timedelta(hours=2))).isoformat()


def value(record) -> dict:
    return json.loads(record.value)


def header(record, name: str) -> str | None:
    found = [v for k, v in record.headers if k == name]
    return found[0].decode() if found else None


def request_ids(records) -> list[str]:
    return [header(r, "request_id") for r in records]


def problem(response: httpx.Response, code: int) -> dict:
    assert response.status_code == code, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


def error_locs(response: httpx.Response) -> list[str]:
    return [e["loc"] for e in problem(response, 422)["errors"]]


# ---------------------------------------------------------------- fan-out


def test_fanout_of_10000_devices_is_in_kafka_once_each_and_counted(keyed_service, kafka_bootstrap, topic):
    """One fan-out to 10,000 devices: 202 with Location; every device's command is in Kafka exactly once, with
    its own request_id, the fanout_id in body and header, and its own topic derived from `{device_id}`; the
    fan-out counts 10,000 published and done; its list pages through all 10,000."""
    devices = [f"fleet-{n:05d}" for n in range(10_000)]
    body = fanout(devices, command_type="config_update", payload={"interval": 600}, qos=1)
    body["metadata"] = {"topic": "devices/{device_id}/commands/config"}
    answer = post(keyed_service.url, body, "writer", FANOUT)
    assert answer.status_code == 202, answer.text
    fanout_id = answer.json()["fanout_id"]
    assert answer.json()["total"] == 10_000 and answer.json()["status"] == "accepted"
    assert answer.headers["location"] == f"/api/v1/fanouts/{fanout_id}"

    done = wait_for(lambda: (f := get_fanout(keyed_service.url, fanout_id, "writer").json())["done"] and f, 180)
    assert done["total"] == 10_000 and done["counts"] == {"published": 10_000} and done["finished"] == 10_000

    records = read_topic(kafka_bootstrap, topic, 10_000, timeout=120)
    assert len(records) == 10_000
    ids = request_ids(records)
    assert len(set(ids)) == 10_000
    assert Counter(r.key.decode() for r in records) == Counter(devices)
    for record in records:
        sent = value(record)
        assert sent["fanout_id"] == fanout_id and header(record, "fanout_id") == fanout_id
        assert sent["device_id"] == record.key.decode() and sent["request_id"] == header(record, "request_id")
        assert sent["metadata"] == {"topic": f"devices/{sent['device_id']}/commands/config", "qos": 1}
        assert sent["payload"] == {"interval": 600} and sent["command_type"] == "config_update"

    children = listed(keyed_service.url, "writer", fanout_id=fanout_id, limit=500)
    assert len(children) == 10_000
    assert {c["request_id"] for c in children} == set(ids)
    assert sorted(c["device_id"] for c in children) == devices
    assert {(c["status"], c["fanout_id"]) for c in children} == {("published", fanout_id)}


def test_fanout_naming_a_device_of_another_key_is_403_and_journals_nothing(fleet):
    """A key limited to site-a/*: a fan-out naming other devices is 403 naming those (not its own), and nothing
    of it is journaled or sent; the same fanout_id without them is then a new fan-out, not a replay."""
    mine, theirs = ["site-a/f403-1", "site-a/f403-2"], ["site-b/f403-7", "f403-elsewhere"]
    refused = post(fleet.url, fanout([mine[0], theirs[0], mine[1], theirs[1]], fanout_id="f403"), "site-a", FANOUT)
    detail = problem(refused, 403)["detail"]
    assert "'site-b/f403-7'" in detail and "'f403-elsewhere'" in detail and "site-a/f403" not in detail

    assert get_fanout(fleet.url, "f403", "admin").status_code == 404
    assert listed(fleet.url, "admin", fanout_id="f403") == []
    assert [c for d in mine + theirs for c in listed(fleet.url, "admin", device_id=d)] == []
    sentinel = post(fleet.url, command(mine[0], payload={"after": "the 403"}), "site-a")
    assert sentinel.status_code == 200, sentinel.text
    assert request_ids(fleet.records(mine[0])) == [sentinel.json()["request_id"]]
    assert [r for d in [mine[1], *theirs] for r in fleet.records(d)] == []

    accepted = post(fleet.url, fanout(mine, fanout_id="f403"), "site-a", FANOUT)
    assert accepted.status_code == 202 and "idempotent-replayed" not in accepted.headers
    assert accepted.json()["total"] == 2


def test_fanout_replays_by_fanout_id_and_idempotency_key_and_is_private_to_its_key(fleet):
    """The same client fanout_id or Idempotency-Key again: the same fan-out (Idempotent-Replayed), nothing sent
    twice; another body: 409. Another key cannot read it (404) nor take its fanout_id (409); admin can read it."""
    devices = ["idem-f-1", "idem-f-2", "idem-f-3"]
    first = post(fleet.url, fanout(devices, fanout_id="fo-idem", payload={"v": 1}), "writer", FANOUT)
    again = post(fleet.url, fanout(devices, fanout_id="fo-idem", payload={"v": 1}), "writer", FANOUT)
    assert first.status_code == 202 and again.status_code == 202, again.text
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert (again.json()["fanout_id"], again.json()["total"]) == ("fo-idem", 3)
    assert again.headers["location"] == "/api/v1/fanouts/fo-idem"
    problem(post(fleet.url, fanout(devices, fanout_id="fo-idem", payload={"v": 2}), "writer", FANOUT), 409)

    keyed = fanout(["idem-k-1", "idem-k-2"], payload={"v": 1})
    by_key = post(fleet.url, keyed, "writer", FANOUT, **{"Idempotency-Key": "fk-1"})
    by_key_again = post(fleet.url, keyed, "writer", FANOUT, **{"Idempotency-Key": "fk-1"})
    assert by_key.status_code == 202 and by_key_again.headers["idempotent-replayed"] == "true"
    assert by_key_again.json()["fanout_id"] == by_key.json()["fanout_id"] and by_key_again.json()["total"] == 2
    other_body = post(fleet.url, {**keyed, "payload": {"v": 2}}, "writer", FANOUT, **{"Idempotency-Key": "fk-1"})
    problem(other_body, 409)

    for fanout_id, total in (("fo-idem", 3), (by_key.json()["fanout_id"], 2)):
        wait_for(lambda f=fanout_id: get_fanout(fleet.url, f, "writer").json()["done"])
        assert get_fanout(fleet.url, fanout_id, "writer").json()["counts"] == {"published": total}
    assert get_fanout(fleet.url, "fo-idem", "admin").json()["total"] == 3
    assert get_fanout(fleet.url, "fo-idem", "site-a").status_code == 404
    assert get_fanout(fleet.url, "fo-idem", "reader").status_code == 404
    assert listed(fleet.url, "site-a", fanout_id="fo-idem") == []
    problem(post(fleet.url, fanout(["site-a/idem"], fanout_id="fo-idem"), "site-a", FANOUT), 409)
    for device in [*devices, "idem-k-1", "idem-k-2"]:
        assert len(fleet.records(device)) == 1, device
    assert listed(fleet.url, "admin", device_id="site-a/idem") == []


def test_fanout_device_list_is_checked_before_anything_is_stored(fleet):
    """422s naming the place: no devices, a device twice, more than MAX_FANOUT (10,000), device_id instead of
    device_ids, and a metadata.topic that is not each device's own; nothing of them is stored."""
    assert error_locs(post(fleet.url, fanout([]), "writer", FANOUT)) == ["$.device_ids"]
    twice = post(fleet.url, fanout(["chk-1", "chk-2", "chk-1"]), "writer", FANOUT)
    assert error_locs(twice) == ["$.device_ids[2]"] and "$.device_ids[0]" in twice.json()["errors"][0]["msg"]
    too_many = post(fleet.url, fanout([f"chk-{n}" for n in range(10_001)]), "writer", FANOUT)
    assert error_locs(too_many) == ["$.device_ids"] and "MAX_FANOUT" in too_many.json()["errors"][0]["msg"]
    assert error_locs(post(fleet.url, command("chk-1"), "writer", FANOUT)) == ["$.device_id"]
    foreign = fanout(["chk-1", "chk-2"], metadata={"topic": "devices/chk-1/commands"})
    assert error_locs(post(fleet.url, foreign, "writer", FANOUT)) == ["$.metadata.topic"]
    assert listed(fleet.url, "writer", device_id="chk-1") == [] and listed(fleet.url, "writer", device_id="chk-2") == []


def test_fanout_is_journaled_whole_or_not_at_all(kafka_bootstrap, topic, tmp_path):
    """JOURNAL_MAX_PENDING=5 with 3 commands held: a fan-out of 3 is 503 journal-full and none of it is stored
    (2 would have fit); a fan-out of 2 is taken and sent."""
    service = ServiceProcess(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic, JOURNAL_MAX_PENDING="5"
    ).start()
    try:
        later = rfc3339(datetime.now(UTC) + timedelta(minutes=10))
        held = [post(service.url, command(f"held-{n}", not_before=later)) for n in range(3)]
        assert [r.status_code for r in held] == [202] * 3
        refused = post(service.url, fanout(["whole-1", "whole-2", "whole-3"], fanout_id="whole"), path=FANOUT)
        assert problem(refused, 503)["type"] == "/problems/journal-full" and refused.headers["retry-after"]
        assert get_fanout(service.url, "whole").status_code == 404
        assert listed(service.url, fanout_id="whole") == []
        assert [c for n in (1, 2, 3) for c in listed(service.url, device_id=f"whole-{n}")] == []
        assert ready(service.url)["backlog"] == 3

        fits = post(service.url, fanout(["whole-1", "whole-2"], fanout_id="whole"), path=FANOUT)
        assert fits.status_code == 202 and fits.json()["total"] == 2
        wait_for(lambda: get_fanout(service.url, "whole").json()["done"])
        records = read_to_end(kafka_bootstrap, topic)
        assert sorted(r.key for r in records) == [b"whole-1", b"whole-2"]
        assert {header(r, "fanout_id") for r in records} == {"whole"}
    finally:
        service.stop()


def test_rate_limit_charges_a_fanout_one_unit_per_device(kafka_bootstrap, topic, tmp_path):
    """RATE_LIMIT=10/day: a fan-out to 4 devices spends 4 units; one to 11 devices (more than the window holds) is a
    422 naming $.device_ids, not a 429 a client would retry for ever; one to more devices than are left is 429."""
    service = ServiceProcess(
        tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic, RATE_LIMIT="10/day"
    ).start()
    try:
        single = post(service.url, command("rl-0"))
        assert single.status_code == 200 and single.headers["ratelimit-remaining"] == "9"
        four = post(service.url, fanout([f"rl-{n}" for n in range(1, 5)]), path=FANOUT)
        assert four.status_code == 202 and four.headers["ratelimit-remaining"] == "5"

        too_many = post(service.url, fanout([f"rl-big-{n}" for n in range(11)]), path=FANOUT)
        assert error_locs(too_many) == ["$.device_ids"]
        left = int(post(service.url, command("rl-0")).headers["ratelimit-remaining"])
        over = post(service.url, fanout([f"rl-over-{n}" for n in range(left + 2)]), path=FANOUT)
        assert problem(over, 429)["type"] == "/problems/rate-limited" and over.headers["retry-after"]
        assert listed(service.url, device_id="rl-big-0") == [] and listed(service.url, device_id="rl-over-0") == []
    finally:
        service.stop()


def test_fanout_children_are_held_and_supersede_each_devices_older_command(fleet):
    """A fan-out with not_before, a TTL and a coalesce_key: each device's queued command with that key is superseded
    by that device's child (the answer lists them); the children are held until not_before, then each device gets
    exactly its child."""
    later = rfc3339(datetime.now(UTC) + timedelta(minutes=10))
    older = {d: post(fleet.url, command(d, coalesce_key="fw", not_before=later), "writer") for d in ("fc-1", "fc-2")}
    assert [r.status_code for r in older.values()] == [202, 202]
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=4)
    body = fanout(["fc-1", "fc-2", "fc-3"], coalesce_key="fw", not_before=rfc3339(due), ttl_seconds=60)
    answer = post(fleet.url, body, "writer", FANOUT)
    assert answer.status_code == 202, answer.text
    assert sorted(answer.json()["superseded"]) == sorted(r.json()["request_id"] for r in older.values())
    assert at(answer.json()["not_before"]) == due and at(answer.json()["expires_at"]) == due + timedelta(seconds=60)
    children = {c["device_id"]: c for c in listed(fleet.url, "writer", fanout_id=answer.json()["fanout_id"])}
    assert sorted(children) == ["fc-1", "fc-2", "fc-3"]
    assert {(c["status"], at(c["not_before"])) for c in children.values()} == {("accepted", due)}
    for device, replaced in older.items():
        gone = status(fleet.url, replaced.json()["request_id"], "writer")
        assert (gone["status"], gone["superseded_by"]) == ("superseded", children[device]["request_id"])

    fanout_id = answer.json()["fanout_id"]
    wait_for(lambda: get_fanout(fleet.url, fanout_id, "writer").json()["done"])
    assert get_fanout(fleet.url, fanout_id, "writer").json()["counts"] == {"published": 3}
    for device, child in children.items():
        [record] = fleet.records(device)
        assert header(record, "request_id") == child["request_id"]
        assert record.timestamp >= int(due.timestamp() * 1000)


# ---------------------------------------------------------------- latest wins


def test_latest_wins_during_an_outage_and_other_commands_keep_their_order(own_broker, tmp_path):
    """Kafka down: 60 setpoints for one device with one coalesce_key are all 202, each superseding the one before;
    another device's plain commands, one of them cancelled, are 202 too. Kafka back: only the last setpoint is
    sent, the 59 others end `superseded` naming their successor, and the plain ones are all sent, in order. A
    command that came due during the outage is sent when Kafka is back; one due later, not before its time."""
    topic, service = service_on(own_broker, tmp_path, PUBLISH_TIMEOUT="1")
    try:
        own_broker.stop()
        wait_for(lambda: not ready(service.url)["kafka_connected"])
        due = {"during": datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)}
        scheduled = {"during": post(service.url, command("sched-1", not_before=rfc3339(due["during"])))}
        setpoints, plain = [], []
        for n in range(60):
            setpoints.append(post(service.url, command("thermo-1", payload={"setpoint": n}, coalesce_key="setpoint")))
            if n % 6 == 0:
                plain.append(post(service.url, command("valve-1", payload={"seq": n // 6})))
            if n == 30:
                withdrawn = post(service.url, command("valve-1", payload={"seq": "withdrawn"}))
                first_cancel = cancel(service.url, withdrawn.json()["request_id"])
        assert [r.status_code for r in setpoints + plain] == [202] * 70
        ids = [r.json()["request_id"] for r in setpoints]
        assert "superseded" not in setpoints[0].json()
        assert [r.json()["superseded"] for r in setpoints[1:]] == [[rid] for rid in ids[:-1]]
        assert withdrawn.status_code == 202 and first_cancel.status_code == 200, first_cancel.text
        assert first_cancel.json()["status"] == "cancelled"
        assert cancel(service.url, withdrawn.json()["request_id"]).json() == first_cancel.json()

        due["after"] = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=12)
        scheduled["after"] = post(service.url, command("sched-1", not_before=rfc3339(due["after"])))
        assert [r.status_code for r in scheduled.values()] == [202, 202]
        own_broker.start()
        wait_status(service.url, ids[-1], "published", timeout=120)
        service.wait_drained()
        for name, answer in scheduled.items():
            body = status(service.url, answer.json()["request_id"])
            assert body["status"] == "published" and at(step(body, "published")["at"]) >= due[name], body
        records = read_to_end(own_broker.bootstrap, topic)
        thermo = [r for r in records if r.key == b"thermo-1"]
        assert request_ids(thermo) == [ids[-1]] and value(thermo[0])["payload"] == {"setpoint": 59}
        in_kafka = [r for r in records if r.key == b"sched-1"]
        assert request_ids(in_kafka) == [scheduled[name].json()["request_id"] for name in ("during", "after")]
        valve = [r for r in records if r.key == b"valve-1"]
        assert [value(r)["payload"]["seq"] for r in valve] == list(range(10))
        assert request_ids(valve) == [r.json()["request_id"] for r in plain]
        for older, newer in pairwise(ids):
            body = status(service.url, older)
            assert body["status"] == "superseded" and body["superseded_by"] == newer, body
            assert [s["status"] for s in body["history"]] == ["accepted", "superseded"]
            assert step(body, "superseded")["detail"] == newer and body["offset"] is None
        assert status(service.url, withdrawn.json()["request_id"])["status"] == "cancelled"
        counters = httpx.get(service.url + "/api/v1/metrics").json()
        assert counters["commands_superseded"] == 59 and counters["commands_cancelled"] == 1
    finally:
        service.stop()


def test_a_command_handed_to_kafka_is_never_superseded(fleet):
    """A command already published stays published when a newer one with its coalesce_key arrives: both are in
    Kafka, and the newer answer supersedes nothing."""
    older = post(fleet.url, command("lw-sent", payload={"v": 1}, coalesce_key="mode"), "writer")
    newer = post(fleet.url, command("lw-sent", payload={"v": 2}, coalesce_key="mode"), "writer")
    assert older.status_code == 200 and newer.status_code == 200, newer.text
    assert newer.json().get("superseded", []) == []
    body = status(fleet.url, older.json()["request_id"], "writer")
    assert body["status"] == "published" and body["superseded_by"] is None
    assert request_ids(fleet.records("lw-sent")) == [older.json()["request_id"], newer.json()["request_id"]]


def test_latest_wins_within_one_device_and_coalesce_key_only(fleet):
    """Held commands: a newer command with the same device and coalesce_key supersedes the held one at once (it is
    never sent, and cancelling it is a 409 naming `superseded`); another key's or another device's are sent."""
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    old = post(fleet.url, command("lw-a", payload={"v": 1}, coalesce_key="k", not_before=rfc3339(due)), "writer")
    other_key = post(fleet.url, command("lw-a", coalesce_key="j", not_before=rfc3339(due)), "writer")
    other_device = post(fleet.url, command("lw-b", coalesce_key="k", not_before=rfc3339(due)), "writer")
    assert [r.status_code for r in (old, other_key, other_device)] == [202] * 3
    new = post(fleet.url, command("lw-a", payload={"v": 2}, coalesce_key="k"), "writer")
    assert new.status_code == 200 and new.json()["superseded"] == [old.json()["request_id"]]
    body = status(fleet.url, old.json()["request_id"], "writer")
    assert (body["status"], body["superseded_by"]) == ("superseded", new.json()["request_id"])
    refused = problem(cancel(fleet.url, old.json()["request_id"], "writer"), 409)
    assert refused["type"] == "/problems/not-cancellable" and "superseded" in refused["detail"]

    for sent in (other_key, other_device):
        wait_status(fleet.url, sent.json()["request_id"], "published", "writer")
    assert request_ids(fleet.records("lw-a")) == [new.json()["request_id"], other_key.json()["request_id"]]
    assert request_ids(fleet.records("lw-b")) == [other_device.json()["request_id"]]
    assert status(fleet.url, old.json()["request_id"], "writer")["status"] == "superseded"


# ---------------------------------------------------------------- cancel


def test_cancel_a_held_command_then_it_is_never_sent(fleet):
    """DELETE of a command held until not_before: 200 `cancelled`, the same 200 again; past its due time it is not
    in Kafka, though a later command of its device is."""
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    held = post(fleet.url, command("cx-held", not_before=rfc3339(due)), "writer")
    assert held.status_code == 202
    request_id = held.json()["request_id"]
    first = cancel(fleet.url, request_id, "writer")
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "cancelled" and first.json()["request_id"] == request_id
    assert [s["status"] for s in first.json()["history"]] == ["accepted", "cancelled"]
    again = cancel(fleet.url, request_id, "writer")
    assert again.status_code == 200 and again.json() == first.json()

    after = post(fleet.url, command("cx-held", not_before=rfc3339(due + timedelta(seconds=0.5))), "writer")
    wait_status(fleet.url, after.json()["request_id"], "published", "writer")
    assert request_ids(fleet.records("cx-held")) == [after.json()["request_id"]]
    assert status(fleet.url, request_id, "writer")["status"] == "cancelled"


def test_cancel_after_hand_over_is_409_naming_the_status(fleet):
    """DELETE of a command Kafka has: 409 not-cancellable, its detail naming `published`; nothing changes."""
    sent = post(fleet.url, command("cx-sent"), "writer")
    assert sent.status_code == 200
    refused = problem(cancel(fleet.url, sent.json()["request_id"], "writer"), 409)
    assert refused["type"] == "/problems/not-cancellable" and "published" in refused["detail"]
    assert status(fleet.url, sent.json()["request_id"], "writer")["status"] == "published"


def test_cancel_of_an_unknown_or_another_keys_command_is_404(fleet):
    """DELETE of an unknown request_id, or of another key's command, is 404 and cancels nothing; a read-only key is
    403; admin may cancel any key's command."""
    problem(cancel(fleet.url, "no-such-command", "writer"), 404)
    later = rfc3339(datetime.now(UTC) + timedelta(minutes=10))
    held = post(fleet.url, command("site-a/cx-foreign", not_before=later), "writer").json()["request_id"]
    problem(cancel(fleet.url, held, "site-a"), 404)
    problem(cancel(fleet.url, held, "reader"), 403)
    assert status(fleet.url, held, "writer")["status"] == "accepted"
    by_admin = cancel(fleet.url, held, "admin")
    assert by_admin.status_code == 200 and by_admin.json()["status"] == "cancelled"


# ---------------------------------------------------------------- deliver at


def test_device_order_is_due_time_then_acceptance(fleet):
    """One device: A due at T+4, B at T+2, C now, D at T+4 (accepted after A), E with not_before past: Kafka holds
    C, E, B, A, D, none of them published before its not_before."""
    now = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    plan = {"A": now + timedelta(seconds=4), "B": now + timedelta(seconds=2), "C": None}
    plan |= {"D": plan["A"], "E": now - timedelta(seconds=10)}
    sent = {}
    for name, due in plan.items():
        extra = {"not_before": rfc3339(due)} if due else {}
        answer = post(fleet.url, command("order-1", payload={"name": name}, **extra), "writer")
        assert answer.status_code in (200, 202), answer.text
        sent[name] = answer.json()["request_id"]
    for name in "ABD":
        body = status(fleet.url, sent[name], "writer")
        assert body["status"] == "accepted" and at(body["not_before"]) == plan[name]
    for name in plan:
        body = wait_status(fleet.url, sent[name], "published", "writer")
        if plan[name] is not None:
            assert at(step(body, "published")["at"]) >= plan[name], (name, body)
    records = fleet.records("order-1")
    assert [value(r)["payload"]["name"] for r in records] == ["C", "E", "B", "A", "D"]
    for record in records:
        due = plan[value(record)["payload"]["name"]]
        if due is not None:
            assert record.timestamp >= int(due.timestamp() * 1000)


def test_a_due_command_goes_before_one_accepted_just_after_its_due_time(fleet):
    """A command accepted without not_before a moment after a held command of its device came due (before the
    forwarder's next tick, on an idle service) goes after it: Kafka holds the device's commands in order of due
    time, then acceptance."""
    first_due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    held = {}  # request id -> (due, accepted)
    for n in range(3):
        due = first_due + timedelta(seconds=0.6 * n)
        answer = post(fleet.url, command("order-2", payload={"held": n}, not_before=rfc3339(due)), "writer")
        assert answer.status_code == 202
        held[answer.json()["request_id"]] = (due, at(answer.json()["timestamp"]))
    sent = {}
    for due, _ in held.values():
        time.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds() + 0.02))
        answer = post(fleet.url, command("order-2", payload={"after": str(due)}), "writer")
        assert answer.status_code in (200, 202), answer.text  # 202: queued behind the command just due
        sent[answer.json()["request_id"]] = (at(answer.json()["timestamp"]),) * 2
    for request_id in held:
        wait_status(fleet.url, request_id, "published", "writer")
    assert all(sent[rid][0] > due for rid, (due, _) in zip(sent, held.values(), strict=True))
    names = {rid: f"held {n}" for n, rid in enumerate(held)} | {rid: f"sent {n}" for n, rid in enumerate(sent)}
    expected = sorted(held | sent, key=lambda rid: (held | sent)[rid])
    in_kafka = request_ids(fleet.records("order-2"))
    assert [names[rid] for rid in in_kafka] == [names[rid] for rid in expected]


def test_not_before_and_expiry_are_checked_together(fleet):
    """expires_at at or before not_before is 422 at $.expires_at, not_before over 30 days ahead or without an offset
    is 422 at $.not_before (nothing stored); a TTL counts from not_before, and the status shows not_before."""
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=10)
    for expires in (due, due - timedelta(seconds=1)):
        for body, path in (
            (command("nb-422", request_id="nb-422", expires_at=rfc3339(expires)), COMMANDS),
            (fanout(["nb-422"], fanout_id="nb-422", expires_at=rfc3339(expires)), FANOUT),
        ):
            body["not_before"] = rfc3339(due)
            assert error_locs(post(fleet.url, body, "writer", path)) == ["$.expires_at"]
    far = datetime.now(UTC) + timedelta(days=30, minutes=5)
    assert error_locs(post(fleet.url, command("nb-422", not_before=rfc3339(far)), "writer")) == ["$.not_before"]
    far_fanout = fanout(["nb-422"], not_before=rfc3339(far))
    assert error_locs(post(fleet.url, far_fanout, "writer", FANOUT)) == ["$.not_before"]
    naive = command("nb-422", not_before=due.replace(tzinfo=None).isoformat())
    assert error_locs(post(fleet.url, naive, "writer")) == ["$.not_before"]
    assert listed(fleet.url, "writer", device_id="nb-422") == []
    assert get_fanout(fleet.url, "nb-422", "writer").status_code == 404

    ttl = post(fleet.url, command("nb-ttl", not_before=rfc3339(due), ttl_seconds=60), "writer")
    assert ttl.status_code == 202, ttl.text
    assert at(ttl.json()["not_before"]) == due and at(ttl.json()["expires_at"]) == due + timedelta(seconds=60)
    body = status(fleet.url, ttl.json()["request_id"], "writer")
    assert at(body["not_before"]) == due and at(body["expires_at"]) == due + timedelta(seconds=60)
    almost = post(fleet.url, command("nb-ttl", not_before=rfc3339(far - timedelta(minutes=10))), "writer")
    assert almost.status_code == 202, almost.text
    for request_id in (ttl.json()["request_id"], almost.json()["request_id"]):
        assert cancel(fleet.url, request_id, "writer").status_code == 200


def test_not_before_is_kept_across_sigterm_and_sigkill(kafka_bootstrap, topic, tmp_path):
    """A held command survives a SIGTERM restart and then a SIGKILL one; another accepted between them survives the
    SIGKILL. Each is published once, after its not_before and never before."""
    service = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic).start()
    try:
        due = {"first": datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=10)}
        first = post(service.url, command("restart-1", payload={"n": 1}, not_before=rfc3339(due["first"])))
        assert first.status_code == 202
        ids = {"first": first.json()["request_id"]}
        assert service.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        service.start()
        due["second"] = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=5)
        second = post(service.url, command("restart-2", payload={"n": 2}, not_before=rfc3339(due["second"])))
        assert second.status_code == 202
        ids["second"] = second.json()["request_id"]
        for name in ids:
            body = status(service.url, ids[name])
            assert body["status"] == "accepted" and at(body["not_before"]) == due[name]
        service.stop(signal.SIGKILL)
        service.start()
        for name in ids:
            body = wait_status(service.url, ids[name], "published")
            assert at(step(body, "published")["at"]) >= due[name], body
    finally:
        service.stop()
    records = read_topic(kafka_bootstrap, topic, 2)
    assert sorted(request_ids(records)) == sorted(ids.values())
    for record in records:
        name = "first" if header(record, "request_id") == ids["first"] else "second"
        assert record.timestamp >= int(due[name].timestamp() * 1000)


def test_a_held_command_reaches_the_device_only_after_its_due_time(kafka_bootstrap, tmp_path):
    """Through the reference MQTT connector and a real Mosquitto: a command held until not_before reaches the
    device after one sent later without it, and its `delivered` event is not earlier than its due time."""
    broker = Mosquitto(tmp_path).start()
    built = Setup(kafka_bootstrap, broker.port, tmp_path)
    try:
        built.service.start()
        built.start_device("heater-1")
        built.start_connector()
        due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=4)
        held = httpx.post(
            built.service.url + COMMANDS, json=command("heater-1", payload={"on": True}, not_before=rfc3339(due))
        )
        assert held.status_code == 202, held.text
        now = built.post(command("heater-1", payload={"on": False}))
        wait_for(lambda: built.received(), timeout=60)
        if datetime.now(UTC) < due:
            assert [line["command"]["request_id"] for line in built.received()] == [now["request_id"]]
        events = built.events(4)
        delivered = events[held.json()["request_id"]][0]
        assert delivered["status"] == "delivered" and at(delivered["at"]) >= due
        assert [line["command"]["request_id"] for line in built.received()] == [
            now["request_id"],
            held.json()["request_id"],
        ]
        assert [line["command"]["payload"] for line in built.received()] == [{"on": False}, {"on": True}]
    finally:
        built.close()
        broker.stop()


def test_what_never_left_the_journal_can_be_cancelled_and_superseded_after_a_crash(own_broker, tmp_path):
    """Kafka down the whole time: commands accepted, then the service killed (SIGKILL) and started again on its
    journal. They never reached a producer, and the journal says so: one is cancelled (200, not a 409), a newer
    setpoint supersedes the recovered one (its answer says so), and once Kafka is back only what is left is sent,
    each once, in order."""
    topic, service = service_on(own_broker, tmp_path, PUBLISH_TIMEOUT="1")
    try:
        own_broker.stop()
        wait_for(lambda: not ready(service.url)["kafka_connected"])
        kept = [post(service.url, command("crash-valve", payload={"n": n})) for n in range(3)]
        doomed = post(service.url, command("crash-valve", payload={"n": "cancel me"}))
        old_setpoint = post(service.url, command("crash-thermo", payload={"sp": 1}, coalesce_key="sp"))
        assert [r.status_code for r in [*kept, doomed, old_setpoint]] == [202] * 5
        service.stop(signal.SIGKILL)
        service.start(wait_ready=False)

        cancelled = cancel(service.url, doomed.json()["request_id"])
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        new_setpoint = post(service.url, command("crash-thermo", payload={"sp": 2}, coalesce_key="sp"))
        assert new_setpoint.status_code == 202
        assert new_setpoint.json()["superseded"] == [old_setpoint.json()["request_id"]]

        own_broker.start()
        wait_status(service.url, new_setpoint.json()["request_id"], "published", timeout=120)
        service.wait_drained()
        records = read_to_end(own_broker.bootstrap, topic)
        valve = [value(r)["payload"]["n"] for r in records if r.key == b"crash-valve"]
        thermo = [value(r)["payload"]["sp"] for r in records if r.key == b"crash-thermo"]
        assert valve == [0, 1, 2] and thermo == [2]
        assert (
            status(service.url, old_setpoint.json()["request_id"])["superseded_by"] == new_setpoint.json()["request_id"]
        )
    finally:
        service.stop()
