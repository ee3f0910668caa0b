"""Recovery partitions for a cluster of Bytewax processes, one directory per process.

Bytewax treats every partition file it finds in a process's `-r` directory as that
process's own. Two processes sharing one directory both write every partition: seen
here, a 2-process run with a shared directory corrupted a partition ("file is not a
database"). So each process gets its own directory (in Kubernetes, its own volume) with a
disjoint share of the partitions; together they hold all of them.

The partition count is fixed for the life of the recovery store (it is in every
partition file); make it a multiple of the process count so shares are even.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bytewax.recovery import init_db_dir


def partitions_of(process_id: int, processes: int, partitions: int) -> list[int]:
    """Partition indices process `process_id` of `processes` holds: k % processes == id."""
    if processes < 1 or not 0 <= process_id < processes:
        raise ValueError(f"process id {process_id} is not in 0..{processes - 1}")
    if partitions < processes:
        raise ValueError(
            f"{partitions} partitions cannot be shared by {processes} processes: "
            "every process needs at least one"
        )
    return [k for k in range(partitions) if k % processes == process_id]


def init_process_dir(
    directory: Path, process_id: int, processes: int, partitions: int
) -> list[Path]:
    """Create this process's partition files in `directory`; returns the ones created.

    Idempotent: existing partition files are never touched, so it is safe as an init step
    on every start. It refuses a directory holding partitions of another layout.
    """
    wanted = partitions_of(process_id, processes, partitions)
    directory.mkdir(parents=True, exist_ok=True)
    names = {f"part-{k}.sqlite3" for k in wanted}
    strangers = sorted(p.name for p in directory.glob("part-*.sqlite3") if p.name not in names)
    if strangers:
        raise ValueError(
            f"{directory} holds partitions {', '.join(strangers)} that do not belong to "
            f"process {process_id} of {processes} with {partitions} partitions: "
            "the layout changed (rescaling needs a new recovery store)"
        )
    missing = [k for k in wanted if not (directory / f"part-{k}.sqlite3").exists()]
    if not missing:
        return []
    created = []
    # Bytewax creates all partitions at once; make them aside and move in our share.
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        init_db_dir(Path(scratch), partitions)
        for k in missing:
            target = directory / f"part-{k}.sqlite3"
            shutil.move(str(Path(scratch) / f"part-{k}.sqlite3"), target)
            created.append(target)
    return created
