"""The KubeRay workflow runs in order: no `kubectl apply -k` starts a RayJob that reads another's output
before that output exists; S3 credentials come from a Secret; pods leave Ray cleanly; the dashboard
embeds Grafana; the GPU overlay gives the sweep's trials GPUs."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
TARGETS = ("base", "dev-cpu", "gpu", "gcs-ft")


def _jobs(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "RayJob"}


def _paths(job: dict) -> tuple[set[str], set[str]]:
    """(reads, writes) of a RayJob, from its entrypoint: ``--out``/storage paths are written; corpora,
    shards, init weights and command arguments are read."""
    words = shlex.split(job["spec"]["entrypoint"].replace("&&", " && "))
    if words[:2] == ["bash", "-c"]:
        words = shlex.split(words[2].replace("&&", " && "))
    sets = {words[i + 1] for i, w in enumerate(words) if w == "--set"}
    values = dict(s.split("=", 1) for s in sets)
    writes = {words[i + 1] for i, w in enumerate(words) if w in ("--out", "-o")}
    reads = {w for w in words if w.startswith(("/data/", "s3://")) and w not in writes}
    name = values.get("run.name") or values.get("name")
    storage = values.get("run.storage_path") or values.get("storage_path")
    if storage:
        writes.add(f"{storage}/{name}" if name else storage)
        reads.discard(storage)
    reads |= {v for k, v in values.items() if k in ("data.corpus", "data.shards", "corpus", "run.init")
              or k.startswith("inits.")}
    return reads, writes


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@pytest.mark.parametrize("target", TARGETS)
def test_every_job_that_reads_another_jobs_output_waits(rendered, target):
    jobs = _jobs(rendered[target])
    io = {name: _paths(job) for name, job in jobs.items()}
    assert io["octssl-ingest"][1] >= {"/data/corpus", "/data/shards"}
    edges = set()
    for reader, (reads, _) in io.items():
        for writer, (_, writes) in io.items():
            if writer != reader and any(_inside(r, w) for r in reads for w in writes):
                edges.add((writer, reader))
                spec = jobs[reader]["spec"]
                assert spec.get("suspend") is True or "clusterSelector" in spec, (
                    f"{target}: RayJob/{reader} reads the output of RayJob/{writer} but starts on apply "
                    "(set suspend: true, or run it on the standing cluster)")
    assert edges >= {("octssl-ingest", "octssl-pretrain"), ("octssl-pretrain", "octssl-sweep")}
    starters = [n for n, j in jobs.items() if not j["spec"].get("suspend")]
    assert starters == ["octssl-ingest"]  # the only job that runs on apply reads no job's output


def test_release_script_follows_the_dependencies():
    script = (K8S / "run-workflow.sh").read_text()
    steps = [line.split()[:2] for line in script.splitlines() if line.startswith(("wait_for ", "release "))]
    assert steps == [["wait_for", "octssl-ingest"], ["release", "octssl-pretrain"], ["wait_for", "octssl-pretrain"],
                     ["release", "octssl-sweep"], ["wait_for", "octssl-sweep"]]
    assert "suspend\":false" in script


@pytest.mark.parametrize("target", TARGETS)
def test_ray_pods_stop_ray_get_s3_from_a_secret_and_embed_grafana(rendered, target):
    (cluster,) = [o for o in rendered[target] if o["kind"] == "RayCluster"]
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        assert "ray stop" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert "octssl-s3" in refs
        assert not any(e["name"].startswith("AWS_") and "value" in e for e in container.get("env", []))
    head_env = {e["name"]: e.get("value") for e in groups[0]["template"]["spec"]["containers"][0]["env"]}
    for key in ("RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST", "RAY_GRAFANA_IFRAME_HOST"):
        assert head_env[key].startswith("http"), key
    assert not [o for o in rendered[target] if o["kind"] == "Secret"]  # no secret is applied from git


def test_example_secret_holds_placeholders_only():
    docs = list(yaml.safe_load_all((K8S / "secrets.example.yaml").read_text()))
    s3 = {d["metadata"]["name"]: d for d in docs}["octssl-s3"]["stringData"]
    assert set(s3) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    assert all("REPLACE" in v for k, v in s3.items() if k != "AWS_REGION")


def test_gpu_overlay_gives_sweep_trials_a_gpu(rendered):
    sweep = _jobs(rendered["gpu"])["octssl-sweep"]
    assert "resources.gpus_per_trial=1" in shlex.split(sweep["spec"]["entrypoint"])


@pytest.mark.parametrize("target", TARGETS)
def test_ray_pods_checkpoint_before_they_are_killed(rendered, target):
    """A pod being evicted first asks every run to checkpoint (octssl.train.preempt), then leaves Ray; its grace
    period covers that window plus `ray stop`, and a driver's own SIGTERM deadline fits in it too."""
    (cluster,) = [o for o in rendered[target] if o["kind"] == "RayCluster"]
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        hook = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        assert hook.index("python -m octssl.train.preempt") < hook.index("ray stop")
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        window = max(float(env["OCTSSL_PREEMPT_WAIT_S"]), float(env["OCTSSL_PREEMPT_GRACE_S"]))
        assert window + 10 <= pod["terminationGracePeriodSeconds"]


def test_the_gcs_fault_tolerance_overlay_keeps_the_head_state_in_redis(rendered):
    clusters = [o["spec"] for o in rendered["gcs-ft"] if o["kind"] == "RayCluster"]
    clusters += [o["spec"]["rayClusterSpec"] for o in rendered["gcs-ft"] if o["kind"] == "RayJob" and
                 "rayClusterSpec" in o["spec"]]
    assert len(clusters) == 3  # the standing cluster and the pretrain and sweep jobs' clusters
    for spec in clusters:
        options = spec["gcsFaultToleranceOptions"]
        assert options["redisAddress"].startswith("redis://")
        assert options["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "octssl-redis", "key": "password"}
