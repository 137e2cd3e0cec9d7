"""A real Apache Kafka (KRaft, combined broker+controller) for tests and `make run`: one node, or a
three-node cluster (`KafkaCluster`) whose nodes can be killed and restarted one at a time.

The jars are resolved from Maven Central with `mvn` into `.cache/kafka/<version>/libs`
(git-ignored); nothing is downloaded by hand. Stdlib only, so `make` can use it before the
virtualenv exists.

    python scripts/kafka_local.py up        # start in the background, print the bootstrap address (progress: stderr)
    python scripts/kafka_local.py down      # stop the broker started by `up`, by PID
    python scripts/kafka_local.py fetch     # only resolve the jars
    python scripts/kafka_local.py smoke     # start and stop one node
    python scripts/kafka_local.py cluster   # start and stop a three-node cluster
"""

from __future__ import annotations

import base64
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TextIO

KAFKA_VERSION = os.environ.get("KAFKA_VERSION", "4.1.1")
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "kafka"
RUN_DIR = CACHE / "run"

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.pusher</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-simple</artifactId>
      <version>1.7.36</version>
    </dependency>
  </dependencies>
</project>
"""


class KafkaUnavailable(RuntimeError):
    """The local broker could not be resolved or started; the message says why."""


def libs_dir(version: str = KAFKA_VERSION, progress: TextIO | None = None) -> Path:
    """Resolve Kafka and its runtime dependencies into the cache once; return the jar folder. With `progress`,
    say so there and write a dot per file Maven downloads or copies."""
    home = CACHE / version
    libs = home / "libs"
    if (home / ".resolved").exists():
        return libs
    home.mkdir(parents=True, exist_ok=True)
    # Test workers start brokers at once: one resolves, the others wait for it and find the jars there.
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / ".resolved").exists():
            _resolve(home, libs, version, progress)
    return libs


def _resolve(home: Path, libs: Path, version: str, progress: TextIO | None) -> None:
    """Run mvn to copy Kafka and its runtime dependencies into `libs`; mark the folder resolved."""
    if shutil.which("mvn") is None:
        raise KafkaUnavailable("mvn is not on PATH: it is needed to resolve Apache Kafka jars")
    (home / "pom.xml").write_text(POM.format(version=version))
    _say(progress, f"local Kafka: resolving Apache Kafka {version} jars from Maven Central with mvn (once) ", end="")
    cmd = [
        "mvn", "-B", "-Dstyle.color=never", "-f", str(home / "pom.xml"),
        "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={libs}",
    ]  # fmt: skip
    output: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as mvn:
        killer = threading.Timer(900, mvn.kill)
        killer.start()
        for line in mvn.stdout:
            output.append(line)
            if line.startswith(("[INFO] Downloaded from", "[INFO] Copying")):
                _say(progress, ".", end="")
        killer.cancel()
    jars = len(list(libs.glob("*.jar")))
    _say(progress, f" {jars} jars")
    if mvn.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
        tail = "".join(output)[-2000:]
        raise KafkaUnavailable(f"resolving org.apache.kafka:kafka_2.13:{version} failed:\n{tail}")
    (home / ".resolved").write_text(version)


def _say(stream: TextIO | None, text: str, end: str = "\n") -> None:
    """Progress for a person; stdout stays for what scripts read (the bootstrap address)."""
    if stream is not None:
        print(text, end=end, file=stream, flush=True)


def free_port() -> int:
    """Ask the kernel for a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Signal a child process, wait for it (SIGKILL after `timeout`), and return its exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def new_cluster_id() -> str:
    """A fresh KRaft cluster id (a base64url UUID, as `kafka-storage.sh random-uuid` prints)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def port_open(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port`."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LocalKafka:
    """One broker process with its own data folder; it can be stopped and started again on the same ports.

    Alone it is a single-node cluster; `KafkaCluster` makes several of them one quorum (`voters`, a shared
    `cluster_id` and its `overrides` of the defaults below)."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        partitions: int = 3,
        sasl_ssl: dict | None = None,
        *,
        node_id: int = 1,
        cluster_id: str | None = None,
        overrides: dict[str, str] | None = None,
        heap: str = "512m",
    ) -> None:
        """`sasl_ssl`, when given, adds a SASL_SSL listener with SCRAM users:
        {"users": {name: password}, "keystore": PEM file (encrypted PKCS#8 key + cert), "key_password": …}."""
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.controller_port = free_port()
        self.partitions = partitions
        self.sasl_ssl = sasl_ssl
        self.sasl_port = free_port() if sasl_ssl else None
        self.node_id = node_id
        self.voters = f"{node_id}@127.0.0.1:{self.controller_port}"
        self.cluster_id = cluster_id or new_cluster_id()
        self.overrides = overrides or {}
        self.heap = heap
        self.process: subprocess.Popen[bytes] | None = None
        self.classpath = str(libs_dir() / "*")
        self._formatted = False
        self._log_offset = 0

    @property
    def bootstrap(self) -> str:
        """The bootstrap address clients connect to."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the broker's stdout and stderr go (kept across restarts)."""
        return self.data_dir / "broker.log"

    @property
    def sasl_bootstrap(self) -> str:
        """The SASL_SSL listener's address (when configured)."""
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def running(self) -> bool:
        """True while the broker process started here is alive."""
        return self.process is not None and self.process.poll() is None

    def _security_settings(self) -> dict[str, str]:
        if not self.sasl_ssl:
            return {}
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return {
            "sasl.enabled.mechanisms": "SCRAM-SHA-256,SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": scram,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.sasl_ssl["keystore"]),
            "ssl.key.password": self.sasl_ssl["key_password"],
        }

    def _write_config(self) -> Path:
        config = self.data_dir / "server.properties"
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}", f"CONTROLLER://127.0.0.1:{self.controller_port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        if self.sasl_ssl:
            listeners.append(f"SASL_SSL://127.0.0.1:{self.sasl_port}")
            advertised.append(f"SASL_SSL://127.0.0.1:{self.sasl_port}")
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "listeners": ",".join(listeners),
            "advertised.listeners": ",".join(advertised),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
            **self._security_settings(),
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": str(self.partitions),
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            **self.overrides,
        }
        config.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        return config

    def _java(self, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise KafkaUnavailable("java is not on PATH: Apache Kafka needs Java 17")
        return [java, "-Xms128m", f"-Xmx{self.heap}", "-XX:+UseSerialGC", "-cp", self.classpath, *args]

    def _format(self, config: Path) -> None:
        cmd = self._java("kafka.tools.StorageTool", "format", f"--cluster-id={self.cluster_id}", "-c", str(config))
        for name, password in (self.sasl_ssl or {}).get("users", {}).items():
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                cmd += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise KafkaUnavailable(f"formatting KRaft storage failed:\n{result.stdout}{result.stderr}")
        self._formatted = True

    def start(self, timeout: float = 90.0) -> LocalKafka:
        """Start the broker (formatting storage the first time) and wait until it answers."""
        self.launch()
        self.wait_started(timeout)
        return self

    def launch(self) -> None:
        """Start the broker process (formatting storage the first time) without waiting for it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        if not self._formatted:
            self._format(config)
        # Only what this run prints counts when looking for its "started" line.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._java("kafka.Kafka", str(config)), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_started(self, timeout: float = 90.0) -> None:
        """Wait until the launched broker answers; stop it and raise KafkaUnavailable if it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else None
                raise KafkaUnavailable(f"broker {self.node_id} exited with {code}; log:\n{self._log_tail()}")
            if port_open(self.port) and self._log_says_started():
                return
            time.sleep(0.2)
        self.stop()
        raise KafkaUnavailable(f"broker {self.node_id} did not answer within {timeout:.0f}s; log:\n{self._log_tail()}")

    def _log_says_started(self) -> bool:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return b"Kafka Server started" in log.read()
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop the broker by PID (SIGTERM: clean; SIGKILL: a crash) and wait for it to exit."""
        if self.process is None:
            return
        stop_process(self.process, sig, timeout)
        self.process = None


# Every cluster node: the durability a production cluster has (three replicas, two in sync for a write) and a
# failover measured in seconds.
CLUSTER_SETTINGS = {
    "default.replication.factor": "3",
    "min.insync.replicas": "2",
    "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": "2",
    "share.coordinator.state.topic.replication.factor": "3",
    "share.coordinator.state.topic.min.isr": "2",
    # The active controller fences a broker whose heartbeats stop for this long and moves its leaderships:
    # 3 s instead of the default 9 s.
    "broker.heartbeat.interval.ms": "500",
    "broker.session.timeout.ms": "3000",
    # Leadership stays where failover put it: no preferred-leader moves in the middle of a measurement.
    "auto.leader.rebalance.enable": "false",
    # Fewer threads than the defaults: three brokers share two cores with the service and its load.
    "num.network.threads": "2",
    "num.io.threads": "2",
    "background.threads": "2",
}


class KafkaCluster:
    """Three (or `size`) combined broker+controller nodes, one KRaft quorum, each node on its own loopback ports,
    data folder and PID; node ids are 1..size and equal the broker ids Kafka reports as partition leaders."""

    def __init__(self, data_dir: Path, size: int = 3, partitions: int = 3, heap: str = "384m") -> None:
        cluster_id = new_cluster_id()
        self.nodes = {
            node_id: LocalKafka(
                Path(data_dir) / f"node-{node_id}",
                partitions=partitions,
                node_id=node_id,
                cluster_id=cluster_id,
                overrides=CLUSTER_SETTINGS,
                heap=heap,
            )
            for node_id in range(1, size + 1)
        }
        voters = ",".join(f"{node.node_id}@127.0.0.1:{node.controller_port}" for node in self.nodes.values())
        for node in self.nodes.values():
            node.voters = voters

    @property
    def bootstrap(self) -> str:
        """Every node's address, comma-separated, as clients take it."""
        return ",".join(node.bootstrap for node in self.nodes.values())

    def start(self, timeout: float = 120.0) -> KafkaCluster:
        """Start every node and wait until all answer; a node cannot finish starting before a quorum exists,
        so all are launched first."""
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes.values():
                node.launch()
            for node in self.nodes.values():
                node.wait_started(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node by PID; all are signalled at once, since a node left alone without a quorum
        would wait out its controlled shutdown."""
        for node in self.nodes.values():
            if node.running:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            node.stop(timeout=timeout)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node: a crash, without controlled shutdown or leadership hand-over."""
        self.nodes[node_id].stop(signal.SIGKILL)

    def restart(self, node_id: int, timeout: float = 90.0) -> None:
        """Start a stopped or killed node again on its ports and data, and wait until it answers."""
        self.nodes[node_id].start(timeout)


def _up() -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    pid_file = RUN_DIR / "pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        bootstrap = (RUN_DIR / "bootstrap").read_text()
        _say(sys.stderr, f"local Kafka: already running at {bootstrap}")
        print(bootstrap)
        return
    shutil.rmtree(RUN_DIR / "data", ignore_errors=True)
    port = int(os.environ.get("KAFKA_LOCAL_PORT", "9092"))
    if port_open(port):
        raise KafkaUnavailable(f"port {port} is taken; set KAFKA_LOCAL_PORT or KAFKA_BOOTSTRAP_SERVERS")
    libs_dir(progress=sys.stderr)
    started = time.monotonic()
    _say(sys.stderr, f"local Kafka: starting Apache Kafka {KAFKA_VERSION} (KRaft, one node) on 127.0.0.1:{port}")
    broker = LocalKafka(RUN_DIR / "data", port=port).start()
    _say(sys.stderr, f"local Kafka: up in {time.monotonic() - started:.0f} s (log: {broker.log_path})")
    pid_file.write_text(str(broker.process.pid))
    (RUN_DIR / "bootstrap").write_text(broker.bootstrap)
    print(broker.bootstrap)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _down() -> None:
    pid_file = RUN_DIR / "pid"
    if not pid_file.exists():
        print("no local Kafka running")
        return
    pid = int(pid_file.read_text())
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        for _ in range(300):
            if not _alive(pid):
                break
            time.sleep(0.1)
    pid_file.unlink()
    print(f"stopped local Kafka (pid {pid})")


def main(argv: list[str]) -> int:
    """Command-line entry: up, down, fetch, smoke or cluster."""
    command = argv[1] if len(argv) > 1 else "up"
    try:
        if command == "up":
            _up()
        elif command == "down":
            _down()
        elif command == "fetch":
            print(libs_dir(progress=sys.stderr))
        elif command == "smoke":
            with tempfile.TemporaryDirectory() as tmp:
                broker = LocalKafka(Path(tmp)).start()
                print(f"started at {broker.bootstrap}")
                broker.stop()
        elif command == "cluster":
            with tempfile.TemporaryDirectory() as tmp:
                started = time.monotonic()
                cluster = KafkaCluster(Path(tmp)).start()
                print(f"cluster started at {cluster.bootstrap} in {time.monotonic() - started:.1f}s")
                cluster.stop()
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except KafkaUnavailable as exc:
        print(f"local Kafka: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
