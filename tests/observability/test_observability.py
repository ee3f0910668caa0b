"""The Grafana dashboards and the Prometheus alert rules, checked against the real thing.

promtool checks and unit-tests the rules (k8s/alerts/). Then a real Prometheus scrapes the
real dataflow (`python -m bytewax.run` on tansu, with recovery and 2 workers) while wine
data is replayed through a model swap, a rejected model and malformed rows, and every
PromQL expression of the dashboards and rules must parse and every dashboard panel must
show data.

Prometheus and promtool come from Debian's `prometheus` package (`.ci/run` installs it): a
missing binary fails these tests, it never skips them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flowtools import ERROR_CSV, WINE_CSV, descriptor
from test_integration import Dataflow

from dataflows.core.config import Config
from dataflows.tools.broker import free_port
from dataflows.tools.cli import main as waxserve
from dataflows.tools.replay import send_descriptor

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "k8s" / "alerts" / "waxserve-rules.yaml"
RULE_TESTS = REPO / "k8s" / "alerts" / "waxserve-rules.test.yaml"
DASHBOARDS = sorted((REPO / "k8s" / "grafana" / "dashboards").glob("*.json"))

SCRAPE_JOB = "waxserve"
"""The job name of the scrape config; the rules expect "waxserve" or "<namespace>/waxserve"."""

WINDOW = "5m"
"""What $__rate_interval, $__interval and $__range become: longer than the whole test, so a
rate covers everything the test sent and stays finite after the replay ends."""

VARIABLE_VALUES = {
    "job": SCRAPE_JOB,
    "instance": ".*",  # "All"
    "data_type": ".*",
    "model": ".*",
    "__rate_interval": WINDOW,
    "__interval": WINDOW,
    "__range": WINDOW,
}
"""Template variables as Grafana substitutes them with every value selected."""

# $name or ${name} / ${name:format}; `$1` (a label_replace group) is not a variable, and
# Grafana leaves it alone too.
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_]\w*)(?::\w+)?\}|([A-Za-z_]\w*))")
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$", re.DOTALL)


def binary(name: str) -> str:
    """Path of a Prometheus binary; fails (never skips) when it is not installed."""
    found = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(found).is_file():
        pytest.fail(
            f"{name} is not installed: install Debian's `prometheus` package "
            "(apt-get install --no-install-recommends prometheus; .ci/run does)"
        )
    return found


# --- the dashboards' queries ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard: where it is, and its text."""

    where: str
    expr: str
    needs_data: bool  # panels and variables must show data; annotations mark rare events


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(path: Path) -> list[Query]:
    """The panel targets, annotation queries and variable queries of a dashboard."""
    dashboard = json.loads(path.read_text())
    queries = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            where = f"{path.name}: panel {panel['title']!r} {target['refId']}"
            queries.append(Query(where, target["expr"], needs_data=True))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append(
                Query(
                    f"{path.name}: annotation {annotation['name']!r}",
                    annotation["expr"],
                    needs_data=False,
                )
            )
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(selector, label) is Grafana's, not PromQL: ask for the same series.
            match = _LABEL_VALUES.match(variable["definition"])
            assert match, f"{path.name}: variable {variable['name']}: not label_values(...)"
            selector, label = match.groups()
            expr = f"count by ({label}) ({selector})"
            where = f"{path.name}: variable {variable['name']!r}"
            queries.append(Query(where, expr, needs_data=True))
    return queries


def substitute(expr: str, values: dict[str, str]) -> str:
    """`expr` with Grafana's template variables replaced; an unknown variable fails."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"unknown template variable ${name} in {expr}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def rule_expressions() -> list[tuple[str, str]]:
    """(alert or record name, expression) of every rule in the rule file."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]


# --- static checks ---------------------------------------------------------------------------


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = binary("promtool")
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_every_alert_has_unit_tests_firing_and_not_firing() -> None:
    alerts = {name for name, _expr in rule_expressions()}
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested not firing"


