"""Closing the loop after a sweep: its GA bundle predicts the test split, GA growth is measured on the
predictions, and the sweep's report.md gains a section with predicted vs true GA area and a growth plot.

What ``octssl demo --close-loop`` runs last; usable on any sweep directory that wrote ``bundles/ga``.
Outputs: ``SWEEP_DIR/predict/`` (``octssl predict``), ``SWEEP_DIR/growth/`` (``octssl growth``), and beside
report.md ``area_scatter.png`` and ``growth_example.png``; the section is appended to report.md (rebuilding
the report with ``octssl report`` drops it; run this again).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from octssl.apply.growth import growth_report
from octssl.errors import PredictError
from octssl.storage.files import atomic_write
from octssl.vocab import GA, TEST


def close_loop(sweep_dir: str | Path, corpus: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Predict the test split with ``SWEEP_DIR/bundles/ga``, run growth, append the report section."""
    from octssl.apply.predict import predict

    sweep_dir = Path(sweep_dir)
    bundle = sweep_dir / "bundles" / GA
    if not (bundle / "config.json").is_file():
        raise PredictError(f"{bundle}: the sweep wrote no GA bundle (see summary.json 'bundles')")
    report = predict(bundle, [corpus], sweep_dir / "predict", split=TEST, progress=progress,
                     overwrite=True)  # the demo's own folder: a re-run replaces it whole
    growth = growth_report(sweep_dir / "predict", sweep_dir / "growth")
    pairs = [(r.label_area_mm2, r.area_mm2) for r in report.rows
             if r.label_area_mm2 is not None and r.area_mm2 is not None]
    truth, predicted = (np.array([p[i] for p in pairs], float) for i in (0, 1))
    r = float(np.corrcoef(truth, predicted)[0, 1]) if len(pairs) > 2 and truth.std() > 0 and predicted.std() > 0 \
        else None
    scatter(truth, predicted, r, sweep_dir / "area_scatter.png")
    example = None
    if growth["plots"]:
        example = sweep_dir / "growth_example.png"
        shutil.copyfile(sweep_dir / "growth" / growth["plots"][0], example)
    result = {"volumes": len(report.rows), "with_labels": len(pairs), "pearson_r": r,
              "mean_abs_error_mm2": float(np.abs(predicted - truth).mean()) if pairs else None,
              "seconds": report.seconds, "growth": growth, "threshold": report.rows[0].threshold if report.rows else None}
    atomic_write(sweep_dir / "loop.json", json.dumps(result, indent=2))
    with open(sweep_dir / "report.md", "a") as handle:
        handle.write("\n".join(section(result, example is not None)) + "\n")
    return result


def scatter(truth: np.ndarray, predicted: np.ndarray, r: float | None, path: Path) -> None:
    """Predicted vs true GA area (mm^2) per test volume, with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot(truth, predicted, "o", alpha=0.7, color="tab:red")
    top = float(max(truth.max(initial=0.0), predicted.max(initial=0.0), 1e-3)) * 1.05
    ax.plot([0, top], [0, top], "--", color="0.5")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("true GA area (mm²)")
    ax.set_ylabel("predicted GA area (mm²)")
    ax.set_title("test split" + (f": Pearson r = {r:.2f}" if r is not None else ""), fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def section(result: dict[str, Any], growth_plot: bool) -> list[str]:
    """The report.md section (Markdown lines)."""
    growth = result["growth"]
    r = f"{result['pearson_r']:.2f}" if result["pearson_r"] is not None else "undefined"
    mae = f"{result['mean_abs_error_mm2']:.2f}" if result["mean_abs_error_mm2"] is not None else "-"
    rate = growth["rate_mm2_per_year_mean"]
    lines = [
        "", "## From the GA bundle to GA growth", "",
        f"The sweep's GA bundle (`bundles/ga`, threshold {result['threshold']} chosen on the val split) predicted the "
        f"{result['volumes']} test volumes in {result['seconds']:.1f} s (`predict/predictions.csv`). GA area, "
        f"predicted vs labelled, on {result['with_labels']} volumes: Pearson r = {r}, mean absolute error {mae} mm².",
        "", "![Predicted vs true GA area](area_scatter.png)", "",
        f"Growth from the predictions (`growth/growth.csv`): {growth['eyes_fitted']} eyes with two or more dated "
        f"visits; over the {growth['eyes_included']} with GA at baseline, mean rate "
        + (f"{rate:.2f} mm²/year" if rate is not None else "-") +
        f"; {growth['eyes_insufficient']} eyes with fewer visits are listed in `growth/insufficient.csv`.", "",
    ]
    if growth_plot:
        lines += ["![GA area over visits for one eye](growth_example.png)", ""]
    return lines
