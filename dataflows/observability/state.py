"""Queryable state: what each waxserve process serves, as JSON over HTTP.

Every process keeps a `ProcessState` that its shards update once per model call (one lock,
a few additions) and serves it read-only:

- `GET /models`: the models this process holds, with serving stats since they were loaded
  here (usage, mean/min/max scoring time per record, online RMSE/accuracy) and the last
  drift window's summary (on the process that merges that data type's windows);
- `GET /state/<data_type>`: the same, for one data type (404 when this process holds none);
- `GET /process`: who this process is (Bytewax process id, host, pid, state address) and
  its models;
- `GET /processes`: every process of the cluster: this one plus each peer's `/process`,
  so one request (through one port-forward) shows the whole cluster;
- `GET /healthz` (liveness) and `GET /readyz` (readiness): 200 or 503, with the checks as
  JSON (see `StateServer.liveness` and `StateServer.readiness` for what they mean).

Numbers here are per process; the stats topic carries the cluster-wide totals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import selectors
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.error import URLError
from urllib.parse import unquote
from urllib.request import urlopen

from dataflows.core.descriptors import FORMAT_NAMES
from dataflows.core.events import (
    BatchScored,
    DeadLettered,
    DriftClosed,
    Event,
    LabelsJoined,
    ModelServing,
    ModelStopped,
    PlanChanged,
    Quality,
)
from dataflows.core.lifecycle import LIFECYCLE, Lifecycle
from dataflows.core.reasons import Reason, Stage
from dataflows.monitoring.quality import LabelCounts, QualityAccumulator
from dataflows.monitoring.windows import ModelIdentity, StatsAccumulator
from dataflows.observability.metrics import unreachable_clients
from protos import waxserve_pb2 as pb

log = logging.getLogger(__name__)

RETIRED_MODELS_KEPT = 8
"""Models no shard of this process serves any more, kept per data type for the record."""

PEER_TIMEOUT_S = 2.0


@dataclass
class HeldModel:
    """One model on this process: how many shards serve with it and what it has done."""

    identity: ModelIdentity
    loaded_at_ms: int
    shards: int = 0
    stats: StatsAccumulator = field(default_factory=StatsAccumulator)
    retired_at_ms: int | None = None
    lineage: dict[str, Any] | None = None  # where it came from, who signed it
    gate: str = ""


class ProcessState:
    """The models this process holds, their serving stats and drift; thread-safe."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._models: dict[ModelIdentity, HeldModel] = {}
        self._drift: dict[tuple[str, str, str], dict[str, Any]] = {}
        # Labels that came later, joined by this process's feedback keys: quality per
        # model, and what became of the labels per data type.
        self._feedback: dict[tuple[str, str, str], QualityAccumulator] = {}
        self._labels: dict[str, LabelCounts] = {}
        # Data types whose records this process dead-lettered for want of a model since a
        # shard here last started serving one: records of theirs arrive, and none serves.
        # (no_model means a contract here: as many as max_data_types at most)
        self._waiting: dict[str, int] = {}
        # Each data type's serving plan, as its registry (in this process) last changed it.
        self._plans: dict[str, dict[str, Any]] = {}

    def installed(
        self,
        identity: ModelIdentity,
        previous: ModelIdentity | None,
        lineage: pb.Lineage | None = None,
        gate: str = "",
    ) -> None:
        """A shard now serves `identity` instead of `previous`."""
        if identity == previous:
            return
        now_ms = int(self._clock() * 1000)
        provenance = None
        if lineage is not None:
            provenance = {
                "control_topic": lineage.control_topic,
                "control_partition": lineage.control_partition,
                "control_offset": lineage.control_offset,
                "signer_key_id": lineage.signer_key_id,
                "signature_status": lineage.signature_status,
                "contract_version": lineage.contract_version,
            }
        with self._lock:
            self._waiting.pop(identity.data_type, None)
            held = self._models.get(identity)
            if held is None:
                held = self._models[identity] = HeldModel(identity, now_ms)
            if provenance is not None:
                held.lineage, held.gate = provenance, gate
            held.shards += 1
            held.retired_at_ms = None
            old = self._models.get(previous) if previous is not None else None
            if old is not None:
                old.shards = max(0, old.shards - 1)
                if old.shards == 0:
                    old.retired_at_ms = now_ms
                    self._forget_retired(old.identity.data_type)

    def stopped(self, identity: ModelIdentity) -> None:
        """A shard no longer serves `identity`, and nothing instead of it."""
        now_ms = int(self._clock() * 1000)
        with self._lock:
            held = self._models.get(identity)
            if held is not None:
                held.shards = max(0, held.shards - 1)
                if held.shards == 0:
                    held.retired_at_ms = now_ms
                    self._forget_retired(identity.data_type)

    def scored(
        self,
        identity: ModelIdentity,
        n: int,
        seconds: float,
        quality: Quality | None,
    ) -> None:
        """One model call scored n records in `seconds`."""
        with self._lock:
            held = self._models.get(identity)
            if held is None:  # scored by a shard restored before install() was seen
                held = self._models[identity] = HeldModel(identity, int(self._clock() * 1000))
            held.stats.add_call(n, seconds)
            if quality is not None:
                quality.add_to(held.stats)

    def on_event(self, event: Event) -> None:
        """Follow the events that change what this process holds: the event bus's subscriber."""
        match event:
            case ModelServing(identity=identity, previous=previous):
                self.installed(identity, previous, event.lineage, event.gate)
            case ModelStopped(identity=identity):
                self.stopped(identity)
            case BatchScored(identity=identity, scored=scored, seconds=seconds, quality=quality):
                self.scored(identity, scored, seconds, quality)
            case DriftClosed(message=message):
                self.drift_closed(message)
            case LabelsJoined():
                self.labels_joined(event)
            case PlanChanged():
                with self._lock:
                    self._plans[event.data_type] = {
                        "plan": event.plan,
                        "number": event.number,
                        "action": event.action,
                        "actor": event.actor,
                        "automatic": event.automatic,
                        "reason": event.reason,
                        "at_ms": event.at_ms,
                    }
            case DeadLettered(data_type=data_type, stage=stage, reason=reason):
                # Records of a data type with a contract here waited for a model in vain.
                if stage == Stage.SCORE and reason == Reason.NO_MODEL:
                    self.no_model(data_type)
            case _:
                pass

    def no_model(self, data_type: str) -> None:
        """A record of `data_type` was dead-lettered here because no model serves it."""
        with self._lock:
            self._waiting[data_type] = self._waiting.get(data_type, 0) + 1

    def waiting_for_a_model(self) -> dict[str, int]:
        """Data types waiting for a model here, with their records dead-lettered since."""
        with self._lock:
            return dict(self._waiting)

    def labels_joined(self, event: LabelsJoined) -> None:
        """A feedback key here joined labels: add up their quality per model."""
        qualities = [(_drift_key(p.identity), p.quality()) for p in event.pairs]
        with self._lock:
            self._labels.setdefault(event.data_type, LabelCounts()).merge(event.counts)
            for key, quality in qualities:
                held = self._feedback.get(key)
                if held is None:
                    held = self._feedback[key] = QualityAccumulator()
                held.merge(quality)
            # Models a data type no longer has here leave, as drift summaries do.
            mine = [k for k in self._feedback if k[0] == event.data_type]
            for old in mine[: max(0, len(mine) - RETIRED_MODELS_KEPT - 1)]:
                del self._feedback[old]

    def drift_closed(self, message: pb.DriftMetrics) -> None:
        """The last closed drift window of a model, merged over the cluster's shards: its
        three most drifted quantities (smallest p-value; by PSI in a window too small to
        judge, which has none)."""
        worst = sorted(
            message.features,
            key=lambda f: (f.p_value, -f.psi) if f.HasField("p_value") else (2.0, -f.psi),
        )[:3]
        summary = {
            "window_start_ms": message.window_start_ms,
            "window_end_ms": message.window_end_ms,
            "record_count": message.record_count,
            "judged": message.judged,
            "alpha": message.alpha,
            "max_psi": message.max_psi,
            "alarm": message.alarm,
            "top_features": [
                {
                    "feature": f.feature,
                    "quantity": f.quantity or "feature",
                    "p_value": f.p_value if f.HasField("p_value") else None,
                    "drifted": f.drifted,
                    "psi": f.psi,
                    "mean_shift_sigmas": f.mean_shift_sigmas,
                    "record_count": f.record_count,
                }
                for f in worst
            ],
        }
        key = (message.data_type, message.model_name, message.model_version)
        with self._lock:
            self._drift[key] = summary
            # The monitor of a data type may run where none of its shards do: keep the
            # newest windows of a few models per data type, not one per model ever seen.
            mine = [k for k in self._drift if k[0] == message.data_type]
            mine.sort(key=lambda k: self._drift[k]["window_end_ms"])
            for old in mine[: max(0, len(mine) - RETIRED_MODELS_KEPT - 1)]:
                del self._drift[old]

    def _forget_retired(self, data_type: str) -> None:
        retired = sorted(
            (
                m
                for m in self._models.values()
                if m.identity.data_type == data_type and m.shards == 0
            ),
            key=lambda m: m.retired_at_ms or 0,
        )
        for old in retired[: max(0, len(retired) - RETIRED_MODELS_KEPT)]:
            del self._models[old.identity]
            key = (data_type, old.identity.name, old.identity.version)
            self._drift.pop(key, None)

    def models(self, data_type: str | None = None) -> list[dict[str, Any]]:
        """The models held, serving ones first, newest first; JSON-ready."""
        with self._lock:
            held = [
                m
                for m in self._models.values()
                if data_type is None or m.identity.data_type == data_type
            ]
            rows = [_model_json(m, self._drift.get(_drift_key(m.identity))) for m in held]
            for m, row in zip(held, rows, strict=True):
                quality = self._feedback.get(_drift_key(m.identity))
                labels = self._labels.get(m.identity.data_type)
                row["feedback"] = quality.to_json() if quality is not None else None
                row["feedback_labels"] = vars(labels).copy() if labels is not None else None
        rows.sort(key=lambda r: (r["data_type"], not r["serving"], -r["loaded_at_ms"]))
        return rows

    def plans(self) -> dict[str, dict[str, Any]]:
        """The serving plan of each data type whose registry is in this process."""
        with self._lock:
            return {k: dict(v) for k, v in self._plans.items()}

    def data_types(self) -> list[str]:
        """Data types this process holds a model for."""
        with self._lock:
            return sorted({m.identity.data_type for m in self._models.values()})


