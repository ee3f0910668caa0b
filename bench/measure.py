"""Measuring a contender from outside: CPU and memory of its process tree from /proc,
throughput from output message timestamps, latency percentiles. No Kafka here.
"""

from __future__ import annotations

import bisect
import math
import os
import statistics
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive (pypmml's JVM is a child process)."""
    found = [pid]
    i = 0
    while i < len(found):
        parent = found[i]
        i += 1
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            found.extend(int(c) for c in children)
    return found


def cpu_seconds(pid: int) -> float:
    """CPU seconds of one process, all its threads included (0 if gone).

    /proc/<pid>/stat counts in clock ticks (10 ms), too coarse for a 0.3 s run; the
    threads' schedstat counts nanoseconds but forgets threads that have exited. Both are
    lower bounds of the truth: take the larger.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat.rsplit(b")", 1)[1].split()
    ticks = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    nanoseconds = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                nanoseconds += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread just exited
    return max(ticks, nanoseconds / 1e9)


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


class CpuSampler:
    """Samples the CPU seconds of a process tree every `interval_s` in a thread, so that
    CPU can be read at any past moment (e.g. at the first and the last output message).
    """

    def __init__(self, pid: int, interval_s: float = 0.02, *, tree: bool = True) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.tree = tree
        self.times: list[float] = []  # time.time()
        self.cpu: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cpu-{pid}", daemon=True)
        self._pids = [pid]
        self._last_scan = 0.0

    def start(self) -> CpuSampler:
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (takes one last sample)."""
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        """Take one sample now."""
        now = time.time()
        if self.tree and now - self._last_scan > 0.5:
            # Children rarely change: look for new ones twice a second, not every sample.
            self._pids = process_tree(self.pid)
            self._last_scan = now
        total = sum(cpu_seconds(p) for p in self._pids)
        if self.cpu and total < self.cpu[-1]:
            total = self.cpu[-1]  # a child exited and took its CPU along: never go back
        self.times.append(now)
        self.cpu.append(total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)
        self.sample()

    def at(self, when: float) -> float:
        """CPU seconds at time `when` (time.time()), interpolated between samples."""
        return interpolate(self.times, self.cpu, when)

    def between(self, start: float, end: float) -> float:
        """CPU seconds spent between two moments."""
        return max(0.0, self.at(end) - self.at(start))


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Linear interpolation of y at x over ascending xs; clamped at both ends."""
    if not xs:
        return 0.0
    i = bisect.bisect_left(xs, x)
    if i <= 0:
        return ys[0]
    if i >= len(xs):
        return ys[-1]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    if x1 == x0:
        return y1
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def throughput(records: int, first_ms: float, last_ms: float) -> float:
    """Records per second between the first and the last output message.

    The first output already holds the first batch, so with batches of B the figure counts
    B records too many: at most 0.5% for 1,000-record batches over 200k records.
    """
    span_s = max(last_ms - first_ms, 1.0) / 1000  # a floor of 1 ms for tiny inputs
    return records / span_s


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN if there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(finite)) if finite else math.nan
