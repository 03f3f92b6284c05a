"""Ingest against hostile sources: impossible dates, FIFOs and device files named like scans, symlink loops,
unreadable folders, bad ``--depth-mm``. Each bad unit is a reject with its reason; the good ones land; nothing
hangs; acquisition dates do not leak through ``visit``."""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.store import Corpus
from octssl.errors import IngestError
from octssl.ingest.dicom import OPT_SOP_CLASS
from octssl.ingest.pipeline import ingest
from octssl.ingest.stack import write_stack

NB, D, W = 4, 32, 16
GRID = (NB, D, W)


def stack(folder: Path, patient: str = "PAT-1", **sidecar: object) -> Path:
    bscans = np.random.default_rng(len(str(folder))).integers(0, 255, (NB, D, W), dtype=np.uint8)
    meta = {"spacing_mm": [0.12, 0.0039, 0.0117], "laterality": "OD", "patient_id": patient,
            "acquired": "2021-03-04", **sidecar}
    return write_stack(folder, bscans, meta)


def dicom(path: Path, study_date: str, patient: str = "PAT-D") -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = OPT_SOP_CLASS, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = OPT_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.ImageLaterality, ds.StudyDate = patient, "L", study_date
    ds.Rows, ds.Columns, ds.NumberOfFrames = D, W, NB
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelSpacing, ds.SliceThickness = [0.0039, 0.0117], 0.12
    ds.PixelData = np.random.default_rng(len(study_date)).integers(0, 255, (NB, D, W), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def reasons(report) -> dict[str, str]:
    return {Path(path).name: reason for path, reason in report.rejected}


# ---- 3: an impossible date rejects its file, the rest of the batch lands ------------------------------
def test_impossible_dates_reject_only_their_files(tmp_path: Path, key: str) -> None:
    src = tmp_path / "src"
    stack(src / "good", patient="A")
    stack(src / "bad_date", patient="B", acquired="2021-13-45")
    dicom(src / "good.dcm", "20210304")
    dicom(src / "bad.dcm", "20211345", patient="PAT-E")
    for _ in range(2):  # a re-run fails the same files the same way, and nothing else
        report = ingest([src], tmp_path / "corpus", grid=GRID, workers=1, progress=False)
        assert set(reasons(report)) == {"bad_date", "bad.dcm"}
        assert all("date" in reason for reason in reasons(report).values()), report.rejected
    assert len(Corpus.open(tmp_path / "corpus")) == 2


# ---- 4: FIFOs and device files named like scans are rejected, never read ------------------------------
@pytest.mark.timeout(120)
def test_fifos_and_device_files_are_rejected_without_hanging(tmp_path: Path, key: str) -> None:
    src = tmp_path / "src"
    stack(src / "good")
    os.mkfifo(src / "pipe.vol")
    (src / "zero.vol").symlink_to("/dev/zero")
    trap = stack(src / "trap", patient="T")
    os.mkfifo(trap / "bscan_9999.png")  # a FIFO among a stack's images
    report = ingest([src], tmp_path / "corpus", grid=GRID, workers=1, progress=False)
    found = reasons(report)
    assert set(found) == {"pipe.vol", "zero.vol", "trap"}, report.rejected
    assert "not a regular file" in found["pipe.vol"] and "not a regular file" in found["zero.vol"]
    assert "bscan_9999.png" in found["trap"] and "not a regular file" in found["trap"]
    assert len(report.ingested) == 1
    with pytest.raises(IngestError, match=r"pipe.vol: no scans found.*pipe.vol: not a regular file"):
        ingest([src / "pipe.vol"], tmp_path / "corpus2", grid=GRID, workers=1, progress=False)
    assert not (tmp_path / "corpus2").exists()  # no empty corpus for a source that holds no scan


# ---- 5: symlink loops and unreadable folders are rejects with reasons ---------------------------------
def test_a_symlink_loop_is_a_reject(tmp_path: Path, key: str) -> None:
    src = tmp_path / "src"
    stack(src / "good")
    (src / "loop.vol").symlink_to(src / "loop.vol")
    (src / "a.vol").symlink_to(src / "b.vol")
    (src / "b.vol").symlink_to(src / "a.vol")
    report = ingest([src], tmp_path / "corpus", grid=GRID, workers=1, progress=False)
    found = reasons(report)
    assert {"loop.vol", "a.vol", "b.vol"} <= set(found), report.rejected
    assert all("symlink loop" in found[name] for name in ("loop.vol", "a.vol", "b.vol"))
    assert len(report.ingested) == 1


def test_an_unreadable_folder_is_a_reject_and_fails_strict(tmp_path: Path) -> None:
    src = tmp_path / "src"
    stack(src / "good")
    locked = src / "locked"
    stack(locked / "inner", patient="L")
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop the capability to ignore permissions")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    locked.chmod(0)
    try:
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "octssl", "ingest", str(src), "--out", str(tmp_path / "corpus"),
             "--grid", ",".join(map(str, GRID)), "--workers", "1", "--strict"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OCTSSL_PSEUDONYM_KEY": "k"},
        )
    finally:
        locked.chmod(0o755)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1, output[-2000:]
    assert "rejected" in output and "locked" in output and "cannot read folder" in output
    assert "Traceback" not in output