def _drift_key(identity: ModelIdentity) -> tuple[str, str, str]:
    return identity.data_type, identity.name, identity.version


def _model_json(held: HeldModel, drift: dict[str, Any] | None) -> dict[str, Any]:
    identity, stats = held.identity, held.stats
    row: dict[str, Any] = {
        "data_type": identity.data_type,
        "name": identity.name,
        "version": identity.version,
        "sha256": identity.sha256,
        "description": identity.description,
        "format": FORMAT_NAMES.get(identity.format, "unknown"),
        "since_ms": identity.since_ms,
        "loaded_at_ms": held.loaded_at_ms,
        "serving": held.shards > 0,
        "shards": held.shards,
        "retired_at_ms": held.retired_at_ms,
        "usage_count": stats.count,
        "mean_duration_us": stats.total_s / stats.count * 1e6 if stats.count else None,
        "min_duration_us": stats.min_s * 1e6 if stats.count else None,
        "max_duration_us": stats.max_s * 1e6 if stats.count else None,
        "labelled_count": stats.labelled,
        "rmse": stats.rmse,
        "accuracy": stats.accuracy,
        "drift": drift,
        "lineage": held.lineage,
        "gate": held.gate,
    }
    return row


PROCESS_STATE = ProcessState()
"""This process's state: the shards and the monitor update it, the HTTP server reads it."""


