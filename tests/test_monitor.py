"""octssl.monitor: metric values, text exposition, the /metrics server, and a real Prometheus scraping it."""

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

from octssl import monitor


def _run_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _samples(text: str, run: str) -> dict[tuple[str, str], float]:
    """(series name, rank or state) -> value for one run, parsed from the text exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("run") == run:
                found[(s.name, s.labels.get("rank") or s.labels.get("state"))] = s.value
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_update_appears_per_rank_in_exposition():
    run = _run_name()
    ranks = [monitor.TrainMetrics(rank=r, run=run) for r in (0, 1)]
    for r, m in enumerate(ranks):
        m.update(step=10, loss=0.5 + r, lr=0.01, samples_per_s=8.0 * (r + 1), step_s=0.25, data_wait_s=0.05,
                 grad_norm=1.5, memory_bytes=1e6)
    got = _samples(monitor.exposition(), run)
    for r in (0, 1):
        rank = str(r)
        assert got[("octssl_loss", rank)] == 0.5 + r
        assert got[("octssl_samples_per_second", rank)] == 8.0 * (r + 1)
        assert got[("octssl_learning_rate", rank)] == 0.01
        assert got[("octssl_step_seconds", rank)] == 0.25
        assert got[("octssl_data_wait_seconds", rank)] == 0.05
        assert got[("octssl_grad_norm", rank)] == 1.5
        assert got[("octssl_device_memory_bytes", rank)] == 1e6
        assert got[("octssl_step", rank)] == 10
        assert got[("octssl_steps_total", rank)] == 10


def test_counters_and_none_keeps_last_value():
    m = monitor.TrainMetrics(rank=3, run=_run_name())
    before = m.values()
    assert before["octssl_skipped_steps_total"] == 0 and before["octssl_worker_restarts_total"] == 0
    assert "octssl_loss" not in before  # gauges appear with their first value, never as a fake 0
    m.update(step=5, loss=2.0, samples_per_s=4.0)
    m.update(step=9, loss=None, samples_per_s=6.0)
    m.skipped_step()
    m.skipped_step()
    m.checkpoint(1.25)
    m.restart(from_step=4)
    m.update(step=7, loss=float("nan"))
    v = m.values()
    assert v["octssl_loss"] != v["octssl_loss"]  # NaN is exported as NaN (the NaN-loss alert needs it)
    assert v["octssl_samples_per_second"] == 6.0
    assert v["octssl_steps_total"] == 9 + 3  # 0->5->9, then resumed at 4 -> 7
    assert v["octssl_step"] == 7
    assert v["octssl_skipped_steps_total"] == 2
    assert v["octssl_checkpoint_seconds"] == 1.25 and v["octssl_checkpoints_total"] == 1
    assert v["octssl_worker_restarts_total"] == 1


def test_sweep_trials_by_state():
    run = _run_name()
    sweep = monitor.SweepMetrics(run)
    sweep.update({"RUNNING": 2, "PENDING": 3})
    sweep.update({"RUNNING": 1, "TERMINATED": 4})
    got = _samples(monitor.exposition(), run)
    assert got[("octssl_sweep_trials", "RUNNING")] == 1
    assert got[("octssl_sweep_trials", "TERMINATED")] == 4
    assert got[("octssl_sweep_trials", "PENDING")] == 0


def test_metric_names_match_exposition():
    run = _run_name()
    monitor.TrainMetrics(rank=0, run=run).update(step=1, loss=1.0, lr=0.1, samples_per_s=1.0, step_s=1.0,
                                                  data_wait_s=0.0, grad_norm=1.0, memory_bytes=1.0)
    exported = {name for name, _ in _samples(monitor.exposition(), run)}
    names = monitor.metric_names()
    assert exported <= names
    assert all(n.startswith("octssl_") for n in names)


def test_serve_is_idempotent_and_serves_metrics():
    run = _run_name()
    monitor.TrainMetrics(rank=0, run=run).update(step=2, loss=0.75)
    port = monitor.serve(0)
    assert monitor.serve(0) == port == monitor.serve(port + 1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert _samples(text, run)[("octssl_loss", "0")] == 0.75


def test_serve_on_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = (f"from octssl.monitor import serve\nfrom octssl.errors import ConfigError\n"
                f"try:\n    serve({port})\nexcept ConfigError as e:\n    print('ConfigError', e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("ConfigError") and str(port) in out.stdout, out.stderr


# --------------------------------------------------------------------------- a real Prometheus server

# One training rank: a genuine torch model stepping on random OCT-shaped batches, its metrics served on
# PORT the way a training worker serves them. Stops by itself after SECONDS.
_RANK_PROCESS = r"""
import sys, time, torch
from octssl.monitor import TrainMetrics, serve
rank, port, run, seconds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
torch.manual_seed(rank)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
metrics = TrainMetrics(rank=rank, run=run)
print("serving", serve(port), flush=True)
step, end = 0, time.time() + seconds
while time.time() < end:
    t0 = time.perf_counter()
    volume = torch.randn(2, 1, 8, 16, 16)
    target = volume.mean(dim=3)
    t1 = time.perf_counter()
    loss = torch.nn.functional.mse_loss(model(volume).mean(dim=3), target)
    opt.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    step += 1
    t2 = time.perf_counter()
    metrics.update(step=step, loss=loss.item(), lr=0.05, samples_per_s=2 / (t2 - t0), step_s=t2 - t0,
                   data_wait_s=t1 - t0, grad_norm=float(grad_norm), memory_bytes=0.0)
    time.sleep(0.05)
