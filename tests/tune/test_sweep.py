"""A real sweep on a tiny corpus (local Ray, 2 CPUs): outputs, schema, report, a failing task, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest

from octssl.config.sweep import parse_sweep_config
from octssl.errors import ConfigError
from octssl.tune.summary import SweepSummary, read_sweep_summary
from octssl.tune.sweep import run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CELL_SCHEMA = {
    "type": "object",
    "required": ["task", "fraction", "init", "model", "dice_mean", "dice_std", "hd95_mean", "n_test", "best_config"],
    "properties": {
        "task": {"enum": ["ga", "rpd"]},
        "fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "init": {"type": "string"},
        "model": {"type": "string"},
        "dice_mean": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "dice_std": {"type": ["number", "null"], "minimum": 0},
        "hd95_mean": {"type": ["number", "null"], "minimum": 0},
        "n_test": {"type": "integer", "minimum": 1},
        "best_config": {
            "type": ["object", "null"],
            "required": ["lr", "weight_decay", "steps", "seed", "trial", "val_dice_pooled"],
        },
    },
}
SUMMARY_SCHEMA = {
    "type": "object",
    "required": ["cells", "timings_s"],
    "properties": {
        "cells": {"type": "array", "minItems": 1, "items": CELL_SCHEMA},
        "timings_s": {"type": "object", "required": ["preflight", "search", "test", "total"],
                      "additionalProperties": {"type": "number", "minimum": 0}},
    },
}


@pytest.fixture(scope="module")
def finished(local_ray, sweep_corpus: Path, ssl_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    """GA x (scratch, ssl) succeed; every RPD trial fails at runtime (NaN losses it may not skip)."""
    storage = tmp_path_factory.mktemp("finished")
    raw = {
        "kind": "sweep", "corpus": str(sweep_corpus), "storage_path": str(storage), "name": "two-cells",
        "tasks": ["ga", "rpd"], "fractions": [1.0], "inits": {"scratch": "scratch", "ssl": str(ssl_weights)},
        "seeds": [0], "search": {"num_samples": 1, "steps": [6], "grace_steps": 3, "lr": [0.003, 0.01]},
        "job": {"data": {"crop": [16, 64], "batch_size": 2, "crops_per_volume": 2, "val_volumes": 4},
                "model": {"width": 0.25}, "optim": {"name": "adamw", "warmup_steps": 0},
                "deepspeed": {"zero_stage": 0}, "run": {"eval_every": 3, "log_every": 1}},
        "task_overrides": {"rpd": ["run.max_bad_steps=1"]},
        "figure_volumes": 2,
    }
    mp = pytest.MonkeyPatch()
    mp.setenv("OCTSSL_FAULT_NAN_STEPS", "2")  # forwarded to trials; GA trials skip the step, RPD ones stop
    try:
        summary = run_sweep(parse_sweep_config(raw), progress=False)
    finally:
        mp.undo()
    return summary, storage / "two-cells"


def test_sweep_runs_end_to_end_and_records_the_failed_task(finished) -> None:
    summary, sweep_dir = finished
    trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    assert len(trials) == 4
    by_cell = {t["cell"]: t for t in trials}
    for init in ("scratch", "ssl"):
        ga = by_cell[f"ga-f1-{init}-fpn"]
        assert ga["status"] == "ok" and ga["error"] is None and ga["last_step"] == 6, ga
        assert 0 <= ga["val_dice_pooled"] <= 1 and ga["wall_s"] > 0
        assert 0.003 <= ga["lr"] <= 0.01
        rpd = by_cell[f"rpd-f1-{init}-fpn"]
        assert rpd["status"] == "error" and "non-finite" in rpd["error"], rpd
    results = pq.read_table(sweep_dir / "results.parquet").to_pylist()
    n_test = summary.cells[0].n_test
    assert {(r["task"], r["init"]) for r in results} == {("ga", "scratch"), ("ga", "ssl")}
    assert len(results) == 2 * n_test
    assert all(0 <= r["dice"] <= 1 for r in results)
    cells = {(c.task, c.init): c for c in summary.cells}
    for init in ("scratch", "ssl"):
        mine = [r["dice"] for r in results if r["init"] == init]
        assert cells[("ga", init)].dice_mean == pytest.approx(sum(mine) / len(mine))
        assert cells[("rpd", init)].dice_mean is None and cells[("rpd", init)].errors
    assert summary.trials == {"ok": 2, "stopped": 0, "error": 2}
    assert (sweep_dir / "trials" / by_cell["ga-f1-ssl-fpn"]["trial"] / "best" / "model.safetensors").is_file()


def test_summary_matches_its_schema(finished) -> None:
    summary, sweep_dir = finished
    on_disk = json.loads((sweep_dir / "summary.json").read_text())
    jsonschema.validate(on_disk, SUMMARY_SCHEMA)
    assert on_disk["search"] == "optuna" and on_disk["sampler"].startswith("optuna ")  # the sampler used
    assert on_disk["cells"] == summary.model_dump(mode="json")["cells"]
    assert len(on_disk["cells"]) == 4
    assert {"n_train_patients", "n_train_volumes"} <= set(on_disk["cells"][0])  # the cell's training data
    manifest = Path(on_disk["corpus"]) / "manifest.parquet"  # the corpus version the sweep read, to the byte
    assert on_disk["corpus_version"]["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()


def test_run_sweep_returns_the_typed_summary_it_wrote(finished) -> None:
    summary, sweep_dir = finished
    assert isinstance(summary, SweepSummary)
    assert read_sweep_summary((sweep_dir / "summary.json").read_bytes()) == summary
    assert summary.sweep_dir == str(sweep_dir) and summary.sampler is not None


def test_a_summary_json_that_is_not_one_fails_naming_the_file(tmp_path: Path) -> None:
    from octssl.tune.report import build_report

    for name in ("summary.json", "results.parquet", "trials.parquet"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "summary.json").write_text('{"cells": [{"task": "ga"}]}')
    with pytest.raises(ConfigError, match=r"summary\.json: not a sweep summary \(cells\.0\.fraction: Field required"):
        build_report(tmp_path)


def test_report_renders_and_rebuilds_from_files(finished) -> None:
    from typer.testing import CliRunner

    from octssl.cli import app
    from octssl.tune.report import FIGURES

    _, sweep_dir = finished
    report = (sweep_dir / "report.md").read_text()
    assert "| GA Dice % | 1 |" in report and "**" in report and "failed" in report
    for name in FIGURES:
        (sweep_dir / name).unlink()
    (sweep_dir / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(sweep_dir)])
    assert result.exit_code == 0, result.output
    for name in FIGURES:
        data = (sweep_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name
    assert (sweep_dir / "report.md").read_text() == report  # the same report, from the files alone


def test_report_of_a_directory_that_is_not_a_sweep_fails(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from octssl.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "not a finished sweep directory" in " ".join(result.output.split())


# ---------------------------------------------------------------- bad input: nothing starts
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"tasks": ["ga", "cnv"]}, "tasks.1"),
        ({"models": ["fpn", "unet3d"]}, "unknown model(s) ['unet3d']"),
        ({"fractions": [0.1, 1.5]}, "label fractions must lie in (0, 1]; got [1.5]"),
        ({"fractions": [0.0]}, "got [0.0]"),
        ({"inits": {"scratch": "scratch", "ssl": "/nonexistent/model.safetensors"}}, "inits.ssl: /nonexistent"),
        ({"job": {"optim": {"lr": 0.1}}}, "job.optim.lr is set by the sweep per trial: use 'search.lr'"),
        ({"search": {"lr": [0.1, 0.01]}}, "need 0 < low <= high"),
    ],
)
def test_bad_input_fails_before_any_trial(sweep_raw, change, reason) -> None:
    raw = sweep_raw(**change)
    with pytest.raises(ConfigError) as err:
        run_sweep(parse_sweep_config(raw), progress=False)
    assert reason in str(err.value)
    assert not (Path(raw["storage_path"]) / "s").exists()


def test_a_corpus_without_labels_for_a_task_fails_before_any_trial(sweep_raw, tmp_path: Path) -> None:
    from octssl.corpus.synth import synthesize

    synthesize(tmp_path / "unlabelled", volumes=12, grid=(16, 64, 64), seed=1, labelled=0.0)
    raw = sweep_raw(corpus=str(tmp_path / "unlabelled"))
    with pytest.raises(ConfigError, match="no train volumes labelled 'ga': cannot fine-tune task ga"):
        run_sweep(parse_sweep_config(raw), progress=False)
    assert not (Path(raw["storage_path"]) / "s").exists()


def test_weights_that_do_not_fit_the_model_fail_before_any_trial(sweep_raw, ssl_weights: Path) -> None:
    raw = sweep_raw(inits={"ssl": str(ssl_weights)})
    raw["job"]["model"]["width"] = 0.5  # the weights are a width-0.25 fpn
    with pytest.raises(ConfigError, match="cell ga-f1-ssl-fpn: .*weights do not fit fpn"):
        run_sweep(parse_sweep_config(raw), progress=False)
    assert not (Path(raw["storage_path"]) / "s").exists()


def test_an_existing_sweep_directory_is_refused(sweep_raw) -> None:
    raw = sweep_raw()
    (Path(raw["storage_path"]) / "s").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(parse_sweep_config(raw), progress=False)


def test_the_bundle_ships_the_chosen_trials_threshold_and_its_own_test_metrics(finished) -> None:
    """The threshold is chosen once (on val, with the checkpoint); the bundle's test metrics are the chosen
    trial's own, at that threshold (not a mean over seeds at another)."""
    from octssl.apply.bundle import load_bundle
    from octssl.apply.metrics import pooled

    summary, sweep_dir = finished
    assert json.loads((sweep_dir / "summary.json").read_text())["schema_version"] == 1
    bundle = load_bundle(sweep_dir / "bundles" / "ga")
    chosen = [c for c in summary.cells if c.task == "ga" and c.best_config is not None]
    cell = max(chosen, key=lambda c: c.best_config.val_dice_pooled if c.best_config else 0.0)
    assert cell.best_config is not None and cell.best_test is not None
    trial = cell.best_config.trial
    assert bundle.threshold == cell.best_config.threshold == cell.best_test.threshold
    assert cell.best_test.trial == trial
    rows = [r for r in pq.read_table(sweep_dir / "results.parquet").to_pylist() if r["trial"] == trial]
    assert rows and all(r["threshold"] == bundle.threshold for r in rows)
    test = bundle.config.metrics.test
    expected = pooled(rows)
    assert test is not None and test.n == expected["n"] == len(rows)
    assert (test.dice, test.dice_pooled, test.hd95_undefined) == (expected["dice"], expected["dice_pooled"],
                                                                  expected["hd95_undefined"])
