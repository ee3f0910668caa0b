"""Every command in README.md and k8s/README.md runs as written.

`readme_commands()` reads the fenced `sh` blocks of both READMEs: one command a line (a
trailing backslash continues it, `#` starts a comment). Each command is either run by
`test_the_readme_commands_run` (against the session's Apache Kafka, in a scratch checkout,
in an order that makes sense: a dataflow before what waits for its verdict) or listed in
`NOT_RUN` with the reason it cannot run here. `test_every_readme_command_is_run_or_excused`
fails when a README gains a command that is in neither, or loses one that is listed.

What "as written" allows: the environment (`WAXSERVE_*` settings pointing at the test's
broker and topics, the venv's bin/ first on PATH, as an activated venv would have it), and
three substitutions, each for something the command itself leaves to the reader: a
`kubectl -n NS exec POD -c waxserve --` prefix is dropped and the command the pod runs is
run here (the image's /app/models is the checkout's models/), and `WAXSERVE_BROKERS=...`
gets the broker's address.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import consume_all

from dataflows.core.config import Config
from dataflows.tools.broker import free_port
from protos import waxserve_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
READMES = (REPO / "README.md", REPO / "k8s" / "README.md")
KUBECTL_EXEC = re.compile(r"^kubectl -n \S+ exec \S+ -c waxserve -- ")

# Commands that cannot run here, each with the reason (and where it is checked instead).
NOT_RUN: dict[str, str] = {
    # README: "Your own data in three commands" names the reader's files and topic.
    "waxserve contract derive readings-sample.jsonl --data-type readings --id-field id "
    "-o readings.json": "the reader's sample: tests/test_integration.py::"
    "test_a_teams_own_topic_in_the_readmes_three_commands runs the three commands",
    "waxserve contract publish readings.json && waxserve publish model.onnx --data-type "
    "readings": "the reader's files: the same test",
    "WAXSERVE_RECORDS_TOPICS=sensor-readings=readings python -m bytewax.run "
    "dataflows.serving:flow": "the reader's topic: the same test",
    # README: "Two commands" are for a fresh machine.
    "python3.11 -m venv .venv && .venv/bin/pip install -q rust-just && .venv/bin/just demo": (
        "a fresh machine: checked from a clean clone; `waxserve demo` end to end is "
        "tests/tools/test_demo.py"
    ),
    "python3.11 -m venv .venv && .venv/bin/pip install -q rust-just && .venv/bin/just test": (
        "the test suite itself, verbatim in .ci/run"
    ),
    "just kafka": (
        "a second Apache Kafka JVM: tests/test_kafka_server.py runs the command it wraps "
        "(python -m dataflows.tools.kafka_server run) in the foreground and stops it"
    ),
    # README: "Pointing it at a real Kafka": placeholders for the reader's cluster.
    "export WAXSERVE_BROKERS=broker-1:9093,broker-2:9093": "the reader's brokers",
    "export WAXSERVE_KAFKA_SECURITY_PROTOCOL=SASL_SSL": (
        "the reader's cluster: tests/test_kafka_security.py sets these on a SASL_SSL listener"
    ),
    "export WAXSERVE_KAFKA_SASL_MECHANISM=SCRAM-SHA-512": "the same",
    "export WAXSERVE_KAFKA_SASL_USERNAME=waxserve WAXSERVE_KAFKA_SASL_PASSWORD=...": "the same",
    "export WAXSERVE_KAFKA_SSL_CA_LOCATION=/etc/kafka/ca.pem": "the same",
    "waxserve topics --partitions 8": "on the reader's cluster (`waxserve topics` runs here)",
    # README: "Labels that arrive later" (new with the feedback join; its flow test is
    # tests/test_feedback_flow.py). To run here: the CSV they name is not in the checkout's
    # root (models/data/winequality_red.csv is).
    "WAXSERVE_FEEDBACK_DATA_TYPES=wine python -m bytewax.run dataflows.serving:flow": (
        "a feedback dataflow: tests/test_feedback_flow.py"
    ),
    "waxserve replay winequality_red.csv --data-type wine": "names a CSV in the reader's directory",
    "waxserve replay winequality_red.csv --data-type wine --feedback": "the same",
    # README: "Development".
    "just test": "the test suite itself",
    "just exactly-once": "a 20-kill benchmark; a bounded run is tests/test_exactly_once.py",
    "just lint": "CI runs it after the tests (.ci/run)",
    "just protos": "writes protos/; tests/test_protos.py checks the code it generates",
    "just bench": "an 8-minute benchmark; tests/test_bench.py runs the harness on a tiny input",
    "just prometheus": (
        "binds 127.0.0.1:9090; tests/observability runs the same Prometheus on a free port"
    ),
    # k8s/README.md: a container engine, a registry and a cluster.
    "IMAGE=registry.example.com/waxserve:0.1.0": "docker: no container engine here",
    'docker build -t "$IMAGE" .': "no container engine here (hadolint checks the Dockerfile)",
    "docker run --rm --read-only --tmpfs /tmp --tmpfs /var/cache/bytewax --network host "
    '-e WAXSERVE_BROKERS=127.0.0.1:19092 "$IMAGE" -w 2': "no container engine here",
    'docker push "$IMAGE"': "no registry here",
    "helm repo add prometheus-community https://prometheus-community.github.io/helm-charts": (
        "no cluster here"
    ),
    "helm install kube-prometheus-stack prometheus-community/kube-prometheus-stack "
    "--namespace monitoring --create-namespace "
    "--set prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues=false "
    "--set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false "
    "--set grafana.sidecar.dashboards.searchNamespace=ALL": "no cluster here",
    "kubectl apply -f k8s/namespaces/prod.yaml": "no cluster here (tests/test_deploy.py)",
    "kubectl -n waxserve create secret generic waxserve-kafka "
    "--from-literal=WAXSERVE_KAFKA_SECURITY_PROTOCOL=SASL_SSL "
    "--from-literal=WAXSERVE_KAFKA_SASL_MECHANISM=SCRAM-SHA-512 "
    "--from-literal=WAXSERVE_KAFKA_SASL_USERNAME=waxserve "
    "--from-literal=WAXSERVE_KAFKA_SASL_PASSWORD='...' "
    "--from-literal=WAXSERVE_KAFKA_SSL_CA_LOCATION=/etc/waxserve/kafka-tls/ca.crt": (
        "no cluster here"
    ),
    "kubectl -n waxserve create secret generic waxserve-kafka-tls --from-file=ca.crt=ca.pem": (
        "no cluster here"
    ),
    "kubectl apply -k k8s/topics/prod -l 'app.kubernetes.io/component in "
    "(config,create-topics)'": "no cluster here (tests/test_deploy.py renders it)",
    "kubectl -n waxserve wait --for=condition=complete job/waxserve-create-topics "
    "--timeout=5m": "no cluster here",
    "kubectl -n waxserve logs job/waxserve-create-topics": "no cluster here",
    "kubectl apply -k k8s/overlays/prod": "no cluster here (tests/test_deploy.py renders it)",
    "kubectl -n waxserve get pods -w": "no cluster here",
    "kubectl -n waxserve logs waxserve-0 -c recovery-init": (
        "no cluster here (tests/test_deploy.py runs the init step)"
    ),
    "kubectl -n waxserve logs waxserve-0 -f": "no cluster here",
    "kubectl -n waxserve port-forward pod/waxserve-0 3040 &": (
        "no cluster here: `waxserve status` runs against a local dataflow instead"
    ),
    "curl -s localhost:3040/state/wine | python -m json.tool": (
        "the port-forward's port; tests/observability/test_state_server.py reads /state"
    ),
    "kubectl -n waxserve delete pod -l app.kubernetes.io/component=dataflow": "no cluster here",
}


# --- reading the READMEs -------------------------------------------------------------------


def _strip_comment(line: str) -> str:
    """The line without a `#` comment (a `#` outside quotes, after a blank or at the start)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(path: Path) -> list[str]:
    """The commands of a README's fenced sh blocks, whitespace runs made one space."""
    blocks = re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", path.read_text(), re.M | re.S)
    commands: list[str] = []
    for block in blocks:
        pending = ""
        for raw in block.splitlines():
            line = _strip_comment(raw)
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            command = " ".join((pending + line).split())
            pending = ""
            if command:
                commands.append(command)
    return commands


