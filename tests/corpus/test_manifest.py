"""manifest.parquet: schema, validation errors that name file and column, atomic writes, checksums."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from octssl.corpus import manifest as mf
from octssl.errors import CorpusError


def _row(**overrides: object) -> dict:
    digest = "ab" * 32
    row = {
        "id": "s1", "patient": "p1", "eye": "OD", "visit": 0, "device": "dev", "scan_pattern": "raster",
        "raster": True, "raster_reason": None, "shape": [4, 8, 8], "spacing_mm": [0.1, 0.01, 0.05],
        "modalities": ["oct"], "labels": [], "split": "train", "grid": "4x8x8", "index": 0,
        "sha256": {"oct": digest, "faf": None, "slo": None, "ga": None, "rpd": None},
        "source": "synth:0", "acquired": None,
    }
    row.update(overrides)
    return row


def test_roundtrip_keeps_schema_and_settings(tmp_path: Path) -> None:
    path = tmp_path / mf.MANIFEST_NAME
    table = mf.rows_table([_row()], {**mf.DEFAULT_SETTINGS, "split_ratios": [0.5, 0.25, 0.25]})
    mf.write_manifest(table, path)
    back = mf.read_manifest(path)
    assert back.schema.remove_metadata() == mf.SCHEMA
    assert mf.settings_of(back)["split_ratios"] == [0.5, 0.25, 0.25]
    assert back.to_pylist()[0]["shape"] == [4, 8, 8]
    assert [p.name for p in tmp_path.iterdir()] == [mf.MANIFEST_NAME]  # no temp file left behind


def test_missing_manifest_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"manifest\.parquet: manifest is missing"):
        mf.read_manifest(tmp_path / mf.MANIFEST_NAME)


def test_not_parquet_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / mf.MANIFEST_NAME
    path.write_bytes(b"this is not parquet")
    with pytest.raises(CorpusError, match=r"manifest\.parquet: cannot read manifest as Parquet"):
        mf.read_manifest(path)


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / mf.MANIFEST_NAME
    table = mf.rows_table([_row()], mf.DEFAULT_SETTINGS).drop_columns(["eye"])
    pq.write_table(table, path)
    with pytest.raises(CorpusError, match=r"manifest\.parquet: column 'eye' is missing"):
        mf.read_manifest(path)


def test_wrong_column_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / mf.MANIFEST_NAME
    table = mf.rows_table([_row()], mf.DEFAULT_SETTINGS)
    table = table.set_column(table.column_names.index("visit"), "visit", pa.array(["first"]))
    pq.write_table(table, path)
    with pytest.raises(CorpusError, match=r"column 'visit' has type string, expected int32"):
        mf.read_manifest(path)


def test_nulls_in_required_column_are_named(tmp_path: Path) -> None:
    path = tmp_path / mf.MANIFEST_NAME
    table = mf.rows_table([_row()], mf.DEFAULT_SETTINGS)
    schema = table.schema.set(table.schema.get_field_index("patient"), pa.field("patient", pa.string()))
    table = table.cast(schema).set_column(1, pa.field("patient", pa.string()), pa.array([None], pa.string()))
    pq.write_table(table, path)
    with pytest.raises(CorpusError, match=r"column 'patient' has null values"):
        mf.read_manifest(path)


def test_row_problems_name_sample_and_column() -> None:
    rows = [
        _row(id="a", eye="left"),
        _row(id="b", split="holdout", index=1),
        _row(id="c", grid="9x9x9", index=2),
        _row(id="d", index=1),  # slot already used by b
        _row(id="a", index=3),  # duplicate id
        _row(id="e", index=4, labels=["ga"]),  # label without a checksum
    ]
    problems = mf.row_problems(mf.rows_table(rows, mf.DEFAULT_SETTINGS), "m.parquet")
    text = "\n".join(problems)
    assert "m.parquet: sample a: column 'eye' is 'left'" in text
    assert "sample b: column 'split' is 'holdout'" in text
    assert "sample c: column 'grid' is '9x9x9'" in text
    assert "sample d: grid 4x8x8 index 1 also used by sample b" in text
    assert "sample a: duplicate id" in text
    assert "sample e: column 'sha256' has no valid digest for 'ga'" in text
    assert len(problems) == 6


def test_array_sha256_is_sha_of_c_order_bytes() -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert mf.array_sha256(array) == hashlib.sha256(array.tobytes()).hexdigest()
    assert mf.array_sha256(np.asfortranarray(array)) == mf.array_sha256(array)


def test_grid_name() -> None:
    assert mf.grid_name((49, 496, 512)) == "49x496x512"
