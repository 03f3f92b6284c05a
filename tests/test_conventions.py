"""Conventions an operator expects of the command line: exit 1 for a failure and 2 for a wrong command line
(the table in docs/operations.md), the config as the first argument everywhere (the old `-c/--config`
still works, with one deprecation line), RAY_ADDRESS honoured wherever an address is taken, and a metrics
port no common exporter uses."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from octssl import jobs as entrypoint
from octssl.cli import EXIT_FAILED, app
from octssl.errors import EXIT_PREEMPTED, Preempted
from octssl.observe.metrics import PORT

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
CONFIG_COMMANDS = {"pretrain": "pretrain.yaml", "finetune": "finetune_ga.yaml", "sweep": "sweep.yaml"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_failure_exits_1_and_a_wrong_command_line_2(tmp_path: Path) -> None:
    runner = CliRunner()
    failed = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert failed.exit_code == EXIT_FAILED == 1 and "error:" in failed.output and "Traceback" not in failed.output
    for usage in (["info", "--no-such-flag"], ["synth"], ["pretrain"], ["verify", "a", "b"]):
        result = runner.invoke(app, usage)
        assert result.exit_code == 2, (usage, result.output)
    assert runner.invoke(app, ["synth", str(tmp_path / "c"), "--volumes", "many"]).exit_code == 2


def test_the_entry_point_exits_1_on_a_failure_and_2_on_a_wrong_command_line(tmp_path: Path, capsys) -> None:
    assert entrypoint.main([str(tmp_path / "missing.yaml")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit) as usage:
        entrypoint.main([str(JOBS / "pretrain.yaml"), "--resume", "--resume-if-exists"])
    assert usage.value.code == 2


def test_a_run_stopped_on_sigterm_exits_143_from_both_entry_points(tmp_path: Path, monkeypatch, capsys) -> None:
    """The exit status of a clean preemption (the real SIGTERM is tests/train/test_preempt.py, slow): the
    launcher raising Preempted, as after the checkpoint a SIGTERM asked for, ends both entry points with 143."""
    from octssl.train import launch

    def preempted(*args, **kwargs):
        raise Preempted(f"{tmp_path}: preempted (SIGTERM): stopped cleanly after the checkpoint at step 3")

    monkeypatch.setattr(launch, "run", preempted)
    assert entrypoint.main([str(JOBS / "pretrain.yaml")]) == EXIT_PREEMPTED == 143
    assert "stopped cleanly" in capsys.readouterr().err
    result = CliRunner().invoke(app, ["pretrain", str(JOBS / "pretrain.yaml")])
    assert result.exit_code == EXIT_PREEMPTED, result.output


def test_the_exit_codes_are_documented() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|", section, flags=re.M))
    assert set(rows) == {"0", "1", "2", "130", "143"}, rows
    assert "usage" in rows["2"].lower() and "fail" in rows["1"].lower()
    assert "SIGTERM" in rows["143"] and "--resume" in rows["143"]
    assert "docs/operations.md#exit-codes" in (REPO / "README.md").read_text()


@pytest.mark.parametrize("command", list(CONFIG_COMMANDS))
def test_config_is_the_first_argument_and_the_old_option_still_works(command: str) -> None:
    runner = CliRunner()
    config = str(JOBS / CONFIG_COMMANDS[command])
    new = runner.invoke(app, [command, config, "--dry-run"])  # exit 1 where the plan's corpus is absent
    assert new.exit_code in (0, 1) and "dry run of" in new.stdout and "deprecated" not in new.output, new.output
    old = runner.invoke(app, [command, "--config", config, "--dry-run"])
    assert old.exit_code == new.exit_code and old.stdout == new.stdout, old.output
    warning = old.stderr.strip().splitlines()[0]
    assert warning == f"deprecated: `octssl {command} --config FILE` is now `octssl {command} FILE`"
    assert old.stderr.count("deprecated") == 1
    assert runner.invoke(app, [command, "-c", config, "--dry-run"]).exit_code == new.exit_code
    both = runner.invoke(app, [command, config, "-c", config, "--dry-run"])
    assert both.exit_code == 2 and f"unexpected argument(s) '{config}'" in " ".join(both.output.split())
    assert "CONFIG" in runner.invoke(app, [command, "--help"]).output


def test_resume_if_exists_reaches_the_launcher(tmp_path: Path) -> None:
    """The flag asks for "continue if it exists", which needs a fixed run name; with --resume it is a usage
    error. (tests/train/test_resume_if_exists.py runs it for real.)"""
    runner = CliRunner()
    config = str(JOBS / "pretrain.yaml")
    unnamed = runner.invoke(app, ["pretrain", config, "--resume-if-exists", "--set", f"run.storage_path={tmp_path}"])
    assert unnamed.exit_code == 1 and "run.name" in unnamed.output, unnamed.output
    both = runner.invoke(app, ["finetune", str(JOBS / "finetune_ga.yaml"), "--resume", "--resume-if-exists"])
    assert both.exit_code == 2 and "--resume-if-exists" in both.output


def test_jobs_commands_take_the_address_from_flag_then_env_then_default() -> None:
    """Ray's order: --address, then RAY_API_SERVER_ADDRESS, then RAY_ADDRESS (nothing listens on these ports,
    so the error names the address that was used)."""
    flag, api, ray = (f"http://127.0.0.1:{_free_port()}" for _ in range(3))
    runner = CliRunner()
    cases = [({"RAY_ADDRESS": ray, "RAY_API_SERVER_ADDRESS": None}, [], ray),
             ({"RAY_ADDRESS": ray, "RAY_API_SERVER_ADDRESS": api}, [], api),
             ({"RAY_ADDRESS": ray, "RAY_API_SERVER_ADDRESS": api}, ["--address", flag], flag)]
    for env, args, used in cases:
        result = runner.invoke(app, ["jobs", "status", "raysubmit_x", *args], env=env)
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and used in text, (env, args, result.output)
    help_text = " ".join(runner.invoke(app, ["submit", "--help"]).output.split())
    assert "RAY_ADDRESS" in help_text


def test_the_entry_points_address_flag_wins_over_ray_address(tmp_path: Path, monkeypatch) -> None:
    """`--address` becomes the RAY_ADDRESS that launch and sweep join (checked on a config that fails before
    any Ray starts: a wrong kind)."""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    config = tmp_path / "bad.yaml"
    config.write_text("kind: pretrain\nrun: {max_steps: -1}\n")
    assert entrypoint.main([str(config), "--address", "ray-head:6379"]) == 1
    assert os.environ["RAY_ADDRESS"] == "ray-head:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert entrypoint.main([str(config)]) == 1 and os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"


def test_metrics_port_is_no_common_exporters_and_k8s_and_docs_use_it() -> None:
    assert not 9100 <= PORT <= 9999  # Prometheus' exporter allocations (9100: node_exporter), all taken
    assert not 10000 <= PORT <= 19999  # Ray's default worker ports (10002-19999) and Ray Client (10001)
    assert PORT + 64 < 32768  # below Linux's ephemeral range, with room for PORT+rank
    for path in [*(REPO / "k8s").rglob("*.yaml"), *(REPO / "docs").glob("*.md"), JOBS / "sweep.yaml"]:
        text = re.sub(r"\*\*Which port\.\*\*.*?\n\n", "", path.read_text(), flags=re.S)  # says why not 9100
        assert not re.search(r"(?<!\d)9100(?!\d)", text), f"{path}: still names 9100"
    assert str(PORT) in (REPO / "k8s" / "base" / "raycluster.yaml").read_text()
