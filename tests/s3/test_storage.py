"""octssl.storage.location: URLs are never local paths, unknown schemes are refused, S3 reads/writes and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.errors import StorageError
from octssl.storage.location import Location, is_url


def test_parse_keeps_urls_and_paths_apart(tmp_path: Path):
    url = Location.parse("s3://bucket//runs/a/")
    assert url.remote and str(url) == "s3://bucket/runs/a" and url.bucket == "bucket"
    assert str(url / "b.json") == "s3://bucket/runs/a/b.json" and str(url.parent) == "s3://bucket/runs"
    local = Location.parse(tmp_path / "x")
    assert not local.remote and local.local == tmp_path / "x" and not is_url(tmp_path / "x")
    assert Location.parse(f"file://{tmp_path}/y").local == tmp_path / "y"
    with pytest.raises(StorageError, match="needs a local path"):
        url.local  # noqa: B018 - the property raises


@pytest.mark.parametrize("value", ["ftp://host/x", "hdfs://nn/x", "s3://", "s3:///key"])
def test_unservable_urls_are_refused(value: str):
    with pytest.raises(StorageError, match=value.split(":")[0]):
        Location.parse(value)


def test_export_to_unknown_scheme_is_refused_and_writes_nothing(tiny_corpus: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export-shards", str(tiny_corpus), "--out", "ftp://host/shards"])
    assert result.exit_code == 1 and "unsupported URL scheme 'ftp'" in result.output
    assert list(tmp_path.iterdir()) == []  # no local folder "ftp:" appeared


def test_s3_round_trip_and_listing(s3: str):
    base = Location.parse(s3)
    (base / "a/one.bin").write_bytes(b"x" * 10)
    (base / "two.bin").write_bytes(b"yz")
    assert (base / "two.bin").read_bytes() == b"yz" and (base / "a/one.bin").size() == 10
    assert [loc.name for loc in base.files()] == ["one.bin", "two.bin"]
    assert (base / "a/one.bin").open_input().read_at(3, 2) == b"xxx"
    (base / "two.bin").delete()
    assert not (base / "two.bin").exists()
    with pytest.raises(FileNotFoundError, match="two.bin"):
        (base / "two.bin").read_bytes()


def test_wrong_credentials_name_the_bucket(s3: str, monkeypatch: pytest.MonkeyPatch):
    (Location.parse(s3) / "f.bin").write_bytes(b"1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="access denied to bucket 'octssl'") as caught:
        (Location.parse(s3) / "f.bin").read_bytes()
    assert "not-the-secret" not in str(caught.value)
