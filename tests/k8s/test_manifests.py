"""k8s/: every rendered object validates against its CRD (or a structural check), pods are hardened,
jobs run octssl.jobs with configs that load, and the GPU overlay asks for GPUs it can use."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jsonschema
import pytest

from octssl.config.job import load_config

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("base", "dev-cpu", "gpu")  # conftest.py renders each
NAMESPACE = "octssl"
CRD_KINDS = {"RayCluster", "RayJob", "PodMonitor", "PrometheusRule"}
CORE_KINDS = {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "ConfigMap", "NetworkPolicy"}
SAFE_VOLUMES = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected", "downwardAPI"}
RAY_PORTS_FOR_PROMETHEUS = {8080, 9100}

pytestmark = pytest.mark.parametrize("target", list(TARGETS))


def _quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity as a number (cpu in cores, memory in bytes)."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * suffixes[suffix]
    return float(text)


def _unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare (the API server would prune them silently: typos)."""
    found: list[str] = []
    if isinstance(obj, dict) and "properties" in schema:
        if schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema:
            return found
        for key, value in obj.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += _unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            found += _unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            found += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _cluster_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    specs = [(f"RayCluster/{o['metadata']['name']}", o["spec"]) for o in _by_kind(objects, "RayCluster")]
    specs += [(f"RayJob/{o['metadata']['name']}", o["spec"]["rayClusterSpec"]) for o in _by_kind(objects, "RayJob")
              if "clusterSelector" not in o["spec"]]  # a job on the standing cluster has no cluster of its own
    return specs


def _pod_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the manifests would create."""
    templates = []
    for where, spec in _cluster_specs(objects):
        templates.append((f"{where} head", spec["headGroupSpec"]["template"]))
        for group in spec.get("workerGroupSpecs", []):
            templates.append((f"{where} workers {group['groupName']}", group["template"]))
    for job in _by_kind(objects, "RayJob"):
        templates.append((f"RayJob/{job['metadata']['name']} submitter", job["spec"]["submitterPodTemplate"]))
    return templates


def _job_config(job: dict):
    """The JobConfig the RayJob's entrypoint would load: its /configs file from jobs/ plus its --set."""
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "octssl.jobs"], words
    config = words[3]
    assert config.startswith("/configs/"), config
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    return config, overrides, words


def test_every_object_is_known_and_namespaced(rendered, target):
    objects = rendered[target]
    kinds = {o["kind"] for o in objects}
    assert kinds <= CRD_KINDS | CORE_KINDS, kinds - (CRD_KINDS | CORE_KINDS)
    assert {"RayCluster", "RayJob", "PodMonitor", "PrometheusRule", "NetworkPolicy", "PersistentVolumeClaim"} <= kinds
    for o in objects:
        assert o["metadata"]["name"]
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]
    assert [o["metadata"]["name"] for o in _by_kind(objects, "Namespace")] == [NAMESPACE]


def test_custom_resources_validate_against_crds(rendered, crd_schemas, target):
    checked = 0
    for o in rendered[target]:
        if o["kind"] not in CRD_KINDS:
            continue
        schema = crd_schemas[(o["apiVersion"], o["kind"])]
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(o)]
        assert not errors, f"{o['kind']}/{o['metadata']['name']}: {errors}"
        unknown = _unknown_fields(o, schema)
        assert not unknown, f"{o['kind']}/{o['metadata']['name']}: fields not in the CRD: {unknown}"
        checked += 1
    assert checked >= 5  # RayCluster, two RayJobs, PodMonitor, PrometheusRule