"""


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _query(base: str, promql: str) -> list[dict]:
    body = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
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


def test_real_prometheus_scrapes_two_training_ranks(prometheus_binary, tmp_path):
    """Two rank processes train a small 3D model and serve on port+rank; Prometheus scrapes both."""
    run = _run_name()
    base_port = _free_port()
    while not all(_port_is_free(base_port + r) for r in (0, 1)):
        base_port = _free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK_PROCESS, str(r), str(base_port + r), run, "40"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    prom = None
    try:
        prom, base = _start_prometheus(prometheus_binary, tmp_path,
                                       [f"127.0.0.1:{base_port}", f"127.0.0.1:{base_port + 1}"])
        deadline = time.time() + 40
        rates = losses = []
        while time.time() < deadline:
            rates = _query(base, f'octssl_samples_per_second{{run="{run}"}} > 0')
            losses = _query(base, f'octssl_loss{{run="{run}"}}')
            if len(rates) == 2 and len(losses) == 2:
                break
            assert all(p.poll() is None for p in ranks), [p.communicate()[1][-2000:] for p in ranks]
            time.sleep(0.5)
        assert sorted(r["metric"]["rank"] for r in rates) == ["0", "1"], rates
        assert sorted(r["metric"]["rank"] for r in losses) == ["0", "1"], losses
        assert all(math.isfinite(float(r["value"][1])) and float(r["value"][1]) > 0 for r in losses)
        up = _query(base, 'up{job="octssl"}')
        assert sorted(float(u["value"][1]) for u in up) == [1.0, 1.0]
        _dashboard_queries_work(base, run)
    finally:
        for p in ranks:
            p.kill()
            p.communicate()
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=20)


def _dashboard_queries_work(base: str, run: str) -> None:
    """Every Grafana panel query parses in a real Prometheus; those on update()'s metrics show both ranks."""
    dashboard = json.loads((Path(__file__).parents[1] / "k8s" / "base" / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = (target["expr"].replace("$run", run).replace("$namespace", ".*")
                    .replace("$__rate_interval", "1m").replace("$__range", "5m"))
            result = _query(base, expr)  # asserts status == success
            if any(name in expr for name in ("octssl_samples_per_second", "octssl_loss{", "octssl_grad_norm")):
                assert sorted(r["metric"]["rank"] for r in result) == ["0", "1"], (panel["title"], result)


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.slow
def test_real_prometheus_scrapes_octssl_pretrain(prometheus_binary, tmp_path):
    """`octssl pretrain --metrics-port P` (2 Ray Train workers, DeepSpeed on CPU) scraped by Prometheus."""
    from octssl.corpus.synth import synthesize

    corpus = tmp_path / "corpus"
    synthesize(corpus, volumes=12, grid=(16, 64, 64), seed=3, labelled=0.5)
    run = _run_name()
    port = _free_port()
    while not _port_is_free(port + 1):
        port = _free_port()
    prom, base = _start_prometheus(prometheus_binary, tmp_path, [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"])
    octssl = Path(sys.executable).parent / "octssl"
    overrides = [f"data.corpus={corpus}", f"run.storage_path={tmp_path / 'runs'}", f"run.name={run}",
                 "data.crop=[16, 64]", "data.batch_size=2", "data.crops_per_volume=2", "data.val_volumes=2",
                 "model.width=0.25", "run.max_steps=30", "run.log_every=1", "run.eval_every=1000",
                 "run.ckpt_every=1000", "optim.warmup_steps=0", "scaling.workers=2"]
    command = [str(octssl), "pretrain", "--config", str(Path(__file__).parents[1] / "jobs" / "pretrain.yaml"),
               "--metrics-port", str(port)]
    for item in overrides:
        command += ["--set", item]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        time.sleep(2)  # one more scrape interval
        # The run has ended: range queries still see every sample it exported.
        rates = _query(base, f'max_over_time(octssl_samples_per_second{{run="{run}"}}[10m]) > 0')
        losses = _query(base, f'max_over_time(octssl_loss{{run="{run}"}}[10m])')
        scrapes = _query(base, f'count_over_time(octssl_step{{run="{run}"}}[10m])')
        assert sorted(r["metric"]["rank"] for r in rates) == ["0", "1"], (rates, done.stderr[-2000:])
        assert sorted(r["metric"]["rank"] for r in losses) == ["0", "1"], losses
        assert all(math.isfinite(float(r["value"][1])) for r in losses)
        assert min(float(r["value"][1]) for r in scrapes) >= 3  # scraped while it trained, not once at the end
    finally:
        prom.terminate()
        prom.wait(timeout=20)
