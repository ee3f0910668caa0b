"""When and on which thread the JVM that scores PMML starts (`WAXSERVE_PMML`), and that a
process which started it on a background thread still exits.

The hang this guards against (GUIDE: "Starting the JVM on a background thread hung the
interpreter at exit once"), reproduced with JPype 1.7.1 and OpenJDK 17 (7 runs of 7 hung,
killed after 25-40 s): JNI_CreateJavaVM attaches the thread that calls it as the JVM's
non-daemon "main" thread, and JPype never detaches it. When that thread is a Python thread
that ends, the attachment stays (jstack of the hung process: `"main" #1 ... cpu=-0.00ms
runnable` beside `"DestroyJavaVM" ... waiting on condition`). At exit JPype's hook calls
DestroyJavaVM (unless `jpype.config.destroy_jvm` is False) from the main thread; if that
thread never called into Java, DestroyJavaVM attaches it as a non-daemon thread and waits
until it is the last one: forever. (A thread that called Java was attached by JPype as a
daemon, and then nothing is waited for: the hang hid whenever the main thread scored, as
with one Bytewax worker.) Detaching the starting thread right after the start ends it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dataflows import serving
from dataflows.core.config import Config, ConfigError
from dataflows.runtimes import ModelError, PmmlRuntime, jvm_policy, set_jvm_policy

REPO = Path(__file__).resolve().parents[2]
PMML_LR = REPO / "models" / "pmml" / "winequalityLinearRegression.pmml"

BACKGROUND_START = textwrap.dedent(
    """
    import atexit, os, sys, threading


    def leave():
        # Runs after JPype's exit hook (atexit is last in, first out), so the exit below
        # happens once that hook is through, and skips only the interpreter's
        # finalization, which with a JVM loaded aborts now and then on any thread.
        print("exited", flush=True)
        os._exit(0)


    atexit.register(leave)
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    import jpype.config
    from dataflows.runtimes import PmmlRuntime, start_jvm

    starter = threading.Thread(target=start_jvm, name="starter")
    starter.start()
    starter.join()  # the thread that started the JVM is gone
    model = open(sys.argv[1], "rb").read()
    loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
    runtime = loader.submit(PmmlRuntime, model).result()  # loaded on a third thread
    rows = np.full((1, len(runtime.features)), 7.0)
    value = loader.submit(runtime.predict, rows).result().values[0]
    # The main thread never called into Java: DestroyJavaVM attaches it as a non-daemon
    # thread, and waits for every other non-daemon one (a thread that had called Java is
    # a daemon, and waits for none but itself: the hang hid whenever the main thread
    # scored, as with one Bytewax worker).
    print("scored", value, flush=True)
    # What hung: DestroyJavaVM in JPype's exit hook, which JPype runs by default.
    jpype.config.destroy_jvm = True
    """
)


def test_a_jvm_started_on_a_background_thread_does_not_hold_the_exit() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BACKGROUND_START, str(PMML_LR)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,  # a hang is the failure; a start takes 1-4 s
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("scored ") and lines[-1] == "exited"


def test_pmml_off_rejects_pmml_models() -> None:
    before = jvm_policy()
    set_jvm_policy("off")
    try:
        with pytest.raises(ModelError) as caught:
            PmmlRuntime(PMML_LR.read_bytes())
        assert caught.value.reason == "unsupported_model"
        assert "WAXSERVE_PMML=off" in str(caught.value)
    finally:
        set_jvm_policy(before)
    with pytest.raises(ValueError):
        set_jvm_policy("sometimes")


def test_the_setting() -> None:
    assert Config().pmml == "auto"
    assert Config.from_env({"WAXSERVE_PMML": "on"}).pmml == "on"
    assert Config.from_env({"WAXSERVE_PMML": "lazy"}).pmml == "lazy"
    with pytest.raises(ConfigError, match="WAXSERVE_PMML='sometimes': one of auto, on, lazy, off"):
        Config.from_env({"WAXSERVE_PMML": "sometimes"})


@pytest.mark.parametrize(("mode", "started"), [("auto", True), ("on", True), ("lazy", False)])
def test_when_the_jvm_starts(mode: str, started: bool) -> None:
    """ "auto" (the default, Java being installed here) and "on" start it before the
    dataflow runs, so that no PMML model pauses scoring; "lazy" leaves it to the first."""
    code = textwrap.dedent(
        f"""
        from dataflows import serving
        from dataflows.runtimes import jvm_policy, jvm_started
        serving._start_the_jvm({mode!r})
        print(jvm_policy(), jvm_started(), flush=True)
        import os
        os._exit(0)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [mode, str(started)]


def test_auto_without_java_rejects_pmml_models_saying_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(serving, "java_missing", lambda: "No JVM shared library file found")
    before = jvm_policy()
    try:
        serving._start_the_jvm("auto")  # runs: an ONNX-only machine needs no Java
        assert jvm_policy() == "off"
        with pytest.raises(ModelError) as caught:
            PmmlRuntime(PMML_LR.read_bytes())
        assert caught.value.reason == "unsupported_model"
        assert "needs a Java runtime" in str(caught.value)
        assert "No JVM shared library file found" in str(caught.value)
        assert "PMML models will be rejected" in caplog.text
    finally:
        set_jvm_policy(before)


def test_on_without_a_jvm_does_not_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_jvm() -> float:
        raise RuntimeError("No JVM shared library file found")

    monkeypatch.setattr(serving, "warm_up", no_jvm)
    before = jvm_policy()
    try:
        with pytest.raises(SystemExit) as stopped:
            serving._start_the_jvm("on")
        assert stopped.value.code == 2
        assert "WAXSERVE_PMML=on: cannot start the JVM" in capsys.readouterr().err
    finally:
        set_jvm_policy(before)
