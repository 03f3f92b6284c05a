"""Writes k8s/base/grafana-dashboard.json, the octssl Grafana dashboard: `python k8s/dashboard.py`.

Rows answer one question each: how fast (throughput, total and per rank), who is slow (stragglers),
starved of data (data-wait share), learning (loss, validation), safe to fail (checkpoints), how full
(memory, GPU from Ray's node metrics) and, for sweeps, how far along (trials by state).

A panel whose series only exist on a real cluster carries ``"octssl_needs"``: ``ray`` (Ray's own
metrics agent: node and GPU metrics, Ray Train's controller), ``gpu`` (octssl's device-memory series,
exported by CUDA ranks only) or ``sweep`` (a running `octssl sweep` driver). tests/test_monitor.py
evaluates every other panel's queries against a real Prometheus scraping a real training run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "base" / "grafana-dashboard.json"
RUN, RANK = "ray_train_run_name", "ray_train_worker_world_rank"
S = f'{RUN}=~"$run", namespace=~"$namespace"'  # the selector every octssl query carries
BY_RUN, BY_RANK = f"by ({RUN})", f"by ({RUN}, {RANK})"
RANK_LEGEND = f"{{{{{RUN}}}}} rank {{{{{RANK}}}}}"
RUN_LEGEND = f"{{{{{RUN}}}}}"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _mean(hist: str, by: str, window: str = "$__rate_interval") -> str:
    """Mean of a histogram's observations over `window`, aggregated `by`."""
    return (f"sum {by} (rate({hist}_sum{{{S}}}[{window}])) / sum {by} (rate({hist}_count{{{S}}}[{window}]))")


def _quantile(q: float, hist: str) -> str:
    return f"histogram_quantile({q}, sum by ({RUN}, le) (rate({hist}_bucket{{{S}}}[$__rate_interval])))"


