"""Fixtures for the k8s/ tests: rendered kustomizations and the CRD schemas from ../shared/schemas."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ..conftest import skip_unless_ci

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
TARGETS = {"base": K8S / "base", "dev-cpu": K8S / "overlays" / "dev-cpu", "gpu": K8S / "overlays" / "gpu"}
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
CRD_FILES = {
    "RayCluster": "kuberay/ray.io_rayclusters.yaml",
    "RayJob": "kuberay/ray.io_rayjobs.yaml",
    "PodMonitor": "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
    "PrometheusRule": "prometheus-operator/monitoring.coreos.com_prometheusrules.yaml",
}


def kustomize_command() -> list[str] | None:
    """`kustomize build` or `kubectl kustomize`, whichever is installed (kubectl embeds kustomize)."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(target: Path) -> list[dict]:
    command = kustomize_command()
    if command is None:
        skip_unless_ci("neither kustomize nor kubectl is installed: cannot render the kustomizations")
    done = subprocess.run([*command, "--load-restrictor", "LoadRestrictionsNone", str(target)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"rendering {target} failed: {done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Target name (base, dev-cpu, gpu) -> its rendered objects."""
    return {name: render(path) for name, path in TARGETS.items()}


@pytest.fixture(scope="session")
def crd_schemas(shared_dir: Path) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the openAPIV3Schema of that CRD version."""
    schemas = {}
    for kind, relative in CRD_FILES.items():
        # The C loader when present: the pure-Python one needs ~20 s for these large CRDs.
        crd = yaml.load((shared_dir / "schemas" / relative).read_text(), Loader=_LOADER)
        group = crd["spec"]["group"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas
