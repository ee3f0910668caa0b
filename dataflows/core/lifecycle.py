"""How a dataflow process stops: SIGINT and SIGTERM end it within `STOP_DEADLINE_S` of the
signal, its output flushed.

Bytewax ends its run loop when its check for signals (`PyErr_CheckSignals`, between two
steps) raises KeyboardInterrupt; it then drops the dataflow, which closes every source and
sink partition, and our Kafka sinks flush in `close()`. That is the clean way out, and
before this module the process rarely took it (measured with tests/test_shutdown.py):

- SIGTERM, what Kubernetes sends, had no handler: the process died at once (exit -15) and
  whatever the producer still held was lost;
- once a PMML model had started the JVM, the JVM's own SIGINT and SIGTERM handlers ran
  `System.exit`: the JVM shut down under the running dataflow (hundreds of "Java Virtual
  Machine is not running" scoring failures) and 0.4 s later the process ended (exit 130
  or 143) without a flush;
- Python raises KeyboardInterrupt wherever the main thread is, which with one worker is
  inside a step (a source's `next_batch`, a producer's `produce`): reported as that
  step's error, and the interpreter's finalization with the JVM loaded then aborted;
- a stop while a flush waited for an unreachable broker lasted as long as the flush
  (60.5 s measured), and whatever blocks a non-daemon thread at exit blocks the exit;
- started in the background by a shell script (`just cluster`: `... &` in a
  non-interactive bash), the process inherits SIGINT ignored, so Python never installs
  its KeyboardInterrupt handler: Ctrl-C and `kill -INT` did nothing at all (still running
  60 s later, measured).

What `install()` does instead:

1. `-Xrs` for the JVM (`JAVA_TOOL_OPTIONS`, before it starts), so SIGINT and SIGTERM stay
   Python's;
2. one handler for both (also when SIGINT was inherited ignored: a stop request sent on
   purpose), which raises KeyboardInterrupt only where Bytewax checks for signals between
   steps (`_Stopper.at_loop`), not inside a step's code. With one worker the signal is
   usually first seen inside a step: the watcher (3.) makes it pending again every
   millisecond until Bytewax's check sees it, and after ESCALATE_S it is raised where it
   lands (reported as that step's error; the stop is the same);
3. a watcher thread woken by the signal itself (`signal.set_wakeup_fd`: the C-level
   handler writes to it even while the main thread is busy in C or Java). It notes when
   the stop began, makes the signal pending again as above, and at the deadline ends the
   process, whatever holds it;
4. once Bytewax has returned, `finish()` runs the stop hooks, logs, and leaves with
   `os._exit`: interpreter finalization would join non-daemon threads (the model loader)
   and run the JVM's exit hooks, which abort now and then.

A second signal during a stop changes nothing (`just cluster` sends SIGTERM to processes
that the terminal's Ctrl-C already reached): the deadline holds either way.

Code that can wait for something outside the process asks how long it may while
stopping: `flush_timeout(usual)`, `time_left()`, `stopping()`.

Whether the dataflow runs: `running()` turns true when the dataflow's Kafka source lists
its partitions (`mark_running`). Bytewax does that on its workers, which exist only once
every process of the cluster is connected (measured with bytewax 0.21.1: a process waiting
for its peers has no worker thread). The health endpoint (`dataflows/observability/state.py`,
`/healthz`) says "live" from then on until a stop begins.
"""

from __future__ import annotations

import _thread
import contextlib
import faulthandler
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from types import FrameType, TracebackType
from typing import NoReturn

log = logging.getLogger(__name__)

STOP_DEADLINE_S = 4.5
"""Seconds from the signal to the end of the process, whatever holds it (the spec: 5 s)."""

FINISH_MARGIN_S = 0.5
"""What `flush_timeout` keeps back from the deadline for the rest of the stop: closing the
other partitions, the stop hooks, the log."""

REARM_S = 0.001
"""How often the watcher makes the signal pending again until Bytewax has acted on it."""