LOCAL = _mean("octssl_step_local_seconds", BY_RANK)

ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    ("Throughput", [
        {"title": "Samples/s (run total)", "type": "stat", "unit": "short", "w": 6,
         "targets": [(f"sum {BY_RUN} (rate(octssl_samples_total{{{S}}}[$__rate_interval]))", RUN_LEGEND)]},
        {"title": "Samples/s per rank", "type": "timeseries", "unit": "short", "w": 10,
         "targets": [(f"sum {BY_RANK} (rate(octssl_samples_total{{{S}}}[$__rate_interval]))", RANK_LEGEND)]},
        {"title": "Progress", "type": "gauge", "unit": "percentunit", "w": 4,
         "targets": [(f"max {BY_RUN} (octssl_step{{{S}}}) / max {BY_RUN} (octssl_total_steps{{{S}}})", RUN_LEGEND)]},
        {"title": "Time to finish", "type": "stat", "unit": "s", "w": 4,
         "description": "steps left over the current step rate",
         "targets": [(f"(max {BY_RUN} (octssl_total_steps{{{S}}}) - max {BY_RUN} (octssl_step{{{S}}})) / "
                      f"max {BY_RUN} (rate(octssl_steps_total{{{S}}}[$__rate_interval]))", RUN_LEGEND)]},
    ]),
    ("Step time and stragglers", [
        {"title": "Step time (p50, p95)", "type": "timeseries", "unit": "s", "w": 8,
         "description": "whole optimizer step, data wait and collectives included (equal across ranks)",
         "targets": [(_quantile(0.5, "octssl_step_duration_seconds"), f"{RUN_LEGEND} p50"),
                     (_quantile(0.95, "octssl_step_duration_seconds"), f"{RUN_LEGEND} p95")]},
        {"title": "Local step time per rank", "type": "timeseries", "unit": "s", "w": 8,
         "description": "mean time before the step's first collective (data, forward, loss): the slow rank "
                        "is the high line",
         "targets": [(LOCAL, RANK_LEGEND)]},
        {"title": "Straggler spread (max - min local step time)", "type": "timeseries", "unit": "s", "w": 8,
         "description": "OctsslStraggler fires when one rank is over 1.5x its run's median for 15 min",
         "targets": [(f"max {BY_RUN} ({LOCAL}) - min {BY_RUN} ({LOCAL})", RUN_LEGEND)]},
    ]),
    ("Data", [
        {"title": "Data-wait share of step time", "type": "timeseries", "unit": "percentunit", "w": 12,
         "description": "above 0.3 for 15 min fires OctsslDataBound",
         "targets": [(f"sum {BY_RANK} (rate(octssl_data_wait_seconds_sum{{{S}}}[$__rate_interval])) / "
                      f"sum {BY_RANK} (rate(octssl_step_duration_seconds_sum{{{S}}}[$__rate_interval]))",
                      RANK_LEGEND)]},
        {"title": "Data wait per step (p95)", "type": "timeseries", "unit": "s", "w": 12,
         "targets": [(_quantile(0.95, "octssl_data_wait_seconds"), RUN_LEGEND)]},
    ]),
    ("Loss and validation", [
        {"title": "Training loss", "type": "timeseries", "unit": "short", "w": 8,
         "targets": [(f"octssl_loss{{{S}}}", RANK_LEGEND)]},
        {"title": "Validation", "type": "timeseries", "unit": "short", "w": 8,
         "description": "rank 0's validation metrics at each evaluation (ssim during pretraining, dice for "
                        "segmentation)",
         "targets": [(f'max by ({RUN}, metric) (octssl_validation{{{S}, {RANK}="0"}})',
                      f"{RUN_LEGEND} {{{{metric}}}}")]},
        {"title": "Learning rate", "type": "timeseries", "unit": "short", "w": 4,
         "targets": [(f"max {BY_RUN} (octssl_learning_rate{{{S}}})", RUN_LEGEND)]},
        {"title": "Gradient norm", "type": "timeseries", "unit": "short", "w": 4,
         "targets": [(f"max {BY_RUN} (octssl_grad_norm{{{S}}})", RUN_LEGEND)]},
        {"title": "Skipped non-finite steps", "type": "stat", "unit": "short", "w": 6,
         "targets": [(f"sum {BY_RUN} (increase(octssl_skipped_steps_total{{{S}}}[$__range]))", RUN_LEGEND)]},
        {"title": "Ranks reporting", "type": "stat", "unit": "short", "w": 6,
         "targets": [(f"count {BY_RUN} (octssl_step{{{S}}})", RUN_LEGEND)]},
        {"title": "Worker restarts", "type": "stat", "unit": "short", "w": 6,
         "targets": [(f"sum {BY_RUN} (octssl_worker_restarts_total{{{S}}})", RUN_LEGEND)]},
        {"title": "Build", "type": "table", "unit": "short", "w": 6,
         "targets": [('octssl_build_info{namespace=~"$namespace"}',
                      "{{version}} torch {{torch}} deepspeed {{deepspeed}} ray {{ray}}")]},
    ]),
    ("Checkpoints", [
        {"title": "Age of the last checkpoint", "type": "stat", "unit": "s", "w": 6,
         "description": "OctsslCheckpointStale fires past twice the time run.ckpt_every steps take",
         "targets": [(f"time() - max {BY_RUN} (octssl_last_checkpoint_timestamp_seconds{{{S}}})", RUN_LEGEND)]},
        {"title": "Expected checkpoint interval", "type": "stat", "unit": "s", "w": 6,
         "description": "run.ckpt_every steps at the current step rate",
         "targets": [(f"max {BY_RUN} (octssl_checkpoint_interval_steps{{{S}}}) / "
                      f"max {BY_RUN} (rate(octssl_steps_total{{{S}}}[$__rate_interval]))", RUN_LEGEND)]},
        {"title": "Checkpoints saved (in range)", "type": "stat", "unit": "short", "w": 6,
         "targets": [(f"max {BY_RUN} (increase(octssl_checkpoint_duration_seconds_count{{{S}}}[$__range]))",
                      RUN_LEGEND)]},
        {"title": "Checkpoint duration (mean in range, slowest rank)", "type": "stat", "unit": "s", "w": 6,
         "targets": [(f"max {BY_RUN} ({_mean('octssl_checkpoint_duration_seconds', BY_RANK, '$__range')})",
                      RUN_LEGEND)]},
    ]),
    ("Memory and GPU", [
        {"title": "Memory per rank by kind", "type": "timeseries", "unit": "bytes", "w": 12,
         "targets": [(f"octssl_memory_bytes{{{S}}}", f"{RANK_LEGEND} {{{{kind}}}}")]},
        {"title": "GPU memory reserved / capacity", "type": "timeseries", "unit": "percentunit", "w": 12,
         "needs": "gpu", "description": "above 0.92 for 10 min fires OctsslGPUMemoryNearFull",
         "targets": [(f'max {BY_RANK} (octssl_memory_bytes{{{S}, kind="device_reserved"}}) / '
                      f"max {BY_RANK} (octssl_device_memory_capacity_bytes{{{S}}})", RANK_LEGEND)]},
        {"title": "GPU utilisation (Ray node metrics)", "type": "timeseries", "unit": "percent", "w": 12,
         "needs": "ray",
         "targets": [('ray_node_gpus_utilization{namespace=~"$namespace"}', "{{ip}} GPU {{GpuIndex}}")]},
        {"title": "GPU memory used (Ray node metrics)", "type": "timeseries", "unit": "bytes", "w": 12,
         "needs": "ray", "description": "Ray reports GPU memory in MiB",
         "targets": [('ray_node_gram_used{namespace=~"$namespace"} * 1024 * 1024', "{{ip}} GPU {{GpuIndex}}")]},
    ]),
    ("Ray Train and sweeps", [
        {"title": "Ray Train controller state", "type": "state-timeline", "unit": "short", "w": 8, "needs": "ray",
         "targets": [(f'max by ({RUN}, ray_train_controller_state) (ray_train_controller_state{{{RUN}=~"$run"}}) > 0',
                      "{{ray_train_controller_state}}")]},
        {"title": "Ray Train report time per rank (joined on the same labels)", "type": "timeseries", "unit": "s",
         "w": 8, "needs": "ray",
         "targets": [(f'sum {BY_RANK} (rate(ray_train_report_total_blocked_time_s{{{RUN}=~"$run"}}[$__rate_interval]))'
                      f" / on ({RUN}, {RANK}) sum {BY_RANK} (rate(octssl_steps_total{{{S}}}[$__rate_interval]))",
                      RANK_LEGEND)]},
        {"title": "Sweep trials by state", "type": "timeseries", "unit": "short", "w": 8, "needs": "sweep",
         "targets": [(f"sum by ({RUN}, state) (octssl_sweep_trials{{{S}}})", f"{RUN_LEGEND} {{{{state}}}}")]},
    ]),
]


