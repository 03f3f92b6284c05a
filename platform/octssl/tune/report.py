"""The label-efficiency report of a sweep directory: report.md (the paper-shaped table) and its figures.

Built only from the files a sweep leaves (summary.json, results.parquet, trials.parquet, figures/*.npz),
so ``octssl report DIR`` can rebuild it at any time. Table: rows init x model, columns label fractions,
Dice in % as mean +- std, the best mean of each column in bold. With several seeds the +- is the std of
the per-seed means (run-to-run spread); with one seed it is the std across test volumes.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from rich.table import Table

from octssl.errors import ConfigError
from octssl.storage.location import Location, download_files
from octssl.tune.summary import SweepCell, SweepSummary, read_sweep_summary
from octssl.vocab import DICE, FAF

FIGURES = ("dice_vs_fraction.png", "reconstructions.png", "segmentations.png")
SWEEP_FILES = ("summary.json", "results.parquet", "trials.parquet")  # what a finished sweep directory holds


@dataclass(frozen=True)
class SweepFiles:
    """What a finished sweep directory holds: its summary and the rows of its two parquet tables."""

    summary: SweepSummary
    results: list[dict[str, Any]]  # results.parquet: one row per test volume, cell and seed
    trials: list[dict[str, Any]]  # trials.parquet: one row per trial


def load_sweep(sweep_dir: str | Path) -> SweepFiles:
    """summary.json + the two parquet tables; ConfigError naming what is missing or not a sweep summary."""

    sweep_dir = Path(sweep_dir)
    missing = [n for n in SWEEP_FILES if not (sweep_dir / n).is_file()]
    if missing:
        raise ConfigError(f"{sweep_dir}: not a finished sweep directory (missing {', '.join(missing)})")
    return SweepFiles(
        summary=read_sweep_summary((sweep_dir / "summary.json").read_bytes(), str(sweep_dir / "summary.json")),
        results=pq.read_table(sweep_dir / "results.parquet").to_pylist(),
        trials=pq.read_table(sweep_dir / "trials.parquet").to_pylist(),
    )


def _cell_text(cell: SweepCell) -> str:
    if cell.dice_mean is None:
        return "failed"
    return f"{100 * cell.dice_mean:.1f} ± {100 * (cell.spread or 0.0):.1f}"


def table_rows(summary: SweepSummary, task: str) -> tuple[list[str], list[tuple[str, list[str], list[bool]]]]:
    """(column headers, [(row label, cell texts, bold flags)]) of one task's Dice table."""
    cells = [c for c in summary.cells if c.task == task]
    fractions = sorted({c.fraction for c in cells})
    labels = list(dict.fromkeys((c.init, c.model) for c in cells))
    at = {(c.init, c.model, c.fraction): c for c in cells}
    best = {}
    for f in fractions:
        means = [c.dice_mean for i, m in labels if (c := at.get((i, m, f))) and c.dice_mean is not None]
        best[f] = max(means) if means else None
    rows = []
    for init, model in labels:
        texts, bold = [], []
        for f in fractions:
            cell = at.get((init, model, f))
            texts.append(_cell_text(cell) if cell else "")
            bold.append(bool(cell and cell.dice_mean is not None and cell.dice_mean == best[f]))
        rows.append((f"{model} + {init}" if init != "scratch" else f"{model} (scratch)", texts, bold))
    return [f"{f:g}" for f in fractions], rows