def test_core_objects_are_well_formed(rendered, target):
    objects = rendered[target]
    (account,) = _by_kind(objects, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    (claim,) = _by_kind(objects, "PersistentVolumeClaim")
    assert claim["apiVersion"] == "v1" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _quantity(claim["spec"]["resources"]["requests"]["storage"]) >= 2**30
    maps = {m["metadata"]["name"]: m for m in _by_kind(objects, "ConfigMap")}
    jobs = maps["octssl-jobs"]["data"]
    assert jobs, "no job configs in ConfigMap octssl-jobs"
    for name, text in jobs.items():  # the ConfigMap carries jobs/ verbatim
        assert text == (REPO / "jobs" / name).read_text(), name
    assert "grafana-dashboard.json" in maps["octssl-grafana-dashboard"]["data"]
    for name, spec in _cluster_specs(objects):
        for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            assert volumes["configs"]["configMap"]["name"] == "octssl-jobs", name
            assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name


def test_network_policy_admits_only_own_pods_and_prometheus(rendered, target):
    objects = rendered[target]
    (policy,) = _by_kind(objects, "NetworkPolicy")
    spec = policy["spec"]
    assert policy["apiVersion"] == "networking.k8s.io/v1" and spec["policyTypes"] == ["Ingress"]
    selected = spec["podSelector"]["matchLabels"]
    for where, template in _pod_templates(objects):
        assert selected.items() <= template["metadata"]["labels"].items(), f"{where} is not covered by the policy"
    own, prometheus, operator = spec["ingress"]
    assert own["from"] == [{"podSelector": {"matchLabels": selected}}] and "ports" not in own
    for rule in (prometheus, operator):
        assert rule["from"] and all(set(peer) == {"namespaceSelector"} for peer in rule["from"]), rule
    assert {p["port"] for p in prometheus["ports"]} == RAY_PORTS_FOR_PROMETHEUS
    assert prometheus["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert {p["port"] for p in operator["ports"]} == {8265}
    assert not any("ipBlock" in peer for rule in spec["ingress"] for peer in rule["from"])


def test_every_pod_template_is_hardened_and_sized(rendered, target):
    templates = _pod_templates(rendered[target])
    assert len(templates) >= 8
    for where, template in templates:
        pod = template["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context.get("runAsUser", 1) != 0, where
        assert context["seccompProfile"]["type"] == "RuntimeDefault", where
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), where
        assert pod["automountServiceAccountToken"] is False, where
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= SAFE_VOLUMES, f"{where}: volume {volume}"
        containers = pod["containers"] + pod.get("initContainers", [])
        for c in containers:
            sc = c["securityContext"]
            name = f"{where} container {c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc.get("privileged", False) is False, name
            assert "ALL" in sc["capabilities"]["drop"] and not sc["capabilities"].get("add"), name
            assert c["image"] and c["image"] != "octssl", f"{name}: image not set by kustomize images"
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            for resource in ("cpu", "memory"):
                assert _quantity(requests[resource]) <= _quantity(limits[resource]), f"{name}: {resource}"


def test_ray_pods_have_shm_and_private_services(rendered, target):
    for where, spec in _cluster_specs(rendered[target]):
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not head.get("enableIngress", False), where
        assert head["rayStartParams"]["num-cpus"] == "0", where
        assert spec["authOptions"]["mode"] == "token", where
        for template in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            pod = template["spec"]
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            shm = {v["name"]: v for v in pod["volumes"]}[mounts["/dev/shm"]]
            assert shm["emptyDir"]["medium"] == "Memory" and _quantity(shm["emptyDir"]["sizeLimit"]) > 0, where
            # The shm size counts against the container's memory limit: it must fit with room to spare.
            limit = _quantity(pod["containers"][0]["resources"]["limits"]["memory"])
            assert _quantity(shm["emptyDir"]["sizeLimit"]) <= limit / 2, where
            env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
            assert env["OCTSSL_METRICS_ADDR"] == "0.0.0.0", where  # PodMonitors scrape the pod IP


def test_every_pod_phones_no_one(rendered, target):
    """Every container of every Ray pod (head, workers, job submitters) turns off Ray usage statistics and
    MLflow telemetry."""
    from octssl.cluster.local import NO_TELEMETRY

    for where, template in _pod_templates(rendered[target]):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in NO_TELEMETRY} == NO_TELEMETRY, f"{where} container {container['name']}"
    dockerfile = (Path(__file__).resolve().parents[2] / "k8s" / "image" / "Dockerfile").read_text()
    assert all(f"{k}={v}" in dockerfile for k, v in NO_TELEMETRY.items())


def test_rayjobs_run_octssl_jobs_and_clean_up(rendered, target):
    objects = rendered[target]
    (cluster,) = _by_kind(objects, "RayCluster")
    jobs = {j["metadata"]["name"]: j for j in _by_kind(objects, "RayJob")}
    assert {"octssl-pretrain", "octssl-sweep"} <= set(jobs)
    configs = {m["metadata"]["name"]: m for m in _by_kind(objects, "ConfigMap")}["octssl-jobs"]["data"]
    for name, job in jobs.items():
        spec = job["spec"]
        if "clusterSelector" in spec:  # runs on the standing cluster: must not create or delete one
            assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}, name
            assert "rayClusterSpec" not in spec and not spec.get("shutdownAfterJobFinishes"), name
            continue
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 0, name
        assert spec["rayClusterSpec"] == cluster["spec"], f"{name}: rayClusterSpec differs from RayCluster/octssl"
        config, overrides, _ = _job_config(job)
        file_name = config.removeprefix("/configs/")
        if file_name not in configs:
            if not (REPO / "jobs" / file_name).is_file():
                pytest.skip(f"{name}: jobs/{file_name} is not written yet: add it to the configMapGenerator then")
            pytest.fail(f"{name}: {config} is not in ConfigMap octssl-jobs (add jobs/{file_name} to the generator)")


