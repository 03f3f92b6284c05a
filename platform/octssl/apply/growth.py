"""`octssl growth`: GA growth per patient and eye from predictions or from a corpus's labels.

Per (patient, eye), the GA area of each dated visit (raster volumes only; several volumes of one day are
averaged) over time in years (days / 365.25 from the first visit) is fitted by least squares: the slope is
the growth rate in mm^2/year, and the slope of sqrt(area) the rate in mm/year (the square-root transform
trials use, which makes the rate less dependent on the baseline size). Each slope has a 95% confidence
interval from its standard error (Student t, visits - 2 degrees of freedom; none with two visits). Eyes
with fewer than two dated visits are listed in ``insufficient.csv`` with the reason, never dropped
silently. An area that cannot be one (negative, not finite) is left out of the fit and listed with its
reason in ``areas.csv``.

Group statistics (``summary.json``) follow GA trials: only eyes with GA at baseline (first visit's area
above zero) enter the mean rates; the others are counted per reason (``eyes_excluded``) and flagged in
``growth.csv`` (``included``, ``excluded_reason``). The trial endpoint is the mean square-root rate with
its 95% confidence interval (t over the included eyes).

Outputs in DIR: ``growth.csv`` / ``growth.parquet`` (one row per fitted eye), ``insufficient.csv`` (patient,
eye, visits, reason), ``areas.csv`` (the points, ``left_out`` naming why a point was not fitted),
``plots/<patient>_<eye>.png`` and ``summary.json`` (strict JSON: an undefined number is ``null``).
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
from pyarrow import csv

from octssl.corpus.layout import ZARR_NAME
from octssl.corpus.store import Corpus
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
    return csv.read_csv(path, convert_options=csv.ConvertOptions(strings_can_be_null=True))


def areas_from_corpus(path: Path) -> list[dict[str, Any]]:
    """The same points from a corpus's GA labels (raster volumes labelled 'ga')."""
    from octssl.apply.metrics import area_mm2

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
    slope, intercept, _ = fit_with_error(days, values)
    return slope, intercept


def fit_with_error(days: np.ndarray, values: np.ndarray) -> tuple[float, float, float | None]:
    """(slope per year, intercept, standard error of the slope); the error is None with two points (no
    residual degrees of freedom), so that no interval is claimed from a line through two points."""
    years = (days - days.min()) / DAYS_PER_YEAR
    slope, intercept = np.polyfit(years, values, 1)
    n = len(years)
    if n < 3:
        return float(slope), float(intercept), None
    residuals = values - (slope * years + intercept)
    spread = float(((years - years.mean()) ** 2).sum())
    error = float(np.sqrt((residuals**2).sum() / (n - 2) / spread))
    return float(slope), float(intercept), error


def interval(centre: float, error: float | None, dof: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """Two-sided Student-t confidence interval ``centre +- t x error``; (None, None) when undefined."""
    if error is None or dof < 1 or not np.isfinite(error):
        return None, None
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, dof)) * error
    return centre - half, centre + half


def impossible_area(area: Any) -> str | None:
    """Why ``area`` cannot be a lesion area (None when it can, or when it is simply missing)."""
    if area is None:
        return None
    value = float(area)
    if not np.isfinite(value):
        return f"area {value} mm^2 is not a finite number"
    if value < 0:
        return f"area {value:g} mm^2 is negative (impossible)"
    return None


