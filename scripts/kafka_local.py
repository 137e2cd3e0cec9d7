"""A real single-node Apache Kafka (KRaft, combined broker+controller) for tests and `make run`.

The jars are resolved from Maven Central with `mvn` into `.cache/kafka/<version>/libs`
(git-ignored); nothing is downloaded by hand. Stdlib only, so `make` can use it before the
virtualenv exists.

    python scripts/kafka_local.py up      # start in the background, print the bootstrap address
    python scripts/kafka_local.py down    # stop the broker started by `up`, by PID
    python scripts/kafka_local.py fetch   # only resolve the jars
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

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


def libs_dir(version: str = KAFKA_VERSION) -> Path:
    """Resolve Kafka and its runtime dependencies into the cache once; return the jar folder."""
    home = CACHE / version
    libs = home / "libs"
    done = home / ".resolved"
    if done.exists():
        return libs
    if shutil.which("mvn") is None:
        raise KafkaUnavailable("mvn is not on PATH: it is needed to resolve Apache Kafka jars")
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(POM.format(version=version))
    cmd = [
        "mvn", "-q", "-B", "-f", str(home / "pom.xml"),
        "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={libs}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
        tail = (result.stdout + result.stderr)[-2000:]
        raise KafkaUnavailable(f"resolving org.apache.kafka:kafka_2.13:{version} failed:\n{tail}")
    done.write_text(version)
    return libs


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


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LocalKafka:
    """One broker process with its own data folder; it can be stopped and started again on the same ports."""

    def __init__(
        self, data_dir: Path, port: int | None = None, partitions: int = 3, sasl_ssl: dict | None = None
    ) -> None:
        """`sasl_ssl`, when given, adds a SASL_SSL listener with SCRAM users:
        {"users": {name: password}, "keystore": PEM file (encrypted PKCS#8 key + cert), "key_password": …}."""
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.controller_port = free_port()
        self.partitions = partitions
        self.sasl_ssl = sasl_ssl
        self.sasl_port = free_port() if sasl_ssl else None
        self.process: subprocess.Popen[bytes] | None = None
        self.classpath = str(libs_dir() / "*")
        self._formatted = False

    @property
    def bootstrap(self) -> str:
        """The bootstrap address clients connect to."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the broker's stdout and stderr go."""
        return self.data_dir / "broker.log"

    @property
    def sasl_bootstrap(self) -> str:
        """The SASL_SSL listener's address (when configured)."""
        return f"127.0.0.1:{self.sasl_port}"

    def _security_lines(self) -> list[str]:
        if not self.sasl_ssl:
            return []
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return [
            "sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512",
            f"listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config={scram}",
            f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram}",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={self.sasl_ssl['keystore']}",
            f"ssl.key.password={self.sasl_ssl['key_password']}",
        ]

    def _write_config(self) -> Path:
        config = self.data_dir / "server.properties"
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}", f"CONTROLLER://127.0.0.1:{self.controller_port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        if self.sasl_ssl:
            listeners.append(f"SASL_SSL://127.0.0.1:{self.sasl_port}")
            advertised.append(f"SASL_SSL://127.0.0.1:{self.sasl_port}")
        config.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners={','.join(listeners)}",
                    f"advertised.listeners={','.join(advertised)}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
                    *self._security_lines(),
                    f"log.dirs={self.data_dir / 'logs'}",
                    f"num.partitions={self.partitions}",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "",
                ]
            )
        )
        return config

    def _java(self, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise KafkaUnavailable("java is not on PATH: Apache Kafka needs Java 17")
        return [java, "-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-cp", self.classpath, *args]

    def _format(self, config: Path) -> None:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        cmd = self._java("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(config))
        for name, password in (self.sasl_ssl or {}).get("users", {}).items():
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                cmd += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise KafkaUnavailable(f"formatting KRaft storage failed:\n{result.stdout}{result.stderr}")
        self._formatted = True

    def start(self, timeout: float = 90.0) -> LocalKafka:
        """Start the broker (formatting storage the first time) and wait until it answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        if not self._formatted:
            self._format(config)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._java("kafka.Kafka", str(config)), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise KafkaUnavailable(f"broker exited with {self.process.returncode}; log:\n{self._log_tail()}")
            if _port_open(self.port) and self._log_says_started():
                return self
            time.sleep(0.2)
        self.stop()
        raise KafkaUnavailable(f"broker did not answer within {timeout:.0f}s; log:\n{self._log_tail()}")

    def _log_says_started(self) -> bool:
        try:
            return b"Kafka Server started" in self.log_path.read_bytes()[-20000:]
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
        # The next start must find the log's "started" line anew.
        self.log_path.write_bytes(b"")


def _up() -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    pid_file = RUN_DIR / "pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        print((RUN_DIR / "bootstrap").read_text())
        return
    shutil.rmtree(RUN_DIR / "data", ignore_errors=True)
    port = int(os.environ.get("KAFKA_LOCAL_PORT", "9092"))
    if _port_open(port):
        raise KafkaUnavailable(f"port {port} is taken; set KAFKA_LOCAL_PORT or KAFKA_BOOTSTRAP_SERVERS")
    broker = LocalKafka(RUN_DIR / "data", port=port).start()
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
    """Command-line entry: up, down or fetch."""
    command = argv[1] if len(argv) > 1 else "up"
    try:
        if command == "up":
            _up()
        elif command == "down":
            _down()
        elif command == "fetch":
            print(libs_dir())
        elif command == "smoke":
            with tempfile.TemporaryDirectory() as tmp:
                broker = LocalKafka(Path(tmp)).start()
                print(f"started at {broker.bootstrap}")
                broker.stop()
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except KafkaUnavailable as exc:
        print(f"local Kafka: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
