"""The corpus under faults and hostile input: lost shard files, a deleted lock, racing creators, damaged
metadata and journals, read-only corpora, bad sample values. Each is refused with a CorpusError or
SampleError that names the file; none is read as zeros or crashes with a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.journal import JOURNAL_DIR, LOCK_NAME, WriterLock
from octssl.corpus.store import Corpus
from octssl.data.sources import ZarrSource
from octssl.errors import CorpusError, OctsslError, SampleError
from octssl.webds.export import export_shards

SHAPE = (4, 8, 8)


def item(sid: str, patient: str = "p0", **meta: object) -> dict:
    rng = np.random.default_rng(int.from_bytes(sid.encode(), "little") % 2**32)
    return {
        "id": sid,
        "oct": rng.integers(1, 256, SHAPE, dtype=np.uint8),
        "faf": rng.integers(1, 256, (SHAPE[0], SHAPE[2]), dtype=np.uint8),
        "ga": np.zeros((SHAPE[0], SHAPE[2]), np.uint8),  # a labelled healthy eye: Zarr stores no chunk
        "meta": {"patient": patient, "eye": "OD", "visit": 0, "device": "test", "scan_pattern": "raster",
                 "spacing_mm": (0.1, 0.005, 0.02), "split": "train", **meta},
    }


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    made = Corpus.create(tmp_path / "c")
    made.append([item(f"s{i}", f"p{i}") for i in range(3)], progress=False)
    return Corpus.open(tmp_path / "c")


def oct_shard(corpus: Corpus) -> Path:
    return corpus.shard_file("oct", *corpus.slot("oct", corpus.row("s0")))


# ---- 1: a missing shard file is never read as zeros --------------------------------------------------
def test_a_deleted_shard_file_fails_every_read_path_naming_the_file(corpus: Corpus, tmp_path: Path) -> None:
    warm = ZarrSource(corpus.path, split="train")
    assert warm[0]["oct"].any()  # a reader that has already read the shard file once
    shard = oct_shard(corpus)
    shard.unlink()
    with pytest.raises(CorpusError, match=f"{shard}.*missing"):
        Corpus.open(corpus.path).read("s0")
    with pytest.raises(CorpusError, match=f"{shard}.*missing"):
        warm[0]
    with pytest.raises(CorpusError, match=f"{shard}.*missing"):
        ZarrSource(corpus.path, split="train")[0]
    with pytest.raises(OctsslError, match=f"{shard}.*missing"):
        export_shards(corpus.path, tmp_path / "shards", progress=False)
    result = CliRunner().invoke(app, ["export-shards", str(corpus.path), "--out", str(tmp_path / "s2")])
    assert result.exit_code != 0 and "missing" in result.output and "Traceback" not in result.output
    assert any("missing" in p and str(shard) in p for p in Corpus.open(corpus.path).verify())


def test_a_missing_shard_file_of_an_array_zarr_reads_is_caught_too(corpus: Corpus) -> None:
    """A foreign codec chain (the Zarr path, not the fast shard reader): the same refusal."""
    import zarr
    from zarr.codecs import GzipCodec
    from zarr.storage import LocalStore

    store = LocalStore(corpus.zarr_path)
    grid = "x".join(map(str, SHAPE))
    faf = zarr.open_array(store, path=f"faf/{grid}")[:]
    zarr.create_array(store, name=f"faf/{grid}", shape=faf.shape, dtype="uint8", chunks=(1, *faf.shape[1:]),
                      shards=(8, *faf.shape[1:]), compressors=GzipCodec(level=1), overwrite=True)[:] = faf
    reader = Corpus.open(corpus.path)
    assert reader.read("s1")["faf"].any()
    shard = reader.shard_file("faf", grid, 0)
    shard.unlink()
    with pytest.raises(CorpusError, match=f"{shard}.*missing"):
        Corpus.open(corpus.path).read("s1")


def test_an_all_zero_label_without_a_shard_file_still_reads(corpus: Corpus) -> None:
    assert not corpus.shard_file("ga", *corpus.slot("ga", corpus.row("s0"))).exists()
    sample = corpus.read("s0", verify=True)
    assert not sample["ga"].any() and sample["oct"].any()


# ---- 2: deleting .lock under a writer does not let a second writer in --------------------------------
WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from octssl.corpus.store import Corpus

def pause(stage):
    if stage == "written":
        print("PAUSED", flush=True)
        sys.stdin.readline()

Corpus.append_hook = pause
rng = np.random.default_rng(7)
samples = [{{"id": f"w{{i}}", "oct": rng.integers(1, 256, {shape}, dtype=np.uint8),
            "meta": {{"patient": f"q{{i}}", "eye": "OS", "visit": 0, "device": "test", "scan_pattern": "raster",
                     "spacing_mm": (0.1, 0.005, 0.02)}}}} for i in range(2)]
try:
    Corpus.open(Path(sys.argv[1])).append(samples, progress=False)
    print("COMMITTED", flush=True)
except Exception as err:
    print("REFUSED", type(err).__name__, err, flush=True)
"""