def test_pretrain_entrypoint_config_loads_and_fits_one_rank_per_pod(rendered, target, tmp_path):
    """The entrypoint's config + --set load with octssl.config.job, and each worker pod holds exactly one rank
    (the metrics port scheme: every worker pod serves its rank on 9100)."""
    objects = rendered[target]
    job = {j["metadata"]["name"]: j for j in _by_kind(objects, "RayJob")}["octssl-pretrain"]
    config_path, overrides, words = _job_config(job)
    data = {m["metadata"]["name"]: m for m in _by_kind(objects, "ConfigMap")}["octssl-jobs"]["data"]
    local = tmp_path / Path(config_path).name
    local.write_text(data[local.name])
    config = load_config(local, overrides)
    assert config.data.corpus.startswith("/data/") and config.run.storage_path.startswith("/data/")
    assert words[words.index("--metrics-port") + 1] == "9100"
    # A retried RayJob (backoffLimit) must continue the run from its last checkpoint, not start again.
    assert job["spec"]["backoffLimit"] >= 1 and "--resume-if-exists" in words and config.run.name
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    pod_cpu, pod_gpu = _quantity(limits["cpu"]), _quantity(limits.get("nvidia.com/gpu", 0))
    assert config.scaling.workers <= group["replicas"], "more ranks than worker pods"
    assert config.scaling.cpus_per_worker <= pod_cpu
    if config.scaling.gpus_per_worker:
        assert pod_gpu // config.scaling.gpus_per_worker == 1
    else:
        assert pod_cpu // config.scaling.cpus_per_worker == 1


def test_gpu_overlay_requests_and_tolerates_gpus(rendered, target):
    objects = rendered[target]
    for where, spec in _cluster_specs(objects):
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            resources = pod["containers"][0]["resources"]
            tolerations = pod.get("tolerations", [])
            if target != "gpu":
                assert "nvidia.com/gpu" not in resources["limits"], where
                continue
            assert _quantity(resources["limits"]["nvidia.com/gpu"]) >= 1, where
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], where
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in tolerations), where
            assert pod["containers"][0]["image"].endswith("-gpu"), where
    if target == "gpu":
        job = {j["metadata"]["name"]: j for j in _by_kind(objects, "RayJob")}["octssl-pretrain"]
        _, overrides, _ = _job_config(job)
        assert "scaling.gpus_per_worker=1" in overrides


def test_podmonitor_scrapes_declared_ports_and_octssl_only_where_it_listens(rendered, target):
    """One PodMonitor for all Ray pods: Ray's port everywhere; octssl's port (a rank per worker during
    pretraining, the sweep driver on the head) only on those pods, by the keep rule on node type and the
    cluster name KubeRay derives from the RayJob's name."""
    objects = rendered[target]
    (cluster,) = _by_kind(objects, "RayCluster")
    ports = {
        "head": {p["name"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]},
        "worker": set.intersection(*[{p["name"] for p in g["template"]["spec"]["containers"][0]["ports"]}
                                     for g in cluster["spec"]["workerGroupSpecs"]]),
    }
    (monitor,) = _by_kind(objects, "PodMonitor")
    (selects,) = monitor["spec"]["selector"]["matchExpressions"]
    assert selects["key"] == "ray.io/node-type" and set(selects["values"]) == {"head", "worker"}
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    assert set(endpoints) == {"metrics", "octssl-metrics"}
    assert set(endpoints) <= ports["head"] and set(endpoints) <= ports["worker"]
    assert "relabelings" not in endpoints["metrics"]
    (keep,) = endpoints["octssl-metrics"]["relabelings"]
    assert keep["action"] == "keep"
    assert keep["sourceLabels"] == ["__meta_kubernetes_pod_label_ray_io_node_type",
                                    "__meta_kubernetes_pod_label_ray_io_cluster"]
    jobs = {j["metadata"]["name"] for j in _by_kind(objects, "RayJob")}
    scraped = {f"{node};{job}-x7k2p" for node in ("head", "worker") for job in jobs
               if re.fullmatch(keep["regex"], f"{node};{job}-x7k2p")}  # Prometheus anchors the regex
    assert scraped == {"worker;octssl-pretrain-x7k2p", "head;octssl-sweep-x7k2p"}
    assert not re.fullmatch(keep["regex"], "worker;octssl")  # the standing cluster

