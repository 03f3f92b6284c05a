"""octssl.observe.progress away from a terminal: plain lines at a steady cadence, and a last one at the end."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from octssl.observe import progress

DEADLINE_S = 30.0  # a periodic line is due every 0.05-0.1 s; this only bounds a loaded machine's delay


def wait_for_line(capsys, seen: list[str], start: str) -> None:
    """Collect stderr lines into ``seen`` until one starts with ``start``; fail after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not any(line.startswith(start) for line in seen):
        assert time.monotonic() < deadline, f"no line starting {start!r} within {DEADLINE_S} s: {seen}"
        time.sleep(0.02)
        seen += capsys.readouterr().err.splitlines()


def test_stage_prints_plain_lines_at_the_cadence_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv(progress.EVERY_ENV, "0.1")
    assert not progress.interactive()  # pytest captures stderr: not a terminal
    lines: list[str] = []
    with progress.stage("export demo", 4) as advance:
        for done in range(1, 4):
            advance()
            wait_for_line(capsys, lines, f"export demo: {done}/4")  # the ticker's own line, not the last one
        advance()
    lines += capsys.readouterr().err.splitlines()
    assert all(re.fullmatch(r"export demo: \d/4 \(\d+%\), \d+s", line) for line in lines), lines
    assert lines[-1].startswith("export demo: 4/4 (100%)")
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and counts[0] < 4


def test_disabled_stage_prints_nothing(capsys, monkeypatch):
    monkeypatch.setenv(progress.EVERY_ENV, "0.05")
    assert list(progress.track(range(3), "quiet", enabled=False)) == [0, 1, 2]
    time.sleep(0.1)
    assert capsys.readouterr().err == ""


def test_run_watcher_tails_metrics_jsonl_as_plain_lines(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv(progress.EVERY_ENV, "0.05")
    run_dir = tmp_path / "pretrain-1"
    run_dir.mkdir()
    watcher = progress.RunWatcher(run_dir)
    watcher.start()
    lines: list[str] = []
    wait_for_line(capsys, lines, "pretrain-1: starting workers")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 4, "total_steps": 10, "loss": 0.25,
                                                       "samples_per_s": 12.5}) + "\n")
    wait_for_line(capsys, lines, "pretrain-1: step 4/10")
    watcher.stop()
    lines += capsys.readouterr().err.splitlines()
    assert lines[0].startswith("pretrain-1: starting workers")
    assert lines[-1].startswith("pretrain-1: step 4/10, loss 0.2500, 12.5 samples/s, ")


def test_cadence_defaults_to_30_seconds(monkeypatch):
    monkeypatch.delenv(progress.EVERY_ENV, raising=False)
    assert progress.cadence() == 30.0
    monkeypatch.setenv(progress.EVERY_ENV, "soon")
    assert progress.cadence() == 30.0
    assert progress.elapsed(3725) == "1h02m05s" and progress.elapsed(65) == "1m05s"


def test_the_last_line_is_not_repeated_with_only_a_later_time(capsys, monkeypatch):
    """At the end a ticker prints the state once more, unless its last line already said exactly that:
    a finished run's `step 3/3` appeared twice, differing only in the elapsed time. A line whose state
    changed is printed, also when only its tail after a comma changed."""
    monkeypatch.setenv(progress.EVERY_ENV, "100")  # no periodic line in this test: `_emit` stands for one
    times = iter(["1s", "2s"])
    same = progress.Ticker(lambda: f"run: step 3/3, loss 0.1000, {next(times)}").start()
    same._emit()
    same.stop()
    assert capsys.readouterr().err.splitlines() == ["run: step 3/3, loss 0.1000, 1s"]
    best = iter(["sweep: 1/2 finished; best a 0.4, b 0.5", "sweep: 2/2 finished; best a 0.4, b 0.6"])
    changed = progress.Ticker(lambda: next(best)).start()
    changed._emit()
    changed.stop()
    assert capsys.readouterr().err.splitlines() == ["sweep: 1/2 finished; best a 0.4, b 0.5",
                                                    "sweep: 2/2 finished; best a 0.4, b 0.6"]