def paused_writer(path: Path) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER.format(shape=SHAPE)), str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = writer.stdout.readline().strip()
    if line != "PAUSED":
        writer.kill()
        raise AssertionError(f"writer did not pause: {line} {writer.stderr.read()}")
    return writer


def test_deleting_the_lock_file_under_a_writer_does_not_admit_a_second(corpus: Corpus) -> None:
    writer = paused_writer(corpus.path)
    try:
        (corpus.path / LOCK_NAME).unlink(missing_ok=True)
        with pytest.raises(CorpusError, match="another writer"):
            Corpus.open(corpus.path).append([item("x0", "p9")], progress=False)
        out, _ = writer.communicate("\n", timeout=60)
    finally:
        writer.kill()
    assert "COMMITTED" in out
    reopened = Corpus.open(corpus.path)
    assert sorted(reopened.ids()) == ["s0", "s1", "s2", "w0", "w1"]
    assert reopened.verify() == []


def test_a_writer_whose_journal_was_replaced_does_not_commit(corpus: Corpus) -> None:
    writer = paused_writer(corpus.path)
    try:
        journal = corpus.path / JOURNAL_DIR / "journal.json"
        state = json.loads(journal.read_text())
        journal.write_text(json.dumps({**state, "token": "0" * 32}))  # another writer's journal now
        out, _ = writer.communicate("\n", timeout=60)
    finally:
        writer.kill()
    assert "REFUSED" in out and "journal" in out
    assert "w0" not in Corpus.open(corpus.path)


