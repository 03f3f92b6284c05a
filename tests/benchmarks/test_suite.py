"""run_cpu's plan and gpu.sh's behaviour on a machine without a GPU."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import run_cpu

GPU_SH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.sh"


def test_cpu_suite_runs_every_benchmark_with_device_named_outputs() -> None:
    cmds = run_cpu.commands("cpu-test-cpu", time.monotonic() + run_cpu.SUITE_S)
    assert list(cmds) == ["data", "models", "train", "growth", "scaling", "step"]
    for name, argv in cmds.items():
        assert (run_cpu.HERE / argv[0]).is_file()
        out = argv[argv.index("--out") + 1]
        assert out.endswith(f"{name}-cpu-test-cpu.json")
    step = cmds["step"]
    assert step[step.index("--device") + 1] == "cpu" and float(step[step.index("--budget-s") + 1]) > 0


def test_gpu_script_is_valid_bash_and_refuses_without_a_gpu() -> None:
    subprocess.run(["bash", "-n", str(GPU_SH)], check=True)
    proc = subprocess.run(["bash", str(GPU_SH)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(Path(run_cpu.sys.executable)),
                               "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "no CUDA GPU visible" in proc.stderr
