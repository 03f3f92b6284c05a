"""octssl.observe.metrics: metric names, types and labels, the /metrics server, and a real Prometheus scraping real
training runs and answering every query of the Grafana dashboard."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from octssl.observe import metrics as monitor

REPO = Path(__file__).resolve().parents[2]
RUN, RANK = "ray_train_run_name", "ray_train_worker_world_rank"
#: every family octssl exports: its Prometheus type and its label names
FAMILIES = {
    "octssl_build_info": ("gauge", {"version", "torch", "deepspeed", "ray"}),
    "octssl_samples": ("counter", {RUN, RANK}),
    "octssl_steps": ("counter", {RUN, RANK}),
    "octssl_skipped_steps": ("counter", {RUN, RANK}),
    "octssl_worker_restarts": ("counter", {RUN, RANK}),
    "octssl_step_duration_seconds": ("histogram", {RUN, RANK}),
    "octssl_step_local_seconds": ("histogram", {RUN, RANK}),
    "octssl_data_wait_seconds": ("histogram", {RUN, RANK}),
    "octssl_checkpoint_duration_seconds": ("histogram", {RUN, RANK}),
    "octssl_last_checkpoint_timestamp_seconds": ("gauge", {RUN, RANK}),
    "octssl_checkpoint_interval_steps": ("gauge", {RUN, RANK}),
    "octssl_step": ("gauge", {RUN, RANK}),
    "octssl_total_steps": ("gauge", {RUN, RANK}),
    "octssl_loss": ("gauge", {RUN, RANK}),
    "octssl_learning_rate": ("gauge", {RUN, RANK}),
    "octssl_grad_norm": ("gauge", {RUN, RANK}),
    "octssl_validation": ("gauge", {RUN, RANK, "metric"}),
    "octssl_memory_bytes": ("gauge", {RUN, RANK, "kind"}),
    "octssl_device_memory_capacity_bytes": ("gauge", {RUN, RANK}),
    "octssl_sweep_trials": ("gauge", {RUN, "state"}),
}


def _run_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _record_everything(run: str) -> monitor.TrainMetrics:
    metrics = monitor.TrainMetrics(rank=0, run=run)
    metrics.observe_step(seconds=0.5, local_s=0.3, data_wait_s=0.05, samples=4)
    metrics.update(step=1, total_steps=10, checkpoint_every=5, loss=0.5, lr=0.01, grad_norm=1.0,
                   memory={kind: 1e6 for kind in monitor.MEMORY_KINDS}, device_capacity=8e9)
    metrics.validation({"ssim": 0.4, "val_loss": 0.6})
    metrics.checkpoint(1.5)
    metrics.skipped_step()
    metrics.restart()
    monitor.SweepMetrics(run).update({"RUNNING": 1})
    return metrics


def test_metric_names_types_and_labels():
    """Names follow Prometheus' conventions (counters *_total, units in the name, base units), each family
    has the type and labels listed in FAMILIES (and docs/monitoring.md), and nothing else is exported."""
    run = _run_name()
    _record_everything(run)
    found = {}
    for family in text_string_to_metric_families(monitor.exposition()):
        labels = set().union(*(set(s.labels) - {"le"} for s in family.samples))
        found[family.name] = (family.type, labels)
    assert found == FAMILIES
    assert monitor.families() == {name: kind for name, (kind, _) in FAMILIES.items()}
    for name, (kind, _) in FAMILIES.items():
        assert name.startswith("octssl_") and not name.endswith("_total")  # the client adds _total to counters
        if kind == "histogram":
            assert name.endswith("_seconds"), name
    docs = (REPO / "docs" / "monitoring.md").read_text()
    undocumented = [n for n, (kind, _) in FAMILIES.items() if f"`{n}{'_total' if kind == 'counter' else ''}`" not in docs]
    assert not undocumented, f"not in docs/monitoring.md: {undocumented}"


def test_step_observations_and_state():
    m = monitor.TrainMetrics(rank=3, run=_run_name())
    before = m.values()
    assert before["octssl_skipped_steps_total"] == 0 and before["octssl_worker_restarts_total"] == 0
    assert before["octssl_last_checkpoint_timestamp_seconds"] == pytest.approx(time.time(), abs=60)
    assert "octssl_loss" not in before  # gauges appear with their first value, never as a fake 0
    for wait in (0.01, 0.2):
        m.observe_step(seconds=0.3, local_s=0.25, data_wait_s=wait, samples=2)
    m.update(step=2, loss=2.0, memory={"host_rss": 5e8})
    m.update(step=2, loss=float("nan"))
    with pytest.raises(ValueError, match="memory kind"):
        m.update(step=2, memory={"vram": 1.0})
    v = m.values()
    assert v["octssl_steps_total"] == 2 and v["octssl_samples_total"] == 4
    assert v["octssl_data_wait_seconds_sum"] == pytest.approx(0.21)
    assert v["octssl_data_wait_seconds_bucket{le=0.025}"] == 1 and v["octssl_data_wait_seconds_bucket{le=0.25}"] == 2
    assert v["octssl_step_duration_seconds_count"] == 2
    assert v["octssl_loss"] != v["octssl_loss"]  # NaN is exported as NaN (the non-finite-loss alert needs it)
    assert v["octssl_memory_bytes{kind=host_rss}"] == 5e8


def test_sweep_trials_by_state():
    run = _run_name()
    sweep = monitor.SweepMetrics(run)
    sweep.update({"RUNNING": 2, "PENDING": 3})
    sweep.update({"RUNNING": 1, "TERMINATED": 4})
    got = {s.labels["state"]: s.value for f in text_string_to_metric_families(monitor.exposition())
           for s in f.samples if s.name == "octssl_sweep_trials" and s.labels[RUN] == run}
    assert got == {"RUNNING": 1, "TERMINATED": 4, "PENDING": 0}


def test_build_info_names_the_stack():
    from importlib.metadata import version

    import octssl

    monitor.publish_build_info()
    (info,) = [s for f in text_string_to_metric_families(monitor.exposition()) for s in f.samples
               if s.name == "octssl_build_info"]
    assert info.value == 1 and info.labels["torch"] == version("torch") and info.labels["ray"] == version("ray")
    assert info.labels["version"] == octssl.__version__ and info.labels["deepspeed"] == version("deepspeed")


def test_serve_is_idempotent_and_serves_metrics():
    run = _run_name()
    monitor.TrainMetrics(rank=0, run=run).update(step=2, loss=0.75)
    port = monitor.serve(0)
    assert monitor.serve(0) == port == monitor.serve(port + 1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f'octssl_loss{{{RUN}="{run}",{RANK}="0"}} 0.75' in text


def test_serve_on_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = (f"from octssl.observe.metrics import serve\nfrom octssl.errors import ConfigError\n"
                f"try:\n    serve({port})\nexcept ConfigError as e:\n    print('ConfigError', e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("ConfigError") and str(port) in out.stdout, out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- a real Prometheus server

def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _query(base: str, promql: str, at: float | None = None) -> list[dict]:
    params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
    body = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode(params))
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("the prometheus binary is not on PATH: install it with `sudo make prometheus` (the Debian "
                    "package prometheus) or put a Prometheus 2.x binary on PATH; .ci/run installs it")
    return path


def _start_prometheus(binary: str, tmp_path: Path, targets: list[str]) -> tuple[subprocess.Popen, str]:
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "octssl", "scrape_interval": "1s", "scrape_timeout": "1s",
                            "static_configs": [{"targets": targets}]}],
    }))
    port = _free_port()
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200:
                return proc, base
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"prometheus did not become ready: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _panels() -> list[dict]:
    dashboard = json.loads((REPO / "k8s" / "base" / "grafana-dashboard.json").read_text())
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _panel_expr(expr: str, run: str) -> str:
    """A panel query with the dashboard's variables substituted as Grafana would for this run."""
    # Windows as Grafana picks them for a 10-minute view: long enough to hold the whole short run.
    return (expr.replace("$run", run).replace("$namespace", ".*").replace("$__rate_interval", "10m")
            .replace("$__range", "10m"))


