"""Benchmark provenance: the CPU's distinguishing flags in the file slug, the commit in every result, a suite
file's outputs committed with it (older files are labelled in benchmarks/legacy-results.json)."""

from __future__ import annotations

import hashlib
import json
import subprocess

import torch

import common

LEGACY = json.loads((common.RESULTS.parent / "legacy-results.json").read_text())["files"]


def test_the_slug_tells_cpus_with_and_without_avx512_bf16_apart(monkeypatch) -> None:
    monkeypatch.setattr(common, "cpu_name", lambda: "AMD EPYC")
    monkeypatch.setattr(common, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    with_bf16 = common.device_slug(torch.device("cpu"))
    monkeypatch.setattr(common, "cpu_flags", lambda: {"avx2", "avx512f"})
    without = common.device_slug(torch.device("cpu"))
    assert (with_bf16, without) == ("cpu-amd-epyc-avx512-bf16", "cpu-amd-epyc-avx512")


def test_every_result_written_records_the_commit_and_cpu_flags(tmp_path) -> None:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.REPO, capture_output=True,
                          text=True).stdout.strip()
    written = json.loads(common.write_json(tmp_path / "x.json", {"rows": [1]}).read_text())
    assert written["git_commit"] == head and isinstance(written["git_dirty"], bool) and written["rows"] == [1]
    assert set(written["cpu_flags"]) == common.cpu_flags() & set(common.SLUG_FLAGS)


def test_committed_results_carry_provenance_or_are_labelled_legacy() -> None:
    """A result file without a commit, or a suite file whose listed outputs are absent or differ, fails here
    unless benchmarks/legacy-results.json labels it."""
    assert set(LEGACY) <= {p.name for p in common.RESULTS.glob("*.json")}  # labels name real files
    for path in sorted(common.RESULTS.glob("*.json")):
        if path.name in LEGACY:
            continue
        result = json.loads(path.read_text())
        assert result.get("git_commit"), f"{path.name}: no git_commit"
        for run in result.get("runs", []) if path.name.startswith("suite-") else []:
            assert run.get("outputs"), f"{path.name}: run {run['benchmark']} lists no outputs"
            for output in run["outputs"]:
                file = common.RESULTS / output["file"]
                assert file.is_file(), f"{path.name}: output {output['file']} was not committed with it"
                digest = hashlib.sha256(file.read_bytes()).hexdigest()
                assert digest == output["sha256"], f"{path.name}: {output['file']} is from another run"


def test_file_digests_name_what_exists(tmp_path) -> None:
    (tmp_path / "a.json").write_text("{}")
    assert common.file_digests([tmp_path / "a.json", tmp_path / "a.png"]) == [
        {"file": "a.json", "sha256": hashlib.sha256(b"{}").hexdigest()}]
