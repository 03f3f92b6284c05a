"""k8s/components/mlflow: each overlay with the optional MLflow component renders, the server is hardened,
private and telemetry-free, and every Ray pod (standing cluster and each job's own) is pointed at it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import K8S, kustomize_command

OVERLAYS = ("dev-cpu", "gpu")
SERVICE_URI = "http://octssl-mlflow:5000"


def _render_with_component(overlay: str, folder: Path) -> list[dict]:
    """The overlay plus the component, as a user's own kustomization.yaml would list them."""
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed: cannot render the kustomizations")
    k8s = os.path.relpath(K8S, folder)  # kustomize refuses absolute paths
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{k8s}/overlays/{overlay}"], "components": [f"{k8s}/components/mlflow"]}))
    done = subprocess.run([*command, "--load-restrictor", "LoadRestrictionsNone", str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"rendering {overlay} with the mlflow component failed: {done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_with_mlflow_component(overlay: str, tmp_path: Path) -> None:
    objects = _render_with_component(overlay, tmp_path)
    named = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    deployment = named[("Deployment", "octssl-mlflow")]
    service = named[("Service", "octssl-mlflow")]
    claim = named[("PersistentVolumeClaim", "octssl-mlflow")]
    for o in (deployment, service, claim):
        assert o["metadata"]["namespace"] == "octssl"

    pod = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), \
        "the server is not covered by the octssl NetworkPolicy (only octssl's own pods may reach it)"
    (server,) = pod["spec"]["containers"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["automountServiceAccountToken"] is False
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert server["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert server["image"].split(":")[-1].startswith("v3."), "pin the MLflow server version"
    args = dict(a.removeprefix("--").split("=", 1) for a in server["args"])
    assert args["backend-store-uri"].startswith("sqlite:////mlflow/") and args["artifacts-destination"].startswith("/mlflow/")
    assert {m["mountPath"] for m in server["volumeMounts"]} >= {"/mlflow"}
    assert {v["name"]: v for v in pod["spec"]["volumes"]}["store"]["persistentVolumeClaim"]["claimName"] == "octssl-mlflow"
    assert _env(server)["MLFLOW_DISABLE_TELEMETRY"] == "true" and _env(server)["DO_NOT_TRACK"] == "true"
    port = service["spec"]["ports"][0]["port"]
    assert SERVICE_URI == f"http://{service['metadata']['name']}:{port}"
    assert "octssl-mlflow:5000" in args["allowed-hosts"].split(",")

    specs = [o["spec"] for o in objects if o["kind"] == "RayCluster"]
    specs += [o["spec"]["rayClusterSpec"] for o in objects if o["kind"] == "RayJob" and "rayClusterSpec" in o["spec"]]
    assert len(specs) >= 3  # the standing cluster and the pretrain and sweep jobs' own clusters
    for spec in specs:
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for template in templates:
            env = _env(template["spec"]["containers"][0])
            assert env["MLFLOW_TRACKING_URI"] == SERVICE_URI
            assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["DO_NOT_TRACK"] == "true"
            assert env["OCTSSL_METRICS_ADDR"] == "0.0.0.0"  # the base's variables are kept


def test_overlays_without_the_component_have_no_tracking_server() -> None:
    for overlay in OVERLAYS:
        text = (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
        assert "components/mlflow" not in yaml.safe_dump(yaml.safe_load(text)), "the component is optional"