# --- who this process is ------------------------------------------------------------------


def bytewax_process_id(argv: Sequence[str] = sys.argv, env: Mapping[str, str] = os.environ) -> int:
    """The Bytewax process id, found where `python -m bytewax.run` finds it."""
    for i, arg in enumerate(argv):
        if arg in ("-i", "--process-id") and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--process-id="):
            return int(arg.split("=", 1)[1])
    if "BYTEWAX_PROCESS_ID" in env:
        return int(env["BYTEWAX_PROCESS_ID"])
    pod, statefulset = env.get("BYTEWAX_POD_NAME"), env.get("BYTEWAX_STATEFULSET_NAME")
    if pod and statefulset and pod.startswith(statefulset + "-"):
        return int(pod[len(statefulset) + 1 :])
    return 0


def split_address(address: str) -> tuple[str, int]:
    """ "host:port" into its parts, with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host or "127.0.0.1", int(port)


# --- the HTTP server ----------------------------------------------------------------------

CONNECTION_TIMEOUT_S = 5.0
"""A connection that has sent no request for this long, or sends or reads it more slowly,
is closed: an idle or slow client cannot hold the server's resources for good."""

MAX_HANDLERS = 8
"""Requests served at once, a thread each; beyond, a request is refused at once with 503
(and `Retry-After`). The endpoints answer in milliseconds (`/processes`: a peer's
PEER_TIMEOUT_S at worst)."""