BACKSTOP_S = 0.4
"""After the deadline, this much more before the process is ended without Python (when the
watcher itself cannot run): still within the 5 s a stop may take."""

ESCALATE_S = 1.0
"""After this long, the stop is raised wherever the main thread is: a dataflow whose
main thread almost never leaves its steps' code still stops (as a step's error)."""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

StopHook = Callable[[float], object]
"""Called once at the end of a stop with the seconds it may take; a false result or an
exception marks the stop as unclean (exit status 1)."""


class Lifecycle:
    """Whether this process is stopping, since when, and what runs at the end of a stop.

    One per process (`LIFECYCLE`); thread-safe. `clock` is for tests.
    """

    def __init__(
        self,
        deadline_s: float = STOP_DEADLINE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deadline_s = deadline_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._since: float | None = None
        self._reason = ""
        self._hooks: list[tuple[str, StopHook]] = []
        self._wake: Callable[[], None] | None = None
        self._running = threading.Event()

    def wake_on_stop(self, wake: Callable[[], None]) -> None:
        """Call `wake()` when a stop is requested (the signal watcher's alarm clock)."""
        with self._lock:
            self._wake = wake

    # --- asking --------------------------------------------------------------------------

    def running(self) -> bool:
        """Whether the dataflow has started running, stopping or not (`mark_running`)."""
        return self._running.is_set()

    def mark_running(self) -> None:
        """The dataflow runs: a Bytewax worker built its input (idempotent)."""
        if not self._running.is_set():
            self._running.set()
            log.info("the dataflow is running")

    def stopping(self) -> bool:
        """Whether a stop was requested (a signal, or `request_stop`)."""
        return self._stop.is_set()

    @property
    def reason(self) -> str:
        """Why the process stops ("SIGTERM", ...); empty when it does not."""
        return self._reason

    def elapsed(self) -> float:
        """Seconds since the stop began (0 when not stopping)."""
        since = self._since
        return 0.0 if since is None else self._clock() - since

    def time_left(self) -> float:
        """Seconds until the stop deadline; infinite when not stopping."""
        since = self._since
        if since is None:
            return math.inf
        return max(0.0, since + self.deadline_s - self._clock())

    def flush_timeout(self, usual: float) -> float:
        """How long a wait for something outside the process may take: `usual` normally;
        while stopping, no longer than what is left before the deadline, less the margin
        the rest of the stop needs (0 once that is spent: give up and say what is lost)."""
        if not self.stopping():
            return usual
        return max(0.0, min(usual, self.time_left() - FINISH_MARGIN_S))

    # --- stopping ------------------------------------------------------------------------

    def request_stop(self, reason: str) -> bool:
        """Start a stop (idempotent); True for the call that started it."""
        with self._lock:
            if self._stop.is_set():
                return False
            self._since = self._clock()
            self._reason = reason
            self._stop.set()
            wake = self._wake
        log.warning(
            "%s: stopping the dataflow (output is flushed; the process ends within %.1f s)",
            reason,
            self.deadline_s,
        )
        if wake is not None:
            wake()
        return True

    def on_stop(self, name: str, hook: StopHook) -> None:
        """Run `hook(seconds_left)` at the end of a stop, once Bytewax has returned (in the
        order registered). Hooks must be quick and thread-safe."""
        with self._lock:
            self._hooks.append((name, hook))

    def run_hooks(self) -> bool:
        """Run the stop hooks (each at most once); whether all succeeded."""
        with self._lock:
            hooks, self._hooks = self._hooks, []
        ok = True
        for name, hook in hooks:
            try:
                if hook(self.flush_timeout(self.deadline_s)) is False:
                    ok = False
                    log.error("stopping: %s did not finish", name)
            except Exception:
                ok = False
                log.exception("stopping: %s failed", name)
        return ok

    def finish(self, *, clean: bool = True) -> NoReturn:
        """End a stopped process now: stop hooks, a last log line, `os._exit` (status 0, or
        1 when the stop was not `clean` or a hook failed).

        Interpreter finalization is skipped on purpose: it joins non-daemon threads (a
        model load in progress) and runs the JVM's exit hooks, which abort now and then.
        Everything worth keeping is done: Bytewax has closed every partition (the sinks
        flushed) before returning.
        """
        ok = self.run_hooks() and clean
        log.info(
            "stopped %.2f s after %s%s",
            self.elapsed(),
            self.reason or "the request",
            "" if ok else " (not cleanly: see above)",
        )
        _exit(0 if ok else 1)


def _exit(status: int) -> NoReturn:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # Closed or broken: nothing more to say anyway.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


LIFECYCLE = Lifecycle()
"""This process's lifecycle."""


def stopping() -> bool:
    """Whether this process is stopping."""
    return LIFECYCLE.stopping()


def running() -> bool:
    """Whether this process's dataflow has started running (see the module's docstring)."""
    return LIFECYCLE.running()


def mark_running() -> None:
    """This process's dataflow runs (its input source says so)."""
    LIFECYCLE.mark_running()


def time_left() -> float:
    """Seconds until this process's stop deadline; infinite when it is not stopping."""
    return LIFECYCLE.time_left()


def flush_timeout(usual: float) -> float:
    """How long a flush (or any wait on a broker) may take now: `usual`, or while
    stopping what the deadline leaves (0: give up, log what is not delivered, do not raise:
    an exception in a partition's `close()` aborts the process)."""
    return LIFECYCLE.flush_timeout(usual)


def on_stop(name: str, hook: StopHook) -> None:
    """Run `hook(seconds_left)` at the end of this process's stop."""
    LIFECYCLE.on_stop(name, hook)


def request_stop(reason: str) -> bool:
    """Stop this process as a signal would."""
    return LIFECYCLE.request_stop(reason)


# --- signals --------------------------------------------------------------------------------


class _Stopper:
    """The signal handler, the watcher thread and the excepthook of one process."""

    def __init__(self, lifecycle: Lifecycle, loop_frame: FrameType) -> None:
        self.lifecycle = lifecycle
        # The frame that calls Bytewax's `cli_main`: handlers run with it as their frame
        # only when called from Bytewax's own check between steps.
        self.loop_frame = loop_frame
        self.interrupted = threading.Event()
        self.signum = int(signal.SIGTERM)
        self._read, self._write = socket.socketpair()
        self._read.setblocking(True)
        self._write.setblocking(False)
        self._previous_excepthook = sys.excepthook

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.on_signal)
        # The C-level handler writes the signal's number here at once, whatever the main
        # thread is doing; Python-level handlers wait for it to run bytecode.
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self.lifecycle.wake_on_stop(self._wake_watcher)
        sys.excepthook = self.excepthook
        threading.Thread(target=self._watch, name="waxserve-stop", daemon=True).start()

    def at_loop(self, frame: FrameType | None) -> bool:
        """Whether a handler called with `frame` runs in Bytewax's check between steps."""
        return frame is self.loop_frame

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGINT and SIGTERM: start the stop; end Bytewax's loop from its own check
        between steps, or wherever the main thread is once ESCALATE_S have passed."""
        self.signum = signum
        self.lifecycle.request_stop(signal.Signals(signum).name)
        if self.interrupted.is_set():
            return
        if self.at_loop(frame) or self.lifecycle.elapsed() >= ESCALATE_S:
            self.interrupted.set()
            raise KeyboardInterrupt(signal.Signals(signum).name)
        # Anywhere else (inside a step, a flush, start-up): carry on; the watcher raises
        # the signal again until it is seen from Bytewax's check. (Raising it again from
        # here would run this handler again at once, recursively.)

    def _wake_watcher(self) -> None:
        with contextlib.suppress(OSError):  # full: the watcher is awake already
            self._write.send(bytes([self.signum]))

    def _watch(self) -> None:
        # Any signal with a Python handler writes its number here: wait for one of ours.
        stops = {int(s) for s in STOP_SIGNALS}
        arrived: set[int] = set()
        while not arrived:
            data = self._read.recv(64)
            if not data:  # closed: nothing left to watch
                return
            arrived = stops.intersection(data)
        if not self.lifecycle.stopping():
            self.signum = min(arrived)
            self.lifecycle.request_stop(signal.Signals(self.signum).name)
        # The deadline below needs the GIL, and a thread that never gives it back (native
        # code waiting on a cluster peer that has gone) would hold the process forever:
        # seen once, a `just cluster` process still running 60 s after Ctrl-C. faulthandler's
        # watchdog is a C thread: BACKSTOP_S after the deadline it prints every thread's
        # stack to stderr and ends the process (exit 1), GIL or not.
        faulthandler.dump_traceback_later(
            self.lifecycle.time_left() + BACKSTOP_S, exit=True, file=2
        )
        # Pending again and again until Bytewax's check sees it: the main thread runs a
        # step's Python code most of the time, where the handler leaves it alone.
        while (left := self.lifecycle.time_left()) > 0:
            if not self.interrupted.is_set():
                _thread.interrupt_main(signal.Signals(self.signum))
            time.sleep(min(REARM_S, left))
        log.error(
            "%s: the dataflow did not stop within %.1f s; exiting without waiting for it "
            "(undelivered output is lost; with recovery, a restart repeats it)",
            self.lifecycle.reason,
            self.lifecycle.deadline_s,
        )
        _exit(1)

    def excepthook(
        self,
        kind: type[BaseException],
        value: BaseException,
        traceback: TracebackType | None,
    ) -> None:
        """Bytewax returned with our KeyboardInterrupt: a requested stop, not a failure.
        Anything else is reported as usual; while stopping, the process then ends at once."""
        if not self.lifecycle.stopping():
            self._previous_excepthook(kind, value, traceback)
            return
        clean = _interrupted_by_request(value)
        if not clean:
            self._previous_excepthook(kind, value, traceback)
        self.lifecycle.finish(clean=clean)


def _interrupted_by_request(error: BaseException | None) -> bool:
    # Bytewax wraps the KeyboardInterrupt of a single-worker run in a BytewaxRuntimeError
    # ("signal received"); a cluster run raises it as it is.
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


_installed: _Stopper | None = None


def _loop_frame() -> FrameType | None:
    """The frame of `python -m bytewax.run`'s main module, which reads the dataflow (and so
    calls us) and then calls Bytewax's run loop; None when Bytewax was not started so."""
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        spec = frame.f_globals.get("__spec__")
        # The module's own code, not one of its functions (`_locate_dataflow` calls us).
        if frame.f_code.co_name == "<module>" and getattr(spec, "name", "") == "bytewax.run":
            return frame
        frame = frame.f_back
    return None


def keep_signals_from_the_jvm(env: MutableMapping[str, str] = os.environ) -> None:
    """Start the JVM with `-Xrs`, so that SIGINT and SIGTERM stay Python's (its own
    handlers call System.exit). Effective only before the JVM starts."""
    options = env.get("JAVA_TOOL_OPTIONS", "")
    if "-Xrs" not in options.split():
        env["JAVA_TOOL_OPTIONS"] = f"{options} -Xrs".strip()


def install(lifecycle: Lifecycle = LIFECYCLE) -> bool:
    """Handle SIGINT and SIGTERM as described above; call it while `python -m bytewax.run`
    reads the dataflow (on its main thread). Anywhere else (a script, a test, another
    thread) it does nothing and returns False: the process's signals stay as they were.
    Idempotent."""
    global _installed
    if _installed is not None:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    frame = _loop_frame()
    if frame is None:
        return False
    keep_signals_from_the_jvm()
    _installed = _Stopper(lifecycle, frame)
    _installed.install()
    return True