def all_commands() -> list[str]:
    """Both READMEs' commands, in order."""
    return [command for path in READMES for command in readme_commands(path)]


def test_every_readme_command_is_run_or_excused() -> None:
    commands = set(all_commands())
    unknown = [c for c in commands if c not in NOT_RUN and c not in RUN]
    assert not unknown, f"README commands neither run here nor in NOT_RUN: {unknown}"
    stale = [c for c in [*NOT_RUN, *RUN] if c not in commands]
    assert not stale, f"listed here but in no README any more: {stale}"
    assert not set(NOT_RUN) & set(RUN)


def test_readme_parsing_joins_lines_and_drops_comments(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "```sh\n"
        "a --x '#not a comment' # a comment\n"
        "# a whole-line comment\n"
        "b \\\n"
        "  --y=1   # continued\n"
        "```\n"
        "```promql\nnot(a command)\n```\n"
    )
    assert readme_commands(readme) == ["a --x '#not a comment'", "b --y=1"]


# --- running them --------------------------------------------------------------------------

RUN: tuple[str, ...] = (
    "just --list",
    # README "Serving plans", "Rolling out a model".
    "waxserve publish wine-gbt --stage staged --wait",
    "waxserve plan wine shadow wine-gbt:1 --wait",
    'waxserve plan wine canary wine-gbt:1=0.1 --reason "gbt on 10%" --wait',
    "waxserve plan wine promote --wait",
    'waxserve rollback wine --reason "rmse worse than wine-lr" --wait',
    "waxserve plan wine split wine-lr:1=0.5 wine-gbt:1=0.5 --wait",
    "waxserve plan wine show",
    "just broker",
    ".venv/bin/waxserve topics",
    "WAXSERVE_BROKERS=... .venv/bin/waxserve topics --partitions 24",
    ".venv/bin/waxserve contract publish wine",
    ".venv/bin/waxserve publish wine-lr",
    ".venv/bin/waxserve publish models/wine-lr.onnx --name m --version 2 --data-type wine "
    "--input-features fixed_acidity,volatile_acidity,citric_acid,residual_sugar,chlorides,"
    "free_sulfur_dioxide,total_sulfur_dioxide,density,ph,sulphates,alcohol",
    ".venv/bin/waxserve replay models/data/winequality_red.csv --data-type wine --rate 2000 --loop",
    ".venv/bin/waxserve contract show",
    ".venv/bin/waxserve profile models/penguins/penguins.csv --data-type penguins -o profile.json",
    ".venv/bin/waxserve contract publish penguins",
    ".venv/bin/waxserve publish models/penguins/penguins-species.onnx --data-type penguins "
    "--profile profile.json",
    ".venv/bin/waxserve tail scored",
    ".venv/bin/waxserve tail events -o -5 -e",
    "python -m bytewax.run dataflows.serving:flow",
    "python -m bytewax.run dataflows.serving:flow -w 2",
    "mkdir -p recovery && python -m bytewax.recovery recovery/ 4",
    "python -m bytewax.run dataflows.serving:flow -r recovery/ -s 5 -b 30",
    "RECOVERY=recovery/ just cluster 2 1",
    "kubectl -n waxserve exec waxserve-0 -c waxserve -- waxserve contract publish wine --wait",
    "kubectl -n waxserve exec waxserve-0 -c waxserve -- waxserve publish wine-lr --wait",
    "kubectl -n waxserve exec waxserve-0 -c waxserve -- waxserve tail events -o -1 -e",
    "kubectl -n waxserve-dev exec waxserve-0 -c waxserve -- waxserve replay "
    "/app/models/data/winequality_red.csv --data-type wine --limit 1000",
    "kubectl -n waxserve-dev exec waxserve-0 -c waxserve -- waxserve tail scored -o -3 -c 3 -e",
    "waxserve status",
    "waxserve keys generate ci-2026 --dir keys",
    "waxserve publish wine-gbt --sign keys/ci-2026.key --golden models/wine/golden.jsonl --wait",
)
"""The commands `test_the_readme_commands_run` runs (it checks it ran each one)."""