def markdown_table(summary: SweepSummary, task: str) -> str:
    headers, rows = table_rows(summary, task)
    lines = [f"| {task.upper()} Dice % | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    for label, texts, bold in rows:
        cells = [f"**{t}**" if b else t for t, b in zip(texts, bold, strict=True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rich_tables(summary: SweepSummary) -> list[Any]:
    """The same tables for the terminal."""

    out = []
    for task in summary.tasks:
        headers, rows = table_rows(summary, task)
        table = Table(title=f"{task.upper()} test Dice % (mean ± std) by label fraction", title_justify="left")
        table.add_column("init x model")
        for h in headers:
            table.add_column(h, justify="right")
        for label, texts, bold in rows:
            table.add_row(label, *[f"[bold]{t}[/]" if b else t for t, b in zip(texts, bold, strict=True)])
        out.append(table)
    return out


def _patients_line(summary: SweepSummary, task: str) -> str:
    seen = {}
    for c in summary.cells:
        if c.task == task:
            seen[c.fraction] = (c.n_train_patients, c.n_train_volumes)
    return ", ".join(f"{f:g}: {p} patients / {v} volumes" for f, (p, v) in sorted(seen.items()))


def build_report(sweep_dir: str | Path | Location) -> Path | Location:
    """Write report.md and the three PNGs into ``sweep_dir``; returns report.md's path. On an object store
    the sweep's files are downloaded, the report built in a temporary folder and uploaded beside them."""
    where = Location.parse(sweep_dir)
    if where.remote:
        return _build_remote(where)
    sweep_dir = where.local
    data = load_sweep(sweep_dir)
    summary, trials = data.summary, data.trials
    plot_dice_vs_fraction(summary, sweep_dir / FIGURES[0])
    plot_reconstructions(sweep_dir / "figures" / "reconstructions.npz", sweep_dir / FIGURES[1])
    plot_segmentations(summary, data.results, sweep_dir / "figures" / "segmentations.npz", sweep_dir / FIGURES[2])
    seeds = summary.seeds
    n_test = {c.task: c.n_test for c in summary.cells}
    spread = ("std of the per-seed means (seeds " + ", ".join(map(str, seeds)) + ")") if len(seeds) > 1 else \
        "std across test volumes (one seed)"
    lines = [
        f"# Label-efficiency sweep `{summary.name}`", "",
        f"Corpus `{summary.corpus}`. Cells: tasks {', '.join(summary.tasks)} x label fractions "
        f"{', '.join(f'{f:g}' for f in summary.fractions)} x inits {', '.join(summary.inits)} x models "
        f"{', '.join(summary.models)}. " + (
            f"{summary.num_samples} trials per cell and seed ({summary.search} sampling, ASHA early "
            "stopping), the best chosen on the val split" if (summary.num_samples or 1) > 1 else
            "One trial per cell and seed (no search)") +
        "; the chosen trial's best-on-val weights are measured on the test split.", "",
        f"Dice in % at the probability threshold each chosen trial took on the val split (best pooled Dice), mean over test volumes and seeds ± {spread}. Best mean per column in bold.",
        "",
    ]
    for task in summary.tasks:
        lines += [f"## {task.upper()}", "", markdown_table(summary, task), "",
                  f"Test volumes: {n_test.get(task)}. Labelled training data per fraction: "
                  f"{_patients_line(summary, task)}.", ""]
        mine = [c for c in summary.cells if c.task == task and c.dice_mean is not None]
        if mine:
            lines += ["| cell | Dice % per seed | Dice % on volumes with the lesion | healthy eyes predicted empty "
                      "| HD95 mm (undefined of all) |", "|---|---|---|---|---|"]
            for c in mine:
                per_seed = " / ".join(f"{100 * d:.1f}" for d in c.dice_seeds)
                lesion = f"{100 * c.dice_lesion_mean:.1f}" if c.dice_lesion_mean is not None else "-"
                healthy = (f"{100 * c.healthy_predicted_empty:.0f} % of {c.n_test_healthy}"
                           if c.healthy_predicted_empty is not None else "-")
                hd95 = f"{c.hd95_mean:.2f}" if c.hd95_mean is not None else "-"
                lines.append(f"| {c.init}/{c.model} @ {c.fraction:g} | {per_seed} | {lesion} | {healthy} | "
                             f"{hd95} ({c.hd95_undefined} of {c.n_test * c.n_seeds}) |")
            lines += ["", "A healthy eye scores Dice 1 when nothing is predicted and 0 otherwise, so the table's "
                      "mean mixes segmentation quality (lesion column) with false alarms on healthy eyes. HD95 is "
                      "undefined when exactly one of prediction and truth is empty.", ""]
    counts = summary.trials
    lines += ["## Trials", "",
              f"{sum(counts.values())} trials: {counts.get('ok', 0)} ran to their last step, "
              f"{counts.get('stopped', 0)} stopped early by ASHA, {counts.get('error', 0)} failed "
              "(`trials.parquet` has every trial's hyperparameters, val Dice, status and error).", ""]
    failed = [t for t in trials if t["status"] == "error"]
    for t in failed[:20]:
        lines.append(f"- `{t['trial']}` failed: {t['error']}")
    errors = [(c, e) for c in summary.cells for e in c.errors]
    for cell, error in errors:
        lines.append(f"- cell {cell.task}/{cell.fraction:g}/{cell.init}/{cell.model}: {error}")
    if failed or errors:
        lines.append("")
    lines += ["| cell | seed | chosen trial | lr | weight decay | steps | pooled val Dice |", "|---|---|---|---|---|---|---|"]
    for c in summary.cells:
        for cfg in c.seed_configs:
            lines.append(f"| {c.task}/{c.fraction:g}/{c.init}/{c.model} | {cfg.seed} | "
                         f"`{cfg.trial}` | {cfg.lr:.2g} | {cfg.weight_decay:.2g} | {cfg.steps} | "
                         f"{100 * cfg.val_dice_pooled:.1f} |")
    timings = summary.timings_s or {}
    lines += ["", "## Figures", "", "![Dice vs label fraction](dice_vs_fraction.png)", "",
              "![Reconstructions: en-face mean projection | target | reconstruction](reconstructions.png)", "",
              "![Segmentations on test volumes](segmentations.png)", "",
              "## Timings (s)", "", ", ".join(f"{k}: {v:.1f}" for k, v in timings.items() if k != "report"), ""]
    path = sweep_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _build_remote(where: Location) -> Location:
    with tempfile.TemporaryDirectory(prefix="octssl-report-") as folder:
        got = download_files(where, folder, [*SWEEP_FILES, "figures/reconstructions.npz", "figures/segmentations.npz"])
        missing = [n for n in SWEEP_FILES if n not in got]
        if missing:
            raise ConfigError(f"{where}: not a finished sweep directory (missing {', '.join(missing)})")
        build_report(folder)
        for name in (*FIGURES, "report.md"):
            if (Path(folder) / name).is_file():
                (where / name).upload(Path(folder) / name)
    return where / "report.md"


# ---------------------------------------------------------------- figures (matplotlib, no pyplot state)
def _figure(rows: int, cols: int, size: float = 2.2) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(max(3.0, cols * size), max(2.0, rows * size * 0.8)), layout="constrained")


def plot_dice_vs_fraction(summary: SweepSummary, out: Path) -> None:
    tasks = summary.tasks
    fig = _figure(1, len(tasks), 4.0)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        cells = [c for c in summary.cells if c.task == task and c.dice_mean is not None]
        for init, model in dict.fromkeys((c.init, c.model) for c in cells):
            mine = sorted((c for c in cells if (c.init, c.model) == (init, model)), key=lambda c: c.fraction)
            x = [c.fraction for c in mine]
            y = [100 * (c.dice_mean or 0.0) for c in mine]
            err = [100 * (c.spread or 0.0) for c in mine]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{model} + {init}")
        fractions = sorted({c.fraction for c in summary.cells if c.task == task})
        if len(fractions) > 1 and max(fractions) / min(fractions) >= 8:
            ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.set_xlabel("label fraction")
        ax.set_ylabel("test Dice %")
        ax.set_title(task.upper())
        ax.grid(alpha=0.3)
        if cells:
            ax.legend(fontsize=8)
    fig.savefig(out, dpi=110)


def _npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _empty(out: Path, text: str) -> None:
    fig = _figure(1, 1, 4.0)
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    fig.savefig(out, dpi=110)


def _stretch(image: np.ndarray) -> np.ndarray:
    """Percentile contrast stretch to [0, 1] (the mean projection spans a narrow grey range)."""
    low, high = np.percentile(image, (1, 99))
    return np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)


def plot_reconstructions(npz: Path, out: Path) -> None:
    arrays = _npz(npz)
    inits = sorted({k.split("|")[0] for k in arrays})
    if not inits:
        _empty(out, "no pretrained (reconstruction) init in this sweep")
        return
    rows = [(init, i) for init in inits for i in range(len(arrays[f"{init}|ids"]))]
    fig = _figure(len(rows), 3)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (init, i) in enumerate(rows):
        modality = str(arrays[f"{init}|modality"])
        target = f"1 - {modality.upper()}" if modality == FAF else modality.upper()
        panels = [("OCT mean projection", _stretch(arrays[f"{init}|enface"][i])), (f"target: {target}", arrays[f"{init}|target"][i]),
                  (f"{init} reconstruction", arrays[f"{init}|output"][i])]
        for c, (title, image) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            ax.set_title(title if c else f"{arrays[f'{init}|ids'][i]}\n{title}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.savefig(out, dpi=110)


def plot_segmentations(summary: SweepSummary, results: list[dict[str, Any]], npz: Path, out: Path) -> None:
    """Per task, at its lowest label fraction: mean projection | truth | each init's prediction (first seed)."""
    arrays = _npz(npz)
    panels_by_task = []
    for task in summary.tasks:
        fraction = min(c.fraction for c in summary.cells if c.task == task)
        model = summary.models[0]
        keys = [f"{task}-f{fraction:g}-{init}-{model}" for init in summary.inits]
        keys = [k for k in keys if f"{k}|ids" in arrays]
        if keys:
            panels_by_task.append((task, fraction, model, keys))
    if not panels_by_task:
        _empty(out, "no test predictions were saved (every cell failed?)")
        return
    dice = {(r["task"], r["fraction"], r["init"], r["model"], r["seed"], r["id"]): r[DICE] for r in results}
    seed = summary.seeds[0]
    rows = [(task, fraction, model, keys, i) for task, fraction, model, keys in panels_by_task
            for i in range(len(arrays[f"{keys[0]}|ids"]))]
    cols = 2 + max(len(keys) for *_, keys, _ in rows)
    fig = _figure(len(rows), cols)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (task, fraction, model, keys, i) in enumerate(rows):
        first = keys[0]
        sample_id = str(arrays[f"{first}|ids"][i])
        panels = [(f"{sample_id}\nOCT mean projection", _stretch(arrays[f"{first}|enface"][i])),
                  (f"{task.upper()} truth", arrays[f"{first}|truth"][i].astype(float))]
        for key in keys:
            init = key[len(f"{task}-f{fraction:g}-"):-len(f"-{model}")]
            d = dice.get((task, fraction, init, model, seed, sample_id), math.nan)
            panels.append((f"{init} @ {fraction:g}: Dice {100 * d:.0f}", arrays[f"{key}|prob"][i]))
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(panels):
                ax.imshow(panels[c][1], cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
                ax.set_title(panels[c][0], fontsize=7)
            else:
                ax.axis("off")
    fig.savefig(out, dpi=110)
