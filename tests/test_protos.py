"""The checked-in generated code matches protos/waxserve.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    (tmp_path / "protos").mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(REPO),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(REPO / "protos" / "waxserve.proto"),
        ],
        check=True,
    )
    for name in ("waxserve_pb2.py", "waxserve_pb2.pyi"):
        fresh = (tmp_path / "protos" / name).read_text()
        checked_in = (REPO / "protos" / name).read_text()
        assert fresh == checked_in, f"protos/{name} is stale: run `just protos`"


def test_the_wine_descriptor_set_matches_its_proto(tmp_path: Path) -> None:
    wine = REPO / "models" / "wine"
    out = tmp_path / "wine.desc"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(wine),
            f"--descriptor_set_out={out}",
            "--include_imports",
            str(wine / "wine.proto"),
        ],
        check=True,
    )
    assert out.read_bytes() == (wine / "wine.desc").read_bytes(), (
        "models/wine/wine.desc is stale: run `just protos`"
    )
