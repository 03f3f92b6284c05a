"""The sweep's progress away from a terminal: one plain line per cadence with trial counts and best Dice,
and the same counts in the octssl_sweep_trials gauge."""

from __future__ import annotations

import time
from types import SimpleNamespace

from octssl.config.sweep import parse_sweep_config
from octssl.observe import metrics as monitor
from octssl.observe import progress
from octssl.tune.live import SweepProgress
from octssl.vocab import DICE_POOLED


def test_sweep_progress_prints_plain_lines_and_sets_the_gauge(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(progress.EVERY_ENV, "0.05")
    config = parse_sweep_config({
        "kind": "sweep", "corpus": str(tmp_path / "corpus"), "storage_path": str(tmp_path), "name": "lines",
        "tasks": ["ga"], "fractions": [1.0], "inits": {"scratch": "scratch"}, "seeds": [0],
        "search": {"num_samples": 2, "steps": [6], "grace_steps": 3, "lr": [0.003, 0.01]},
    })
    (cell,) = config.cells
    watcher = SweepProgress(config, run="lines-sweep", total=2)
    watcher.start()  # pytest captures stderr: not a terminal, so a Ticker, not a rich Live table
    trials = [SimpleNamespace(trial_id=f"t{i}", config={"group": f"{cell.key}-s0", "steps": 6}, last_result={})
              for i in range(2)]
    for trial in trials:
        watcher.on_trial_start(0, trials, trial)
    watcher.on_trial_result(0, trials, trials[0], {DICE_POOLED: 0.42})
    lines: list[str] = []
    deadline = time.monotonic() + 30  # a line is due every 0.05 s; this only bounds a loaded machine's delay
    while not any(line.startswith("sweep: 0/2 trials finished, 2 running") for line in lines):
        assert time.monotonic() < deadline, lines
        time.sleep(0.02)
        lines += capsys.readouterr().err.splitlines()
    watcher.on_trial_complete(0, trials, trials[0])
    watcher.stop()
    lines += capsys.readouterr().err.splitlines()
    assert lines[-1] == f"sweep: 1/2 trials finished, 1 running, 0 failed, 0 stopped early by ASHA; best pooled val Dice: {cell.key} 0.420"
    gauge = {s.labels["state"]: s.value for f in monitor.REGISTRY.collect() for s in f.samples
             if s.name == "octssl_sweep_trials" and s.labels[monitor.RUN_LABEL] == "lines-sweep"}
    assert gauge == {"PENDING": 0, "RUNNING": 1, "TERMINATED": 1, "ERROR": 0}
