"""Synthetic corpus: determinism, cohort structure, lesion behaviour, modality physics, preview, CLI."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from octssl.cli import app
from octssl.corpus.store import Corpus
from octssl.corpus.synth import EyeModel, plan_volumes, render


def _checksums(path: Path) -> list[tuple[str, dict]]:
    corpus = Corpus.open(path)
    return [(r["id"], r["sha256"]) for r in corpus.manifest.to_pylist()]


def test_same_seed_same_bytes_other_seed_other_bytes(make_corpus) -> None:
    first = _checksums(make_corpus(volumes=10, seed=5, name="a"))
    again = _checksums(make_corpus(volumes=10, seed=5, name="b"))
    other = _checksums(make_corpus(volumes=10, seed=6, name="c"))
    assert first == again
    assert [s["oct"] for _, s in first] != [s["oct"] for _, s in other]


def test_cohort_has_both_eyes_several_visits_and_patient_splits(tiny_corpus: Path) -> None:
    corpus = Corpus.open(tiny_corpus)
    rows = corpus.manifest.to_pylist()
    assert len(rows) == 24 and corpus.grids == ["16x64x64"]
    eyes, splits, visits = defaultdict(set), defaultdict(set), defaultdict(set)
    for row in rows:
        eyes[row["patient"]].add(row["eye"])
        splits[row["patient"]].add(row["split"])
        visits[(row["patient"], row["eye"])].add(row["visit"])
        assert row["source"] == "synth:0" and row["raster"] and row["acquired"] is not None
    assert sum(e == {"OD", "OS"} for e in eyes.values()) >= len(eyes) - 1  # the last patient may be cut
    assert all(len(s) == 1 for s in splits.values())
    assert {next(iter(s)) for s in splits.values()} == {"train", "val", "test"}
    assert max(len(v) for v in visits.values()) >= 2
    for patient, eye in visits:  # later visits are acquired later
        dates = [r["acquired"] for r in sorted(rows, key=lambda r: r["visit"]) if (r["patient"], r["eye"]) == (patient, eye)]
        assert dates == sorted(dates) and len(set(dates)) == len(dates)


@pytest.mark.parametrize("labelled", [0.0, 0.3, 1.0])
def test_labelled_share_per_split(labelled: float) -> None:
    plan = plan_volumes(60, seed=1, labelled=labelled)
    for split in ("train", "val", "test"):
        in_split = [p for p in plan if p.split == split]
        assert sum(p.labelled for p in in_split) == round(labelled * len(in_split))


def test_unlabelled_volumes_keep_faf_and_slo_but_no_masks(tiny_corpus: Path) -> None:
    corpus = Corpus.open(tiny_corpus)
    unlabelled = [sid for sid in corpus.ids() if sid not in corpus.ids(label="ga")]
    assert unlabelled and len(corpus.ids(label="ga")) == 12
    sample = corpus.read(unlabelled[0])
    assert {"faf", "slo"} <= set(sample) and not {"ga", "rpd"} & set(sample)
    assert corpus.ids(require=("oct", "faf", "slo")) == corpus.ids()


def test_some_labelled_eyes_are_healthy(tiny_corpus: Path) -> None:
    corpus = Corpus.open(tiny_corpus)
    areas = [int(corpus.read(sid)["ga"].sum()) for sid in corpus.ids(label="ga")]
    assert min(areas) == 0 < max(areas)  # empty masks exist, so Dice edge cases are exercised


def _coords(grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    nb, _, width = grid
    return np.meshgrid((np.arange(nb) + 0.5) * 6 / nb - 3, (np.arange(width) + 0.5) * 6 / width - 3, indexing="ij")


def test_ga_grows_across_visits_from_the_same_seeds() -> None:
    yy, xx = _coords((32, 0, 64))
    grew = 0
    for patient in range(12):
        eye = EyeModel(0, patient, "OD")
        masks = [eye.ga_mask(yy, xx, visit) for visit in range(3)]
        for earlier, later in zip(masks, masks[1:], strict=False):
            assert not (earlier & ~later).any()  # the lesion never shrinks
        grew += int(masks[2].sum() > masks[0].sum() > 0)
    assert grew >= 4


def _best_dice(score: np.ndarray, mask: np.ndarray) -> float:
    """Best Dice of any single threshold (either direction) on ``score`` against ``mask``."""
    best = 0.0
    for t in np.quantile(score, np.linspace(0.01, 0.99, 99)):
        for prediction in (score > t, score < t):
            best = max(best, 2 * (prediction & mask).sum() / (prediction.sum() + mask.sum()))
    return best


def test_ga_is_in_faf_and_in_oct_depth_but_not_one_threshold_of_the_mean_projection() -> None:
    grid = (16, 64, 64)
    dice = defaultdict(list)
    for patient in range(10):
        eye = EyeModel(0, patient, "OS")
        if not eye.has_ga:
            continue
        arrays = render(eye, 1, grid, [0, patient, 1, 1, 1])
        ga = arrays["ga"].astype(bool)
        volume = arrays["oct"].astype(np.float64)
        split = int(0.7 * grid[1])  # beneath the RPE lies the choroid, brighter under GA
        dice["mean"].append(_best_dice(volume.mean(axis=1), ga))
        dice["deep"].append(_best_dice(volume[:, split:].mean(axis=1) - volume[:, :split].mean(axis=1), ga))
        dice["faf"].append(_best_dice(arrays["faf"].astype(np.float64), ga))
        dice["slo"].append(_best_dice(arrays["slo"].astype(np.float64), ga))
    means = {k: float(np.mean(v)) for k, v in dice.items()}
    assert len(dice["mean"]) >= 4
    assert means["faf"] > 0.8  # FAF carries the lesion (softly): the pretext target is informative
    assert means["mean"] < 0.45  # not a single intensity threshold of the en-face mean
    assert means["deep"] > means["mean"] + 0.15  # but present in the volume's depth structure
    assert means["slo"] > means["mean"]


def test_faf_dark_lesion_bright_rim_slo_brighter_lesion_faint_rpd() -> None:
    grid = (32, 64, 128)
    faf_in, faf_rim, faf_out, slo_in, slo_out, slo_rpd, slo_clear = ([] for _ in range(7))
    for patient in range(12):
        eye = EyeModel(1, patient, "OD")
        arrays = render(eye, 0, grid, [1, patient, 0, 0, 1])
        ga, rpd = arrays["ga"].astype(bool), arrays["rpd"].astype(bool)
        faf, slo = arrays["faf"].astype(float), arrays["slo"].astype(float)
        if ga.sum() > 20:
            from scipy.ndimage import binary_dilation

            rim = binary_dilation(ga, iterations=2) & ~ga
            far = ~binary_dilation(ga, iterations=6)
            faf_in.append(faf[ga].mean())
            faf_rim.append(faf[rim].mean())
            faf_out.append(faf[far].mean())
            slo_in.append(slo[ga].mean())
            slo_out.append(slo[far].mean())
        if rpd.sum() > 5:
            slo_rpd.append(slo[rpd & ~ga].mean())
            slo_clear.append(slo[~rpd & ~ga].mean())
    assert np.mean(faf_in) < 0.5 * np.mean(faf_out)
    assert np.mean(faf_rim) > np.mean(faf_in) + 30
    assert np.mean(slo_in) > np.mean(slo_out)
    assert np.mean(slo_in) - np.mean(slo_out) < np.mean(faf_out) - np.mean(faf_in)  # lower contrast than FAF
    assert np.mean(slo_rpd) < np.mean(slo_clear)


def test_rpd_deposits_sit_above_the_rpe() -> None:
    grid = (32, 96, 128)
    for patient in range(12):
        eye = EyeModel(2, patient, "OD")
        if not eye.has_rpd or eye.has_ga:
            continue
        plain = render(eye, 0, grid, [2, patient, 0, 0, 1])
        eye.has_rpd = False
        without = render(eye, 0, grid, [2, patient, 0, 0, 1])
        rpd = plain["rpd"].astype(bool)
        diff = plain["oct"].astype(float) - without["oct"].astype(float)  # same speckle: only deposits differ
        profile = np.abs(diff).transpose(0, 2, 1)[rpd].mean(axis=0)  # mean |change| per depth under RPD
        rpe = int(np.argmax(without["oct"].astype(float).transpose(0, 2, 1)[rpd].mean(axis=0)))
        assert profile.sum() > 0 and int(np.argmax(profile)) < rpe + 2
        assert np.abs(diff).transpose(0, 2, 1)[~rpd].mean() < 0.2 * profile.max()
        return
    pytest.fail("no eye with RPD and without GA among 12")


def test_preview_png(make_corpus) -> None:
    from octssl.corpus.synth import synthesize

    out = make_corpus(volumes=4).parent / "with-preview"
    synthesize(out, volumes=6, grid=(8, 32, 32), seed=1, preview=True)
    png = (out / "preview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# ---- CLI -------------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_synth_info_verify(tmp_path: Path) -> None:
    out = tmp_path / "c"
    result = runner.invoke(app, ["synth", str(out), "--volumes", "9", "--grid", "8,32,48", "--seed", "4",
                                 "--labelled", "1.0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["volumes"] == 9 and summary["grids"] == {"8x32x48": 9}
    assert summary["labels"]["ga"] == 9 and sum(summary["splits"].values()) == 9
    assert summary["bytes_on_disk"] > 9 * 8 * 32 * 48 // 2
    assert runner.invoke(app, ["info", str(out)]).exit_code == 0
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0

    corpus = Corpus.open(out)
    shard = corpus.shard_file("faf", "8x32x48", 0)
    shard.write_bytes(b"\0" * shard.stat().st_size)  # index checksum fails: every faf chunk is unreadable
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 1
    named = [line for line in result.stdout.splitlines() if str(shard) in line]
    assert sorted(line.split("sample ")[1].split(":")[0] for line in named) == sorted(corpus.ids())


def test_cli_errors_are_clean(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no corpus directory" in " ".join(result.output.split())  # rich wraps
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "volumes.zarr: missing" in result.stdout
    result = runner.invoke(app, ["synth", str(tmp_path / "x"), "--grid", "8,32"])
    assert result.exit_code == 2 and "NB,D,W" in " ".join(result.output.split())


def test_cli_verify_dispatches_to_shard_directories(tiny_corpus: Path, tmp_path: Path) -> None:
    from octssl.webds.export import export_shards

    export_shards(tiny_corpus, tmp_path / "shards", samples_per_shard=8)
    assert runner.invoke(app, ["verify", str(tmp_path / "shards")]).exit_code == 0
    tar = sorted((tmp_path / "shards").glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[:-2048])
    result = runner.invoke(app, ["verify", str(tmp_path / "shards")])
    assert result.exit_code == 1 and tar.name in result.stdout


def test_cli_verify_names_the_bad_manifest_column(make_corpus) -> None:
    import pyarrow.parquet as pq

    path = make_corpus(volumes=3)
    table = pq.read_table(path / "manifest.parquet")
    pq.write_table(table.drop_columns(["split"]), path / "manifest.parquet")
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and "manifest.parquet: column 'split' is missing" in result.stdout
