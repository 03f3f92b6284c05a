"""Interrupted appends: a writer process is SIGKILLed mid-append; the previous corpus must survive intact."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from octssl.corpus.store import Corpus
from octssl.errors import CorpusError

SHAPE = (4, 8, 8)
COMMITTED = 4  # volumes in the corpus before the killed append (3 per oct shard: shard 1 is partly full;
# localizers of 96 bytes: 8 per shard, the 3 committed leave shard 0 partly full, rewritten by the append)


def item(i: int) -> dict:
    rng = np.random.default_rng(i)
    out = {
        "id": f"v{i}",
        "oct": rng.integers(0, 256, (4, 8, 8), dtype=np.uint8),
        "faf": rng.integers(0, 256, (4, 8), dtype=np.uint8),
        "meta": {"patient": f"p{i % 3}", "eye": "OS", "visit": i, "device": "test", "scan_pattern": "raster",
                 "spacing_mm": (0.1, 0.005, 0.02)},
    }
    if i % 3 != 2:  # most volumes carry a native localizer (its own bucket and shards), some do not
        out["localizer"] = rng.integers(0, 256, (8, 12), dtype=np.uint8)
        out["meta"].update(localizer_spacing_mm=(0.05, 0.05), positions_mm=rng.uniform(0, 0.6, (4, 2, 2)))
    return out


WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from octssl.corpus.store import Corpus

{item}

path, stage, torn = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
SHARDS = {{"oct": "oct/4x8x8/c/1/0/0/0", "localizer": "localizer/8x12/c/0/0/0"}}  # hold committed data

def pause(name):
    if name != stage:
        return
    if torn:  # what a crash in the middle of rewriting a shard could leave behind
        shard = path / "volumes.zarr" / SHARDS[torn]
        shard.write_bytes(shard.read_bytes()[:40] + b"torn")
    print("PAUSED", flush=True)
    time.sleep(120)

Corpus.append_hook = pause
Corpus.open(path).append([item(i) for i in range({start}, {start} + 5)], progress=False)
print("FINISHED", flush=True)
"""


def start_writer(path: Path, stage: str, torn: str = "") -> subprocess.Popen:
    """A writer process paused at ``stage``; ``torn`` names an array ("oct", "localizer") whose committed
    shard it damages first."""
    script = WRITER.format(item=inspect.getsource(item), start=COMMITTED)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(path), stage, torn],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = writer.stdout.readline().strip()
    if line != "PAUSED":
        writer.kill()
        raise AssertionError(f"writer did not pause at {stage}: {line} {writer.stderr.read()}")
    return writer


def kill(writer: subprocess.Popen) -> None:
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    writer.stdout.close()
    writer.stderr.close()


@pytest.fixture
def corpus_path(tmp_path: Path) -> Path:
    corpus = Corpus.create(tmp_path / "c", shard_bytes=3 * int(np.prod(SHAPE)))
    corpus.append([item(i) for i in range(COMMITTED)], progress=False)
    return corpus.path


def assert_intact(path: Path, expected: int) -> Corpus:
    corpus = Corpus.open(path)
    assert corpus.ids() == [f"v{i}" for i in range(expected)]
    for i in range(expected):
        got = corpus.read(f"v{i}", localizer=True)
        np.testing.assert_array_equal(got["oct"], item(i)["oct"])
        np.testing.assert_array_equal(got["faf"], item(i)["faf"])
        assert ("localizer" in got) == ("localizer" in item(i))
        if "localizer" in got:
            np.testing.assert_array_equal(got["localizer"], item(i)["localizer"])
            np.testing.assert_array_equal(got["meta"]["positions_mm"], item(i)["meta"]["positions_mm"])
    assert corpus.verify() == []  # also: no orphan slots left by the killed append
    assert corpus.array("oct", "4x8x8").shape[0] == expected
    assert corpus.array("localizer", "8x12").shape[0] == sum(i % 3 != 2 for i in range(expected))
    assert not (path / ".journal").exists()
    assert not list(path.rglob("*.partial"))
    return corpus


@pytest.mark.parametrize(("stage", "torn", "survivors"), [
    ("flushed", "", COMMITTED),  # new chunks written into the shard that holds committed volume 3
    ("flushed", "oct", COMMITTED),  # ... and that shard file left damaged
    ("written", "", COMMITTED),  # all data written, manifest not yet replaced
    ("written", "localizer", COMMITTED),  # ... the localizer shard holding committed localizers damaged
    ("committed", "", COMMITTED + 5),  # manifest replaced, journal not yet dropped: the append counts
])
def test_killed_writer_leaves_a_readable_consistent_corpus(corpus_path: Path, stage: str, torn: str,
                                                           survivors: int) -> None:
    writer = start_writer(corpus_path, stage, torn)
    assert (corpus_path / ".journal" / "journal.json").is_file()
    kill(writer)
    corpus = assert_intact(corpus_path, survivors)
    corpus.append([item(i) for i in range(20, 22)], progress=False)  # a further append works
    reopened = Corpus.open(corpus_path)
    assert reopened.ids()[-2:] == ["v20", "v21"] and len(reopened) == survivors + 2
    assert reopened.verify() == []
    np.testing.assert_array_equal(reopened.read("v21")["oct"], item(21)["oct"])


def test_readers_and_writers_while_an_append_is_in_flight(corpus_path: Path) -> None:
    writer = start_writer(corpus_path, "flushed")
    try:
        with pytest.raises(CorpusError, match=rf"another writer \(pid {writer.pid}\)"):
            Corpus.open(corpus_path).append([item(30)], progress=False)
        reader = Corpus.open(corpus_path)  # must not roll back the live writer's journal
        assert (corpus_path / ".journal" / "journal.json").is_file()
        assert reader.ids() == [f"v{i}" for i in range(COMMITTED)]
        np.testing.assert_array_equal(reader.read("v3")["oct"], item(3)["oct"])
        assert reader.verify() == []  # slots of the in-flight append are not reported as orphans
    finally:
        kill(writer)
    assert_intact(corpus_path, COMMITTED)
