"""Format detection by content, folder walking, and robustness of every reader to garbage behind a valid magic."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import numpy as np
import pytest

from octssl.errors import IngestError
from octssl.ingest import detect
from octssl.ingest.phi import pseudonym
from octssl.ingest.pipeline import ingest

GARBAGE = np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes()


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"HSF-OCT-103\0", detect.VOL),
        (b"CMDb\0\0\0\0", detect.E2E),
        (b"FOCTFDS\0", detect.FDS),
        (b"FOCTFDA\0", detect.FDA),
        (b"FOCTFAA\0", detect.FDA),
        (b"\0" * 128 + b"DICM", detect.DICOM),
        (b"FOCTXYZ\0", None),
        (b"\x89PNG\r\n", None),
    ],
)
def test_sniff(head: bytes, fmt: str | None) -> None:
    assert detect.sniff(head + b"\0" * 8) == fmt


def test_detect_names_the_cause(tmp_path: Path) -> None:
    (tmp_path / "empty.vol").write_bytes(b"")
    (tmp_path / "scan.e2e").write_bytes(b"nonsense")
    with pytest.raises(IngestError, match="empty file"):
        detect.detect_format(tmp_path / "empty.vol")
    with pytest.raises(IngestError, match=r"not a recognised format although named \.e2e"):
        detect.detect_format(tmp_path / "scan.e2e")


def test_walk_finds_device_files_and_stacks_only(tmp_path: Path) -> None:
    (tmp_path / "a" / "stack").mkdir(parents=True)
    (tmp_path / "a" / "stack" / "b0.png").write_bytes(b"png")
    (tmp_path / "a" / "stack" / "side.json").write_text("{}")
    (tmp_path / "a" / "x.vol").write_bytes(b"")
    (tmp_path / "a" / "IM1").write_bytes(b"\0" * 128 + b"DICM")
    (tmp_path / "a" / "README.md").write_text("readme")
    (tmp_path / "a" / ".hidden.vol").write_bytes(b"")
    found = {p.relative_to(tmp_path).as_posix() for p in detect.discover([tmp_path])}
    assert found == {"a/stack", "a/x.vol", "a/IM1"}


@pytest.mark.parametrize(
    ("name", "head"),
    [("e.e2e", b"CMDb"), ("t.fds", b"FOCTFDS"), ("t.fda", b"FOCTFDA"), ("v.vol", b"HSF-OCT-103\0"),
     ("d.dcm", b"\0" * 128 + b"DICM")],
)
def test_garbage_behind_a_valid_magic_is_rejected_not_raised(
    tmp_path: Path, key: str, name: str, head: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(head + GARBAGE)
    report = ingest([path], tmp_path / "corpus", workers=1, progress=False)
    assert report.ingested == [] and len(report.rejected) == 1
    assert report.rejected[0][1]  # a non-empty reason


def test_pseudonym_is_keyed_hmac_sha256() -> None:
    expected = hmac.new(b"k1", b"01234", hashlib.sha256).hexdigest()[:24]
    assert pseudonym("01234", b"k1") == "p" + expected
    assert pseudonym("01234", b"k2") != pseudonym("01234", b"k1")
