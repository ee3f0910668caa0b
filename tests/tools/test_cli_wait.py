"""`waxserve publish --wait` and `contract publish --wait` against a running dataflow on
Apache Kafka: the command exits with the dataflow's verdict, read from the events topic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import config_env

from dataflows.core.config import Config
from dataflows.core.descriptors import MODELS_DIR
from dataflows.tools.cli import EXIT_AWAITING_CONTRACT, EXIT_NO_VERDICT, EXIT_REJECTED, main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PENGUINS_MODEL = MODELS_DIR / "penguins" / "penguins-species.onnx"
# Generous: the first verdict waits for the dataflow to start on a busy machine. A verdict
# ends the wait as soon as it comes, so this bounds a failure, it paces nothing.
WAIT = "180"


@pytest.fixture
def dataflow(kafka_config: Config, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m bytewax.run dataflows.serving:flow` on the test's topics."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WAXSERVE_")},
        **config_env(kafka_config),
        "WAXSERVE_STATE_ADDR": "",
        "BYTEWAX_DATAFLOW_API_CACHE_PATH": str(tmp_path),
        "WAXSERVE_PMML": "lazy",  # no PMML here: no JVM (2-3 s of CPU a start)
        "WAXSERVE_FETCH_WAIT_MS": "100",  # idle fetches: as tests/test_integration.py
    }
    log = (tmp_path / "dataflow.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bytewax.run", "dataflows.serving:flow"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_publish_wait_reports_each_verdict(
    dataflow: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "contract", "publish", "wine", "--wait", "--timeout", WAIT)
    assert code == 0, err
    assert "contract_installed: the wine contract v1" in out

    code, out, err = _run(capsys, "publish", "wine-lr", "--wait", "--timeout", WAIT)
    assert code == 0, err
    assert "installed: wine-lr version 1 for wine" in out.splitlines()[-1]

    # A model whose inputs the wine contract cannot feed: published fine, then rejected.
    code, out, err = _run(
        capsys, "publish", str(PENGUINS_MODEL), "--data-type", "wine", "--wait", "--timeout", WAIT
    )
    assert code == EXIT_REJECTED, (out, err)
    verdict = out.splitlines()[-1]
    assert verdict.startswith("rejected: penguins-species version ")
    assert verdict.split(": bad_inputs: ", 1)[1]  # the reason, then what is wrong

    # Trained against a contract version nobody published yet: it waits, and says so.
    code, out, err = _run(
        capsys,
        "publish",
        "wine-lr",
        "--version",
        "2",
        "--contract-version",
        "7",
        "--wait",
        "--timeout",
        WAIT,
    )
    assert code == EXIT_AWAITING_CONTRACT, (out, err)
    assert out.splitlines()[-1].startswith("awaiting_contract: wine-lr version 2 for wine")
    assert "waits for contract v7" in out
    assert dataflow.poll() is None


def test_publish_wait_without_a_dataflow_times_out(
    kafka_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "publish", "wine-lr", "--wait", "--timeout", "1")
    assert code == EXIT_NO_VERDICT
    assert out.startswith("published wine-lr version 1")  # it was sent all the same
    assert "no verdict within 1 s: is a dataflow running" in err
