"""`octssl growth`: rates recovered from a synthetic corpus with known per-eye GA growth; short eyes listed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from octssl.apply.growth import growth_report
from octssl.cli import app
from octssl.errors import PredictError


def known_rates(corpus: Path) -> dict[tuple[str, str], float]:
    with open(corpus / "ga_growth.csv") as handle:
        return {(r["patient"], r["eye"]): float(r["rate_mm2_per_year"]) for r in csv.DictReader(handle)}


def test_growth_recovers_the_known_rates_within_5_percent(tmp_path: Path) -> None:
    from octssl.corpus.synth import synthesize

    corpus = tmp_path / "corpus"
    synthesize(corpus, volumes=36, grid=(24, 8, 96), seed=2, labelled=1.0, ga_growth=True)
    result = CliRunner().invoke(app, ["growth", str(corpus), "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    rates = known_rates(corpus)
    rows = pq.read_table(tmp_path / "g" / "growth.parquet").to_pylist()
    grown = [r for r in rows if rates[(r["patient"], r["eye"])] > 0]
    assert len(grown) >= 5
    for row in grown:
        assert row["rate_mm2_per_year"] == pytest.approx(rates[(row["patient"], row["eye"])], rel=0.05)
        assert row["visits"] >= 2 and row["span_years"] > 0
        assert (tmp_path / "g" / "plots" / f"{row['patient']}_{row['eye']}.png").is_file()
    for row in rows:
        if rates[(row["patient"], row["eye"])] == 0:
            assert row["rate_mm2_per_year"] == 0.0
    with open(tmp_path / "g" / "insufficient.csv") as handle:
        short = list(csv.DictReader(handle))
    fitted = {(r["patient"], r["eye"]) for r in rows}
    assert short and all((s["patient"], s["eye"]) not in fitted and s["visits"] == "1" for s in short)
    assert len(fitted) + len(short) == len(rates)
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["eyes_fitted"] == len(rows) and summary["eyes_insufficient"] == len(short)


def test_growth_from_a_predictions_table(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "patient": "p1", "eye": "OD", "acquired": "2020-01-01", "area_mm2": 2.0, "task": "ga"},
        {"id": "b", "patient": "p1", "eye": "OD", "acquired": "2021-01-01", "area_mm2": 3.5, "task": "ga"},
        {"id": "c", "patient": "p1", "eye": "OD", "acquired": "2022-01-01", "area_mm2": 5.0, "task": "ga"},
        {"id": "d", "patient": "p2", "eye": "OS", "acquired": "2020-01-01", "area_mm2": 1.0, "task": "ga"},
        {"id": "e", "patient": "p2", "eye": "OS", "acquired": None, "area_mm2": 1.5, "task": "ga"},
        {"id": "f", "patient": "p3", "eye": "OD", "acquired": "2020-01-01", "area_mm2": None, "task": "ga"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "predictions.parquet")
    summary = growth_report(tmp_path / "predictions.parquet", tmp_path / "g")
    assert summary["eyes_fitted"] == 1 and summary["eyes_insufficient"] == 2
    (fit,) = pq.read_table(tmp_path / "g" / "growth.parquet").to_pylist()
    assert fit["rate_mm2_per_year"] == pytest.approx(1.5, rel=1e-3) and fit["visits"] == 3
    reasons = {r["patient"]: r["reason"] for r in csv.DictReader(open(tmp_path / "g" / "insufficient.csv"))}
    assert "1 undated" in reasons["p2"] and "without an area" in reasons["p3"]
    pq.write_table(pa.Table.from_pylist([{**rows[0], "task": "rpd"}]), tmp_path / "rpd.parquet")
    with pytest.raises(PredictError, match="growth is for GA"):
        growth_report(tmp_path / "rpd.parquet", tmp_path / "g2")
    with pytest.raises(PredictError, match="no predictions table"):
        growth_report(tmp_path / "absent.parquet", tmp_path / "g3")


def test_default_synthetic_corpus_is_unchanged_and_growth_changes_only_ga_driven_arrays(tmp_path: Path) -> None:
    """The digest was taken from the corpus code before GA growth existed: the default must stay byte-identical."""
    import hashlib

    from octssl.corpus.synth import synthesize

    plain = synthesize(tmp_path / "plain", volumes=6, grid=(8, 32, 32), seed=1, labelled=1.0)
    digest = hashlib.sha256(json.dumps([r["sha256"] for r in plain.rows], sort_keys=True).encode()).hexdigest()
    assert digest == "984032ff5bfdf6f85d021a17fc1ec01399a60c539bf2d75c35766d24d91ad071"
    assert not (tmp_path / "plain" / "ga_growth.csv").exists()
    grown = synthesize(tmp_path / "grown", volumes=6, grid=(8, 32, 32), seed=1, labelled=1.0, ga_growth=True)
    for a, b in zip(plain.rows, grown.rows, strict=True):
        assert a["sha256"]["rpd"] == b["sha256"]["rpd"]  # only GA (and what shows it) differs


def _strict_json(path: Path) -> dict:
    """json.loads that refuses NaN and Infinity, as every JSON parser outside Python does."""
    def refuse(name: str) -> None:
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_growth_means_cover_only_eyes_with_ga_at_baseline_with_intervals(tmp_path: Path) -> None:
    """Issue 26.5: eyes without GA (rate 0) pulled the mean rate down; they are counted out, with the reason."""
    from octssl.corpus.synth import synthesize

    corpus = tmp_path / "corpus"
    synthesize(corpus, volumes=36, grid=(24, 8, 96), seed=2, labelled=1.0, ga_growth=True)
    summary = growth_report(corpus, tmp_path / "g", plots=False)
    rates = known_rates(corpus)
    rows = pq.read_table(tmp_path / "g" / "growth.parquet").to_pylist()
    with_ga = [r for r in rows if rates[(r["patient"], r["eye"])] > 0]
    without = [r for r in rows if rates[(r["patient"], r["eye"])] == 0]
    assert with_ga and without, "the corpus must hold fitted eyes with and without GA for this test"
    assert all(r["included"] for r in with_ga) and not any(r["included"] for r in without)
    assert all("no GA at baseline" in r["excluded_reason"] for r in without)
    assert summary["eyes_included"] == len(with_ga)
    assert summary["eyes_excluded_why"]["no GA at baseline (first visit's area is 0)"] == len(without)
    assert summary["eyes_excluded"] == len(without) + summary["eyes_insufficient"]
    true_mean = sum(rates[(r["patient"], r["eye"])] for r in with_ga) / len(with_ga)
    assert summary["rate_mm2_per_year_mean"] == pytest.approx(true_mean, rel=0.05)
    for key in ("rate_mm2_per_year", "rate_sqrt_mm_per_year"):
        low, high = summary[f"{key}_ci95"]
        assert low < summary[f"{key}_mean"] < high
    _strict_json(tmp_path / "g" / "summary.json")


def test_growth_interval_per_eye_is_the_t_interval_of_the_slope(tmp_path: Path) -> None:
    from scipy import stats

    days = [0, 200, 380, 590, 730]
    areas = [2.0, 2.7, 3.1, 4.2, 4.4]
    rows = [{"id": str(i), "patient": "p1", "eye": "OD", "acquired": f"{2020 + d // 365}-{1 + (d % 365) // 31:02d}-01",
             "area_mm2": a, "task": "ga"} for i, (d, a) in enumerate(zip(days, areas, strict=True))]
    rows += [{"id": "x", "patient": "p2", "eye": "OS", "acquired": "2020-01-01", "area_mm2": 1.0, "task": "ga"},
             {"id": "y", "patient": "p2", "eye": "OS", "acquired": "2021-01-01", "area_mm2": 2.0, "task": "ga"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    growth_report(tmp_path / "p.parquet", tmp_path / "g", plots=False)
    fitted = {r["patient"]: r for r in pq.read_table(tmp_path / "g" / "growth.parquet").to_pylist()}
    import datetime as dt

    dates = [dt.date.fromisoformat(r["acquired"]) for r in rows[:5]]
    years = [(d - dates[0]).days / 365.25 for d in dates]
    line = stats.linregress(years, areas)
    half = stats.t.ppf(0.975, len(years) - 2) * line.stderr
    assert fitted["p1"]["rate_ci_low"] == pytest.approx(line.slope - half)
    assert fitted["p1"]["rate_ci_high"] == pytest.approx(line.slope + half)
    assert fitted["p2"]["rate_ci_low"] is None and fitted["p2"]["rate_sqrt_ci_high"] is None  # two visits: no interval


def test_growth_leaves_out_a_negative_area_and_writes_strict_json(tmp_path: Path) -> None:
    """Issue 24.6: a negative area was fitted (rate 2.25 instead of 1.0) and summary.json held a bare NaN."""
    rows = [
        {"id": "a", "patient": "p1", "eye": "OD", "acquired": "2020-01-01", "area_mm2": 2.0, "task": "ga"},
        {"id": "b", "patient": "p1", "eye": "OD", "acquired": "2021-01-01", "area_mm2": 3.0, "task": "ga"},
        {"id": "c", "patient": "p1", "eye": "OD", "acquired": "2022-01-01", "area_mm2": 4.0, "task": "ga"},
        {"id": "d", "patient": "p1", "eye": "OD", "acquired": "2023-01-01", "area_mm2": -5.0, "task": "ga"},
        {"id": "e", "patient": "p2", "eye": "OS", "acquired": "2020-01-01", "area_mm2": float("nan"), "task": "ga"},
        {"id": "f", "patient": "p2", "eye": "OS", "acquired": "2021-01-01", "area_mm2": 1.0, "task": "ga"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    result = CliRunner().invoke(app, ["growth", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert "2 impossible area(s) left out" in " ".join(result.output.split())
    (fit,) = pq.read_table(tmp_path / "g" / "growth.parquet").to_pylist()
    assert fit["rate_mm2_per_year"] == pytest.approx(1.0, abs=0.01) and fit["visits"] == 3
    assert fit["rate_sqrt_mm_per_year"] is not None and math.isfinite(fit["rate_sqrt_mm_per_year"])  # not NaN
    left = {r["id"]: r["left_out"] for r in csv.DictReader(open(tmp_path / "g" / "areas.csv"))}
    assert "negative" in left["d"] and "not a finite number" in left["e"] and not left["a"]
    reasons = {r["patient"]: r["reason"] for r in csv.DictReader(open(tmp_path / "g" / "insufficient.csv"))}
    assert "1 with an impossible area" in reasons["p2"]
    summary = _strict_json(tmp_path / "g" / "summary.json")
    assert summary["points_left_out"] == 2 and summary["rate_mm2_per_year_ci95"] == [None, None]
