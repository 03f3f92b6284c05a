"""k8s/ monitoring: alert rules evaluated by promtool on synthetic series, and the dashboard and rules
naming only metrics that octssl.monitor really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from octssl import monitor

BASE = Path(__file__).resolve().parents[2] / "k8s" / "base"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                "unless", "inf", "nan"}
LABELS = 'namespace="octssl",run="r1",rank="0"'


def _rule_groups() -> list[dict]:
    (rule,) = [d for d in yaml.safe_load_all((BASE / "alerts.yaml").read_text()) if d]
    return rule["spec"]["groups"]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((BASE / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, matchers, durations, grouping labels removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """The live registry's series names after one update of every recorder."""
    metrics = monitor.TrainMetrics(rank=0, run="names-check")
    metrics.update(step=1, loss=1.0, lr=0.1, samples_per_s=1.0, step_s=1.0, data_wait_s=0.1, grad_norm=1.0,
                   memory_bytes=1.0)
    metrics.checkpoint(1.0)
    metrics.skipped_step()
    metrics.restart()
    monitor.SweepMetrics("names-check").update({"RUNNING": 1})
    names = set()
    for line in monitor.exposition().splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def test_metric_name_parser():
    expr = 'max by (namespace, rank) (rate(octssl_steps_total{run=~"$run"}[5m])) / on(run) octssl_step offset 15m'
    assert metric_names_in(expr) == {"octssl_steps_total", "octssl_step"}


def test_dashboard_names_only_exported_metrics(exported):
    exprs = _dashboard_exprs()
    used = set().union(*(metric_names_in(e) for e in exprs))
    assert used, "no metric found in the dashboard"
    assert used <= exported, f"dashboard names metrics the exporter does not export: {used - exported}"


def test_dashboard_has_a_panel_per_metric_per_rank(exported):
    dashboard = json.loads((BASE / "grafana-dashboard.json").read_text())
    per_metric = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in metric_names_in(target["expr"]):
                per_metric.setdefault(name, []).append(target["legendFormat"])
    families = {n for n in exported if not n.endswith("_created")}
    assert families <= set(per_metric), f"metrics without a panel: {families - set(per_metric)}"
    for name, legends in per_metric.items():
        if name != "octssl_sweep_trials":
            assert all("{{rank}}" in legend for legend in legends), name


def test_alert_rules_name_only_exported_metrics(exported):
    used = set().union(*(metric_names_in(r["expr"]) for g in _rule_groups() for r in g["rules"]))
    assert used <= exported, used - exported
    alerts = {r["alert"] for g in _rule_groups() for r in g["rules"]}
    assert alerts == {"OctsslNoProgress", "OctsslDataBound", "OctsslNaNLoss", "OctsslWorkerRestarts"}


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (`make prometheus` installs the Debian package, which has it)")
    return path


def _series(name: str, values: str, rank: str = "0") -> dict:
    return {"series": f'{name}{{namespace="octssl",run="r1",rank="{rank}"}}', "values": values}


def _expect(alert: str, at: str, rank: str | None, severity: str) -> dict:
    labels = [{"namespace": "octssl", "run": "r1", "rank": rank, "severity": severity}] if rank else []
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": lab} for lab in labels]}


def test_alert_rules_fire_when_they_should(promtool, tmp_path):
    """promtool evaluates the rules on synthetic series: rank 0 misbehaves, rank 1 trains well."""
    groups = _rule_groups()
    (tmp_path / "full.yaml").write_text(yaml.safe_dump({"groups": groups}))
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "full.yaml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for group in groups:  # promtool compares annotations verbatim; the tests are about when alerts fire
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    healthy = [_series("octssl_samples_per_second", "40x40", "1"), _series("octssl_steps_total", "0+10x40", "1"),
               _series("octssl_step_seconds", "0.5x40", "1"), _series("octssl_data_wait_seconds", "0.05x40", "1"),
               _series("octssl_loss", "0.9-0.01x40", "1"), _series("octssl_skipped_steps_total", "0x40", "1"),
               _series("octssl_worker_restarts_total", "0x40", "1")]
    tests = [
        {   # hung rank: its samples/s gauge keeps the last value, but the step counter stops at 10 min
            "interval": "1m",
            "input_series": healthy + [_series("octssl_samples_per_second", "40x40"),
                                       _series("octssl_steps_total", "0+10x10 100x30")],
            "alert_rule_test": [_expect("OctsslNoProgress", "12m", None, ""),
                                _expect("OctsslNoProgress", "30m", "0", "critical")],
        },
        {   # data-bound rank: 40% of each step waiting for data
            "interval": "1m",
            "input_series": healthy + [_series("octssl_step_seconds", "1x40"),
                                       _series("octssl_data_wait_seconds", "0.1x5 0.4x35")],
            "alert_rule_test": [_expect("OctsslDataBound", "10m", None, ""),
                                _expect("OctsslDataBound", "25m", "0", "warning")],
        },
        {   # NaN loss at 5 min
            "interval": "1m",
            "input_series": healthy + [_series("octssl_loss", "0.9 0.8 0.7 0.6 0.5 NaN NaN NaN"),
                                       _series("octssl_skipped_steps_total", "0x8")],
            "alert_rule_test": [_expect("OctsslNaNLoss", "4m", None, ""),
                                _expect("OctsslNaNLoss", "6m", "0", "critical")],
        },
        {   # skipped non-finite steps without a NaN gauge
            "interval": "1m",
            "input_series": healthy + [_series("octssl_loss", "0.5x10"), _series("octssl_skipped_steps_total", "0x4 1x6")],
            "alert_rule_test": [_expect("OctsslNaNLoss", "3m", None, ""),
                                _expect("OctsslNaNLoss", "6m", "0", "critical")],
        },
        {   # a restarted worker whose counter is already 1 at its first scrape (the series starts at 20 min)
            "interval": "1m",
            "input_series": healthy + [_series("octssl_worker_restarts_total", "_x20 1x20")],
            "alert_rule_test": [_expect("OctsslWorkerRestarts", "15m", None, ""),
                                _expect("OctsslWorkerRestarts", "22m", "0", "warning"),
                                _expect("OctsslWorkerRestarts", "39m", None, "")],
        },
        {   # a restart counted by a process that was scraped before it (0 -> 1 at 10 min)
            "interval": "1m",
            "input_series": healthy + [_series("octssl_worker_restarts_total", "0x10 1x30")],
            "alert_rule_test": [_expect("OctsslWorkerRestarts", "9m", None, ""),
                                _expect("OctsslWorkerRestarts", "12m", "0", "warning"),
                                _expect("OctsslWorkerRestarts", "30m", None, "")],
        },
    ]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                         "tests": tests}))
    done = subprocess.run([promtool, "test", "rules", str(tmp_path / "tests.yaml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
