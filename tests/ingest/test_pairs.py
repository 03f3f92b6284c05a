"""Pairs tables: masks and images attached through the volume's geometry, atomically, with rejects and provenance."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.attach import read_provenance
from octssl.corpus.store import Corpus
from octssl.ingest.pairs import label_corpus
from octssl.ingest.pipeline import ingest

LINE_FILE, CIRCLE_FILE = "Willis_B_716_0.vol", "Willis_B_716_2.vol"


def write_pairs(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["volume", "kind", "image", "space", "matrix"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"matrix": "", **row})
    return path


def half_plane(shape: tuple[int, int], through: tuple[float, float], to: tuple[float, float]) -> np.ndarray:
    """0/255 mask of the pixels left of the directed line through -> to (x, y pixel coordinates)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    dx, dy = to[0] - through[0], to[1] - through[1]
    return np.where(dx * (rows - through[1]) - dy * (cols - through[0]) > 0, 255, 0).astype(np.uint8)


@pytest.fixture
def real_corpus(tmp_path: Path, vol_dir: Path, key: str) -> tuple[Path, Path]:
    """The line and circle Spectralis files copied to src/ and ingested into corpus/."""
    src = tmp_path / "src"
    src.mkdir()
    for name in (LINE_FILE, CIRCLE_FILE):
        shutil.copyfile(vol_dir / name, src / name)
    ingest([src], tmp_path / "corpus", workers=1, progress=False)
    return tmp_path / "corpus", src


def _snapshot(corpus: Corpus, skip: set[tuple[str, str]] = frozenset()) -> dict:
    out = {}
    for row in corpus.rows:
        keys = [*row["modalities"], *row["labels"]] + (["localizer"] if row["localizer_grid"] else [])
        for key in keys:
            if (row["id"], key) not in skip:
                out[(row["id"], key)] = corpus.read_array(key, row).tobytes()
    return out


def test_half_plane_on_the_localizer_labels_half_of_the_line_and_the_circle(real_corpus, tmp_path: Path) -> None:
    corpus_dir, src = real_corpus
    corpus = Corpus.open(corpus_dir)
    rows = {r["scan_pattern"]: r for r in corpus.rows}
    line, circle = rows["line"], rows["circle"]
    # The boundary passes through the line scan's middle and the circle's centre (pixels on the localizer).
    line_mid = np.asarray(line["positions_mm"])[0].mean(axis=0) / line["localizer_spacing_mm"][1]
    centre = np.asarray(circle["positions_mm"])[0, 1] / circle["localizer_spacing_mm"][1]
    Image.fromarray(half_plane((768, 768), tuple(line_mid), tuple(centre))).save(tmp_path / "ga.png")
    before = _snapshot(corpus)
    pairs = write_pairs(tmp_path / "pairs.csv", [
        {"volume": f"src/{LINE_FILE}", "kind": "ga", "image": "ga.png", "space": "localizer"},
        {"volume": f"src/{CIRCLE_FILE}", "kind": "ga", "image": "ga.png", "space": "localizer"},
    ])
    report = label_corpus(corpus_dir, pairs)
    assert len(report.attached) == 2 and not report.rejected
    corpus = Corpus.open(corpus_dir)
    line_ga = corpus.read(line["id"])["ga"][0]
    circle_ga = corpus.read(circle["id"])["ga"][0]
    # Line: horizontal, split at its middle; the A-scans left of the boundary are labelled.
    assert abs(line_ga.mean() - 0.5) < 0.01
    assert line_ga[:380].all() != line_ga[390:].any()
    # Circle: the boundary through the centre cuts it into two arcs, one labelled.
    assert abs(circle_ga.mean() - 0.5) < 0.01
    assert np.count_nonzero(np.diff(np.r_[circle_ga, circle_ga[0]])) == 2
    for row in (line, circle):
        assert "ga" in corpus.row(row["id"])["labels"]
    assert corpus.verify() == []
    after = _snapshot(corpus, skip={(line["id"], "ga"), (circle["id"], "ga")})
    assert after == before  # every other array byte-identical (neither volume had a GA label before)
    provenance = {(p["id"], p["key"]): p for p in read_provenance(corpus)}
    assert provenance[(line["id"], "ga")]["space"] == "localizer"
    assert provenance[(line["id"], "ga")]["image_sha256"] == hashlib.sha256(
        (tmp_path / "ga.png").read_bytes()).hexdigest()


