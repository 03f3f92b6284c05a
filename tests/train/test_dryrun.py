"""`--dry-run` of the paper profiles (no data needed), its arithmetic on a real corpus, and one real step of
every profile at a reduced size on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from octssl.cli import app
from octssl.config.job import load_config
from octssl.config.sweep import load_sweep_config, trial_job
from octssl.data.plan import steps_per_epoch
from octssl.models.profile import saved_activation_bytes, training_activation_bytes
from octssl.train import dryrun

PAPER = Path(__file__).resolve().parents[2] / "jobs" / "paper"
JOBS = {"pretrain-faf": "pretrain", "pretrain-slo": "pretrain", "pretrain-faf-gpu-fast": "pretrain",
        "finetune-ga": "finetune", "finetune-rpd": "finetune", "sweep": "sweep"}


def test_the_paper_profiles_are_all_here() -> None:
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(JOBS)


@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_paper_profile_dry_runs_without_the_paper_data(name: str) -> None:
    result = CliRunner().invoke(app, [JOBS[name], "--config", str(PAPER / f"{name}.yaml"), "--dry-run"])
    assert result.exit_code == 1, result.output  # the plan is printed, but it cannot run without the data
    text = result.output
    assert f"dry run of {PAPER / name}.yaml (nothing is trained)" in text
    assert "runs/paper/corpus: no corpus directory here" in text  # said, and the plan goes on without it
    assert "this plan cannot run" in text and "- runs/paper/corpus: no corpus directory here" in text
    assert "4,369,553" in text  # the paper's FPN at width 1.0
    assert "32 x 128 x 256" in text and "assumed, the paper's" in text
    lines = {line[:40].strip(): line[40:].strip() for line in text.splitlines() if not line.startswith(" ")}
    if name == "sweep":
        assert lines["cells"] == "18" and lines["trials"] == "18" and "not found yet" in lines["inits"]
        assert text.count("one trial of") == 6  # ga x 4 fractions + rpd x 2, the inits share a plan
    else:
        batch = 64 if "gpu-fast" in name else 8
        assert lines["epochs"] == "40" and lines["steps"] == "unknown"
        assert lines["steps formula"].endswith(f"= {40 * 20 / batch:g} x N")  # 40 epochs of 20 crops per volume
        assert lines["batch per worker"] == str(batch)
        assert lines["precision"].startswith("bf16" if "gpu-fast" in name else "fp32")
        act = float(lines["activation memory / worker"].split()[0])
        assert 1.0 * batch < act < 2.5 * batch  # ~1.6 GiB per paper-crop volume (fp32), more under bf16 autocast
        ckpt = float(text.split("with checkpointing")[1].split()[0])
        assert ckpt < act
        wall = lines["wall"] if "wall" in lines else lines["wall time / worker / 1000 steps"]
        assert wall.startswith("unmeasured") or wall.endswith(("h", "min"))


def test_the_plan_counts_steps_from_the_corpus_and_times_them_from_a_benchmark(tiny_corpus, tmp_path) -> None:
    job = load_config(PAPER / "finetune-ga.yaml", [f"data.corpus={tiny_corpus}", "data.crop=[8, 32]",
                                                    "model.width=0.25", "scaling.gpus_per_worker=0",
                                                    "objective.label_fraction=0.5"])
    results = tmp_path / "results"
    results.mkdir()
    slug = dryrun.device_slug(gpu=False)
    row = {"label": "octssl b1", "status": "ok", "engine": "deepspeed", "precision": "fp32", "channels_last": False,
           "compile": False, "checkpointing": False, "batch": 1, "crop": [32, 128, 256], "volumes_per_s": 0.5}
    (results / f"step-{slug}.json").write_text(json.dumps(
        {"env": {"device": "this CPU", "finished_utc": "2026-01-01T00:00:00+00:00"}, "model": "fpn", "rows": [row]}))
    plan = dryrun.job_plan(job, results)
    volumes = plan["train_volumes"]
    assert 0 < volumes < 24 and plan["depth"].startswith("64 (the corpus grid 16x64x64)")
    assert plan["data"] == str(tiny_corpus)
    assert plan["steps_per_epoch"] == steps_per_epoch(volumes * 20, 1, 8)  # 20 crops per volume, batch 8
    assert plan["samples_per_epoch"] == plan["steps_per_epoch"] * 8
    assert plan["steps"] == 40 * plan["steps_per_epoch"] and plan["samples"] == plan["steps"] * 8
    flops = dryrun._flops("fpn", 1.0, (32, 128, 256)) / dryrun._flops("fpn", 0.25, (8, 64, 32))
    assert plan["volumes_per_s"] == pytest.approx(0.5 * flops)
    assert plan["seconds"] == pytest.approx(plan["steps"] * 8 / (0.5 * flops))
    assert plan["device"] == "CPU" and plan["measured_on"] == "this CPU" and "octssl b1" in plan["from"]
    gpu = dryrun.job_plan(job.model_copy(update={"scaling": job.scaling.model_copy(update={"gpus_per_worker": 1})}),
                          results)
    if not torch.cuda.is_available():
        assert gpu["wall"].startswith("unmeasured") and "seconds" not in gpu


def test_activation_memory_is_measured_and_agrees_with_a_real_forward() -> None:
    crop = (8, 64, 32)
    fake = training_activation_bytes("fpn", crop, 4, width=0.5)
    ckpt = training_activation_bytes("fpn", crop, 4, width=0.5, checkpointing=True)
    from octssl.models import build_model

    torch.manual_seed(0)
    model = build_model("fpn", width=0.5).train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # saved for backward, not activations
    real = saved_activation_bytes(model, torch.randn(4, 1, *crop)) - weights
    assert abs(fake["activations"] - real) < 0.15 * real  # what a real forward saves for the backward
    assert ckpt["activations"] < 0.75 * fake["activations"]


def _reduced(corpus: Path, storage: Path, name: str) -> list[str]:
    """A reduced size: crops of 12 x 32 (the SSIM window needs 11 B-scans), width 0.25, one step of batch 2."""
    return [f"data.corpus={corpus}", "data.crop=[12, 32]", "data.batch_size=2", "data.loader_workers=0",
            "data.crops_per_volume=1", "data.val_volumes=2", "model.width=0.25", "run.epochs=null",
            "run.max_steps=1", "run.eval_every=1", "run.ckpt_every=1", f"run.storage_path={storage}",
            f"run.name={name}", "scaling.gpus_per_worker=0", "scaling.cpus_per_worker=1"]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_one_real_step_of_every_profile_at_a_reduced_size_on_cpu(name: str, tiny_corpus, tmp_path) -> None:
    from octssl.train.launch import run_single_process

    if name == "sweep":
        sweep = load_sweep_config(PAPER / "sweep.yaml", [f"corpus={tiny_corpus}", "job.data.crop=[12, 32]",
                                                         "job.data.batch_size=2", "job.data.loader_workers=0",
                                                         "job.model.width=0.25", "resources.gpus_per_trial=0",
                                                         "resources.cpus_per_trial=1"])
        group = next(g for g in sweep.groups if g.cell.init == "scratch")
        job = trial_job(sweep, group, {"lr": 0.1, "weight_decay": 1e-4, "steps": 1}, "trial",
                        storage_path=str(tmp_path))
    else:
        job = load_config(PAPER / f"{name}.yaml", _reduced(tiny_corpus, tmp_path, name))
    summary = run_single_process(job)
    assert summary.steps == 1 and summary.final_loss is not None
    assert Path(job.run_dir if name == "sweep" else tmp_path / name, "final", "model.safetensors").is_file()


def test_a_crop_the_model_cannot_take_is_a_one_line_error() -> None:
    result = CliRunner().invoke(app, ["pretrain", "--config", str(PAPER / "pretrain-faf.yaml"), "--dry-run",
                                      "--set", "data.crop=[30, 256]"])
    assert result.exit_code == 2 and "does not fit fpn" in result.output and "Traceback" not in result.output


def test_a_dry_run_that_would_fail_exits_non_zero_and_says_where_the_run_goes(tiny_corpus: Path, tmp_path: Path) -> None:
    """Issue 26.7: missing shards were "data not available" inside a plan that exited 0; a taken run name
    was not checked, and the plan did not say where the run would be written."""
    base = ["pretrain", "--config", str(PAPER / "pretrain-faf.yaml"), "--dry-run", "--set", "data.crop=[8, 32]",
            "--set", "model.width=0.25", "--set", "scaling.gpus_per_worker=0", "--set", f"run.storage_path={tmp_path}",
            "--set", "run.name=first"]
    stream = CliRunner().invoke(app, [*base, "--set", "data.source=stream", "--set", f"data.shards={tmp_path / 'none'}"])
    assert stream.exit_code == 1, stream.output
    assert "this plan cannot run (1 problem(s))" in stream.output and str(tmp_path / "none") in stream.output.split(
        "cannot run")[-1]
    ready = CliRunner().invoke(app, [*base, "--set", f"data.corpus={tiny_corpus}"])
    assert ready.exit_code == 0, ready.output
    assert "this plan can run" in ready.output
    assert f"run written to                           {tmp_path / 'first'}" in ready.output
    (tmp_path / "first").mkdir()
    taken = CliRunner().invoke(app, [*base, "--set", f"data.corpus={tiny_corpus}"])
    assert taken.exit_code == 1 and f"{tmp_path / 'first'} already exists" in " ".join(taken.output.split())
    resumed = CliRunner().invoke(app, [*base, "--set", f"data.corpus={tiny_corpus}", "--resume"])
    assert resumed.exit_code == 0, resumed.output
