"""A real Apache Kafka 4.x broker (KRaft, one node) for tests, the benchmark and local runs.

`ApacheKafka` mirrors `dataflows.tools.broker.EmbeddedBroker` (tansu): `start()`/`stop()`,
a context manager, `bootstrap`, `pid`, `log_path`, `running`. It runs one JVM that is
broker and controller at once, on free ports of 127.0.0.1, with its data in a temporary
directory that `stop()` removes: every start is an empty cluster.

The jars come from Maven Central: `kafka_server/pom.xml` names `org.apache.kafka:kafka_2.13`,
and `resolve_jars()` copies it and its dependencies into `~/.cache/waxserve/kafka-<version>/`
once (`mvn dependency:copy-dependencies`, a few seconds to a minute; about 45 MB). After
that only `java` (17+) is needed. What this module does is what Kafka's own scripts do, in
two JVM calls over that classpath (verified with Kafka 4.4.0 on Java 17):

1. `kafka.tools.StorageTool format --standalone --cluster-id ID --config server.properties`
   (`kafka-storage.sh format`): writes the cluster id and the one-voter quorum to the log
   directory; `--add-scram` creates the SCRAM user of the optional SASL listener there.
2. `kafka.Kafka server.properties` (`kafka-server-start.sh`).

Optionally the broker also listens with SASL/SCRAM-SHA-512 over TLS (`secure=True`): a CA
and a broker certificate are made with `openssl`, and `secure_listener` gives the client
settings (`client_config()`, `env()`).

`python -m dataflows.tools.kafka_server run` runs one in the foreground (`just kafka`);
`python -m dataflows.tools.kafka_server resolve` only fetches the jars (`just kafka-jars`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from dataflows.core.config import Config, ConfigError
from dataflows.tools.broker import (
    DEFAULT_PARTITIONS,
    KAFKA_LOGGER,
    BrokerError,
    BrokerProcess,
    Terminated,
    _die_with_parent,
    create_topics,
    free_port,
    local_port,
    log_tail,
    port_is_free,
    raise_terminated,
)

RESOURCES = Path(__file__).with_name("kafka_server")
"""The package-data folder: `pom.xml` (the jars) and `log4j2.properties` (the broker's log)."""

POM = RESOURCES / "pom.xml"
LOG4J_CONFIG = RESOURCES / "log4j2.properties"

HEAP_MAX = "512m"
HEAP_MIN = "256m"
JVM_OPTIONS = (
    # One GC thread: the machines this runs on have 2 cores, shared with the dataflow.
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
QUICK_JIT = ("-XX:TieredStopAtLevel=1",)
"""C1 only: no C2 compiles, which a short-lived JVM (the storage tool; a broker for one
test session) pays for in CPU and never earns back. A session of the integration tests
took 26 s of the broker's CPU with it and about twice that without (the commit says how)."""

SCRAM_MECHANISM = "SCRAM-SHA-512"

BROKER_SETTINGS: Mapping[str, str] = {
    # One node: every internal topic with one replica, or creating it fails.
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "min.insync.replicas": "1",
    # 50 partitions each by default: 100 log directories made at the first group or
    # transaction, for nothing on one node.
    "offsets.topic.num.partitions": "1",
    "transaction.state.log.num.partitions": "1",
    "group.initial.rebalance.delay.ms": "0",
    # Topics are created explicitly (`create_topics`), as on most production clusters:
    # code that relies on auto-creation fails here instead of in production.
    "auto.create.topics.enable": "false",
    # The log cleaner (compacted control and marker topics) takes 128 MB of heap for its
    # dedupe buffer by default: a quarter of ours.
    "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
    # message.max.bytes stays Kafka's default (1048588), as on a real cluster.
}
"""Broker settings for a single-node test broker, on top of Kafka's defaults."""


class _PortInUse(Exception):
    pass


# --- the jars --------------------------------------------------------------------------------


def kafka_version(pom: Path = POM) -> str:
    """The Kafka version `pom.xml` resolves (its `kafka.version` property)."""
    namespace = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(pom).getroot().find("m:properties/m:kafka.version", namespace)
    if node is None or not (node.text or "").strip():
        raise BrokerError(f"{pom} has no kafka.version property")
    return (node.text or "").strip()


def cache_root() -> Path:
    """Where resolved jars are kept: `$WAXSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/waxserve`,
    else `~/.cache/waxserve`."""
    explicit = os.environ.get("WAXSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "waxserve"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resolve_jars(
    version: str | None = None,
    *,
    cache: Path | None = None,
    progress: Callable[[str], None] | None = _stderr,
) -> Path:
    """The directory holding the Kafka broker's jars (its classpath is `<dir>/*`).

    Resolved with Maven on the first call for a version (and again when `pom.xml`
    changes), then read from the cache. Concurrent callers (two test sessions, a test run
    and the benchmark) wait for each other on a lock file. `progress` gets a line now
    and then during a download (None: quiet).
    """
    version = version or kafka_version()
    root = (cache or cache_root()) / f"kafka-{version}"
    libs = root / "libs"
    stamp = root / "resolved"
    want = hashlib.sha256(POM.read_bytes() + version.encode()).hexdigest()
    if _stamp_matches(stamp, want, libs):
        return libs
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if _stamp_matches(stamp, want, libs):  # another process resolved them meanwhile
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(
                "Apache Kafka's jars are fetched with Maven, and `mvn` is not on PATH: "
                "install it (`just system-deps` as root, or `apt-get install maven`), or put "
                f"the jars of org.apache.kafka:kafka_2.13:{version} and its runtime "
                f"dependencies in {libs} and write {want} to {stamp}"
            )
        _maven_copy(mvn, version, root, libs, progress)
        stamp.write_text(want + "\n")
    return libs


def _stamp_matches(stamp: Path, want: str, libs: Path) -> bool:
    try:
        return stamp.read_text().strip() == want and any(libs.glob("kafka_2.13-*.jar"))
    except OSError:
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_DOWNLOADED = re.compile(r"Downloaded from \S+: \S+ \(([\d.,]+) (B|kB|KB|MB|GB)")
_UNITS = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def _maven_copy(
    mvn: str, version: str, root: Path, libs: Path, progress: Callable[[str], None] | None
) -> None:
    """Run Maven's copy-dependencies into a fresh directory, then move it to `libs`."""
    say = progress or (lambda _line: None)
    staging = root / f"libs.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    log_path = root / "mvn.log"
    command = [
        mvn,
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(POM),
        f"-Dkafka.version={version}",
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={staging}",
    ]
    say(
        f"resolving Apache Kafka {version}'s jars with Maven into {libs} "
        "(once per version; about 45 MB)"
    )
    started = time.monotonic()
    files, size, last = 0, 0.0, started
    with open(log_path, "w") as log:
        # cwd: Maven writes nothing next to the pom (it may be in a read-only site-packages).
        process = subprocess.Popen(
            command,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            match = _DOWNLOADED.search(line)
            if match:
                files += 1
                size += float(match.group(1).replace(",", "")) * _UNITS[match.group(2)]
                if time.monotonic() - last >= 2.0:
                    last = time.monotonic()
                    say(f"  {files} files downloaded ({size / 1e6:.1f} MB) ...")
        code = process.wait()
    if code != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise BrokerError(
            f"Maven could not resolve org.apache.kafka:kafka_2.13:{version} (exit {code}); "
            f"log: {log_path}\n{log_tail(log_path, 25)}"
        )
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    jars = len(list(libs.glob("*.jar")))
    say(
        f"  {jars} jars in {libs} ({files} files downloaded, {size / 1e6:.1f} MB, "
        f"{time.monotonic() - started:.1f} s)"
    )


def java_binary() -> str:
    """The `java` to run Kafka with: `$JAVA_HOME/bin/java`, else `java` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise BrokerError(
            "Apache Kafka needs Java 17 or newer, and `java` is not on PATH: install it "
            "(`just system-deps` as root, or `apt-get install openjdk-17-jre-headless`)"
        )
    return found


# --- TLS and SCRAM ------------------------------------------------------------------------


@dataclass(frozen=True)
class SecureListener:
    """The broker's SASL_SSL listener: where it is and what a client needs to log in."""

    bootstrap: str
    username: str
    password: str
    ca_location: Path
    """The CA certificate (PEM) that signed the broker's certificate."""
    mechanism: str = SCRAM_MECHANISM

    def client_config(self, *, password: str | None = None) -> dict[str, str]:
        """librdkafka settings for this listener (`password` replaces the right one)."""
        return {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": self.mechanism,
            "sasl.username": self.username,
            "sasl.password": self.password if password is None else password,
            "ssl.ca.location": str(self.ca_location),
        }

    def env(self, *, password: str | None = None) -> dict[str, str]:
        """The same as WAXSERVE_* variables (`Config.from_env`: WAXSERVE_KAFKA_X_Y is x.y)."""
        settings = self.client_config(password=password)
        env = {"WAXSERVE_BROKERS": settings.pop("bootstrap.servers")}
        for key, value in settings.items():
            env["WAXSERVE_KAFKA_" + key.upper().replace(".", "_")] = value
        return env


def make_tls_material(directory: Path, host: str, password: str) -> tuple[Path, Path]:
    """A throw-away CA and a broker certificate for `host`, made with `openssl`.

    Returns (the CA certificate as PEM, for clients' `ssl.ca.location`; the broker's key
    and certificate chain as a PKCS12 keystore locked with `password`).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BrokerError("the SASL_SSL listener needs `openssl` on PATH to make certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_pem = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "broker.key", directory / "broker.csr", directory / "broker.pem"
    keystore = directory / "broker.p12"
    try:
        is_ip = bool(ipaddress.ip_address(host))
    except ValueError:
        is_ip = False
    names = {"DNS:localhost", "IP:127.0.0.1", f"IP:{host}" if is_ip else f"DNS:{host}"}
    extensions = directory / "broker.ext"
    extensions.write_text(
        f"subjectAltName={','.join(sorted(names))}\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    days = "30"
    new_key = ("-newkey", "rsa:2048", "-nodes")
    ca_identity = ("-subj", "/CN=waxserve test CA", "-keyout", ca_key)
    ca_extensions = (
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    signing = ("-CA", ca_pem, "-CAkey", ca_key, "-set_serial", f"0x{secrets.token_hex(8)}")
    keystore_out = ("-name", "broker", "-out", keystore, "-passout", f"pass:{password}")
    steps: list[tuple[str | Path, ...]] = [
        # A CA, then a broker key and certificate it signs, then both in a PKCS12 keystore.
        ("req", "-x509", *new_key, "-days", days, *ca_identity, *ca_extensions, "-out", ca_pem),
        ("req", *new_key, "-subj", f"/CN={host}", "-keyout", key, "-out", csr),
        ("x509", "-req", "-in", csr, *signing, "-days", days, "-extfile", extensions, "-out", cert),
        ("pkcs12", "-export", "-in", cert, "-inkey", key, "-certfile", ca_pem, *keystore_out),
    ]
    for step in steps:
        command = [openssl, *map(str, step)]
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            raise BrokerError(f"openssl {step[0]} failed: {done.stderr.strip()}")
    return ca_pem, keystore


# --- the broker ---------------------------------------------------------------------------


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding.

    Like Kafka's `Uuid.randomUuid()`, never one starting with "-", which command lines
    would take for an option.
    """
    while True:
        text = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


class ApacheKafka(BrokerProcess):
    """An Apache Kafka broker (KRaft, broker and controller in one JVM) on 127.0.0.1.

    ```python
    with ApacheKafka() as kafka:
        config = dataclasses.replace(Config(), brokers=kafka.bootstrap)
        create_topics(config)
        ...
    ```

    `start()` resolves the jars (first time only), formats a fresh log directory, starts
    the JVM with a bounded heap and returns once the broker answers a metadata request
    (on the SASL_SSL listener too, with `secure=True`). Its output goes to `log_path`
    (default: a file in its temporary directory). `stop()` stops it and removes that
    directory; a broker that failed to start keeps it, for its log. On Linux the broker
    also dies with the thread that started it (`die_with_parent`).

    `secure=True` adds a SASL_SSL listener (`secure_port`, else a free one) with the SCRAM
    user `username`/`password` (default: a random password): `secure_listener` says how to
    log in. `heap_max`/`heap_min` are the JVM's -Xmx/-Xms (None: no -Xms); `settings` are
    broker properties over `BROKER_SETTINGS`; `progress` gets the lines of a first jar
    download (None: quiet); `jvm_options` are added to the JVM's (`QUICK_JIT` for a
    broker that serves tests, not a benchmark).
    """

    STOP_TIMEOUT_S = 20.0  # a clean JVM shutdown takes longer than tansu's

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        secure: bool = False,
        secure_port: int | None = None,
        username: str = "waxserve",
        password: str | None = None,
        log_path: str | Path | None = None,
        version: str | None = None,
        heap_max: str = HEAP_MAX,
        heap_min: str | None = HEAP_MIN,
        settings: Mapping[str, str] | None = None,
        startup_timeout: float = 90.0,
        die_with_parent: bool = True,
        progress: Callable[[str], None] | None = _stderr,
        jvm_options: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.secure = secure
        self.secure_port = secure_port
        self.username = username
        # Hex: safe inside the `--add-scram` syntax and in any config file.
        self.password = password or secrets.token_hex(12)
        self.version = version or kafka_version()
        self.heap_max = heap_max
        self.heap_min = heap_min
        self.settings = dict(settings or {})
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self.progress = progress
        self.jvm_options = tuple(jvm_options)
        self.cluster_id = new_cluster_id()
        self.controller_port: int | None = None
        self.secure_listener: SecureListener | None = None
        """Where and how clients log in on the SASL_SSL listener (with `secure=True`)."""
        self.started_in: float | None = None
        """Seconds the last `start()` took until the broker answered (jars resolved first)."""
        self._given_log = Path(log_path) if log_path is not None else None
        self._log_path: Path | None = self._given_log
        self._log_offset = 0
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self, port: int | None = None) -> Self:
        """Start the broker (on `port`, else the constructor's, else a free one) and wait."""
        if self._process is not None:
            raise BrokerError(f"Kafka already running at {self.bootstrap}")
        java = java_binary()
        libs = resolve_jars(self.version, progress=self.progress)
        _sweep_stale_workdirs()
        port = port if port is not None else self.port
        asked_secure_port = self.secure_port if self.secure else None
        for asked in (port, asked_secure_port):
            if asked and not port_is_free(asked, self.host):
                raise BrokerError(f"port {asked} on {self.host} is in use (another broker?)")
        started = time.monotonic()
        attempts = 3  # a free port can be taken by another process before Kafka binds it
        for attempt in range(attempts):
            self.port = port or free_port(self.host)
            self.controller_port = _another_free_port(self.host, {self.port})
            if self.secure:
                taken = {self.port, self.controller_port}
                self.secure_port = asked_secure_port or _another_free_port(self.host, taken)
            try:
                self._launch(java, libs)
                self.started_in = time.monotonic() - started
                return self
            except _PortInUse:
                if attempt == attempts - 1:
                    raise BrokerError(
                        f"Kafka found a port in use {attempts} times; log: {self.log_path}"
                    ) from None
        raise AssertionError("unreachable")

    def _launch(self, java: str, libs: Path) -> None:
        if self._workdir is not None:  # a previous attempt's: another port, a fresh format
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = workdir = Path(tempfile.mkdtemp(prefix="waxserve-kafka-"))
        # Whose directory this is: a later start removes it once they are all gone.
        owner = workdir / "owner"
        owner.write_text(f"{os.getpid()}\n")
        if self._given_log is None:
            self._log_path = workdir / "kafka.log"
        log_path = self._log_path
        assert log_path is not None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        properties = workdir / "server.properties"
        scram: list[str] = []
        if self.secure:
            keystore_password = secrets.token_hex(12)
            ca_pem, keystore = make_tls_material(workdir / "tls", self.host, keystore_password)
            self.secure_listener = SecureListener(
                f"{self.host}:{self.secure_port}", self.username, self.password, ca_pem
            )
            scram = [
                "--add-scram",
                f"{SCRAM_MECHANISM}=[name={self.username},password={self.password}]",
            ]
        else:
            keystore_password, keystore = "", Path()
        _write_properties(
            properties, self._properties(workdir / "data", keystore, keystore_password)
        )
        classpath = f"{libs}/*"
        logging_options = [f"-Dlog4j2.configurationFile={LOG4J_CONFIG}"]
        storage_tool = [java, "-Xmx256m", *JVM_OPTIONS, *QUICK_JIT, *logging_options]
        storage_tool += ["-Dwaxserve.kafka.log.level=WARN", "-cp", classpath]
        storage_tool += ["kafka.tools.StorageTool", "format", "--standalone"]
        formatted = subprocess.run(
            [*storage_tool, "--cluster-id", self.cluster_id, "--config", str(properties), *scram],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if formatted.returncode != 0:
            output = (formatted.stdout + formatted.stderr).strip()
            raise BrokerError(f"formatting Kafka's storage failed:\n{output[-3000:]}")
        heap = [f"-Xmx{self.heap_max}"]
        if self.heap_min:
            heap.append(f"-Xms{self.heap_min}")
        command = [
            java,
            *heap,
            *JVM_OPTIONS,
            *self.jvm_options,
            *logging_options,
            "-cp",
            classpath,
            "kafka.Kafka",
            str(properties),
        ]
        with open(log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: Ctrl-C in a terminal reaches us, and we stop it in order.
                start_new_session=True,
                preexec_fn=_die_with_parent
                if self.die_with_parent and sys.platform.startswith("linux")
                else None,
            )
        owner.write_text(f"{os.getpid()} {self._process.pid}\n")
        try:
            self._wait_ready()
        except BaseException:
            self._terminate()
            raise

    def _properties(self, data: Path, keystore: Path, keystore_password: str) -> dict[str, str]:
        """server.properties: one node that is broker and controller, on 127.0.0.1."""
        listeners = {
            "PLAINTEXT": f"{self.host}:{self.port}",
            "CONTROLLER": f"{self.host}:{self.controller_port}",
        }
        if self.secure:
            listeners["SASL_SSL"] = f"{self.host}:{self.secure_port}"
        advertised = {k: v for k, v in listeners.items() if k != "CONTROLLER"}
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": listeners["CONTROLLER"],
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listeners": ",".join(f"{k}://{v}" for k, v in listeners.items()),
            "advertised.listeners": ",".join(f"{k}://{v}" for k, v in advertised.items()),
            "listener.security.protocol.map": ",".join(
                f"{k}:{'SASL_SSL' if k == 'SASL_SSL' else 'PLAINTEXT'}" for k in listeners
            ),
            "log.dirs": str(data),
            **BROKER_SETTINGS,
        }
        if self.secure:
            prefix = "listener.name.sasl_ssl."
            properties.update(
                {
                    "sasl.enabled.mechanisms": SCRAM_MECHANISM,
                    prefix + "sasl.enabled.mechanisms": SCRAM_MECHANISM,
                    prefix + SCRAM_MECHANISM.lower() + ".sasl.jaas.config": (
                        "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                    ),
                    prefix + "ssl.keystore.type": "PKCS12",
                    prefix + "ssl.keystore.location": str(keystore),
                    prefix + "ssl.keystore.password": keystore_password,
                    prefix + "ssl.key.password": keystore_password,
                }
            )
        properties.update(self.settings)
        return properties

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:  # first the TCP port (quietly), then a real metadata request
            self._check_alive()
            try:
                with socket.create_connection((self.host, int(self.port or 0)), timeout=0.2):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"Kafka did not listen on {self.bootstrap} within {self.startup_timeout:g} s;"
                    f" log: {self.log_path}\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self._wait_metadata({"bootstrap.servers": self.bootstrap}, deadline)
        if self.secure_listener is not None:
            self._wait_metadata(self.secure_listener.client_config(), deadline)

    def _wait_metadata(self, settings: dict[str, Any], deadline: float) -> None:
        """Wait until the listener of `settings` answers metadata naming our cluster and a
        broker (a KRaft broker answers before it has registered with its controller)."""
        problems: list[str] = []
        client: dict[str, Any] = {
            **settings,
            "logger": KAFKA_LOGGER,
            "error_cb": lambda e: problems.append(str(e)),
        }
        admin = AdminClient(client)
        while True:
            self._check_alive()
            remaining = deadline - time.monotonic()
            try:
                metadata = admin.list_topics(timeout=max(0.5, min(2.0, remaining)))
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                problems.append(err.str() if isinstance(err, KafkaError) else str(exc))
            else:
                if metadata.cluster_id == self.cluster_id and metadata.brokers:
                    return
                problems.append(
                    f"cluster id {metadata.cluster_id!r}, brokers {sorted(metadata.brokers)}"
                )
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"Kafka at {settings['bootstrap.servers']} did not answer a metadata "
                    f"request within {self.startup_timeout:g} s ({problems[-1]}); "
                    f"log: {self.log_path}\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _check_alive(self) -> None:
        assert self._process is not None
        code = self._process.poll()
        if code is None:
            return
        self._process = None
        text = self._attempt_log()
        if "Address already in use" in text:
            raise _PortInUse()
        raise BrokerError(
            f"Kafka exited with code {code} during start-up; log: {self.log_path}\n"
            f"{self.log_tail(30)}"
        )

    def _attempt_log(self) -> str:
        """What this start attempt wrote to the log (a given log file is appended to)."""
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float | None = None) -> None:
        """Stop the broker (SIGTERM: a clean shutdown; SIGKILL after `timeout` s) and remove
        its directory. Idempotent."""
        self._terminate(timeout)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            if self._given_log is None:
                self._log_path = None
        self.secure_listener = None

    # --- state -----------------------------------------------------------------------

    @property
    def data_dir(self) -> Path | None:
        """The broker's log directory (its topics' data), while it runs."""
        return self._workdir / "data" if self._workdir is not None else None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"ApacheKafka({self.version}, {self.host}:{self.port}, {state})"


def _another_free_port(host: str, taken: Collection[int | None]) -> int:
    while True:
        port = free_port(host)
        if port not in taken:
            return port


def _write_properties(path: Path, properties: Mapping[str, str]) -> None:
    # Java properties: a backslash escapes; paths and values here have none to escape
    # but a Windows-style path would, so escape them all.
    lines = [f"{k}={v.replace(chr(92), chr(92) * 2)}" for k, v in properties.items()]
    path.write_text("\n".join(lines) + "\n")


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (an exited one that nobody reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust kill()
    return state not in ("Z", "X")


def _sweep_stale_workdirs() -> None:
    """Remove the directories of brokers whose starter and JVM are both gone (a test run
    killed with -9 leaves them behind: the JVM dies with it, nothing cleans up)."""
    for directory in Path(tempfile.gettempdir()).glob("waxserve-kafka-*"):
        try:
            pids = [int(p) for p in (directory / "owner").read_text().split()]
        except (OSError, ValueError):
            continue
        if pids and not any(_alive(pid) for pid in pids):
            shutil.rmtree(directory, ignore_errors=True)


# --- command line --------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    config = Config.from_env()
    port = args.port
    if port is None:
        port = local_port(config.brokers) or 19092
    kafka = ApacheKafka(
        port or None,
        secure=args.secure or args.secure_port is not None,
        secure_port=args.secure_port,
        password=args.password,
        log_path=args.log,
        version=args.version,
        heap_max=args.heap,
        heap_min=HEAP_MIN if args.heap == HEAP_MAX else None,  # never above the maximum
    )
    started = time.monotonic()
    kafka.start()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        print(
            f"Apache Kafka {kafka.version} listening on {kafka.bootstrap} "
            f"(started in {time.monotonic() - started:.1f} s; data is deleted on exit)"
        )
        print(f"  pid: {kafka.pid}  log: {kafka.log_path}")
        print(f"  export WAXSERVE_BROKERS={kafka.bootstrap}")
        if kafka.secure_listener is not None:
            print(f"  SASL_SSL ({SCRAM_MECHANISM}) on {kafka.secure_listener.bootstrap}:")
            for name, value in kafka.secure_listener.env().items():
                print(f"    export {name}={value}")
        if args.create_topics:
            # Through the PLAINTEXT listener, whatever WAXSERVE_KAFKA_* says.
            served = dataclasses.replace(config, brokers=kafka.bootstrap, kafka={})
            for info in create_topics(served, args.partitions):
                print(f"  topic {info.name}: {info.partitions} partition(s)")
        print("Ctrl-C stops it.", flush=True)
        code = kafka.wait()
        print(f"Kafka exited with code {code}:\n{kafka.log_tail()}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated):
        print("stopping Kafka", file=sys.stderr)
        return 0
    finally:
        kafka.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dataflows.tools.kafka_server {run,resolve}`; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m dataflows.tools.kafka_server",
        description="A single-node Apache Kafka (KRaft) for local runs and tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "resolve", help="fetch the broker's jars with Maven (once per version) and exit"
    )
    p.add_argument("--version", help=f"Kafka version (default {kafka_version()})")
    p = sub.add_parser(
        "run",
        help="run a broker in the foreground until Ctrl-C",
        description="Run Apache Kafka in the foreground, with its data in a temporary "
        "directory (deleted on exit). Without --port it listens on the port of "
        "$WAXSERVE_BROKERS when that is a local address, else 19092.",
    )
    p.add_argument("--port", type=int, help="PLAINTEXT port (0: any free port)")
    p.add_argument(
        "--secure", action="store_true", help="also listen with SASL_SSL (SCRAM-SHA-512)"
    )
    p.add_argument("--secure-port", type=int, help="port of the SASL_SSL listener")
    p.add_argument("--password", help="password of the SCRAM user waxserve (default: random)")
    p.add_argument("--log", type=Path, metavar="PATH", help="write the broker's log here")
    p.add_argument("--version", help=f"Kafka version (default {kafka_version()})")
    p.add_argument("--heap", default=HEAP_MAX, help=f"max heap (default {HEAP_MAX})")
    p.add_argument(
        "--create-topics", action="store_true", help="create the waxserve topics once it is up"
    )
    p.add_argument(
        "--partitions",
        type=int,
        default=DEFAULT_PARTITIONS,
        help=f"with --create-topics: partitions of the records and output topics "
        f"(default {DEFAULT_PARTITIONS})",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "resolve":
            libs = resolve_jars(args.version)
            print(f"Apache Kafka {args.version or kafka_version()}: {libs}")
            return 0
        return _run(args)
    except (BrokerError, ConfigError) as exc:
        print(f"kafka: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
