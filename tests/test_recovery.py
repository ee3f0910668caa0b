"""Per-process recovery directories."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dataflows.cli import main
from dataflows.recovery import init_process_dir, partitions_of


def test_partitions_are_shared_out_disjointly() -> None:
    shares = [partitions_of(i, 3, 6) for i in range(3)]
    assert shares == [[0, 3], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="at least one"):
        partitions_of(0, 4, 2)
    with pytest.raises(ValueError, match=r"not in 0\.\.1"):
        partitions_of(2, 2, 4)


def test_init_creates_only_this_process_share_and_is_idempotent(tmp_path: Path) -> None:
    created = init_process_dir(tmp_path, 1, processes=2, partitions=4)
    assert sorted(p.name for p in created) == ["part-1.sqlite3", "part-3.sqlite3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-1.sqlite3", "part-3.sqlite3"]
    # Real Bytewax partitions, numbered as the cluster-wide set.
    with sqlite3.connect(tmp_path / "part-3.sqlite3") as db:
        assert db.execute("select part_index, part_count from parts").fetchall() == [(3, 4)]
    before = (tmp_path / "part-1.sqlite3").stat().st_mtime_ns
    assert init_process_dir(tmp_path, 1, processes=2, partitions=4) == []
    assert (tmp_path / "part-1.sqlite3").stat().st_mtime_ns == before


def test_init_refuses_another_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    init_process_dir(tmp_path, 0, processes=2, partitions=4)
    assert main(["recovery-init", str(tmp_path), "--partitions", "4", "--processes", "4"]) == 1
    assert "the layout changed" in capsys.readouterr().err