# ---- 7: visits do not reveal acquisition dates ---------------------------------------------------------
def test_visit_is_a_keyed_pseudonym_not_the_date(tmp_path: Path, key: str, monkeypatch) -> None:
    src = tmp_path / "src"
    stack(src / "v1", patient="P", acquired="2017-01-11")
    stack(src / "v1_again", patient="P", acquired="2017-01-11T15:00:00")
    stack(src / "v2", patient="P", acquired="2018-06-30")
    ingest([src], tmp_path / "corpus", grid=GRID, workers=1, progress=False)
    rows = {row["source"]: row for row in Corpus.open(tmp_path / "corpus").rows}
    visits = sorted(row["visit"] for row in rows.values())
    assert all("2017" not in str(v) and "2018" not in str(v) and "0111" not in str(v) for v in visits)
    assert len(set(visits)) == 2  # the same day is the same visit, another day another
    monkeypatch.setenv("OCTSSL_PSEUDONYM_KEY", "another-key")
    ingest([src], tmp_path / "corpus2", grid=GRID, workers=1, progress=False)
    other = sorted(row["visit"] for row in Corpus.open(tmp_path / "corpus2").rows)
    assert other != visits  # keyed: no table maps a visit number back to a day


# ---- 10: --depth-mm must be a positive, finite number --------------------------------------------------
@pytest.mark.parametrize("depth", [0.0, -1.0, math.nan, math.inf])
def test_bad_depth_is_refused_before_anything_is_read(tmp_path: Path, key: str, depth: float) -> None:
    stack(tmp_path / "src" / "good")
    with pytest.raises(IngestError, match="--depth-mm"):
        ingest([tmp_path / "src"], tmp_path / "corpus", grid=GRID, depth_mm=depth, workers=1, progress=False)
    assert not (tmp_path / "corpus").exists()
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "c"),
                                      "--depth-mm", str(depth)])
    assert result.exit_code == 2 and "--depth-mm" in result.output and "Traceback" not in result.output


def test_cli_out_naming_a_file_is_one_line(tmp_path: Path, key: str) -> None:
    stack(tmp_path / "src" / "good")
    (tmp_path / "file").write_text("not a corpus")
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "file")])
    assert result.exit_code == 2 and "is a file" in " ".join(result.output.split()), result.output


# ---- 11: acquisition dates shifted per patient by a keyed offset (DICOM PS3.15 Annex E) -----------------
VISITS = {"a1": ("PAT-A", "2019-01-10"), "a2": ("PAT-A", "2019-07-20"), "a3": ("PAT-A", "2020-03-05"),
          "b1": ("PAT-B", "2018-05-01"), "b2": ("PAT-B", "2021-05-01")}