def test_affine_image_matches_the_localizer_space_and_bad_rows_are_rejected(real_corpus, tmp_path: Path) -> None:
    corpus_dir, src = real_corpus
    corpus = Corpus.open(corpus_dir)
    line = next(r for r in corpus.rows if r["scan_pattern"] == "line")
    # A "FAF" at half the localizer's resolution, registered by a scale of 2.
    faf_small = (np.arange(384)[None, :] * np.ones((384, 1)) * 255 / 383).astype(np.uint8)
    Image.fromarray(faf_small).save(tmp_path / "faf.png")
    Image.fromarray(np.full((768, 768), 128, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray((np.arange(768 * 768).reshape(768, 768) % 7).astype(np.uint8)).save(tmp_path / "noisy.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {"volume": line["id"], "kind": "faf", "image": "faf.png", "space": "affine", "matrix": "2 0 0 0 2 0"},
        {"volume": "nope.vol", "kind": "ga", "image": "grey.png", "space": "localizer"},
        {"volume": line["id"], "kind": "ga", "image": "broken.png", "space": "localizer"},
        {"volume": line["id"], "kind": "ga", "image": "small.png", "space": "enface"},
        {"volume": line["id"], "kind": "ga", "image": "noisy.png", "space": "localizer"},
        {"volume": line["id"], "kind": "faf", "image": "faf.png", "space": "affine", "matrix": "1 0 5000 0 1 5000"},
        {"volume": line["id"], "kind": "faf", "image": "faf.png", "space": "affine", "matrix": "1 0 0 0 1"},
        {"volume": line["id"], "kind": "ga", "image": "small.png", "space": "localizer"},
        {"volume": line["id"], "kind": "oct", "image": "grey.png", "space": "localizer"},
    ]
    report = label_corpus(corpus_dir, write_pairs(tmp_path / "pairs.csv", rows))
    assert [a[2] for a in report.attached] == [2]
    reasons = dict(report.rejected)
    assert "unknown volume" in reasons[f"{tmp_path}/pairs.csv:line 3"]
    assert "unreadable image" in reasons[f"{tmp_path}/pairs.csv:line 4"]
    assert "en-face grid is 1x768" in reasons[f"{tmp_path}/pairs.csv:line 5"]
    assert "not binary" in reasons[f"{tmp_path}/pairs.csv:line 6"]
    assert "off the localizer" in reasons[f"{tmp_path}/pairs.csv:line 7"]
    assert "six finite numbers" in reasons[f"{tmp_path}/pairs.csv:line 8"]
    assert "localizer is 768x768" in reasons[f"{tmp_path}/pairs.csv:line 9"]
    assert "unknown kind" in reasons[f"{tmp_path}/pairs.csv:line 10"]
    table = pq.read_table(corpus_dir / "rejects.parquet").to_pylist()
    assert {r["path"] for r in table} >= set(reasons)
    faf = Corpus.open(corpus_dir).read(line["id"])["faf"][0].astype(float)
    # the line runs across the whole localizer: the ramp of the small image, sampled back along it
    expected = np.linspace(0, 767, 768) / 2 * 255 / 383
    assert np.abs(faf - np.clip(expected, 0, 255)).max() <= 1.0


def test_enface_space_and_a_volume_without_localizer(make_corpus, tmp_path: Path) -> None:
    corpus_dir = make_corpus(volumes=6, grid=(8, 32, 32), labelled=0.0)
    corpus = Corpus.open(corpus_dir)
    ids = corpus.ids()
    mask = np.zeros((8, 32), np.uint8)
    mask[2:5, 10:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(tmp_path / "loc.png")
    before = _snapshot(corpus)
    report = label_corpus(corpus_dir, write_pairs(tmp_path / "p.csv", [
        {"volume": ids[0], "kind": "rpd", "image": "m.png", "space": "enface"},
        {"volume": ids[1], "kind": "ga", "image": "loc.png", "space": "localizer"},
    ]))
    assert [r[1] for r in report.attached] == ["rpd"]
    assert "has no localizer" in report.rejected[0][1]
    corpus = Corpus.open(corpus_dir)
    assert np.array_equal(corpus.read(ids[0])["rpd"], (mask > 0).astype(np.uint8))
    assert corpus.row(ids[0])["labels"] == ["rpd"]
    assert _snapshot(corpus, skip={(ids[0], "rpd")}) == before
    assert corpus.verify() == []


def test_a_failed_attach_leaves_the_corpus_as_it_was(make_corpus, tmp_path: Path) -> None:
    corpus_dir = make_corpus(volumes=6, grid=(8, 32, 32), labelled=1.0)
    corpus = Corpus.open(corpus_dir)
    ids = corpus.ids()
    Image.fromarray(np.ones((8, 32), np.uint8)).save(tmp_path / "m.png")
    pairs = write_pairs(tmp_path / "p.csv", [{"volume": i, "kind": "ga", "image": "m.png", "space": "enface"}
                                             for i in ids])
    manifest = (corpus_dir / "manifest.parquet").read_bytes()
    files = {p: p.read_bytes() for p in (corpus_dir / "volumes.zarr").rglob("*") if p.is_file()}

    def crash(stage: str) -> None:
        if stage == "written":
            raise RuntimeError("simulated crash before the commit")

    Corpus.append_hook = crash
    try:
        with pytest.raises(RuntimeError):
            label_corpus(corpus_dir, pairs)
    finally:
        Corpus.append_hook = None
    assert (corpus_dir / "manifest.parquet").read_bytes() == manifest
    assert {p: p.read_bytes() for p in (corpus_dir / "volumes.zarr").rglob("*") if p.is_file()} == files
    assert not (corpus_dir / ".journal").exists()
    assert read_provenance(Corpus.open(corpus_dir)) == []  # rows of the undone attach do not count


def test_cli_label_and_ingest_with_pairs(vol_dir: Path, key: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(vol_dir / LINE_FILE, src / LINE_FILE)
    Image.fromarray(half_plane((768, 768), (384, 0), (384, 767))).save(tmp_path / "ga.png")
    pairs = write_pairs(tmp_path / "pairs.csv", [
        {"volume": f"src/{LINE_FILE}", "kind": "ga", "image": "ga.png", "space": "localizer"},
        {"volume": f"src/{LINE_FILE}", "kind": "rpd", "image": "missing.png", "space": "localizer"},
    ])
    result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "c"), "--workers", "1",
                                      "--pairs", str(pairs)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "attached 1" in output and "rejected 1 pairs row" in output and "missing.png" in output
    (row,) = Corpus.open(tmp_path / "c").rows
    assert row["labels"] == ["ga"]
    bad = CliRunner().invoke(app, ["label", str(tmp_path / "c"), str(tmp_path / "absent.csv")])
    assert bad.exit_code == 2 and "pairs table not found" in bad.output
    (tmp_path / "cols.csv").write_text("volume,kind\nx,ga\n")
    bad = CliRunner().invoke(app, ["label", str(tmp_path / "c"), str(tmp_path / "cols.csv")])
    assert bad.exit_code == 2 and "lacks column" in bad.output


def test_raster_stack_mask_on_the_localizer_lands_on_the_grid(tmp_path: Path, key: str) -> None:
    """A raster stack spanning its 64 x 64 localizer, gridded to 8 x 32 x 32: a mask of the localizer's upper-left
    quadrant labels the first half of the B-scans' first half of A-scans."""
    from octssl.ingest.stack import write_stack

    rng = np.random.default_rng(0)
    write_stack(tmp_path / "src" / "stack", rng.integers(0, 255, (16, 40, 48), dtype=np.uint8),
                {"spacing_mm": [0.1, 0.004, 0.0125], "laterality": "OD", "localizer_spacing_mm": [0.0125, 0.0125]},
                localizer=rng.integers(0, 255, (64, 64), dtype=np.uint8))
    ingest([tmp_path / "src"], tmp_path / "corpus", grid=(8, 32, 32), workers=1, progress=False)
    quadrant = np.zeros((64, 64), np.uint8)
    quadrant[:32, :32] = 1
    Image.fromarray(quadrant).save(tmp_path / "q.png")
    report = label_corpus(tmp_path / "corpus", write_pairs(tmp_path / "p.csv", [
        {"volume": "src/stack", "kind": "ga", "image": "q.png", "space": "localizer"}]))
    assert len(report.attached) == 1
    (row,) = Corpus.open(tmp_path / "corpus").rows
    ga = Corpus.open(tmp_path / "corpus").read(row["id"])["ga"]
    expected = np.zeros((8, 32), np.uint8)
    expected[:4, :16] = 1
    assert np.array_equal(ga, expected)


def test_special_files_and_duplicates_reject_their_row_only(make_corpus, tmp_path: Path) -> None:
    """A volume that is a symlink to /dev/zero or a FIFO rejects its row; three rows for one volume and kind
    attach one and reject two, and the report says so."""
    import os

    corpus_dir = make_corpus(volumes=4, grid=(8, 32, 32), labelled=0.0)
    ids = Corpus.open(corpus_dir).ids()
    Image.fromarray(np.ones((8, 32), np.uint8)).save(tmp_path / "m.png")
    (tmp_path / "zero.vol").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.vol")
    good = {"kind": "ga", "image": "m.png", "space": "enface"}
    report = label_corpus(corpus_dir, write_pairs(tmp_path / "p.csv", [
        {**good, "volume": "zero.vol"}, {**good, "volume": "fifo.vol"}, {**good, "volume": ids[0]},
        {**good, "volume": ids[1]}, {**good, "volume": ids[1]}, {**good, "volume": ids[1]},
    ]))
    assert [(i, line) for i, _, line in report.attached] == [(ids[0], 4), (ids[1], 5)]
    reasons = {where.rsplit(" ", 1)[1]: reason for where, reason in report.rejected}
    assert "not a regular file (a character device)" in reasons["2"]
    assert "not a regular file (a FIFO)" in reasons["3"]
    assert reasons["6"].startswith("duplicate") and "from line 5" in reasons["6"] and "from line 5" in reasons["7"]
    corpus = Corpus.open(corpus_dir)
    assert [corpus.row(i)["labels"] for i in ids[:2]] == [["ga"], ["ga"]]


def test_a_localizer_mask_that_misses_the_scan_is_rejected(tmp_path: Path, key: str) -> None:
    """B-scans registered partly off their 64 x 64 localizer: a localizer-space mask would be sampled off the
    image (an all-zero mask is 'no lesion'); the row is rejected with the reason, nothing attaches."""
    from octssl.ingest.stack import write_stack

    rng = np.random.default_rng(0)
    positions = [[[0.1, y], [1.5, y]] for y in np.linspace(0.05, 0.75, 16)]  # x runs to 1.5 mm, localizer 0.8 mm
    write_stack(tmp_path / "src" / "stack", rng.integers(0, 255, (16, 40, 48), dtype=np.uint8),
                {"spacing_mm": [0.05, 0.004, 0.03], "laterality": "OD", "localizer_spacing_mm": [0.0125, 0.0125],
                 "positions_mm": positions}, localizer=rng.integers(0, 255, (64, 64), dtype=np.uint8))
    ingest([tmp_path / "src"], tmp_path / "corpus", grid=(8, 32, 32), workers=1, progress=False)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "none.png")
    report = label_corpus(tmp_path / "corpus", write_pairs(tmp_path / "p.csv", [
        {"volume": "src/stack", "kind": "ga", "image": "none.png", "space": "localizer"}]))
    assert report.attached == []
    ((_, reason),) = report.rejected
    assert "does not lie on the localizer" in reason and "A-scans fall outside its 64x64 pixels" in reason
    (row,) = Corpus.open(tmp_path / "corpus").rows
    assert row["labels"] == []