def growth_rates(points: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per eye: (fitted rows, eyes with fewer than two dated visits). Points with an impossible area are
    left out (their ``left_out`` says why; the caller lists them)."""
    eyes: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for point in points:
        point["left_out"] = impossible_area(point["area_mm2"])
        eyes.setdefault((point["patient"], point["eye"]), []).append(point)
    rows, short = [], []
    for (patient, eye), mine in sorted(eyes.items()):
        usable = [p for p in mine if p["acquired"] is not None and p["area_mm2"] is not None and not p["left_out"]]
        by_day: dict[dt.date, list[float]] = {}
        for p in usable:
            by_day.setdefault(p["acquired"], []).append(float(p["area_mm2"]))
        if len(by_day) < 2:
            undated = sum(p["acquired"] is None for p in mine)
            no_area = sum(p["area_mm2"] is None for p in mine)
            impossible = sum(bool(p["left_out"]) for p in mine)
            reason = f"{len(by_day)} dated visit(s) with an area" + (f"; {undated} undated" if undated else "") + (
                f"; {no_area} without an area (non-raster scan)" if no_area else "") + (
                f"; {impossible} with an impossible area (see areas.csv)" if impossible else "")
            short.append({"patient": patient, "eye": eye, "visits": len(by_day), "reason": reason})
            continue
        rows.append(_eye_row(patient, eye, by_day))
    return rows, short


def _eye_row(patient: str, eye: str, by_day: dict[dt.date, list[float]]) -> dict[str, Any]:
    """One fitted eye: both rates with their 95% intervals, and whether it enters the group statistics."""
    dates = sorted(by_day)
    days = np.array([(d - dates[0]).days for d in dates], float)
    area = np.array([np.mean(by_day[d]) for d in dates])
    rate, baseline, error = fit_with_error(days, area)
    rate_sqrt, _, error_sqrt = fit_with_error(days, np.sqrt(area))
    low, high = interval(rate, error, len(dates) - 2)
    low_sqrt, high_sqrt = interval(rate_sqrt, error_sqrt, len(dates) - 2)
    excluded = None if area[0] > 0 else "no GA at baseline (first visit's area is 0)"
    return {"patient": patient, "eye": eye, "visits": len(dates), "first": dates[0].isoformat(),
            "last": dates[-1].isoformat(), "span_years": float(days[-1] / DAYS_PER_YEAR),
            "baseline_mm2": baseline, "first_area_mm2": float(area[0]),
            "rate_mm2_per_year": rate, "rate_ci_low": low, "rate_ci_high": high,
            "rate_sqrt_mm_per_year": rate_sqrt, "rate_sqrt_ci_low": low_sqrt, "rate_sqrt_ci_high": high_sqrt,
            "included": excluded is None, "excluded_reason": excluded,
            "points": [(d.isoformat(), float(a)) for d, a in zip(dates, area, strict=True)]}


def mean_with_interval(values: list[float]) -> dict[str, Any]:
    """Mean, 95% t interval (n - 1 degrees of freedom; null for fewer than two values) and n."""
    if not values:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    array = np.asarray(values, float)
    error = float(array.std(ddof=1) / np.sqrt(len(array))) if len(array) > 1 else None
    low, high = interval(float(array.mean()), error, len(array) - 1)
    return {"mean": float(array.mean()), "ci_low": low, "ci_high": high, "n": len(array)}


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

    source, out = Path(source), Path(out)
    points = areas_from_corpus(source) if (source / ZARR_NAME).is_dir() else areas_from_predictions(source)
    rows, short = growth_rates(points)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "points"} for r in rows], schema=SCHEMA)
    _write(out / "growth", table)
    _write(out / "insufficient", pa.Table.from_pylist(short, schema=SHORT_SCHEMA), parquet=False)
    points_table = pa.Table.from_pylist(
        [{"patient": p["patient"], "eye": p["eye"], "acquired": None if p["acquired"] is None else p["acquired"].isoformat(),
          "area_mm2": _finite(p["area_mm2"]), "id": p.get("id"), "left_out": p["left_out"]}
         for p in points], schema=POINTS_SCHEMA)
    _write(out / "areas", points_table, parquet=False)
    if plots:
        (out / "plots").mkdir(exist_ok=True)
        for row in rows:
            plot(row, out / "plots" / f"{row['patient']}_{row['eye']}.png")
    summary = _summary(source, rows, short, points, plots)
    atomic_write(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    return summary


def _summary(source: Path, rows: list[dict[str, Any]], short: list[dict[str, Any]], points: list[dict[str, Any]],
             plots: bool) -> dict[str, Any]:
    """summary.json: counts, the eyes left out of the group statistics and why, means with 95% intervals."""
    included = [r for r in rows if r["included"]]
    excluded: dict[str, int] = {}
    for row in rows:
        if not row["included"]:
            excluded[row["excluded_reason"]] = excluded.get(row["excluded_reason"], 0) + 1
    if short:
        excluded["fewer than two dated visits with an area (insufficient.csv)"] = len(short)
    rate = mean_with_interval([r["rate_mm2_per_year"] for r in included])
    rate_sqrt = mean_with_interval([r["rate_sqrt_mm_per_year"] for r in included])
    return {
        "source": str(source), "eyes": len(rows) + len(short), "eyes_fitted": len(rows),
        "eyes_insufficient": len(short), "eyes_included": len(included),
        "eyes_excluded": sum(excluded.values()), "eyes_excluded_why": excluded,
        "points_left_out": sum(bool(p["left_out"]) for p in points),
        "rates_over": "eyes with GA at baseline and two or more dated visits",
        "rate_mm2_per_year_mean": rate["mean"],
        "rate_mm2_per_year_ci95": [rate["ci_low"], rate["ci_high"]],
        "rate_mm2_per_year_median": float(np.median([r["rate_mm2_per_year"] for r in included])) if included else None,
        "rate_sqrt_mm_per_year_mean": rate_sqrt["mean"],
        "rate_sqrt_mm_per_year_ci95": [rate_sqrt["ci_low"], rate_sqrt["ci_high"]],
        "endpoint": "mean rate_sqrt_mm_per_year over the included eyes, 95% t interval",
        "plots": [f"plots/{r['patient']}_{r['eye']}.png" for r in rows] if plots else [],
    }


def _finite(value: Any) -> float | None:
    """A number for a table, None for one that is missing or not finite (its ``left_out`` says which)."""
    return None if value is None or not np.isfinite(float(value)) else float(value)


def _write(stem: Path, table: pa.Table, parquet: bool = True) -> None:
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
    ("first_area_mm2", pa.float64()), ("rate_mm2_per_year", pa.float64()), ("rate_ci_low", pa.float64()),
    ("rate_ci_high", pa.float64()), ("rate_sqrt_mm_per_year", pa.float64()), ("rate_sqrt_ci_low", pa.float64()),
    ("rate_sqrt_ci_high", pa.float64()), ("included", pa.bool_()), ("excluded_reason", pa.string()),
])
POINTS_SCHEMA = pa.schema([("patient", pa.string()), ("eye", pa.string()), ("acquired", pa.string()),
                           ("area_mm2", pa.float64()), ("id", pa.string()), ("left_out", pa.string())])
SHORT_SCHEMA = pa.schema([("patient", pa.string()), ("eye", pa.string()), ("visits", pa.int64()),
                          ("reason", pa.string())])