MAX_WAITING = 256
"""Connections waiting for their request, in one thread; a newcomer beyond that closes
the one that has waited longest, so that idle connections cannot lock others out."""

POLL_INTERVAL_S = 0.1
"""How often the accept loop looks for a stop: `stop()` takes at most this long."""

_BUSY = json.dumps({"error": "busy: too many requests at once, retry shortly"}).encode()
_BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n"
    + f"Content-Length: {len(_BUSY)}\r\n\r\n".encode()
    + _BUSY
)


class _StateHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose threads are bounded, whatever its clients do.

    The stdlib's starts a thread per connection at once and lets it wait for the request
    without a timeout: 200 idle connections held 200 threads. Here a connection waits for
    its first bytes without a thread (`_WaitingRoom`); only a connection with a request to
    read gets a handler thread, at most `max_handlers` at once, each with a socket timeout.
    """

    daemon_threads = True  # never joined: a stuck client cannot hold up the process's exit
    block_on_close = False
    request_queue_size = 128  # a burst of connections is accepted, not reset

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_handlers: int,
        timeout_s: float,
        max_waiting: int,
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_handlers)
        self._waiting = _WaitingRoom(self._dispatch, timeout_s, max_waiting)
        super().__init__(address, handler)  # a failed bind calls server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        # On the accept loop: never waits for the client.
        self._waiting.add(request, client_address)

    def _dispatch(self, request: socket.socket, client_address: Any) -> None:
        """A request arrived on `request`: a handler thread for it, or 503 when all are busy."""
        if not self._slots.acquire(blocking=False):
            _refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        self._waiting.close()


def _refuse_busy(request: socket.socket) -> None:
    """503 on a connection no handler can take, without waiting for anything."""
    with contextlib.suppress(OSError):
        request.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            request.recv(65536)  # what arrived: unread bytes make close() reset the reply
        request.settimeout(0.5)
        request.sendall(_BUSY_RESPONSE)
        request.shutdown(socket.SHUT_WR)
    request.close()


class _WaitingRoom:
    """Accepted connections waiting for their request, watched by one thread.

    A connection whose first bytes arrive goes to `dispatch`; one that sends nothing for
    `timeout_s` is closed; beyond `max_waiting`, the longest waiting is closed.
    """

    def __init__(
        self,
        dispatch: Any,
        timeout_s: float,
        max_waiting: int,
    ) -> None:
        self._dispatch = dispatch
        self._timeout_s = timeout_s
        self._max_waiting = max_waiting
        self._arrivals: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="waxserve-state-wait", daemon=True)
        self._thread.start()

    def add(self, request: socket.socket, client_address: Any) -> None:
        """Watch `request` until its first bytes arrive (from the accept loop)."""
        self._arrivals.put((request, client_address))
        self._wake()

    def close(self) -> None:
        """Close every waiting connection and stop watching."""
        self._arrivals.put(None)
        self._wake()
        self._thread.join(timeout=1.0)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: the thread is awake anyway
            self._wake_write.send(b"\0")

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_read, selectors.EVENT_READ)
        # Insertion order is arrival order: the first entry has waited longest.
        waiting: dict[socket.socket, tuple[Any, float]] = {}
        try:
            while True:
                timeout = None
                if waiting:
                    oldest = next(iter(waiting.values()))[1]
                    timeout = max(0.0, oldest - time.monotonic())
                for key, _ in selector.select(timeout):
                    if key.fileobj is self._wake_read:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_read.recv(4096)
                        if not self._take_arrivals(selector, waiting):
                            return
                        continue
                    request = key.fileobj
                    assert isinstance(request, socket.socket)
                    selector.unregister(request)
                    address, _ = waiting.pop(request)
                    self._hand_over(request, address)
                now = time.monotonic()
                while waiting and next(iter(waiting.values()))[1] <= now:
                    request = next(iter(waiting))
                    _close(selector, waiting, request)
        finally:
            for request in list(waiting):
                _close(selector, waiting, request)
            selector.close()
            self._wake_read.close()
            self._wake_write.close()

    def _take_arrivals(
        self, selector: selectors.BaseSelector, waiting: dict[socket.socket, tuple[Any, float]]
    ) -> bool:
        """Watch the connections accepted since; False once asked to close."""
        while True:
            try:
                arrival = self._arrivals.get_nowait()
            except queue.Empty:
                return True
            if arrival is None:
                return False
            request, address = arrival
            if len(waiting) >= self._max_waiting:
                _close(selector, waiting, next(iter(waiting)))
            selector.register(request, selectors.EVENT_READ)
            waiting[request] = (address, time.monotonic() + self._timeout_s)

    def _hand_over(self, request: socket.socket, address: Any) -> None:
        try:
            self._dispatch(request, address)
        except Exception:  # one bad connection must not end the waiting room
            log.debug("state: could not serve %s", address, exc_info=True)
            with contextlib.suppress(OSError):
                request.close()


def _close(
    selector: selectors.BaseSelector,
    waiting: dict[socket.socket, tuple[Any, float]],
    request: socket.socket,
) -> None:
    selector.unregister(request)
    waiting.pop(request, None)
    with contextlib.suppress(OSError):
        request.close()


@dataclass
class StateServer:
    """The read-only HTTP server of one process's queryable state.

    Bounded whatever its clients do: idle connections wait without a thread and are closed
    after `timeout_s`; at most `max_handlers` requests are served at once (503 beyond);
    every thread is a daemon, so the server never holds up the process's exit.
    """

    state: ProcessState
    bind: str
    peers: Sequence[str] = ()
    process_id: int = 0
    timeout_s: float = CONNECTION_TIMEOUT_S
    max_handlers: int = MAX_HANDLERS
    max_waiting: int = MAX_WAITING
    lifecycle: Lifecycle = LIFECYCLE
    unreachable: Callable[[], list[str]] = unreachable_clients
    _server: _StateHTTPServer | None = None
    _instance: str = field(default_factory=lambda: uuid.uuid4().hex)

    def start(self) -> str:
        """Bind and serve in a daemon thread; returns the base URL."""
        host, port = split_address(self.bind)
        try:
            self._server = _StateHTTPServer(
                (host, port),
                _handler(self),
                max_handlers=self.max_handlers,
                timeout_s=self.timeout_s,
                max_waiting=self.max_waiting,
            )
        except OSError as exc:
            raise RuntimeError(
                f"queryable state cannot listen on {self.bind}: {exc} "
                "(set WAXSERVE_STATE_ADDR to a free host:port, or empty to turn it off)"
            ) from exc
        threading.Thread(
            target=self._server.serve_forever,
            args=(POLL_INTERVAL_S,),
            name="waxserve-state",
            daemon=True,
        ).start()
        return self.url

    @property
    def url(self) -> str:
        """Base URL the server listens on."""
        assert self._server is not None
        host = split_address(self.bind)[0]
        if host in ("0.0.0.0", "::", ""):  # listening everywhere: name the host instead
            host = socket.gethostname()
        return f"http://{host}:{self._server.server_address[1]}"

    def stop(self) -> None:
        """Stop serving and release the port (within POLL_INTERVAL_S; requests being
        served are not waited for)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def process(self) -> dict[str, Any]:
        """This process, JSON-ready."""
        return {
            "process_id": self.process_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "url": self.url,
            "instance": self._instance,
            "data_types": self.state.data_types(),
            "models": self.state.models(),
            "plans": self.state.plans(),
        }

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """`/healthz`: live while the dataflow runs and is not stopping.

        Running: Bytewax has started running the dataflow's steps, which it does once every
        process of the cluster is connected (`lifecycle.running`); stopping: SIGTERM or
        SIGINT arrived (the process ends within a few seconds). An answer at all also says
        the interpreter is not wedged: this runs Python code.
        """
        running, stopping = self.lifecycle.running(), self.lifecycle.stopping()
        body: dict[str, Any] = {
            "live": running and not stopping,
            "running": running,
            "stopping": stopping,
        }
        if stopping:
            body["reason"] = self.lifecycle.reason
        return body["live"], body

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """`/readyz`: ready when live, every Kafka client of this process reaches a broker,
        and no data type waits for a model here.

        Kafka: no producer or consumer has lost every broker (`waxserve_kafka_unreachable`
        is 0). A data type waits for a model from the moment this process dead-letters one
        of its records as `no_model` (it has a contract, and its records waited
        WAXSERVE_NO_MODEL_WAIT_S for a model in vain) until a shard here serves a model of
        it. A data type with a contract whose records do not arrive expects no model, and
        one whose model is loading is not waited for while its records are held.
        """
        live, _ = self.liveness()
        unreachable = self.unreachable()
        waiting = self.state.waiting_for_a_model()
        checks: dict[str, dict[str, Any]] = {
            "live": {"ok": live},
            "kafka": {"ok": not unreachable, "unreachable": unreachable},
            "models": {"ok": not waiting, "waiting": waiting},
        }
        ready = all(check["ok"] for check in checks.values())
        return ready, {"ready": ready, "checks": checks}

    def processes(self) -> list[dict[str, Any]]:
        """This process and every peer's `/process` (or why it could not be reached)."""
        out = [self.process()]
        for peer in self.peers:
            url = peer if peer.startswith("http") else f"http://{peer}"
            try:
                with urlopen(f"{url}/process", timeout=PEER_TIMEOUT_S) as response:
                    info = json.load(response)
            except (OSError, URLError, ValueError) as exc:
                info = {"url": url, "error": f"unreachable: {exc}"}
            if info.get("instance") == self._instance:
                continue  # the peer list names this server too
            out.append(info)
        return sorted(out, key=lambda p: (p.get("process_id", 1 << 30), p.get("url", "")))


