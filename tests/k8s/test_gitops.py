"""k8s/ as Argo CD and Flux take it: every overlay renders with kustomize's defaults (no load-restrictor
flag), images are pinned by digest or pulled Always, and the optional Kueue component queues the RayJobs
that bring their own cluster."""

from __future__ import annotations

import os
from pathlib import Path

import jsonschema
import pytest

from .conftest import K8S, render

OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def _overlay(tmp_path: Path, body: str) -> list[dict]:
    """Render a user's overlay written in tmp_path; it names the repository by a relative path, as kustomize
    requires."""
    k8s = Path(os.path.relpath(K8S, tmp_path)).as_posix()
    (tmp_path / "kustomization.yaml").write_text(body.replace("K8S", k8s))
    return render(tmp_path)


def _containers(objects: list[dict]) -> list[tuple[str, dict]]:
    """(where, container) for every container of every pod template, found wherever it nests."""
    found: list[tuple[str, dict]] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for c in node.get("containers", []) + node.get("initContainers", []):
                if isinstance(c, dict) and "image" in c:
                    found.append((f"{where} {c['name']}", c))
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for o in objects:
        walk(o.get("spec", {}), f"{o['kind']}/{o['metadata']['name']}")
    return found


def _assert_pinned_or_always(objects: list[dict]) -> int:
    containers = _containers(objects)
    for where, c in containers:
        pinned = "@sha256:" in c["image"]
        assert pinned or c.get("imagePullPolicy") == "Always", f"{where}: {c['image']} is a mutable tag not pulled Always"
    return len(containers)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_every_overlay_renders_with_plain_kustomize_and_pulls_a_mutable_tag_always(overlay: Path) -> None:
    objects = render(overlay)  # conftest: `kubectl kustomize DIR`, no --load-restrictor
    configs = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "octssl-jobs"]
    assert configs and "pretrain.yaml" in configs[0]["data"], "the job configs did not come in from jobs/"
    assert _assert_pinned_or_always(objects) >= 8  # heads, workers, submitters of the cluster and the jobs


def test_a_digest_pinned_overlay_pins_every_container(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    objects = _overlay(tmp_path, "resources: [K8S/overlays/gpu]\n"
                                 f"images: [{{name: ghcr.io/octssl/octssl, digest: '{digest}'}}]\n")
    containers = _containers(objects)
    assert containers and all(c["image"] == f"ghcr.io/octssl/octssl@{digest}" for _, c in containers), containers


def test_kueue_component_queues_the_rayjobs_kueue_can_admit(tmp_path: Path, crd_schemas) -> None:
    objects = _overlay(tmp_path, "resources: [K8S/overlays/dev-cpu]\ncomponents: [K8S/components/kueue]\n")
    jobs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "RayJob"}
    queued = {name for name, job in jobs.items() if QUEUE_LABEL in job["metadata"].get("labels", {})}
    assert queued == {"octssl-pretrain", "octssl-sweep"}, queued
    (queue,) = [o for o in objects if o["kind"] == "LocalQueue"]
    assert queue["apiVersion"] == "kueue.x-k8s.io/v1beta1" and queue["metadata"]["namespace"] == "octssl"
    assert queue["spec"]["clusterQueue"]
    for name in queued:
        job = jobs[name]
        assert job["metadata"]["labels"][QUEUE_LABEL] == queue["metadata"]["name"]
        # What Kueue's RayJob integration requires: a cluster of its own, deleted at the end, a fixed size.
        assert "clusterSelector" not in job["spec"] and job["spec"]["shutdownAfterJobFinishes"] is True, name
        assert not job["spec"]["rayClusterSpec"].get("enableInTreeAutoscaling"), name
        schema = crd_schemas[(job["apiVersion"], "RayJob")]
        errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(job)]
        assert not errors, f"{name}: {errors}"
    assert "clusterSelector" in jobs["octssl-ingest"]["spec"]  # on the standing cluster: left unqueued
    assert _assert_pinned_or_always(objects) >= 8