# ---- 6: two creators of one new corpus ---------------------------------------------------------------
def test_a_creator_preempted_before_the_lock_does_not_wipe_the_winner(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "new"
    real_acquire = WriterLock.acquire

    def preempted(self: WriterLock) -> WriterLock:
        monkeypatch.setattr(WriterLock, "acquire", real_acquire)
        Corpus.create(path).append([item("first")], progress=False)  # the other creator wins the race
        return real_acquire(self)

    monkeypatch.setattr(WriterLock, "acquire", preempted)
    with pytest.raises(CorpusError, match="already exists"):
        Corpus.create(path)
    assert Corpus.open(path).ids() == ["first"]
    assert Corpus.open(path).read("first")["oct"].any()


# ---- 9: damaged metadata and journals, read-only corpora: one-line errors ---------------------------
def test_garbage_settings_metadata_names_the_manifest(corpus: Corpus) -> None:
    table = pq.read_table(corpus.manifest_path)
    pq.write_table(table.replace_schema_metadata({b"octssl": b"{not json"}), corpus.manifest_path)
    with pytest.raises(CorpusError, match=f"{corpus.manifest_path}.*settings"):
        Corpus.open(corpus.path)
    result = CliRunner().invoke(app, ["info", str(corpus.path)])
    assert result.exit_code == 2 and "Traceback" not in result.output


def _pending_journal(path: Path) -> None:
    """Leave the journal of a writer killed after writing (an append that never committed)."""
    writer = paused_writer(path)
    writer.kill()
    writer.wait(timeout=30)
    assert (path / JOURNAL_DIR / "journal.json").is_file()


def test_a_pending_journal_without_its_backups_says_what_to_do(corpus: Corpus) -> None:
    _pending_journal(corpus.path)
    for backup in (corpus.path / JOURNAL_DIR / "files").rglob("*"):
        if backup.is_file():
            backup.unlink()
    with pytest.raises(CorpusError, match=r"backup.*missing.*octssl verify.*\.journal"):
        Corpus.open(corpus.path).append([item("x1", "p8")], progress=False)
    result = CliRunner().invoke(app, ["info", str(corpus.path)])
    assert "Traceback" not in result.output


def test_a_garbage_journal_is_a_corpus_error(corpus: Corpus) -> None:
    _pending_journal(corpus.path)
    (corpus.path / JOURNAL_DIR / "journal.json").write_text("{garbage")
    with pytest.raises(CorpusError, match="journal.json"):
        Corpus.open(corpus.path).append([item("x1", "p8")], progress=False)


READ_ONLY = """
import sys
from octssl.corpus.store import Corpus
corpus = Corpus.open(sys.argv[1])
print(len(corpus), int(corpus.read("s0")["oct"].any()))
"""


def run_without_write_access(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child that file permissions apply to (as root: without CAP_DAC_OVERRIDE)."""
    import os
    import shutil

    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop the capability to ignore permissions")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120)


def test_a_read_only_corpus_with_a_pending_journal_opens_and_reads(corpus: Corpus) -> None:
    _pending_journal(corpus.path)
    files = [p for p in corpus.path.rglob("*")] + [corpus.path]
    try:
        for p in files:
            p.chmod(0o555 if p.is_dir() else 0o444)
        result = run_without_write_access(READ_ONLY, str(corpus.path))
    finally:
        for p in files:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["3", "1"]


# ---- 10: the append API refuses bad meta values with SampleError -------------------------------------
@pytest.mark.parametrize("meta, message", [
    ({"patient": ""}, "patient"),
    ({"patient": "   "}, "patient"),
    ({"device": ""}, "device"),
    ({"visit": "tuesday"}, "visit"),
    ({"visit": 2**40}, "visit"),
    ({"acquired": "2021-13-45"}, "acquired"),
    ({"acquired": 20210304}, "acquired"),
])
def test_bad_meta_values_are_sample_errors(corpus: Corpus, meta: dict, message: str) -> None:
    bad = item("bad", "p7")
    bad["meta"].update(meta)
    with pytest.raises(SampleError, match=message):
        corpus.append([bad], progress=False)
    assert "bad" not in Corpus.open(corpus.path)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_array_zarr_json_is_listed_by_verify_which_goes_on(corpus: Corpus, damage: str) -> None:
    """A flipped byte (not UTF-8) or a cut in the oct array's zarr.json: verify names that metadata file, still
    checks the other arrays, and `octssl verify` exits 1 with the list, not a traceback."""
    grid = corpus.row("s0")["grid"]
    meta = corpus.path / "volumes.zarr" / "oct" / grid / "zarr.json"
    data = bytearray(meta.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2:]
    meta.write_bytes(bytes(data))
    (corpus.shard_file("faf", *corpus.slot("faf", corpus.row("s1")))).write_bytes(b"garbage")
    problems = Corpus.open(corpus.path).verify()
    assert any(str(meta) in p and "metadata" in p for p in problems), problems
    assert any("faf" in p and "s1" in p for p in problems), problems  # the rest was still checked
    with pytest.raises(CorpusError, match=f"{meta}.*metadata"):
        Corpus.open(corpus.path).read("s0")
    result = CliRunner().invoke(app, ["verify", str(corpus.path)])
    assert result.exit_code == 1 and str(meta) in "".join(result.output.split()), result.output
    assert "Traceback" not in result.output
