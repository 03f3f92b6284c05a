"""`octssl growth`: GA growth per patient and eye from predictions or from a corpus's labels.

Per (patient, eye), the GA area of each dated visit (raster volumes only; several volumes of one day are
averaged) over time in years (days / 365.25 from the first visit) is fitted by least squares: the slope is
the growth rate in mm^2/year, and the slope of sqrt(area) the rate in mm/year (the square-root transform
trials use, which makes the rate less dependent on the baseline size). Eyes with fewer than two dated
visits are listed in ``insufficient.csv`` with the reason, never dropped silently.

Outputs in DIR: ``growth.csv`` / ``growth.parquet`` (patient, eye, visits, first, last, span_years,
baseline_mm2, rate_mm2_per_year, rate_sqrt_mm_per_year), ``insufficient.csv`` (patient, eye, visits,
reason), ``areas.csv`` (the points fitted), ``plots/<patient>_<eye>.png`` and ``summary.json``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from octssl.errors import PredictError
from octssl.storage.files import atomic_write
from octssl.vocab import GA

DAYS_PER_YEAR = 365.25


def areas_from_predictions(path: Path) -> list[dict[str, Any]]:
    """(patient, eye, acquired, area_mm2) points of a predictions.parquet/.csv (or a predict output folder)."""
    if path.is_dir():
        path = path / "predictions.parquet"
    if not path.is_file():
        raise PredictError(f"{path}: no predictions table (run `octssl predict` first) and not a corpus")
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else _read_csv(path)
    except (pa.ArrowException, OSError) as err:
        raise PredictError(f"{path}: unreadable predictions table ({err})") from err
    missing = [c for c in ("patient", "eye", "acquired", "area_mm2") if c not in table.column_names]
    if missing:
        raise PredictError(f"{path}: predictions table lacks column(s) {missing}")
    tasks = set(table.column("task").to_pylist()) if "task" in table.column_names else {GA}
    if tasks - {GA, None}:
        raise PredictError(f"{path}: growth is for GA; these predictions are for {sorted(t for t in tasks if t)}")
    return [{"patient": r["patient"], "eye": r["eye"], "acquired": _date(r["acquired"]), "area_mm2": r["area_mm2"],
             "id": r.get("id")} for r in table.to_pylist()]


def _read_csv(path: Path) -> pa.Table:
    from pyarrow import csv

    return csv.read_csv(path, convert_options=csv.ConvertOptions(strings_can_be_null=True))


def areas_from_corpus(path: Path) -> list[dict[str, Any]]:
    """The same points from a corpus's GA labels (raster volumes labelled 'ga')."""
    from octssl.apply.metrics import area_mm2
    from octssl.corpus.store import Corpus

    corpus = Corpus.open(path)
    points = []
    for row in corpus.rows:
        if GA not in row["labels"] or not row["raster"]:
            continue
        mask = corpus.read_array(GA, row)
        points.append({"patient": row["patient"], "eye": row["eye"], "acquired": row["acquired"],
                       "area_mm2": area_mm2(mask, row["spacing_mm"]), "id": row["id"]})
    return points


def _date(value: Any) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        return None


