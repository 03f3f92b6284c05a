"""Pictures a person can check (issue 26.9): ingest previews, the scanned region on prediction overlays,
readable line/circle masks, en-face pictures at their physical aspect ratio."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octssl.apply.predict import pictures
from octssl.corpus.store import Corpus
from octssl.ingest.pictures import FIRST_COLOUR, LESION_COLOUR, SCAN_COLOUR, enface_size
from octssl.ingest.pipeline import ingest

GRID = (10, 32, 64)


def colour_count(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(image[..., :3] == np.array(colour), axis=-1).sum())


@pytest.fixture
def corpus(tmp_path: Path, vol_dir: Path, shared_dir: Path, key: str) -> Path:
    sources = [vol_dir / "Willis_B_716_0.vol", vol_dir / "Willis_B_716_2.vol"]
    xml = shared_dir / "data" / "heyex-xml" / "test_volume"
    sources += [xml] if xml.is_dir() else []
    ingest(sources, tmp_path / "corpus", grid=GRID, workers=1, progress=False, previews=2)
    return tmp_path / "corpus"


def test_ingest_writes_previews_with_the_scan_drawn_on_the_localizer(corpus: Path) -> None:
    pictures_written = sorted((corpus / "previews").glob("*.png"))
    assert len(pictures_written) == 2  # --previews 2: the first two volumes only
    for path in pictures_written:
        image = np.asarray(Image.open(path).convert("RGB"))
        assert image.shape[1] > 1000 and colour_count(image, FIRST_COLOUR) > 200  # the B-scan path, drawn
    assert Corpus.open(corpus).verify() == []  # the previews folder is no part of the corpus data


def test_prediction_pictures_of_a_line_scan_are_readable_and_show_where_it_was_scanned(corpus: Path) -> None:
    opened = Corpus.open(corpus)
    line = next(r["id"] for r in opened.rows if r["scan_pattern"] == "line")
    sample = opened.read(line, localizer=True)
    prob = np.zeros(sample["oct"].shape[::2], np.float32)
    prob[:, 300:400] = 0.9
    files = {name: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for name, data in
             pictures(sample, prob, 0.5).items()}
    assert files["mask.png"].shape[:2] == (48, 512) and files["prob.png"].shape[:2] == (48, 512)  # was 1 x 768
    assert (files["mask.png"][:, 201:266] == 255).all() and not files["mask.png"][:, 270:].any()  # 300-400 of 768
    overlay = files["overlay.png"]
    assert overlay.shape[:2] == sample["localizer"].shape
    assert colour_count(overlay, FIRST_COLOUR) > 300  # the line's path across the localizer
    reds = overlay[..., 0].astype(int) - overlay[..., 1].astype(int)
    assert (reds > 80).sum() > 50  # the lesion A-scans, in red, on the line


def test_enface_pictures_have_the_physical_aspect_ratio() -> None:
    """A 49 x 512 raster over 6 x 6 mm is square on screen, not 49 pixels high."""
    assert enface_size((49, 512), (6 / 49, 6 / 512)) == (512, 512)
    assert enface_size((97, 512), (4.5 / 97, 9 / 512)) == (512, 256)
    assert enface_size((1, 768), (0.01, 0.01)) == (512, 48)
    sample = {"oct": np.full((49, 8, 512), 100, np.uint8),
              "meta": {"spacing_mm": (6 / 49, 0.004, 6 / 512), "scan_pattern": "raster", "eye": "OD"}}
    prob = np.zeros((49, 512), np.float32)
    prob[10:20, 100:200] = 1.0
    files = {name: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for name, data in
             pictures(sample, prob, 0.5).items()}
    assert files["mask.png"].shape[:2] == files["overlay.png"].shape[:2] == (512, 512)
    red = files["overlay.png"][..., 0].astype(int) - files["overlay.png"][..., 1]
    rows = np.flatnonzero((red > 50).any(axis=1))  # B-scans 10-19 of 49 over 512 px: rows 104-209
    assert rows.min() == pytest.approx(104, abs=2) and rows.max() == pytest.approx(209, abs=2)
    assert SCAN_COLOUR != LESION_COLOUR
