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
  so one request (through one port-forward) shows the whole cluster.

Numbers here are per process; the stats topic carries the cluster-wide totals.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.error import URLError
from urllib.parse import unquote
from urllib.request import urlopen

from dataflows.core.descriptors import FORMAT_NAMES
from dataflows.core.events import BatchScored, DriftClosed, Event, ModelServing, Quality
from dataflows.monitoring.windows import ModelIdentity, StatsAccumulator
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


class ProcessState:
    """The models this process holds, their serving stats and drift; thread-safe."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._models: dict[ModelIdentity, HeldModel] = {}
        self._drift: dict[tuple[str, str, str], dict[str, Any]] = {}

    def installed(self, identity: ModelIdentity, previous: ModelIdentity | None) -> None:
        """A shard now serves `identity` instead of `previous`."""
        if identity == previous:
            return
        now_ms = int(self._clock() * 1000)
        with self._lock:
            held = self._models.get(identity)
            if held is None:
                held = self._models[identity] = HeldModel(identity, now_ms)
            held.shards += 1
            held.retired_at_ms = None
            old = self._models.get(previous) if previous is not None else None
            if old is not None:
                old.shards = max(0, old.shards - 1)
                if old.shards == 0:
                    old.retired_at_ms = now_ms
                    self._forget_retired(old.identity.data_type)

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
                self.installed(identity, previous)
            case BatchScored(identity=identity, scored=scored, seconds=seconds, quality=quality):
                self.scored(identity, scored, seconds, quality)
            case DriftClosed(message=message):
                self.drift_closed(message)
            case _:
                pass

    def drift_closed(self, message: pb.DriftMetrics) -> None:
        """The last closed drift window of a model, merged over the cluster's shards."""
        worst = sorted(message.features, key=lambda f: f.psi, reverse=True)[:3]
        summary = {
            "window_start_ms": message.window_start_ms,
            "window_end_ms": message.window_end_ms,
            "record_count": message.record_count,
            "max_psi": message.max_psi,
            "alarm": message.alarm,
            "top_features": [
                {"feature": f.feature, "psi": f.psi, "mean_shift_sigmas": f.mean_shift_sigmas}
                for f in worst
            ],
        }
        key = (message.data_type, message.model_name, message.model_version)
        with self._lock:
            self._drift[key] = summary

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
        rows.sort(key=lambda r: (r["data_type"], not r["serving"], -r["loaded_at_ms"]))
        return rows

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


@dataclass
class StateServer:
    """The read-only HTTP server of one process's queryable state."""

    state: ProcessState
    bind: str
    peers: Sequence[str] = ()
    process_id: int = 0
    _server: ThreadingHTTPServer | None = None
    _instance: str = field(default_factory=lambda: uuid.uuid4().hex)

    def start(self) -> str:
        """Bind and serve in a daemon thread; returns the base URL."""
        host, port = split_address(self.bind)
        try:
            self._server = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as exc:
            raise RuntimeError(
                f"queryable state cannot listen on {self.bind}: {exc} "
                "(set WAXSERVE_STATE_ADDR to a free host:port, or empty to turn it off)"
            ) from exc
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, name="waxserve-state", daemon=True
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
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

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
        }

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
            else:
                endpoints = ["/models", "/state/<data_type>", "/process", "/processes"]
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
    """Hosts of the Bytewax cluster's processes (`-a` / BYTEWAX_ADDRESSES), if any."""
    addresses = env.get("BYTEWAX_ADDRESSES", "")
    for i, arg in enumerate(argv):
        if arg in ("-a", "--addresses") and i + 1 < len(argv):
            addresses = argv[i + 1]
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
    log.info("queryable state on %s (GET /models, /state/<data_type>, /processes)", server.start())
    return server