def _handler(server: StateServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # A socket timeout on every read and write: a client that sends its request or
        # reads the answer too slowly loses the connection instead of holding the thread.
        timeout = server.timeout_s

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/models":
                self._json(HTTPStatus.OK, server.state.models())
            elif path.startswith("/state/"):
                data_type = unquote(path[len("/state/") :])
                rows = server.state.models(data_type)
                if rows:
                    self._json(HTTPStatus.OK, rows)
                else:
                    message = f"this process holds no model for data type {data_type!r}"
                    self._json(HTTPStatus.NOT_FOUND, {"error": message})
            elif path == "/process":
                self._json(HTTPStatus.OK, server.process())
            elif path == "/processes":
                self._json(HTTPStatus.OK, server.processes())
            elif path in ("/healthz", "/readyz"):
                ok, body = server.liveness() if path == "/healthz" else server.readiness()
                self._json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)
            else:
                endpoints = [
                    "/models",
                    "/state/<data_type>",
                    "/process",
                    "/processes",
                    "/healthz",
                    "/readyz",
                ]
                self._json(
                    HTTPStatus.NOT_FOUND, {"error": "no such endpoint", "endpoints": endpoints}
                )

        def _refuse(self) -> None:
            self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "read-only: GET only"})

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

        def _json(self, status: HTTPStatus, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == HTTPStatus.METHOD_NOT_ALLOWED:
                self.send_header("Allow", "GET")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("state %s", format % args)

    return Handler


def cluster_hosts(argv: Sequence[str] = sys.argv, env: Mapping[str, str] = os.environ) -> list[str]:
    """Hosts of the Bytewax cluster's processes, if any: where bytewax.run finds them
    (`-a`, BYTEWAX_ADDRESSES, else the file BYTEWAX_HOSTFILE_PATH names, one a line)."""
    addresses = env.get("BYTEWAX_ADDRESSES", "")
    for i, arg in enumerate(argv):
        if arg in ("-a", "--addresses") and i + 1 < len(argv):
            addresses = argv[i + 1]
    if not addresses and env.get("BYTEWAX_HOSTFILE_PATH"):
        with open(env["BYTEWAX_HOSTFILE_PATH"]) as hostfile:
            addresses = ";".join(line.strip() for line in hostfile)
    return [split_address(a.strip())[0] for a in addresses.split(";") if a.strip()]


def start_state_server(bind: str, peers: str) -> StateServer | None:
    """Serve PROCESS_STATE on `bind` (none when empty).

    `peers` is a comma-separated list of the other processes' state addresses; when empty,
    each cluster host (`-a`) at this server's port, which is right when every process has a
    host of its own (Kubernetes pods).
    """
    if not bind:
        return None
    peer_list = [p.strip() for p in peers.split(",") if p.strip()]
    if not peer_list:
        port = split_address(bind)[1]
        peer_list = [f"{host}:{port}" for host in dict.fromkeys(cluster_hosts())]
    server = StateServer(PROCESS_STATE, bind, peers=peer_list, process_id=bytewax_process_id())
    log.info(
        "queryable state on %s (GET /models, /state/<data_type>, /processes, /healthz, /readyz)",
        server.start(),
    )
    return server
