"""The queryable-state server stays bounded whatever its clients do: idle connections hold
no thread and are closed after a timeout, busy handlers answer 503 at once, and the server
stops quickly."""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dataflows.core.events import DeadLettered, ModelServing
from dataflows.core.lifecycle import Lifecycle
from dataflows.monitoring.windows import ModelIdentity
from dataflows.observability.metrics import kafka_unreachable, unreachable_clients
from dataflows.observability.state import ProcessState, StateServer, split_address

TIMEOUT_S = 1.0
"""The servers here close a connection idle this long (5 s in the dataflow)."""

NOT_RUNNING = {"live": False, "running": False, "stopping": False}


@pytest.fixture
def make_server() -> Iterator[Callable[..., StateServer]]:
    started: list[StateServer] = []

    def make(**options: Any) -> StateServer:
        server = StateServer(ProcessState(), "127.0.0.1:0", timeout_s=TIMEOUT_S, **options)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def address(server: StateServer) -> tuple[str, int]:
    return split_address(server.url.removeprefix("http://"))


def get(server: StateServer, path: str = "/models") -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(f"{server.url}{path}", timeout=5) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.load(error)


def connect_idle(server: StateServer, count: int) -> list[socket.socket]:
    """`count` connections that never send anything."""
    return [socket.create_connection(address(server), timeout=10) for _ in range(count)]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def closed_by_server(sockets: list[socket.socket], timeout: float) -> tuple[int, float]:
    """Wait until the server closes each socket (EOF or reset); (how many it closed,
    seconds until the last one was)."""
    started = time.monotonic()
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    closed = 0
    deadline = started + timeout
    while closed < len(sockets) and (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(left):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            with contextlib.suppress(ConnectionResetError):
                assert ready.recv(1024) == b"", "the server sent something to an idle client"
            selector.unregister(ready)
            closed += 1
    selector.close()
    return closed, time.monotonic() - started


def test_200_idle_connections_hold_no_thread_and_are_closed_after_the_timeout(
    make_server: Callable[..., StateServer],
) -> None:
    server = make_server(max_handlers=4)
    assert get(server)[0] == 200
    baseline = threading.active_count()

    idle = connect_idle(server, 200)
    try:
        # A normal request is served while they wait, by one more thread at most.
        status, _, body = get(server)
        assert (status, body) == (200, [])
        assert threading.active_count() <= baseline + 1

        closed, took = closed_by_server(idle, timeout=TIMEOUT_S + 10)
        assert closed == len(idle)
        assert TIMEOUT_S * 0.8 <= took <= TIMEOUT_S + 5, took
        assert threading.active_count() <= baseline + 1
    finally:
        for sock in idle:
            sock.close()
    assert get(server)[0] == 200


def test_beyond_the_handler_limit_a_request_gets_503_at_once(
    make_server: Callable[..., StateServer],
) -> None:
    """Clients that send half a request (slowloris) hold a handler until the timeout; the
    handlers are bounded, and the next request is refused at once, then served again."""
    server = make_server(max_handlers=2)
    baseline = threading.active_count()
    slow = connect_idle(server, 2)
    try:
        for sock in slow:
            sock.sendall(b"GET /models HTTP/1.0\r\nHost: x\r\n")  # no blank line: unfinished
        wait_until(lambda: threading.active_count() >= baseline + 2)

        started = time.monotonic()
        status, headers, body = get(server)
        assert (status, headers.get("Retry-After")) == (503, "1"), body
        assert time.monotonic() - started < 1.0
        assert threading.active_count() <= baseline + 2

        closed, _ = closed_by_server(slow, timeout=TIMEOUT_S + 10)  # the handler's timeout
        assert closed == 2
        wait_until(lambda: get(server)[0] == 200)
    finally:
        for sock in slow:
            sock.close()


def test_when_the_waiting_room_is_full_the_longest_waiting_connection_goes(
    make_server: Callable[..., StateServer],
) -> None:
    server = make_server(max_waiting=4)
    idle = connect_idle(server, 4)
    try:
        assert get(server)[0] == 200  # it took the place of the first idle connection
        closed, took = closed_by_server(idle[:1], timeout=5)
        assert closed == 1 and took < TIMEOUT_S
    finally:
        for sock in idle:
            sock.close()


def test_stop_is_quick_and_closes_waiting_connections(
    make_server: Callable[..., StateServer],
) -> None:
    server = make_server()
    port = address(server)[1]
    idle = connect_idle(server, 20)
    try:
        get(server)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
        closed, _ = closed_by_server(idle, timeout=5)
        assert closed == len(idle)
    finally:
        for sock in idle:
            sock.close()
    again = StateServer(ProcessState(), f"127.0.0.1:{port}")
    again.start()  # the port is free again
    again.stop()


def test_healthz_is_live_while_the_dataflow_runs_and_not_once_it_stops(
    make_server: Callable[..., StateServer],
) -> None:
    lifecycle = Lifecycle()
    server = make_server(lifecycle=lifecycle, unreachable=list)
    # Started, not running yet (a cluster process waiting for its peers): neither.
    status, _, body = get(server, "/healthz")
    assert (status, body) == (503, NOT_RUNNING)
    assert get(server, "/readyz")[0] == 503
    lifecycle.mark_running()
    status, _, body = get(server, "/healthz")
    assert (status, body) == (200, {"live": True, "running": True, "stopping": False})
    status, _, body = get(server, "/readyz")
    assert (status, body["ready"]) == (200, True)
    lifecycle.request_stop("SIGTERM")
    status, _, body = get(server, "/healthz")
    assert (status, body) == (
        503,
        {"live": False, "running": True, "stopping": True, "reason": "SIGTERM"},
    )
    status, _, body = get(server, "/readyz")
    assert (status, body["checks"]["live"]) == (503, {"ok": False})


def test_readyz_wants_the_brokers_and_a_model_for_data_types_whose_records_arrive(
    make_server: Callable[..., StateServer],
) -> None:
    lifecycle = Lifecycle()
    lifecycle.mark_running()
    unreachable: list[str] = []
    server = make_server(lifecycle=lifecycle, unreachable=lambda: list(unreachable))
    state = server.state
    # A contract's records arrived and waited for a model in vain: not ready for them.
    for _ in range(3):
        state.on_event(DeadLettered("wine", "score", "no_model"))
    # Other dead letters, and records of a data type with no contract, change nothing.
    state.on_event(DeadLettered("wine", "decode", "bad_csv"))
    state.on_event(DeadLettered("typo", "score", "no_contract"))
    status, _, body = get(server, "/readyz")
    assert status == 503 and not body["ready"]
    assert body["checks"]["models"] == {"ok": False, "waiting": {"wine": 3}}
    assert body["checks"]["kafka"] == {"ok": True, "unreachable": []}
    # A shard here serves a wine model: ready.
    state.on_event(ModelServing(ModelIdentity("wine", "wine-lr", "1", "a" * 64), None))
    assert get(server, "/readyz")[0] == 200
    # A producer that reaches no broker: not ready, and it says which client.
    unreachable.append("producer")
    status, _, body = get(server, "/readyz")
    assert status == 503
    assert body["checks"]["kafka"] == {"ok": False, "unreachable": ["producer"]}
    assert get(server, "/healthz")[0] == 200  # still live: the dataflow waits for the broker


def test_readiness_reads_the_kafka_clients_metrics_count() -> None:
    """The default readiness check of the brokers is the waxserve_kafka_unreachable gauge's."""
    assert unreachable_clients() == []
    kafka_unreachable("consumer", True)
    try:
        assert unreachable_clients() == ["consumer"]
        ready, body = StateServer(ProcessState(), "127.0.0.1:0").readiness()
        assert not ready
        assert body["checks"]["kafka"] == {"ok": False, "unreachable": ["consumer"]}
    finally:
        kafka_unreachable("consumer", False)
    assert unreachable_clients() == []
