"""Apache Kafka on loopback for tests and benchmarks: one KRaft node or a three-node cluster.

The broker's jars come from Maven Central (the distribution tarball is not needed): a
one-dependency ``pom.xml`` and ``mvn dependency:copy-dependencies`` fill
``.cache/kafka/<version>/lib`` once. Each node runs ``kafka.Kafka`` as combined
controller and broker with a small heap, its data in its own directory and its output in
``node-<id>.log``; any node can be stopped, killed, frozen and restarted with its data.
Timeouts are tuned for tests (no initial rebalance delay, fast broker fencing).

``python -m bridge.local.apache_kafka fetch`` fetches the jars; ``... run`` starts a node.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.local.broker import Features, create_topics, free_port, wait_for_metadata

VERSION = "4.4.0"  # the newest 4.x on Maven Central here; runs on Java 17
LOG4J_VERSION = "2.24.3"  # Kafka's own log4j; the slf4j binding is not a broker dependency
ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BRIDGE_KAFKA_CACHE", ROOT / ".cache" / "kafka"))
INSTALL_HINT = (
    "Apache Kafka for the tests runs on Java 17+ and its jars are fetched with Maven;"
    " on Debian: apt-get install openjdk-17-jre-headless maven"
)

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.wavespeed-bridge</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J = """\
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
logger.kafka.name = kafka.Kafka
logger.kafka.level = INFO
"""


def ensure_jars(version: str = VERSION, cache: Path = CACHE) -> Path:
    """The broker's classpath folder, fetched with Maven on first use (then reused)."""
    home = cache / version
    lib = home / "lib"
    if (home / "complete").exists():
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError(f"Maven (mvn) not found. {INSTALL_HINT}")
    home.mkdir(parents=True, exist_ok=True)
    with (home / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes fetching at once share one result
        if (home / "complete").exists():
            return lib
        (home / "pom.xml").write_text(_POM.format(version=version, log4j=LOG4J_VERSION))
        partial = home / "lib.partial"
        shutil.rmtree(partial, ignore_errors=True)
        done = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(home / "pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={partial}",
                "-DincludeScope=runtime",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"fetching Apache Kafka {version} with Maven failed:\n{done.stdout[-2000:]}"
            )
        shutil.rmtree(lib, ignore_errors=True)
        partial.rename(lib)
        (home / "complete").write_text(version)
    return lib


def java_binary() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise RuntimeError(f"java not found. {INSTALL_HINT}")
    return java


def random_cluster_id() -> str:
    # Kafka's Uuid: 16 random bytes, URL-safe base64 without padding, not starting with '-'.
    while True:
        text = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


@dataclass(frozen=True)
class SaslSsl:
    """A SASL_SSL (SCRAM-SHA-512) listener beside the plain one: PEM files and users."""

    keystore_pem: Path  # the server's private key (PKCS#8) and certificate chain
    users: dict[str, str]  # name -> password
    mechanism: str = "SCRAM-SHA-512"


@dataclass
class KafkaNode:
    node_id: int
    port: int
    controller_port: int
    directory: Path
    secure_port: int | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def properties(self) -> Path:
        return self.directory / "server.properties"

    @property
    def log_path(self) -> Path:
        return self.directory.parent / f"node-{self.node_id}.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class KafkaCluster:
    """``size`` KRaft nodes, each controller and broker, on free loopback ports.

    One node for most tests; three for replication (factor 3, ``min.insync.replicas`` 2).
    """

    size: int = 1
    directory: Path | None = None
    version: str = VERSION
    heap_mb: int = 384
    overrides: dict[str, str] = field(default_factory=dict)
    sasl_ssl: SaslSsl | None = None
    nodes: list[KafkaNode] = field(default_factory=list)
    _own_directory: bool = False
    startup_s: float = 0.0  # start() to ready, for the record

    name: str = ""
    features = Features(idempotence=True, transactions=True, commit_metadata=True, persistent=True)

    def __post_init__(self) -> None:
        self.name = f"Apache Kafka {self.version}"
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="kafka-"))
            self._own_directory = True
        self.nodes = [
            KafkaNode(
                node_id=i + 1,
                port=free_port(),
                controller_port=free_port(),
                directory=self.directory / f"node-{i + 1}",
                secure_port=free_port() if self.sasl_ssl else None,
            )
            for i in range(self.size)
        ]

    # --- addresses --------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """The plain listeners of every node (tests' own clients use these)."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def secure_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.secure_port}" for n in self.nodes)

    def client_options(self) -> dict[str, Any]:
        return {"bootstrap_servers": self.bootstrap}

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    # --- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        """Format every node's storage (first start only) and launch them."""
        lib = ensure_jars(self.version)
        self._started_at = time.monotonic()
        fresh = [n for n in self.nodes if not (n.directory / "data" / "meta.properties").exists()]
        for n in self.nodes:
            self._write_config(n)
        self._format(lib, fresh)
        for n in self.nodes:
            self.start_node(n.node_id)

    async def wait_ready(self, timeout: float = 120.0) -> None:
        await wait_for_metadata(
            self.client_options(), timeout=timeout, brokers=self.size, alive=self._check_alive
        )
        self.startup_s = time.monotonic() - self._started_at

    def start_node(self, node_id: int) -> None:
        n = self.node(node_id)
        if n.running:
            return
        classpath = str(ensure_jars(self.version) / "*")
        out = n.log_path.open("ab")
        n.process = subprocess.Popen(
            [
                java_binary(),
                f"-Xmx{self.heap_mb}m",
                "-Xms64m",
                "-XX:+UseSerialGC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.directory}/log4j2.properties",
                "-cp",
                classpath,
                "kafka.Kafka",
                str(n.properties),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # signals reach the JVM alone
        )
        out.close()

    def stop_node(self, node_id: int, timeout: float = 30.0) -> None:
        """SIGTERM: a controlled shutdown that moves leadership away first."""
        n = self.node(node_id)
        if n.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            n.process.send_signal(signal.SIGCONT)
            n.process.terminate()
        try:
            n.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            n.process.kill()
            n.process.wait()
        n.process = None

    def kill_node(self, node_id: int) -> None:
        n = self.node(node_id)
        if n.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            n.process.kill()
        n.process.wait()
        n.process = None

    def freeze_node(self, node_id: int) -> None:
        n = self.node(node_id)
        assert n.process is not None
        n.process.send_signal(signal.SIGSTOP)

    def thaw_node(self, node_id: int) -> None:
        n = self.node(node_id)
        assert n.process is not None
        n.process.send_signal(signal.SIGCONT)

    def restart_node(self, node_id: int) -> None:
        self.stop_node(node_id)
        self.start_node(node_id)

    def close(self) -> None:
        for n in self.nodes:
            self.kill_node(n.node_id)
        if self._own_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    # --- single-node conveniences (the usual test broker) ------------------------------

    def freeze(self) -> None:
        self.freeze_node(1)

    def thaw(self) -> None:
        self.thaw_node(1)

    def stop(self) -> None:
        for n in self.nodes:
            self.stop_node(n.node_id)

    # --- admin -------------------------------------------------------------------------

    async def create_topics(
        self,
        names: list[str],
        partitions: int = 1,
        replication: int | None = None,
        *,
        leader: int | None = None,
    ) -> None:
        """Replicated on min(size, 3) nodes unless told; ``leader`` leads every partition."""
        factor = replication if replication is not None else min(self.size, 3)
        replicas = None
        if leader is not None:
            others = [n.node_id for n in self.nodes if n.node_id != leader]
            replicas = [leader, *others[: factor - 1]]
        await create_topics(self.client_options(), names, partitions, factor, replicas)

    async def wait_in_sync(self, topics: list[str], timeout: float = 60.0) -> None:
        """Until every partition of ``topics`` has all its replicas in sync again."""
        from aiokafka.admin import AIOKafkaAdminClient

        deadline = time.monotonic() + timeout
        admin = AIOKafkaAdminClient(**self.client_options())
        await admin.start()
        try:
            while time.monotonic() < deadline:
                described = await admin.describe_topics(topics)
                if all(
                    len(p["isr"]) == len(p["replicas"]) and p["leader"] >= 0
                    for t in described
                    for p in t["partitions"]
                ):
                    return
                await asyncio.sleep(0.2)
            raise TimeoutError(f"replicas of {topics} not in sync after {timeout}s")
        finally:
            await admin.close()

    async def leader(self, topic: str, partition: int = 0) -> int:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(**self.client_options())
        await admin.start()
        try:
            (described,) = await admin.describe_topics([topic])
            for p in described["partitions"]:
                if p["partition"] == partition:
                    return int(p["leader"])
            raise KeyError(f"{topic}-{partition}")
        finally:
            await admin.close()

    # --- internals ---------------------------------------------------------------------

    def _check_alive(self) -> None:
        for n in self.nodes:
            if n.process is not None and n.process.poll() is not None:
                tail = n.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"Kafka node {n.node_id} exited:\n{tail}")

    def _settings(self, n: KafkaNode) -> dict[str, str]:
        voters = ",".join(f"{m.node_id}@127.0.0.1:{m.controller_port}" for m in self.nodes)
        replicas = min(self.size, 3)
        listeners = [f"PLAIN://127.0.0.1:{n.port}"]
        protocols = ["PLAIN:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        if self.sasl_ssl is not None:
            listeners.append(f"SECURE://127.0.0.1:{n.secure_port}")
            protocols.append("SECURE:SASL_SSL")
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(n.node_id),
            "controller.quorum.voters": voters,
            "controller.listener.names": "CONTROLLER",
            "listeners": ",".join([*listeners, f"CONTROLLER://127.0.0.1:{n.controller_port}"]),
            "advertised.listeners": ",".join(listeners),
            "listener.security.protocol.map": ",".join(protocols),
            "inter.broker.listener.name": "PLAIN",
            "log.dirs": str(n.directory / "data"),
            "num.partitions": "1",
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(min(replicas, 2)),
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min(replicas, 2)),
            "transaction.state.log.num.partitions": "5",
            # A transaction past its timeout (a killed producer's) is aborted within a second.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
            # Tests: no join delay, short sessions allowed, dead brokers fenced in seconds.
            "group.initial.rebalance.delay.ms": "0",
            "group.min.session.timeout.ms": "1000",
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            "replica.lag.time.max.ms": "4000",
            "auto.create.topics.enable": "true",
        }
        if self.sasl_ssl is not None:
            mech = self.sasl_ssl.mechanism.lower()
            settings |= {
                "sasl.enabled.mechanisms": self.sasl_ssl.mechanism,
                f"listener.name.secure.{mech}.sasl.jaas.config": (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                ),
                "listener.name.secure.ssl.keystore.type": "PEM",
                "listener.name.secure.ssl.keystore.location": str(self.sasl_ssl.keystore_pem),
            }
        return settings | self.overrides

    def _write_config(self, n: KafkaNode) -> None:
        assert self.directory is not None
        n.directory.mkdir(parents=True, exist_ok=True)
        lines = [f"{k}={v}" for k, v in self._settings(n).items()]
        n.properties.write_text("\n".join(lines) + "\n")
        (self.directory / "log4j2.properties").write_text(_LOG4J)

    def _format(self, lib: Path, nodes: Sequence[KafkaNode]) -> None:
        if not nodes:
            return
        cluster_id = random_cluster_id()
        scram: list[str] = []
        if self.sasl_ssl is not None:
            for user, password in self.sasl_ssl.users.items():
                scram += [
                    "--add-scram",
                    f"{self.sasl_ssl.mechanism}=[name={user},password={password}]",
                ]
        runs = [
            subprocess.Popen(
                [
                    java_binary(),
                    "-Xmx128m",
                    "-XX:+UseSerialGC",
                    f"-Dlog4j2.configurationFile={self.directory}/log4j2.properties",
                    "-cp",
                    str(lib / "*"),
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(n.properties),
                    *scram,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for n in nodes
        ]
        for n, run in zip(nodes, runs, strict=True):
            out, _ = run.communicate(timeout=120)
            if run.returncode != 0:
                raise RuntimeError(f"formatting node {n.node_id} failed: {out.decode()[-2000:]}")


async def start_cluster(size: int = 1, **options: Any) -> KafkaCluster:
    """Start ``size`` nodes and wait until each is registered; close() on failure."""
    cluster = KafkaCluster(size, **options)
    try:
        cluster.start()
        await cluster.wait_ready()
    except BaseException:
        cluster.close()
        raise
    return cluster


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.local.apache_kafka")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help=f"fetch Apache Kafka {VERSION}'s jars into {CACHE}")
    run = sub.add_parser("run", help="run a cluster on loopback until Ctrl-C")
    run.add_argument("--nodes", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            java_binary()
            lib = ensure_jars()
        except RuntimeError as exc:
            print(f"error: {exc}")
            return 1
        java = subprocess.run(
            [java_binary(), "-version"], capture_output=True, text=True, check=False
        ).stderr.splitlines()
        print(f"Apache Kafka {VERSION}: {len(list(lib.glob('*.jar')))} jars in {lib}")
        print(f"Java: {java[0] if java else 'unknown'}")
        return 0

    async def serve() -> None:
        cluster = await start_cluster(args.nodes)
        print(f"{cluster.name} on {cluster.bootstrap} (data {cluster.directory})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            cluster.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
