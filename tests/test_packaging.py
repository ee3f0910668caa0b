"""What `pip install waxserve` gives: the wheel built from the source tree, installed into a
throwaway venv and run from another directory, away from the checkout.

The wheel is built offline (`pip wheel --no-deps --no-build-isolation --no-index`, with the
project venv's setuptools) from a copy of exactly what the Dockerfile's build stage copies,
and installed with `--no-deps --no-index`; the project venv's site-packages is made visible
to the throwaway venv by a .pth line, for the dependencies. Its own .pth files (the editable
install of this checkout) are not run from there, so `dataflows` can only come from the wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataflows.core.config import Config

REPO = Path(__file__).resolve().parents[1]
BUILD_CONTEXT = ("pyproject.toml", "setup.py", "README.md", "dataflows", "protos", "models")
"""What the Dockerfile's build stage copies to build the wheel."""
TOP_LEVEL = {"dataflows", "protos"}
"""The generic import names the wheel installs; nothing else may join them (pyproject.toml)."""


@dataclass(frozen=True)
class Installed:
    """The built wheel, and a venv with it installed."""

    wheel: Path
    build_log: str  # what building it printed
    venv: Path
    elsewhere: Path  # a working directory with no checkout in it

    def run(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A command of the venv's bin/, run in `elsewhere`."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("WAXSERVE_")}
        base.pop("PYTHONPATH", None)
        return subprocess.run(
            [str(self.venv / "bin" / argv[0]), *argv[1:]],
            cwd=self.elsewhere,
            env={**base, **(env or {})},
            capture_output=True,
            text=True,
            timeout=300,
        )


def _ignore_generated(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("__pycache__", ".mypy_cache") or n.endswith(".pyc")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("packaging")
    source = root / "src"
    source.mkdir()
    for name in BUILD_CONTEXT:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=_ignore_generated)
        else:
            shutil.copy2(path, source / name)
    dist = root / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist)]
    built = subprocess.run(
        [*build, str(source)], capture_output=True, text=True, check=True, timeout=600
    )
    (wheel,) = dist.glob("waxserve-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    target = venv / "bin" / "python"
    install = [*pip, "--python", str(target), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, timeout=600)
    purelib = subprocess.run(
        [str(target), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "zz_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    yield Installed(wheel, built.stdout + built.stderr, venv, elsewhere)


def test_the_wheel_holds_two_packages_and_the_examples(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == TOP_LEVEL
    # A folder the packages list misses is left out of wheels to come: setuptools warns.
    assert "is absent from the `packages` configuration" not in installed.build_log
    # Every module of the source tree is in it, and the protobuf schema and stubs.
    sources = [path for package in TOP_LEVEL for path in (REPO / package).rglob("*.py")]
    for path in [
        *sources,
        REPO / "protos" / "waxserve.proto",
        REPO / "protos" / "waxserve_pb2.pyi",
    ]:
        assert path.relative_to(REPO).as_posix() in names, f"{path} is not in the wheel"
    # The example catalog and every file it names, as package data.
    catalog = json.loads((REPO / "models" / "catalog.json").read_text())
    files = [m["file"] for m in catalog["models"]] + [c["file"] for c in catalog["contracts"]]
    files += [m["profile"] for m in catalog["models"] if m.get("profile")]
    for name in ["catalog.json", *files, "data/winequality_red.csv", "penguins/penguins.csv"]:
        assert f"dataflows/examples/{name}" in names, f"models/{name} is not in the wheel"


def test_the_installed_commands_run_from_anywhere(installed: Installed) -> None:
    version = installed.run("waxserve", "--version")
    assert version.returncode == 0 and version.stdout.strip() == "waxserve 0.1.0"

    # The catalog comes from the package, not from a checkout: no broker needed for a dry run.
    published = installed.run("waxserve", "publish", "wine-lr", "--dry-run")
    assert published.returncode == 0, published.stderr
    digest = hashlib.sha256((REPO / "models" / "wine-lr.onnx").read_bytes()).hexdigest()
    assert f"sha256:    {digest}" in published.stdout
    contract = installed.run("waxserve", "contract", "publish", "penguins", "--dry-run")
    assert contract.returncode == 0, contract.stderr

    # The image's layout: the models in WAXSERVE_MODEL_DIR, whose catalog then comes first,
    # so that a model sent by reference is inside the directory the dataflow accepts.
    model_dir = installed.elsewhere / "app-models"
    shutil.copytree(REPO / "models", model_dir, dirs_exist_ok=True)
    argv = ("waxserve", "publish", "wine-pmml-lr", "--by-reference", "--dry-run")
    by_reference = installed.run(*argv, env={"WAXSERVE_MODEL_DIR": str(model_dir)})
    assert by_reference.returncode == 0, by_reference.stderr
    location = (model_dir / "pmml" / "winequalityLinearRegression.pmml").resolve().as_uri()
    assert f"location:  {location}" in by_reference.stdout
    assert "warning" not in by_reference.stderr

    where = installed.run(
        "python",
        "-c",
        "import dataflows, dataflows.tools.demo as demo; print(dataflows.__file__); "
        "print(all(p.is_file() for p in (demo.WINE_CSV, demo.ERROR_CSV, demo.PENGUINS_CSV)))",
    )
    assert where.returncode == 0, where.stderr
    module, data_found = where.stdout.split()
    assert Path(module).is_relative_to(installed.venv), "dataflows came from the checkout"
    assert data_found == "True"


@pytest.mark.integration
def test_the_installed_cli_publishes_and_replays_the_examples(
    installed: Installed, tansu_config: Config
) -> None:
    env = {
        "WAXSERVE_BROKERS": tansu_config.brokers,
        "WAXSERVE_CONTROL_TOPIC": tansu_config.control_topic,
        "WAXSERVE_RECORDS_TOPICS": tansu_config.records_topics,
    }
    for argv in (
        ("waxserve", "contract", "publish", "wine"),
        ("waxserve", "publish", "wine-lr"),
        ("waxserve", "publish", "wine-pmml-lr"),
    ):
        done = installed.run(*argv, env=env)
        assert done.returncode == 0, (argv, done.stderr)
        assert done.stdout.startswith("published "), done.stdout
    wine_csv = installed.run(
        "python", "-c", "from dataflows.tools.demo import WINE_CSV; print(WINE_CSV)"
    ).stdout.strip()
    replayed = installed.run(
        "waxserve", "replay", wine_csv, "--data-type", "wine", "--limit", "20", "-q", env=env
    )
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith("sent 20 wine records")