def test_dashboards_are_well_formed() -> None:
    assert DASHBOARDS, "no dashboards in k8s/grafana/dashboards"
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids), f"duplicate dashboard uids: {uids}"
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert {"data_type", "model"} <= variables.keys(), path.name
        panels = list(_panels(dashboard["panels"]))
        ids = [p["id"] for p in panels]
        assert len(set(ids)) == len(ids), f"{path.name}: duplicate panel ids"
        for panel in panels:
            if panel["type"] == "row":
                continue
            # Every query goes to the data source the user picks, never a fixed one.
            sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
            assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), (
                f"{path.name}: panel {panel['title']!r}: datasource is not ${{datasource}}"
            )
            assert panel["targets"], f"{path.name}: panel {panel['title']!r} has no query"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{path.name}: {panel['title']!r} too wide"
        for query in dashboard_queries(path):
            substitute(query.expr, VARIABLE_VALUES)  # every variable used is known


# --- the real thing ---------------------------------------------------------------------------


class Prometheus:
    """A Prometheus server scraping one target every second, with the rule file loaded."""

    def __init__(self, executable: str, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": SCRAPE_JOB, "static_configs": [{"targets": [target]}]}],
        }
        config_file = tmp / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.log = tmp / "prometheus.log"
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            [
                executable,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def wait_for(self, expr: str, flow: Dataflow, timeout: float = 30) -> None:
        """Wait until `expr` has data; fail early, with its log, when the dataflow died."""
        deadline = time.monotonic() + timeout
        while not has_data(self.query(expr)):
            flow.check_alive()
            if time.monotonic() > deadline:
                targets = self.api("targets")["data"]["activeTargets"]
                raise AssertionError(f"no data for {expr} after {timeout} s; targets: {targets}")
            time.sleep(0.2)

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """A Prometheus HTTP API answer; error answers (HTTP 400/422) are returned too."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:
            answer = json.load(exc)
        return answer

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


def has_data(answer: dict[str, Any]) -> bool:
    """Whether a successful query answer holds at least one finite sample."""
    if answer["status"] != "success":
        return False
    result = answer["data"]["result"]
    if answer["data"]["resultType"] == "scalar":
        result = [{"value": result}]
    return any(math.isfinite(float(series["value"][1])) for series in result)


def replay(*args: str) -> None:
    """`waxserve replay ...` in-process (the topics come from the environment `kafka_config`
    sets)."""
    assert waxserve(["replay", *args, "--data-type", "wine", "-q"]) == 0, (
        f"waxserve replay {args} failed"
    )


@pytest.mark.integration
def test_dashboards_and_alerts_on_the_real_dataflow(kafka_config: Config, tmp_path: Path) -> None:
    config = kafka_config
    executable = binary("prometheus")  # fail before starting anything
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "2"], check=True)
    api_port = free_port()
    assert waxserve(["contract", "publish", "wine"]) == 0
    assert waxserve(["publish", "wine-lr"]) == 0
    with contextlib.ExitStack() as stack:
        prometheus = Prometheus(executable, tmp_path, f"127.0.0.1:{api_port}")
        stack.callback(prometheus.stop)
        # Recovery on, so the recovery-store panels have data; 2 workers for the per-worker
        # panels.
        flow = Dataflow(
            config,
            tmp_path,
            *("-w", "2", "-r", str(recovery), "-s", "1", "-b", "0"),
            BYTEWAX_DATAFLOW_API_ENABLED="1",
            BYTEWAX_DATAFLOW_API_PORT=str(api_port),
            WAXSERVE_FEEDBACK_DATA_TYPES="wine",  # the delayed-label panels
        )
        stack.callback(flow.stop)
        prometheus.wait_ready()
        # Every counter must be scraped several times while it grows, or its rate is 0 and
        # the dashboards' ratios and quantiles are NaN: scraping starts first (target
        # discovery takes ~5 s), each model serves for a few scrape intervals.
        prometheus.wait_for(f'up{{job="{SCRAPE_JOB}"}} == 1', flow)
        rows = ("--rate", "400", "--limit", "1000")
        prometheus.wait_for('waxserve_model_info{model="wine-lr"}', flow)
        replay(str(WINE_CSV), *rows)
        # A tampered descriptor: rejected (DLQ stage "model"), wine-lr keeps serving.
        send_descriptor(config, descriptor("wine-gbt", version="2", sha256="0" * 64))
        assert waxserve(["publish", "wine-gbt"]) == 0
        prometheus.wait_for('waxserve_model_info{model="wine-gbt"}', flow)
        # wine-lr (the last good model) in shadow beside it: the serving-plan panels.
        assert waxserve(["plan", "wine", "shadow", "wine-lr:1", "--wait"]) == 0
        replay(str(WINE_CSV), *rows)
        replay(str(ERROR_CSV))  # malformed rows: dead letters at decode and score
        assert waxserve(["publish", "wine-rf-classifier"]) == 0  # accuracy needs a classifier
        prometheus.wait_for('waxserve_model_info{model="wine-rf-classifier"}', flow)
        replay(str(WINE_CSV), *rows)
        # A counter's rate needs it to grow after its first scrape: on a busy machine the
        # dataflow scored all these records between two scrapes, the new series' first
        # sample held them all, and the accuracy panel stayed empty (0 / 0). More once
        # Prometheus has the series.
        prometheus.wait_for('waxserve_labelled_records_total{model="wine-rf-classifier"}', flow)
        replay(str(WINE_CSV), "--rate", "400", "--limit", "200")
        # The labels, later: each joins the predictions of the three models (same ids).
        replay(str(WINE_CSV), "--feedback", *rows)
        # The delayed-label counters likewise: more labels once Prometheus has the series.
        prometheus.wait_for("waxserve_feedback_pairs_total", flow)
        replay(str(WINE_CSV), "--feedback", "--rate", "400", "--limit", "200")

        queries = [q for path in DASHBOARDS for q in dashboard_queries(path)]
        # Wait until every panel shows data: the last model's series need a few scrapes.
        deadline = time.monotonic() + 45
        while True:
            flow.check_alive()
            empty = [
                q
                for q in queries
                if q.needs_data
                and not has_data(prometheus.query(substitute(q.expr, VARIABLE_VALUES)))
            ]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(1)

        # Every expression parses and runs: Prometheus answers "success".
        failures = []
        for query in queries:
            answer = prometheus.query(substitute(query.expr, VARIABLE_VALUES))
            if answer["status"] != "success":
                failures.append(f"{query.where}: {answer.get('error')}")
        for name, expr in rule_expressions():
            answer = prometheus.query(expr)
            if answer["status"] != "success":
                failures.append(f"rule {name}: {answer.get('error')}")
        assert not failures, "queries Prometheus rejects:\n" + "\n".join(failures)
        assert not empty, "dashboard panels and variables without data:\n" + "\n".join(
            f"{q.where}: {substitute(q.expr, VARIABLE_VALUES)}" for q in empty
        )

        # The variables offer what was served.
        def label_values(expr: str, label: str) -> set[str]:
            answer = prometheus.query(expr)
            return {series["metric"][label] for series in answer["data"]["result"]}

        assert label_values("count by (job) (bytewax_item_out_count_total)", "job") == {SCRAPE_JOB}
        models = label_values("count by (model) (waxserve_records_scored_total)", "model")
        assert {"wine-lr", "wine-gbt", "wine-rf-classifier"} <= models

        # The loaded rules evaluate without error, and the rejected descriptor fires its
        # alert (no `for:`) while the dataflow is neither down nor without a model.
        groups = prometheus.api("rules")["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        assert rules.keys() == {name for name, _expr in rule_expressions()}
        assert all(r["health"] == "ok" for r in rules.values()), [
            (name, r.get("lastError")) for name, r in rules.items() if r["health"] != "ok"
        ]
        assert rules["WaxserveModelRejected"]["state"] == "firing"
        assert rules["WaxserveDataflowDown"]["state"] == "inactive"
        assert rules["WaxserveNoModel"]["state"] == "inactive"