def _check_dashboard(base: str, run: str, at: float, ranks: int) -> set[str]:
    """Every panel query parses; every panel that needs no cluster returns finite data at time `at`, per
    rank where its legend names the rank. Returns the titles of the panels that returned data."""
    answered = set()
    for panel in _panels():
        for target in panel["targets"]:
            result = _query(base, _panel_expr(target["expr"], run), at)  # asserts status == success
            if panel.get("octssl_needs"):
                continue
            values = [float(r["value"][1]) for r in result]
            assert values and all(math.isfinite(v) for v in values), (panel["title"], target["expr"], result)
            if RANK in target["legendFormat"]:
                assert sorted(r["metric"][RANK] for r in result) == [str(r) for r in range(ranks)], panel["title"]
        if not panel.get("octssl_needs"):
            answered.add(panel["title"])
    return answered


# One real training run in a process of its own: the Trainer (DeepSpeed on CPU, world size 1) serving
# /metrics on PORT; after the run the process keeps serving until killed, and prints when it finished.
_TRAIN_PROCESS = r"""
import sys, time
from octssl.config.job import load_config
from octssl.train.launch import run_single_process
config, port, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
run_single_process(load_config(config, overrides), metrics_port=port)
print("finished", time.time(), flush=True)
time.sleep(600)
"""