def test_dates_are_shifted_per_patient_and_growth_rates_do_not_change(tmp_path: Path, key: str) -> None:
    from octssl.apply.growth import growth_report
    from octssl.ingest.detect import content_hash
    from octssl.ingest.phi import date_shift_days, pseudonym

    src = tmp_path / "src"
    for name, (patient, day) in VISITS.items():
        stack(src / name, patient=patient, acquired=day)
    ingest([src], tmp_path / "shifted", grid=GRID, workers=1, progress=False)
    ingest([src], tmp_path / "real", grid=GRID, workers=1, progress=False, keep_real_dates=True)
    shifted, real = Corpus.open(tmp_path / "shifted"), Corpus.open(tmp_path / "real")
    assert shifted.settings["dates"] == "shifted" and real.settings["dates"] == "real"
    name_of = {content_hash(src / name): name for name in VISITS}
    stored = {name_of[r["source"]]: str(r["acquired"]) for r in shifted.rows}
    assert {name_of[r["source"]]: str(r["acquired"]) for r in real.rows} == {n: d for n, (_, d) in VISITS.items()}
    manifest = (tmp_path / "shifted" / "manifest.parquet").read_bytes()
    assert not any(day.encode() in manifest for _, day in VISITS.values())  # no real date stored
    for name, (patient, day) in VISITS.items():  # one keyed shift per patient, 1-10 years back
        back = (dt.date.fromisoformat(day) - dt.date.fromisoformat(stored[name])).days
        assert back == date_shift_days(pseudonym(patient, key.encode()), key.encode()) and 366 <= back <= 3653
    assert len({(dt.date.fromisoformat(VISITS[n][1]) - dt.date.fromisoformat(d)).days
                for n, d in stored.items()}) == 2
    rates = []
    for corpus, folder in ((shifted, "shifted"), (real, "real")):
        # the same GA area per scan in both corpora, growing 1.5 mm^2/year (+ a wobble) in real time
        rows = [{"id": r["id"], "patient": r["patient"], "eye": r["eye"], "acquired": str(r["acquired"]), "task": "ga",
                 "area_mm2": 2.0 + 1.5 * (dt.date.fromisoformat(VISITS[name_of[r["source"]]][1])
                                          - dt.date(2018, 1, 1)).days / 365.25 + 0.1 * len(name_of[r["source"]])}
                for r in corpus.rows]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{folder}.parquet")
        growth_report(tmp_path / f"{folder}.parquet", tmp_path / f"g-{folder}", plots=False)
        fits = pq.read_table(tmp_path / f"g-{folder}" / "growth.parquet").to_pylist()
        rates.append(sorted((f["patient"], f["eye"], f["rate_mm2_per_year"], f["span_years"]) for f in fits))
    assert len(rates[0]) == 2 and rates[0] == rates[1]  # intervals exact: the same rates and spans


def test_real_and_shifted_dates_never_mix_in_one_corpus(tmp_path: Path, key: str) -> None:
    src = tmp_path / "src"
    stack(src / "a", patient="A", acquired="2019-01-10")
    stack(tmp_path / "more" / "b", patient="B", acquired="2019-02-10")
    ingest([src], tmp_path / "corpus", grid=GRID, workers=1, progress=False)
    with pytest.raises(IngestError, match="stores shifted acquisition dates.*drop --keep-real-dates"):
        ingest([tmp_path / "more"], tmp_path / "corpus", grid=GRID, workers=1, progress=False, keep_real_dates=True)
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "more"), "--out", str(tmp_path / "real"),
                                      "--workers", "1", "--keep-real-dates"])
    assert result.exit_code == 0, result.output
    assert Corpus.open(tmp_path / "real").settings["dates"] == "real"
    bad = CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "real"), "--workers", "1"])
    assert bad.exit_code == 2 and "stores real acquisition dates" in " ".join(bad.output.split())
    assert len(Corpus.open(tmp_path / "real")) == 1