def fit(days: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Least-squares (slope per year, intercept) of ``values`` over ``days`` since the first visit."""
    years = (days - days.min()) / DAYS_PER_YEAR
    slope, intercept = np.polyfit(years, values, 1)
    return float(slope), float(intercept)


def growth_rates(points: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per eye: (fitted rows, eyes with fewer than two dated visits)."""
    eyes: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for point in points:
        eyes.setdefault((point["patient"], point["eye"]), []).append(point)
    rows, short = [], []
    for (patient, eye), mine in sorted(eyes.items()):
        usable = [p for p in mine if p["acquired"] is not None and p["area_mm2"] is not None]
        by_day: dict[dt.date, list[float]] = {}
        for p in usable:
            by_day.setdefault(p["acquired"], []).append(float(p["area_mm2"]))
        if len(by_day) < 2:
            undated = sum(p["acquired"] is None for p in mine)
            no_area = sum(p["area_mm2"] is None for p in mine)
            reason = f"{len(by_day)} dated visit(s) with an area" + (f"; {undated} undated" if undated else "") + (
                f"; {no_area} without an area (non-raster scan)" if no_area else "")
            short.append({"patient": patient, "eye": eye, "visits": len(by_day), "reason": reason})
            continue
        dates = sorted(by_day)
        days = np.array([(d - dates[0]).days for d in dates], float)
        area = np.array([np.mean(by_day[d]) for d in dates])
        rate, baseline = fit(days, area)
        rate_sqrt, _ = fit(days, np.sqrt(area))
        rows.append({"patient": patient, "eye": eye, "visits": len(dates), "first": dates[0].isoformat(),
                     "last": dates[-1].isoformat(), "span_years": float(days[-1] / DAYS_PER_YEAR),
                     "baseline_mm2": baseline, "rate_mm2_per_year": rate, "rate_sqrt_mm_per_year": rate_sqrt,
                     "points": [(d.isoformat(), float(a)) for d, a in zip(dates, area, strict=True)]})
    return rows, short


def plot(row: dict[str, Any], path: Path) -> None:
    """Area over time with the fitted line, for one eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dates = [dt.date.fromisoformat(d) for d, _ in row["points"]]
    years = np.array([(d - dates[0]).days for d in dates]) / DAYS_PER_YEAR
    area = np.array([a for _, a in row["points"]])
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    ax.plot(years, area, "o", color="tab:red")
    line = np.linspace(0, max(years.max(), 1e-6), 20)
    ax.plot(line, row["baseline_mm2"] + row["rate_mm2_per_year"] * line, "-", color="0.3")
    ax.set_xlabel(f"years since {dates[0].isoformat()}")
    ax.set_ylabel("GA area (mm²)")
    ax.set_title(f"{row['patient'][:14]} {row['eye']}: {row['rate_mm2_per_year']:.2f} mm²/y, "
                 f"{row['rate_sqrt_mm_per_year']:.3f} mm/y (sqrt)", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def growth_report(source: str | Path, out: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Growth per eye from a predictions table/folder or a corpus; writes ``out``; returns summary.json's content."""
    from octssl.corpus.layout import ZARR_NAME

    source, out = Path(source), Path(out)
    points = areas_from_corpus(source) if (source / ZARR_NAME).is_dir() else areas_from_predictions(source)
    rows, short = growth_rates(points)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "points"} for r in rows], schema=SCHEMA)
    _write(out / "growth", table)
    _write(out / "insufficient", pa.Table.from_pylist(short, schema=SHORT_SCHEMA), parquet=False)
    points_table = pa.Table.from_pylist(
        [{"patient": p["patient"], "eye": p["eye"], "acquired": None if p["acquired"] is None else p["acquired"].isoformat(),
          "area_mm2": p["area_mm2"], "id": p.get("id")} for p in points])
    _write(out / "areas", points_table, parquet=False)
    if plots:
        (out / "plots").mkdir(exist_ok=True)
        for row in rows:
            plot(row, out / "plots" / f"{row['patient']}_{row['eye']}.png")
    rates = np.array([r["rate_mm2_per_year"] for r in rows])
    sqrt_rates = np.array([r["rate_sqrt_mm_per_year"] for r in rows])
    summary = {
        "source": str(source), "eyes": len(rows) + len(short), "eyes_fitted": len(rows), "eyes_insufficient": len(short),
        "rate_mm2_per_year_mean": float(rates.mean()) if rows else None,
        "rate_mm2_per_year_median": float(np.median(rates)) if rows else None,
        "rate_sqrt_mm_per_year_mean": float(sqrt_rates.mean()) if rows else None,
        "plots": [f"plots/{r['patient']}_{r['eye']}.png" for r in rows] if plots else [],
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _write(stem: Path, table: pa.Table, parquet: bool = True) -> None:
    from pyarrow import csv

    if parquet:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        atomic_write(stem.with_suffix(".parquet"), buffer.getvalue())
    text = io.BytesIO()
    csv.write_csv(table, text)
    atomic_write(stem.with_suffix(".csv"), text.getvalue())


SCHEMA = pa.schema([
    ("patient", pa.string()), ("eye", pa.string()), ("visits", pa.int64()), ("first", pa.string()),
    ("last", pa.string()), ("span_years", pa.float64()), ("baseline_mm2", pa.float64()),
    ("rate_mm2_per_year", pa.float64()), ("rate_sqrt_mm_per_year", pa.float64()),
])
SHORT_SCHEMA = pa.schema([("patient", pa.string()), ("eye", pa.string()), ("visits", pa.int64()),
                          ("reason", pa.string())])