COMMAND_TIMEOUT_S = 300.0
"""Bounds a command that hangs; the commands end on their own well before it."""
STOPPED = (0, 130)
"""Exit codes of a foreground command stopped with Ctrl-C (130: the shell's "interrupted")."""


class Background:
    """A foreground command (a broker, a dataflow, a follower) run in its own process
    group, stopped as Ctrl-C would stop it: SIGINT to the whole group."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.command = command
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, ok: Callable[[], bool], timeout: float = 300.0) -> None:
        """Until `ok()`, failing with the log if the command ends first."""
        deadline = time.monotonic() + timeout
        while not ok():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.command!r} exited {self.proc.returncode} before "
                    f"{what}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.command!r}: no {what} in {timeout:g} s:\n{self.output()[-3000:]}"
                )
            time.sleep(0.2)

    def stop(self) -> int:
        """Ctrl-C; the exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                tail = self.output()[-3000:]
                raise AssertionError(f"{self.command!r} ignored Ctrl-C:\n{tail}") from None
        self._out.close()
        return self.proc.returncode


class Readme:
    """Runs README commands in a scratch checkout and remembers which ones ran."""

    def __init__(self, checkout: Path, config: Config, logs: Path) -> None:
        self.checkout = checkout
        self.config = config
        self.logs = logs
        self.ran: set[str] = set()
        self.env = {
            **os.environ,
            "PATH": f"{checkout / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
            # One dataflow at a time here, but other tests may hold the default port.
            "WAXSERVE_STATE_ADDR": f"127.0.0.1:{free_port()}",
        }
        self.env.pop("PYTHONPATH", None)
        self._background: list[Background] = []

    def _here(self, command: str) -> str:
        assert command in RUN, f"not in RUN: {command}"
        self.ran.add(command)
        command = KUBECTL_EXEC.sub("", command).replace("/app/models/", "models/")
        return command.replace("WAXSERVE_BROKERS=...", f"WAXSERVE_BROKERS={self.config.brokers}")

    def _log(self) -> Path:
        return self.logs / f"{uuid.uuid4().hex[:8]}.log"

    def run(self, command: str, env: dict[str, str] | None = None) -> str:
        """Run to the end; assert it succeeded; its output."""
        done = subprocess.run(
            ["bash", "-c", self._here(command)],
            cwd=self.checkout,
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stderr}"
        return done.stdout

    def start(self, command: str, env: dict[str, str] | None = None) -> Background:
        """Start a foreground command."""
        running = Background(
            self._here(command), self.checkout, {**self.env, **(env or {})}, self._log()
        )
        self._background.append(running)
        return running

    def probe(self, *argv: str) -> None:
        """Wait until a running dataflow serves: publish (`waxserve ARGV`) and wait for its
        verdict, however long it takes to start (test machinery, not a README command)."""
        done = subprocess.run(
            ["waxserve", *argv, "--wait", "--timeout", str(COMMAND_TIMEOUT_S)],
            cwd=self.checkout,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S + 30,
        )
        assert done.returncode == 0, f"no dataflow answered:\n{done.stdout}\n{done.stderr}"

    def stop_all(self) -> None:
        for running in self._background:
            if running.proc.poll() is None:
                running.stop()


