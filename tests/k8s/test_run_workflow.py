"""k8s/run-workflow.sh's control flow, run against a stand-in `kubectl` on PATH (no cluster here): it releases
each job once the one before succeeded, and stops at once when a job fails or misses its deadline, naming
the job, printing its log's last lines and saying how to resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "k8s" / "run-workflow.sh"

# The stand-in: `get rayjob NAME -o jsonpath=...` answers the next line of $FAKE_STATE/NAME (the last one
# stays), `logs job/NAME --tail=N` prints the last N of 100 numbered lines, every call is appended to $FAKE_CALLS.
FAKE_KUBECTL = f"""#!{sys.executable}
import os, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as calls:
    calls.write(" ".join(args) + "\\n")
verb = args[2]
if verb == "get":
    state = Path(os.environ["FAKE_STATE"]) / args[4]
    lines = state.read_text().splitlines()
    if len(lines) > 1:
        state.write_text("\\n".join(lines[1:]) + "\\n")
    print(lines[0], end="")
elif verb == "logs":
    name = args[3].split("/", 1)[1]
    tail = int(next(a for a in args if a.startswith("--tail=")).split("=")[1])
    print("\\n".join(f"{{name}} log line {{i}}" for i in range(101 - tail, 101)))
"""


def workflow(tmp_path: Path, states: dict[str, list[str]], **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the script with the stand-in kubectl; (the finished process, the kubectl calls it made)."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    for job, answers in states.items():
        (state / job).write_text("\n".join(answers) + "\n")
    calls = tmp_path / "calls"
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": str(state),
               "FAKE_CALLS": str(calls), "POLL": "0", **env}
    done = subprocess.run(["sh", str(SCRIPT)], env=run_env, capture_output=True, text=True, timeout=60)
    return done, calls.read_text().splitlines() if calls.exists() else []


OK = "SUCCEEDED/Complete"


def test_the_jobs_are_released_in_order(tmp_path: Path) -> None:
    done, calls = workflow(tmp_path, {"octssl-ingest": ["RUNNING/Running", OK], "octssl-pretrain": [OK],
                                      "octssl-sweep": ["/Initializing", "RUNNING/Running", OK]})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "workflow done"
    order = [c.split()[2:4] for c in calls]
    assert order == [["get", "rayjob"]] * 2 + [["patch", "rayjob"], ["get", "rayjob"], ["patch", "rayjob"]] \
        + [["get", "rayjob"]] * 3
    assert [c.split()[4] for c in calls if " patch " in c] == ["octssl-pretrain", "octssl-sweep"]


@pytest.mark.parametrize("status", ["FAILED/Failed", "STOPPED/Complete", "RUNNING/Failed"])
def test_a_failed_job_stops_the_workflow_names_it_and_says_how_to_resume(tmp_path: Path, status: str) -> None:
    done, calls = workflow(tmp_path, {"octssl-ingest": [OK], "octssl-pretrain": ["RUNNING/Running", status],
                                      "octssl-sweep": [OK]}, LOG_LINES="5")
    assert done.returncode == 1
    err = done.stderr.splitlines()
    assert err[0] == f"error: rayjob/octssl-pretrain ended ({status}); the workflow stops here"
    assert "octssl-pretrain log line 100" in err and "octssl-pretrain log line 96" in err
    assert "octssl-pretrain log line 95" not in err  # only the last LOG_LINES lines
    assert f"  kubectl -n octssl delete rayjob octssl-pretrain && kubectl apply -k k8s/overlays/dev-cpu && {SCRIPT}" in err
    assert not any("octssl-sweep" in c for c in calls)  # never released after the failure
    assert "workflow done" not in done.stdout


def test_a_job_past_its_deadline_stops_the_workflow(tmp_path: Path) -> None:
    done, calls = workflow(tmp_path, {"octssl-ingest": ["RUNNING/Running"]}, TIMEOUT="0s")
    assert done.returncode == 1
    assert "rayjob/octssl-ingest did not succeed within 0s (status: RUNNING/Running)" in done.stderr
    assert not any(" patch " in c for c in calls)
