"""`octssl predict` through the bundle's exports (--runtime) and into NIfTI and DICOM-SEG (--format)."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from octssl.apply.bundle import export_model
from octssl.apply.outputs import dicom_geometry, read_dicom_header
from octssl.apply.predict import predict
from octssl.apply.runtimes import PARITY, read_export_metadata
from octssl.cli import app
from octssl.corpus.store import Corpus
from octssl.errors import ModelError, PredictError


@pytest.fixture(scope="module")
def bundle(finetuned_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(finetuned_run, "ga", tmp_path_factory.mktemp("bundle") / "ga")


def _nifti(path: Path) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes()))


def test_bundle_carries_its_exports(bundle: Path) -> None:
    config = json.loads((bundle / "config.json").read_text())
    assert config["format_version"] >= "1.2"  # exports came with format 1.2
    assert {kind: entry["file"] for kind, entry in config["exports"].items()} == {
        "torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
    for entry in config["exports"].values():
        assert hashlib.sha256((bundle / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
        described = read_export_metadata(bundle / entry["file"])
        assert described["threshold"] == config["threshold"] and described["input"]["grid"] == config["input"]["grid"]
        assert described["weights_card"]["grid"] == ["16x64x64"]  # the weights' card travels with each export
        assert described["card"] == config["card"]  # and so does the bundle's model card


def test_three_runtimes_agree_on_the_test_split(bundle: Path, growth_corpus: Path, tmp_path: Path) -> None:
    corpus = Corpus.open(growth_corpus)
    test_ids = corpus.ids(split="test", raster_only=False)
    probabilities = {}
    for runtime in ("torch", "torchscript"):
        predict(bundle, [growth_corpus], tmp_path / runtime, split="test", runtime=runtime, progress=False)
    result = CliRunner().invoke(app, ["predict", str(bundle), str(growth_corpus), "--split", "test", "--runtime", "onnx",
                                      "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    for runtime in ("torch", "torchscript", "onnx"):
        probabilities[runtime] = {i: np.asarray(_nifti(tmp_path / runtime / "volumes" / i / "prob.nii.gz").dataobj)
                                  for i in test_ids}
    assert test_ids
    for runtime in ("torchscript", "onnx"):
        worst = max(float(np.abs(probabilities[runtime][i] - probabilities["torch"][i]).max()) for i in test_ids)
        assert worst <= PARITY, (runtime, worst)
    # the NIfTI files of a corpus volume: (W, nB, 1), spacing_mm, the PNG's mask
    for volume_id in test_ids:
        folder = tmp_path / "torch" / "volumes" / volume_id
        mask = _nifti(folder / "mask.nii.gz")
        spacing = corpus.read(volume_id)["meta"]["spacing_mm"]
        png = np.asarray(Image.open(folder / "mask_grid.png")) > 0
        assert mask.shape == (png.shape[1], png.shape[0], 1)
        assert mask.header.get_zooms()[:2] == pytest.approx((spacing[2], spacing[0]))
        np.testing.assert_array_equal(np.asarray(mask.dataobj)[:, :, 0].T > 0, png)


def test_dicom_input_gives_a_seg_on_its_series(bundle: Path, opt: SimpleNamespace, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCTSSL_PSEUDONYM_KEY", "test-key")
    source = opt.write(tmp_path / "IM0001", (16, 64, 64))
    report = predict(bundle, [source], tmp_path / "out", formats=["png,nifti", "dicom-seg"], progress=False)
    (row,) = report.rows
    assert row.source == str(source) and row.source_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    folder = tmp_path / "out" / "volumes" / row.id
    png = np.asarray(Image.open(folder / "mask_grid.png")) > 0
    header = read_dicom_header(source)
    geometry = dicom_geometry(header, png.shape)
    assert geometry is not None

    seg = hd.seg.segread(folder / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == header.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == header.FrameOfReferenceUID and seg.StudyInstanceUID == header.StudyInstanceUID
    assert seg.get_segment_description(1).segment_label == "Geographic atrophy"
    volume = seg.get_volume(combine_segments=True)
    np.testing.assert_array_equal(volume.array[0] > 0, png)
    np.testing.assert_allclose(volume.affine[:3, 3], geometry.origin, atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 1:3], np.stack([geometry.bscan_step, geometry.ascan_step], axis=1),
                               atol=1e-6)
    # the NIfTI lies where the SEG lies (RAS = LPS with x and y negated)
    mask = _nifti(folder / "mask.nii.gz")
    np.testing.assert_allclose(mask.affine[:3, 3], np.asarray(geometry.origin) * [-1, -1, 1], atol=1e-6)
    assert int(mask.header["sform_code"]) == 1  # scanner: the device's frame of reference
    np.testing.assert_array_equal(np.asarray(mask.dataobj)[:, :, 0].T > 0, png)
    # the default formats write no DICOM-SEG (it carries the patient's identifiers)
    plain = predict(bundle, [source], tmp_path / "plain", progress=False)
    assert not (tmp_path / "plain" / "volumes" / plain.rows[0].id / "seg.dcm").exists()


def test_runtime_and_format_refusals(bundle: Path, growth_corpus: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PredictError, match="--format tiff: choose from png, nifti, dicom-seg"):
        predict(bundle, [growth_corpus], tmp_path / "a", split="test", formats=["png,tiff"], progress=False)
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    config = json.loads((old / "config.json").read_text())
    config.update(format_version="1.1", exports={})
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="has no onnx export"):
        predict(old, [growth_corpus], tmp_path / "b", split="test", runtime="onnx", progress=False)
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if the interop extra were not installed
    with pytest.raises(PredictError, match=r"needs highdicom, which is not installed: pip install 'octssl\[interop\]'"):
        predict(bundle, [growth_corpus], tmp_path / "c", split="test", formats=["dicom-seg"], progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # refused before writing anything
