"""Recovery partitions for a cluster of Bytewax processes, one directory (volume) each.

Run as `python -m dataflows.tools.recovery` (the init step of a waxserve pod, and `just cluster`):
create this process's Bytewax recovery partitions, then wait until its cluster address
resolves.

Every pod of the StatefulSet has its own recovery volume. Bytewax needs the cluster as a
whole to hold every partition exactly once, and it uses whatever `part-K.sqlite3` files a
process finds in its `-r` directory. So each pod must hold a disjoint share:

    partition K lives on the pod whose ordinal is K % RECOVERY_LAYOUT_PROCESSES

where RECOVERY_LAYOUT_PROCESSES is the process count the store was created with. Like the
partition count, it is fixed for the life of the recovery store (both are written down once,
in the ConfigMap). Pods whose ordinal is >= RECOVERY_LAYOUT_PROCESSES (added by a scale-up)
hold no partition, which Bytewax accepts. Two copies of one partition are never safe: with a
fresh copy on a second volume, Bytewax silently resumed from scratch in our tests; and two
processes sharing one directory both write every partition in it (seen: a corrupted
partition, "file is not a database").

The step is idempotent: existing partition files are never touched, rewritten or removed;
only missing ones of this pod's share are created. It refuses a volume whose partitions
were made with another partition count. It needs nothing but the Python standard library
and, to create partitions, `bytewax.recovery.init_db_dir` (Bytewax only makes a whole set
at once, so the set is made in a scratch directory on the same volume and this pod's share
is moved in).

Settings come from the environment (the same ConfigMap as the dataflow), flags override:

    BYTEWAX_RECOVERY_DIRECTORY   --directory           this pod's recovery volume
    RECOVERY_PARTITIONS          --partitions          total partitions, fixed forever
    RECOVERY_LAYOUT_PROCESSES    --layout-processes    processes the store was laid out for
    BYTEWAX_PROCESS_ID, or BYTEWAX_POD_NAME minus "BYTEWAX_STATEFULSET_NAME-"
                                 --process-id          this pod's process id (as bytewax.run)
    BYTEWAX_ADDRESSES            --addresses           "host:port;host:port;..." of all pods

Exit status: 0 done, 2 bad settings or a volume that does not fit them, 3 this pod's
address did not resolve in time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PART_PREFIX = "part-"
PART_SUFFIX = ".sqlite3"
SCRATCH_PREFIX = ".recovery-init-"


class InitError(Exception):
    """Settings or a volume that the init step cannot work with."""


@dataclass
class Report:
    """What the init step found and did on one volume."""

    share: list[int]
    created: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    others: list[int] = field(default_factory=list)


def share_of(process_id: int, layout_processes: int, partitions: int) -> list[int]:
    """Partitions the pod with this ordinal holds: K % layout_processes == process_id."""
    if layout_processes < 1:
        raise InitError(f"RECOVERY_LAYOUT_PROCESSES must be >= 1, got {layout_processes}")
    if partitions < layout_processes:
        raise InitError(
            f"{partitions} partitions cannot be spread over {layout_processes} processes: "
            "every process of the first layout needs at least one"
        )
    if process_id < 0:
        raise InitError(f"process id must be >= 0, got {process_id}")
    return [k for k in range(partitions) if k % layout_processes == process_id]


def process_id_from_env(env: Mapping[str, str]) -> int:
    """The process id the way `python -m bytewax.run` derives it in Kubernetes."""
    if env.get("BYTEWAX_PROCESS_ID"):
        return _int("BYTEWAX_PROCESS_ID", env["BYTEWAX_PROCESS_ID"])
    pod, sts = env.get("BYTEWAX_POD_NAME"), env.get("BYTEWAX_STATEFULSET_NAME")
    if not pod or not sts:
        raise InitError(
            "no process id: set --process-id, BYTEWAX_PROCESS_ID, or BYTEWAX_POD_NAME and "
            "BYTEWAX_STATEFULSET_NAME"
        )
    prefix = f"{sts}-"
    if not pod.startswith(prefix) or not pod[len(prefix) :].isdigit():
        raise InitError(
            f"pod name {pod!r} is not '<BYTEWAX_STATEFULSET_NAME>-<ordinal>' with "
            f"BYTEWAX_STATEFULSET_NAME={sts!r}; bytewax.run could not derive its process id"
        )
    return int(pod[len(prefix) :])


def partition_files(directory: Path) -> dict[int, Path]:
    """The `part-K.sqlite3` files in `directory`, by K."""
    found: dict[int, Path] = {}
    for path in directory.glob(f"{PART_PREFIX}*{PART_SUFFIX}"):
        index = path.name[len(PART_PREFIX) : -len(PART_SUFFIX)]
        if index.isdigit():
            found[int(index)] = path
    return found


def read_partition(path: Path) -> tuple[int, int]:
    """(part_index, part_count) recorded in a Bytewax partition file.

    Opened immutable: SQLite then creates no -wal/-shm files and takes no lock. The parts
    record is written when the partition is created, so it is in the main file.
    """
    try:
        with sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True) as db:
            row = db.execute("SELECT part_index, part_count FROM parts").fetchone()
    except sqlite3.Error as exc:
        raise InitError(f"{path} is not a readable Bytewax recovery partition: {exc}") from None
    if row is None:
        raise InitError(f"{path} has no partition record: not a Bytewax recovery partition")
    return int(row[0]), int(row[1])


def init_volume(directory: Path, partitions: int, layout_processes: int, process_id: int) -> Report:
    """Create this pod's missing partitions in `directory`; never touch existing ones."""
    share = share_of(process_id, layout_processes, partitions)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{SCRATCH_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an init step that was killed

    existing = partition_files(directory)
    for index, path in sorted(existing.items()):
        part_index, part_count = read_partition(path)
        if part_index != index:
            raise InitError(f"{path} records partition {part_index}: renamed by hand?")
        if part_count != partitions:
            raise InitError(
                f"{path} belongs to a store of {part_count} partitions, but "
                f"RECOVERY_PARTITIONS={partitions}: the partition count is fixed for the "
                "life of the store"
            )
    report = Report(
        share=share,
        kept=[k for k in share if k in existing],
        others=sorted(k for k in existing if k not in share),
    )
    missing = [k for k in share if k not in existing]
    if not missing:
        return report

    from bytewax.recovery import init_db_dir  # only needed when there is work to do

    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=directory))
    try:
        init_db_dir(scratch, partitions)
        for k in missing:
            name = f"{PART_PREFIX}{k}{PART_SUFFIX}"
            target = directory / name
            if target.exists():  # appeared meanwhile: keep it
                report.kept.append(k)
                continue
            os.rename(scratch / name, target)  # same file system: atomic
            report.created.append(k)
        _fsync_dir(directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.kept.sort()
    return report


def wait_for_address(
    addresses: Sequence[str], process_id: int, timeout_s: float, interval_s: float = 2.0
) -> str:
    """Wait until this process's host in `addresses` resolves (Bytewax binds to it)."""
    if process_id >= len(addresses):
        raise InitError(
            f"process {process_id} has no entry in BYTEWAX_ADDRESSES ({len(addresses)} "
            "addresses): the addresses must list every replica of the StatefulSet"
        )
    address = addresses[process_id]
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InitError(f"BYTEWAX_ADDRESSES entry {address!r} is not host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)
            return address
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{host} did not resolve within {timeout_s:g} s ({exc}); is the headless "
                    "Service there, with publishNotReadyAddresses: true?"
                ) from None
        time.sleep(interval_s)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise InitError(f"{name}={raw!r} is not an integer") from None


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dataflows.tools.recovery",
        description="Create this pod's share of the Bytewax recovery partitions (partition K "
        "on the pod with ordinal K %% RECOVERY_LAYOUT_PROCESSES), never touching existing "
        "ones; then wait until this pod's cluster address resolves.",
    )
    p.add_argument("--directory", type=Path, default=env.get("BYTEWAX_RECOVERY_DIRECTORY"))
    p.add_argument("--partitions", default=env.get("RECOVERY_PARTITIONS"))
    p.add_argument("--layout-processes", default=env.get("RECOVERY_LAYOUT_PROCESSES"))
    p.add_argument("--process-id", default=None)
    p.add_argument("--addresses", default=env.get("BYTEWAX_ADDRESSES"))
    p.add_argument(
        "--dns-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for this pod's address to resolve (0: don't wait)",
    )
    return p


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = _parser(env).parse_args(argv)
    try:
        if args.directory is None:
            raise InitError("no recovery directory: set BYTEWAX_RECOVERY_DIRECTORY")
        if args.partitions is None or args.layout_processes is None:
            raise InitError("set RECOVERY_PARTITIONS and RECOVERY_LAYOUT_PROCESSES")
        partitions = _int("RECOVERY_PARTITIONS", str(args.partitions))
        layout = _int("RECOVERY_LAYOUT_PROCESSES", str(args.layout_processes))
        if args.process_id is not None:
            process_id = _int("--process-id", args.process_id)
        else:
            process_id = process_id_from_env(env)
        report = init_volume(args.directory, partitions, layout, process_id)
        share = report.share or "none (this ordinal joined after the store was laid out)"
        print(
            f"recovery: process {process_id}, {args.directory}: holds {share} of "
            f"{partitions} partitions (layout: {layout} processes); created {report.created}, "
            f"kept {report.kept}"
            + (f"; also holds {report.others} (moved here by hand)" if report.others else "")
        )
        if args.addresses and args.dns_timeout > 0:
            addresses = [a.strip() for a in args.addresses.split(";") if a.strip()]
            address = wait_for_address(addresses, process_id, args.dns_timeout)
            print(f"recovery: {address} resolves")
    except InitError as exc:
        print(f"recovery: error: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"recovery: error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
