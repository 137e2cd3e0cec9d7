"""Session fixtures: a real Apache Kafka broker (or the one KAFKA_BOOTSTRAP_SERVERS names)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from helpers import ServiceProcess, keys_file, new_topic
from kafka_local import KafkaUnavailable, LocalKafka


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
