"""Curves of one training run as PNG files (`octssl plot RUN_DIR`): loss, validation metrics, throughput.

Reads ``RUN_DIR/metrics.jsonl`` (one record per logged step) and ``RUN_DIR/val.jsonl`` (one per
evaluation), both written by rank 0, and writes ``RUN_DIR/plots/{loss,validation,throughput}.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from octssl.errors import OctsslError

PLOTS_DIR = "plots"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; OctsslError naming the file and line of a bad one."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise OctsslError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise OctsslError(f"{path}:{number}: a record needs a 'step'")
        records.append(record)
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's curves; returns the PNG paths. OctsslError when RUN_DIR has no metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise OctsslError(f"{run}: no metrics.jsonl (not a run directory, or no step was logged yet)")
    train = read_jsonl(metrics_path)
    val = read_jsonl(run / "val.jsonl") if (run / "val.jsonl").is_file() else []
    out = run / PLOTS_DIR
    out.mkdir(exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(train, "loss"), label="train loss")
    if any("val_loss" in r for r in val):
        ax.plot(*_series(val, "val_loss"), marker="o", label="val loss")
    ax.set(xlabel="step", ylabel="loss", title=f"{run.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "loss.png"))

    names = sorted({k for r in val for k in r if k not in ("step", "val_loss") and isinstance(r[k], (int, float))})
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            ax.plot(*_series(val, name), marker="o")
            ax.set(xlabel="step", title=name)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{run.name}: validation")
        written.append(_save(fig, out / "validation.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(train, "samples_per_s"), label="samples/s (all ranks)")
    ax.set(xlabel="step", ylabel="samples/s", title=f"{run.name}: throughput")
    share = [(r["step"], r["data_wait_s"] / r["step_s"]) for r in train if r.get("step_s") and r.get("data_wait_s") is not None]
    if share:
        twin = ax.twinx()
        twin.plot([s for s, _ in share], [v for _, v in share], color="tab:red", alpha=0.6, label="data-wait share")
        twin.set(ylabel="data-wait share of step time", ylim=(0, 1))
        twin.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    written.append(_save(fig, out / "throughput.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
