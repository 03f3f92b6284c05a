"""Registration that cannot be right is flagged (issue 26.3): the HEYEX XML test export's B-scans (1.5-7.6 mm)
lie outside its 0.59 mm localizer and its registered SLO is one constant value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.store import Corpus
from octssl.ingest.pipeline import ingest
from octssl.ingest.registration import positions_problem, registration_problem

GRID = (10, 32, 64)


def test_the_heyex_export_is_flagged_and_stores_no_slo_while_real_vol_scans_pass(
        tmp_path: Path, shared_dir: Path, vol_dir: Path, key: str) -> None:
    folder = shared_dir / "data" / "heyex-xml" / "test_volume"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent; this test needs the HEYEX XML export")
    corpus_dir = tmp_path / "corpus"
    report = ingest([folder, vol_dir / "Willis_B_716_0.vol", vol_dir / "Willis_B_716_2.vol"], corpus_dir, grid=GRID,
                    workers=1, progress=False)
    assert report.rejected == [] and len(report.ingested) == 3
    corpus = Corpus.open(corpus_dir)
    by_pattern = {row["scan_pattern"]: row for row in corpus.rows}
    xml = by_pattern["raster"]
    assert "outside the 0.59 x 0.59 mm localizer" in xml["registration_problem"]
    assert "x 1.51-7.56 mm" in xml["registration_problem"]
    assert "registered en-face image is one constant value" in xml["registration_problem"]
    assert "slo" not in xml["modalities"] and xml["localizer_grid"] == "50x50"  # the localizer itself is kept
    assert xml["id"] not in corpus.ids(require=("oct", "slo"), raster_only=False)  # nothing trains on its SLO
    for pattern in ("line", "circle"):  # real registrations on the IR localizer pass and keep their SLO trace
        assert by_pattern[pattern]["registration_problem"] is None and "slo" in by_pattern[pattern]["modalities"]
    assert corpus.verify() == []
    result = CliRunner().invoke(app, ["info", str(corpus_dir)])
    assert result.exit_code == 0 and "registration flagged" in result.output and "1 volume(s)" in result.output
    as_json = json.loads(CliRunner().invoke(app, ["info", str(corpus_dir), "--json"]).output)
    assert list(as_json["registration_flagged"]) == [xml["id"]]


def test_positions_on_the_localizer_pass_and_off_it_are_named() -> None:
    spacing = (0.01, 0.01)  # a 100 x 200 pixel localizer is 1 mm high, 2 mm wide
    inside = np.array([[[0.1, 0.2], [1.9, 0.2]], [[0.1, 0.8], [2.0, 0.8]]])  # the edge itself is on it
    assert positions_problem(inside, (100, 200), spacing, "raster") is None
    outside = inside + [0.0, 0.5]
    assert "y 0.70-1.30 mm lie outside the 2.00 x 1.00 mm localizer" in positions_problem(outside, (100, 200), spacing,
                                                                                          "raster")
    circle = np.array([[[1.0, 0.1], [1.0, 0.5]]])  # radius 0.4 around (1.0, 0.5): fits
    assert positions_problem(circle, (100, 200), spacing, "circle") is None
    wide = np.array([[[1.0, -0.2], [1.0, 0.5]]])  # radius 0.7: leaves the 1 mm height
    assert positions_problem(wide, (100, 200), spacing, "circle") is not None
    flat = np.full((100, 200), 7, np.uint8)
    assert "localizer is one constant value (7)" in registration_problem(flat, spacing, inside, "raster", None)
