"""Recovery partitions spread over per-process volumes (dataflows/tools/recovery.py)."""

from __future__ import annotations

import ast
import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from dataflows.tools import recovery


def _parts(directory: Path) -> dict[int, tuple[int, int]]:
    found = {}
    for k, path in recovery.partition_files(directory).items():
        with sqlite3.connect(path) as db:
            found[k] = db.execute("SELECT part_index, part_count FROM parts").fetchone()
    return found


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def test_pods_hold_disjoint_shares_of_all_partitions(tmp_path: Path) -> None:
    partitions, layout = 12, 3
    held: list[int] = []
    for ordinal in range(layout + 1):  # the last pod came with a scale-up
        volume = tmp_path / f"recovery-waxserve-{ordinal}"
        report = recovery.init_volume(volume, partitions, layout, ordinal)
        assert report.created == report.share
        assert _parts(volume) == {k: (k, partitions) for k in report.share}
        held += report.share
        if ordinal < layout:
            assert report.share == list(range(ordinal, partitions, layout))
        else:
            assert report.share == [] and not any(volume.iterdir())
    assert sorted(held) == list(range(partitions))


def test_init_is_idempotent_and_never_touches_existing_partitions(tmp_path: Path) -> None:
    volume = tmp_path / "recovery"
    recovery.init_volume(volume, 4, 2, 1)
    with sqlite3.connect(volume / "part-1.sqlite3") as db:  # as if the dataflow ran
        db.execute("INSERT INTO commits (part_index, commit_epoch) VALUES (1, 42)")
    (volume / "part-3.sqlite3").unlink()  # lost: only this one is made again
    (volume / ".recovery-init-stale").mkdir()  # left by a killed init step
    before = _digest(volume)

    report = recovery.init_volume(volume, 4, 2, 1)
    assert (report.created, report.kept) == ([3], [1])
    after = _digest(volume)
    assert after["part-1.sqlite3"] == before["part-1.sqlite3"]
    assert sorted(recovery.partition_files(volume)) == [1, 3]
    assert not [p for p in volume.iterdir() if p.is_dir()]  # scratch directories gone

    again = recovery.init_volume(volume, 4, 2, 1)
    assert (again.created, again.kept) == ([], [1, 3])
    assert _digest(volume) == after


def test_init_refuses_another_partition_count(tmp_path: Path) -> None:
    volume = tmp_path / "recovery"
    recovery.init_volume(volume, 4, 1, 0)
    env = {"BYTEWAX_RECOVERY_DIRECTORY": str(volume), "BYTEWAX_PROCESS_ID": "0"}
    env |= {"RECOVERY_PARTITIONS": "8", "RECOVERY_LAYOUT_PROCESSES": "1"}
    before = _digest(volume)
    assert recovery.main([], env) == 2
    assert _digest(volume) == before


def test_init_derives_the_process_id_like_bytewax_run(tmp_path: Path) -> None:
    env = {
        "BYTEWAX_RECOVERY_DIRECTORY": str(tmp_path),
        "RECOVERY_PARTITIONS": "6",
        "RECOVERY_LAYOUT_PROCESSES": "3",
        "BYTEWAX_POD_NAME": "waxserve-2",
        "BYTEWAX_STATEFULSET_NAME": "waxserve",
        "BYTEWAX_ADDRESSES": "localhost:1;localhost:2;localhost:3",
    }
    assert recovery.main(["--dns-timeout", "5"], env) == 0
    assert sorted(recovery.partition_files(tmp_path)) == [2, 5]
    # A pod the addresses do not list (replicas raised, BYTEWAX_ADDRESSES not): refused.
    assert recovery.main([], env | {"BYTEWAX_POD_NAME": "waxserve-3"}) == 2
    assert recovery.main([], env | {"BYTEWAX_POD_NAME": "other-0"}) == 2
    assert recovery.main([], env | {"RECOVERY_LAYOUT_PROCESSES": "7"}) == 2


FLOW = textwrap.dedent(
    """
    import os

    import bytewax.operators as op
    from bytewax.connectors.stdio import StdOutSink
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSource

    def add(total, x):
        total = (total or 0) + x
        return total, total

    flow = Dataflow("layout")
    items = op.input("inp", flow, TestingSource(range(int(os.environ["ITEMS"]))))
    keyed = op.key_on("key", items, lambda x: str(x % 8))
    op.output("out", op.stateful_map("sum", keyed, add), StdOutSink())
    """
)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run_cluster(tmp_path: Path, volumes: list[Path], items: int) -> dict[str, int]:
    """Run the test flow as one process per volume; the last sum printed per key."""
    addresses = ";".join(f"127.0.0.1:{p}" for p in _free_ports(len(volumes)))
    env = os.environ | {"ITEMS": str(items), "PYTHONPATH": str(tmp_path)}
    run = [sys.executable, "-m", "bytewax.run", "layout_flow:flow", "-s", "1", "-b", "0"]
    procs = [
        subprocess.Popen(
            [*run, "-i", str(i), "-a", addresses, "-r", str(volume)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, volume in enumerate(volumes)
    ]
    totals: dict[str, int] = {}
    deadline = time.monotonic() + 60
    for proc in procs:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert proc.returncode == 0, err
        for line in out.splitlines():
            if not line.startswith("("):
                continue  # timely's "error connecting to worker ...; retrying"
            key, total = ast.literal_eval(line)  # StdOutSink prints (key, total) tuples
            totals[key] = max(totals.get(key, 0), total)
    return totals


def test_bytewax_resumes_from_partitions_spread_over_pod_volumes(tmp_path: Path) -> None:
    """Two processes, each with its own volume from recovery_init, resume their state."""
    (tmp_path / "layout_flow.py").write_text(FLOW)
    volumes = [tmp_path / f"recovery-{i}" for i in range(2)]
    for i, volume in enumerate(volumes):
        recovery.init_volume(volume, 4, 2, i)
    first = _run_cluster(tmp_path, volumes, 40)
    assert first["0"] == sum(range(0, 40, 8))
    resumed = _run_cluster(tmp_path, volumes, 48)  # 8 more items: state carried over
    assert resumed["0"] == sum(range(0, 48, 8))
    # Each process wrote only the partitions its volume holds; none appeared elsewhere.
    assert [sorted(recovery.partition_files(v)) for v in volumes] == [[0, 2], [1, 3]]
    # The init step before the next start reads the used partitions and leaves them alone.
    for i, volume in enumerate(volumes):
        before = _digest(volume)
        report = recovery.init_volume(volume, 4, 2, i)
        assert (report.created, report.kept) == ([], [i, i + 2])
        assert _digest(volume) == before