def _train_overrides(corpus: Path, runs: Path, run: str, steps: int) -> list[str]:
    return [f"data.corpus={corpus}", f"run.storage_path={runs}", f"run.name={run}", "data.crop=[16, 64]",
            "data.batch_size=2", "data.crops_per_volume=2", "data.val_volumes=2", "model.width=0.25",
            f"run.max_steps={steps}", "run.log_every=2", f"run.eval_every={steps // 2}", f"run.ckpt_every={steps // 2}",
            "optim.warmup_steps=0"]


def test_dashboard_queries_answer_on_a_real_training_run(prometheus_binary, tmp_path):
    """A short real training run (the Trainer, DeepSpeed on CPU) serves /metrics; a real Prometheus scrapes
    it every second; every dashboard panel's PromQL, variables substituted, parses and returns finite data,
    except the panels marked as needing Ray's own metrics, a GPU or a sweep (they must still parse)."""
    from octssl.corpus.synth import synthesize

    corpus = tmp_path / "corpus"
    synthesize(corpus, volumes=12, grid=(16, 64, 64), seed=3, labelled=0.0)  # 8 train, 2 val volumes
    run, port = _run_name(), _free_port()
    prom, base = _start_prometheus(prometheus_binary, tmp_path, [f"127.0.0.1:{port}"])
    command = [sys.executable, "-c", _TRAIN_PROCESS, str(REPO / "jobs" / "pretrain.yaml"), str(port),
               *_train_overrides(corpus, tmp_path / "runs", run, steps=12)]
    log = tmp_path / "trainer.log"
    with open(log, "w") as errors:
        trainer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        finished = next((float(line.split()[1]) for line in trainer.stdout if line.startswith("finished")), None)
        assert finished is not None, log.read_text()[-3000:]
        time.sleep(2.5)  # two more scrapes
        answered = _check_dashboard(base, run, at=finished + 1.5, ranks=1)
    finally:
        trainer.kill()
        trainer.communicate()
        prom.terminate()
        prom.wait(timeout=20)
    unmarked = {p["title"] for p in _panels() if not p.get("octssl_needs")}
    assert answered == unmarked and len(unmarked) >= 20, unmarked - answered
    assert {p.get("octssl_needs") for p in _panels()} == {None, "ray", "gpu", "sweep"}


@pytest.mark.slow
def test_real_prometheus_scrapes_octssl_pretrain(prometheus_binary, tmp_path):
    """`octssl pretrain --metrics-port P` (2 Ray Train workers, DeepSpeed on CPU) scraped by Prometheus:
    both ranks on P and P+1, and the dashboard answers per rank for both."""
    from octssl.corpus.synth import synthesize

    corpus = tmp_path / "corpus"
    synthesize(corpus, volumes=12, grid=(16, 64, 64), seed=3, labelled=0.5)
    run = _run_name()
    port = _free_port()
    while not _port_is_free(port + 1):
        port = _free_port()
    prom, base = _start_prometheus(prometheus_binary, tmp_path, [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"])
    octssl = Path(sys.executable).parent / "octssl"
    command = [str(octssl), "pretrain", str(REPO / "jobs" / "pretrain.yaml"), "--metrics-port", str(port)]
    for item in [*_train_overrides(corpus, tmp_path / "runs", run, steps=30), "scaling.workers=2"]:
        command += ["--set", item]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        time.sleep(2)  # one more scrape interval
        # The workers have exited: look back at the last moment both served (their last scrape).
        scrapes = _query(base, f'count_over_time(octssl_step{{{RUN}="{run}"}}[10m])')
        assert min(float(r["value"][1]) for r in scrapes) >= 3  # scraped while it trained, not once at the end
        ends = _query(base, f'max_over_time(timestamp(octssl_step{{{RUN}="{run}"}})[10m:1s])')
        at = min(float(r["value"][1]) for r in ends)
        assert len(ends) == 2, (ends, done.stderr[-2000:])
        _check_dashboard(base, run, at=at, ranks=2)
    finally:
        prom.terminate()
        prom.wait(timeout=20)