def _variable(name: str, query: str) -> dict[str, Any]:
    return {"name": name, "type": "query", "label": name, "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "includeAll": True, "allValue": ".*", "multi": True,
            "refresh": 2}


def build() -> dict[str, Any]:
    """The dashboard as a dict (Grafana schema 39)."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row_title, row in ROWS:
        panels.append({"id": len(panels) + 1, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        x = 0
        for spec in row:
            if x + spec["w"] > 24:
                x, y = 0, y + 8
            panel: dict[str, Any] = {
                "id": len(panels) + 1, "type": spec["type"], "title": spec["title"],
                "description": spec.get("description", ""), "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": spec["w"], "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": spec["unit"]}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
                "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                             "datasource": DATASOURCE} for i, (expr, legend) in enumerate(spec["targets"])],
            }
            if "needs" in spec:
                panel["octssl_needs"] = spec["needs"]
            panels.append(panel)
            x += spec["w"]
        y += 8
    return {
        "title": "octssl training", "uid": "octssl-training", "tags": ["octssl", "ray"],
        "description": "octssl's per-rank training series (labels ray_train_run_name, ray_train_worker_world_rank, "
                       "as Ray Train's) beside Ray's node and Train metrics; docs/monitoring.md explains each panel.",
        "schemaVersion": 39, "version": 2, "editable": True, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            _variable("namespace", "label_values(octssl_build_info, namespace)"),
            _variable("run", f'label_values(octssl_step{{namespace=~"$namespace"}}, {RUN})'),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=1) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
