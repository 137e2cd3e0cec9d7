"""Session fixtures: a real Apache Kafka broker (or the one KAFKA_BOOTSTRAP_SERVERS names); and the
`integration` marker, set here on every test that starts a server, so `make check` can leave those out."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, FunctionType

import pytest
from helpers import ServiceProcess, keys_file, new_topic
from kafka_local import KafkaCluster, KafkaUnavailable, LocalKafka

TESTS = Path(__file__).resolve().parent
# What makes a test `integration`: starting one of these classes, or running one of these programs, from the
# test, its fixtures, or any function or class of tests/ that they use.
LAUNCHERS = (ServiceProcess, LocalKafka, KafkaCluster)
SERVER_PROGRAMS = {"java", "mvn", "redis-server", "mosquitto", "chromium"}


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker that tests/conftest.py sets by itself."""
    config.addinivalue_line(
        "markers",
        "integration: starts a server (Kafka, Mosquitto, Redis, Chromium) or the service as a process; "
        "set by tests/conftest.py from what the test uses, never by hand",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts a server, through its own code or a fixture's."""
    for item in items:
        fixtures = [defs[-1].func for defs in item._fixtureinfo.name2fixturedefs.values()]
        if any(_starts_a_server(func, set()) for func in [item.function, *fixtures]):
            item.add_marker(pytest.mark.integration)


def _starts_a_server(thing: object, seen: set[CodeType]) -> bool:
    """Whether a function (or class) of tests/ names a launcher or a server program, directly or through
    the functions and classes of tests/ it refers to."""
    if isinstance(thing, type):
        return any(_starts_a_server(attr, seen) for attr in vars(thing).values())
    if not isinstance(thing, FunctionType) or Path(thing.__code__.co_filename).parent != TESTS:
        return False
    codes = [thing.__code__]
    while codes:
        code = codes.pop()
        if code in seen:
            continue
        seen.add(code)
        if SERVER_PROGRAMS.intersection(c for c in code.co_consts if isinstance(c, str)):
            return True
        codes += [c for c in code.co_consts if isinstance(c, CodeType)]  # lambdas, comprehensions
        for name in code.co_names:
            value = thing.__globals__.get(name)
            if any(value is launcher for launcher in LAUNCHERS) or _starts_a_server(value, seen):
                return True
    return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """Run an unmarked test with servers refused: one that starts a server after all (a way the marking
    above missed) fails saying so, instead of slowing `make check` down unseen."""
    if item.get_closest_marker("integration"):
        return (yield)
    with _refusing_servers(item.nodeid):
        return (yield)


@contextlib.contextmanager
def _refusing_servers(nodeid: str) -> Iterator[None]:
    """Within the block, starting a server program, the service or a broker fails the test."""
    popen_init, service_start, kafka_launch = subprocess.Popen.__init__, ServiceProcess.start, LocalKafka.launch

    def refuse(what: str) -> None:
        pytest.fail(
            f"{nodeid} starts {what} but is not marked integration: tests/conftest.py marks the tests that name "
            "one of LAUNCHERS or SERVER_PROGRAMS; add the way this test starts it there",
            pytrace=False,
        )

    def guarded_popen(self, args, *rest, **kwargs):
        first = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
        program = os.path.basename(os.fsdecode(first).split(" ")[0])
        if program in SERVER_PROGRAMS:
            refuse(program)
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = guarded_popen
    ServiceProcess.start = lambda *_, **__: refuse("the service (ServiceProcess)")
    LocalKafka.launch = lambda *_, **__: refuse("Kafka (LocalKafka)")
    try:
        yield
    finally:
        subprocess.Popen.__init__, ServiceProcess.start, LocalKafka.launch = popen_init, service_start, kafka_launch


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A reachable broker: KAFKA_BOOTSTRAP_SERVERS when set, else a local one; never a skip."""
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        host, _, port = given.split(",")[0].rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            pytest.fail(f"KAFKA_BOOTSTRAP_SERVERS={given} is not reachable: {exc}", pytrace=False)
        yield given
        return
    try:
        broker = LocalKafka(tmp_path_factory.mktemp("kafka")).start()
    except KafkaUnavailable as exc:
        pytest.fail(f"no Kafka broker for the integration tests: {exc}", pytrace=False)
    yield broker.bootstrap
    broker.stop()


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    """A fresh three-partition command topic."""
    return new_topic(kafka_bootstrap)


@pytest.fixture
def service(kafka_bootstrap: str, topic: str, tmp_path) -> Iterator[ServiceProcess]:
    """The service as a real process, publishing to `topic`."""
    proc = ServiceProcess(tmp_path, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_COMMAND_TOPIC=topic).start()
    yield proc
    proc.stop()


@pytest.fixture
def keyed_service(kafka_bootstrap: str, topic: str, tmp_path) -> Iterator[ServiceProcess]:
    """The service as a real process with API keys on (helpers.KEYS)."""
    keys = keys_file(tmp_path / "keys.toml")
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "KAFKA_COMMAND_TOPIC": topic, "API_KEYS_FILE": keys}
    proc = ServiceProcess(tmp_path, **env).start()
    yield proc
    proc.stop()


@pytest.fixture
def own_broker(tmp_path) -> Iterator[LocalKafka]:
    """A broker of this test's own (not started yet), so it can be stopped and started at will."""
    broker = LocalKafka(tmp_path / "kafka")
    yield broker
    broker.stop()