@pytest.fixture
def readme(kafka_config: Config, tmp_path: Path) -> Iterator[Readme]:
    """A scratch checkout: the code and models of this one, its venv's bin/ and lib/ (its
    own stamp, so `just setup` finds it current and installs nothing), the Justfile."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("dataflows", "protos", "models", "k8s"):
        (checkout / name).symlink_to(REPO / name)
    venv = checkout / ".venv"
    venv.mkdir()
    for name in ("bin", "lib", "pyvenv.cfg"):
        (venv / name).symlink_to(REPO / ".venv" / name)
    for name in ("Justfile", "pyproject.toml", "setup.py", "README.md"):
        (checkout / name).write_bytes((REPO / name).read_bytes())
    for name in ("pyproject.toml", "setup.py"):  # older than the stamp: nothing to install
        os.utime(checkout / name, (0, 0))
    (venv / ".installed").touch()
    logs = tmp_path / "logs"
    logs.mkdir()
    runner = Readme(checkout, kafka_config, logs)
    try:
        yield runner
    finally:
        runner.stop_all()


def _events(config: Config) -> list[pb.ModelEvent]:
    return [
        pb.ModelEvent.FromString(m.value() or b"")
        for m in consume_all(config, config.events_topic, timeout=5.0)
    ]


def _json_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("{")]


@pytest.mark.integration
def test_the_readme_commands_run(readme: Readme, kafka_config: Config) -> None:
    config = kafka_config
    assert "cluster" in readme.run("just --list")

    # The embedded broker, on a port of its own (the one WAXSERVE_BROKERS names).
    broker = readme.start("just broker", env={"WAXSERVE_BROKERS": f"127.0.0.1:{free_port()}"})
    broker.wait_for("a running broker", lambda: "Ctrl-C to stop" in broker.output(), 120)
    assert broker.stop() in STOPPED

    # A dataflow, then the Kubernetes guide's step 6 as the pod would run it (its --wait
    # waits 60 s: the probe first waits out the dataflow's start, however slow).
    dataflow = readme.start("python -m bytewax.run dataflows.serving:flow")
    readme.probe("contract", "publish", "penguins")
    out = readme.run(
        "kubectl -n waxserve exec waxserve-0 -c waxserve -- waxserve contract publish wine --wait"
    )
    assert "contract_installed: the wine contract v1" in out
    out = readme.run(
        "kubectl -n waxserve exec waxserve-0 -c waxserve -- waxserve publish wine-lr --wait"
    )
    assert "installed: wine-lr version 1 for wine" in out
    out = readme.run(
        "kubectl -n waxserve exec waxserve-0 -c waxserve -- waxserve tail events -o -1 -e"
    )
    assert _json_lines(out)
    readme.run(
        "kubectl -n waxserve-dev exec waxserve-0 -c waxserve -- waxserve replay "
        "/app/models/data/winequality_red.csv --data-type wine --limit 1000"
    )
    assert len(consume_all(config, config.scored_topic, expect=3, timeout=COMMAND_TIMEOUT_S)) >= 3
    out = readme.run(
        "kubectl -n waxserve-dev exec waxserve-0 -c waxserve -- waxserve tail scored -o -3 -c 3 -e"
    )
    assert len(_json_lines(out)) == 3
    assert "process 0" in readme.run("waxserve status")

    # README "Signed models and the quality gate": this dataflow trusts no key (policy warn),
    # so the signed model installs, its event saying whose key it was and what the gate did.
    assert "private:" in readme.run("waxserve keys generate ci-2026 --dir keys")
    out = readme.run(
        "waxserve publish wine-gbt --sign keys/ci-2026.key --golden models/wine/golden.jsonl --wait"
    )
    assert "installed: wine-gbt version 1 for wine" in out
    (signed,) = [e for e in _events(config) if e.kind == "installed" and e.model_name == "wine-gbt"]
    assert signed.signature_status == "unknown_key" and signed.signer_key_id
    assert signed.gate.startswith("quality gate passed: 12 golden set rows, outputs match")

    # README "Rolling out a model", beside wine-lr (wine-gbt serves now: make wine-lr active).
    readme.probe("plan", "wine", "activate", "wine-lr:1")
    assert "installed: wine-gbt" in readme.run("waxserve publish wine-gbt --stage staged --wait")
    answers = {
        "waxserve plan wine shadow wine-gbt:1 --wait": "shadow wine-gbt:1 beside wine-lr:1",
        'waxserve plan wine canary wine-gbt:1=0.1 --reason "gbt on 10%" --wait': (
            "canary wine-gbt:1 0.10 over wine-lr:1 0.90"
        ),
        "waxserve plan wine promote --wait": "single wine-gbt:1",
        'waxserve rollback wine --reason "rmse worse than wine-lr" --wait': "single wine-lr:1",
        "waxserve plan wine split wine-lr:1=0.5 wine-gbt:1=0.5 --wait": (
            "split wine-lr:1 0.50, wine-gbt:1 0.50"
        ),
    }
    for command, plan in answers.items():
        assert f"plan for wine is now: {plan}" in readme.run(command), command
    assert "plan for wine: split wine-lr:1 0.50, wine-gbt:1 0.50" in readme.run(
        "waxserve plan wine show"
    )

    # README "Running it", against the running dataflow.
    readme.run(".venv/bin/waxserve topics")
    readme.run("WAXSERVE_BROKERS=... .venv/bin/waxserve topics --partitions 24")
    readme.run(".venv/bin/waxserve contract publish wine")  # v1 again: refused, harmless
    readme.run(".venv/bin/waxserve publish wine-lr")
    readme.run(
        ".venv/bin/waxserve publish models/wine-lr.onnx --name m --version 2 --data-type wine "
        "--input-features fixed_acidity,volatile_acidity,citric_acid,residual_sugar,chlorides,"
        "free_sulfur_dioxide,total_sulfur_dioxide,density,ph,sulphates,alcohol"
    )
    readme.run(
        ".venv/bin/waxserve profile models/penguins/penguins.csv --data-type penguins "
        "-o profile.json"
    )
    assert (readme.checkout / "profile.json").is_file()
    readme.run(".venv/bin/waxserve contract publish penguins")  # v1 again: refused, harmless
    readme.run(
        ".venv/bin/waxserve publish models/penguins/penguins-species.onnx --data-type penguins "
        "--profile profile.json"
    )

    def installed() -> set[str]:
        return {e.model_name for e in _events(config) if e.kind == "installed"}

    # The example with --input-features is real: the dataflow installs it, and the penguins
    # model with its profile.
    dataflow.wait_for(
        "m and penguins-species installed", lambda: {"m", "penguins-species"} <= installed()
    )

    replay = readme.start(
        ".venv/bin/waxserve replay models/data/winequality_red.csv --data-type wine --rate 2000 "
        "--loop"
    )
    follow = readme.start(".venv/bin/waxserve tail scored")
    follow.wait_for("a scored record", lambda: bool(_json_lines(follow.output())))
    assert follow.stop() in STOPPED
    assert replay.stop() in STOPPED
    assert _json_lines(readme.run(".venv/bin/waxserve tail events -o -5 -e"))
    assert '"dataType": "wine"' in readme.run(".venv/bin/waxserve contract show")
    assert dataflow.stop() in STOPPED

    # Two workers, then recovery: the partitions made first, as the README says.
    dataflow = readme.start("python -m bytewax.run dataflows.serving:flow -w 2")
    readme.probe("publish", "wine-lr", "--version", "w2")
    assert dataflow.stop() in STOPPED
    readme.run("mkdir -p recovery && python -m bytewax.recovery recovery/ 4")
    dataflow = readme.start("python -m bytewax.run dataflows.serving:flow -r recovery/ -s 5 -b 30")
    readme.probe("publish", "wine-lr", "--version", "recovery")
    assert dataflow.stop() in STOPPED

    # A local cluster on free ports (the caller's settings would be kept).
    env = {k: v for k, v in readme.env.items() if k != "WAXSERVE_STATE_ADDR"}
    readme.env = env
    cluster = readme.start("RECOVERY=recovery/ just cluster 2 1")
    readme.probe("publish", "wine-lr", "--version", "cluster")
    assert "waxserve status --url http://127.0.0.1:" in cluster.output()
    assert cluster.stop() in STOPPED
    assert not (readme.checkout / "dataflow.json").exists()

    assert readme.ran == set(RUN)
