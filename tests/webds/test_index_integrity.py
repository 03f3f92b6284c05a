"""A tampered or garbage ``index.json`` is caught by ``verify`` and refused by the stream reader (never a
MemoryError, OSError or KeyError); shards carry visit ordinals, never acquisition dates."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.config.job import load_config
from octssl.corpus.store import Corpus
from octssl.data.sources import StreamSource
from octssl.errors import OctsslError, ShardError
from octssl.webds.export import export_shards
from octssl.webds.index import INDEX_NAME
from octssl.webds.verify import verify_shards


def tamper(root: Path, change) -> tuple[dict, str]:
    index = json.loads((root / INDEX_NAME).read_text())
    victim = index["shards"][1]["ids"][2]
    change(index, victim)
    (root / INDEX_NAME).write_text(json.dumps(index))
    return index, victim


def _shift(index: dict, sid: str) -> None:
    index["samples"][sid]["offset"] += 512


def _shrink(index: dict, sid: str) -> None:
    index["samples"][sid]["size"] -= 512


def _drop(index: dict, sid: str) -> None:
    del index["samples"][sid]


def _huge(index: dict, sid: str) -> None:
    index["samples"][sid]["size"] = 2**40


def _negative(index: dict, sid: str) -> None:
    index["samples"][sid]["offset"] = -512


def _other_shard(index: dict, sid: str) -> None:
    index["samples"][sid]["shard"] = index["shards"][0]["name"]


def _escape(index: dict, sid: str) -> None:
    index["shards"][1]["name"] = "../../etc/passwd"


@pytest.mark.parametrize("change", [_shift, _shrink, _drop, _huge, _negative, _other_shard, _escape])
def test_verify_catches_and_the_reader_refuses_a_tampered_index(damaged: Path, change) -> None:
    index, victim = tamper(damaged, change)
    problems = verify_shards(damaged)
    assert problems, "a tampered index passed verify"
    assert any(victim in p or "etc/passwd" in p for p in problems), problems
    with pytest.raises(ShardError, match=INDEX_NAME if change is not _shift and change is not _shrink else victim):
        source = StreamSource(damaged, batch_size=1, verify=False)
        for _ in source:
            pass


def test_a_garbage_index_is_one_shard_error(damaged: Path) -> None:
    (damaged / INDEX_NAME).write_text('{"format": "octssl-shards/1", "shards": 7}')
    with pytest.raises(ShardError, match=INDEX_NAME):
        StreamSource(damaged)
    assert any(INDEX_NAME in p for p in verify_shards(damaged))
    (damaged / INDEX_NAME).write_text("{not json")
    with pytest.raises(ShardError, match=INDEX_NAME):
        StreamSource(damaged)


def test_source_stream_with_a_garbage_index_fails_preflight_in_one_line(damaged: Path, tmp_path: Path) -> None:
    from octssl.train.launch import preflight

    (damaged / INDEX_NAME).write_text("{not json")
    config = load_config(None, ["data.source=stream", f"data.shards={damaged}", "run.max_steps=1"])
    with pytest.raises(OctsslError, match=INDEX_NAME):
        preflight(config)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"kind: pretrain\ndata: {{source: stream, shards: {damaged}}}\nrun: {{max_steps: 1}}\n")
    result = CliRunner().invoke(app, ["pretrain", str(cfg)])
    assert result.exit_code == 1 and INDEX_NAME in result.output and "Traceback" not in result.output


def test_verify_of_an_export_without_its_index_says_index_missing(damaged: Path) -> None:
    (damaged / INDEX_NAME).unlink()
    result = CliRunner().invoke(app, ["verify", str(damaged)])
    assert result.exit_code == 1
    assert f"{INDEX_NAME}: missing" in result.output and "volumes.zarr" not in result.output


# ---- 7: no acquisition date in shards ----------------------------------------------------------------
def test_shards_carry_visit_ordinals_not_dates(tmp_path: Path) -> None:
    corpus = Corpus.create(tmp_path / "c")
    rng = np.random.default_rng(0)

    def scan(sid: str, patient: str, eye: str, day: str) -> dict:
        return {"id": sid, "oct": rng.integers(0, 255, (4, 8, 8), dtype=np.uint8),
                "meta": {"patient": patient, "eye": eye, "visit": int(day.replace("-", "")), "device": "d",
                         "scan_pattern": "raster", "spacing_mm": (0.1, 0.01, 0.1), "acquired": day,
                         "split": "train"}}

    # visits stored as YYYYMMDD (what earlier ingests wrote), appended out of order
    corpus.append([scan("b", "p1", "OD", "2018-06-30"), scan("a", "p1", "OD", "2017-01-11"),
                   scan("c", "p1", "OS", "2018-06-30"), scan("d", "p2", "OD", "2019-02-03")], progress=False)
    export_shards(corpus.path, tmp_path / "s", progress=False)
    metas = {}
    with tarfile.open(tmp_path / "s" / "shard-000000.tar") as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                metas[member.name.split(".")[0]] = json.loads(tar.extractfile(member).read())
    assert {sid: m["visit"] for sid, m in metas.items()} == {"a": 0, "b": 1, "c": 0, "d": 0}
    text = (tmp_path / "s" / "shard-000000.tar").read_bytes()
    for day in (b"20170111", b"2017-01-11", b"20180630", b"20190203"):
        assert day not in text
