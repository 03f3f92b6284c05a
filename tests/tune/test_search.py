"""Sweep config, cells and the per-group search and early stopping (no Ray cluster needed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from octssl.config.sweep import load_sweep_config, parse_sweep_config, trial_job
from octssl.errors import ConfigError
from octssl.tune.search import METRIC, GroupASHA, GroupSearch, make_sampler, sampler_name

REPO = Path(__file__).resolve().parents[2]


def test_jobs_sweep_yaml_loads_with_overrides() -> None:
    config = load_sweep_config(REPO / "jobs" / "sweep.yaml", ["fractions=[0.5, 0.1]", "seeds=[3]"])
    assert config.kind == "sweep" and config.fractions == [0.1, 0.5] and config.seeds == [3]
    assert {c.task for c in config.cells} == set(config.tasks)
    assert len(config.groups) == len(config.cells) == len(config.tasks) * 2 * len(config.inits) * len(config.models)


def test_trial_job_takes_the_cell_and_the_sampled_hyperparameters(sweep_raw) -> None:
    config = parse_sweep_config(sweep_raw(inits={"scratch": "scratch", "ssl": "w.safetensors"}, seeds=[0, 7]))
    group = next(g for g in config.groups if g.cell.init == "ssl" and g.seed == 7)
    job = trial_job(config, group, {"lr": 0.02, "weight_decay": 3e-4, "steps": 6}, "t1", storage_path="/x")
    assert (job.objective.kind, job.objective.target, job.objective.label_fraction) == ("segmentation", "ga", 1.0)
    assert (job.optim.lr, job.optim.weight_decay, job.run.max_steps, job.run.seed) == (0.02, 3e-4, 6, 7)
    assert job.run.init == "w.safetensors" and job.run_dir == "/x/t1" and job.scaling.workers == 1
    assert job.run.ckpt_every == job.run.eval_every == 3  # every evaluation is reported to Tune
    assert job.model.width == 0.25 and job.data.crop == (16, 64)


def test_task_overrides_reach_only_their_task(sweep_raw) -> None:
    config = parse_sweep_config(sweep_raw(tasks=["ga", "rpd"], task_overrides={"rpd": ["data.crops_per_volume=5"]}))
    params = {"lr": 0.01, "weight_decay": 0.0, "steps": 6}
    crops = {g.cell.task: trial_job(config, g, params, "t").data.crops_per_volume for g in config.groups}
    assert crops == {"ga": 2, "rpd": 5}


def test_task_fractions_replace_the_fractions_of_their_task(sweep_raw) -> None:
    config = parse_sweep_config(sweep_raw(tasks=["ga", "rpd"], fractions=[1.0, 0.05],
                                          task_fractions={"rpd": [0.2, 1.0]}))
    assert [(c.task, c.fraction) for c in config.cells] == [("ga", 0.05), ("ga", 1.0), ("rpd", 0.2), ("rpd", 1.0)]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"job": {"objective": {"target": "rpd"}}}, "job.objective.target is set by the sweep per trial: use 'tasks'"),
        ({"job": {"data": {"crop": [16, 40]}}}, None),  # a crop that fits no model is caught by preflight, not here
        ({"job": {"optim": {"nesterov": True}}}, "unknown key 'optim.nesterov'"),
        ({"search": {"steps": [6], "points": [{"lr": 0.01, "weight_decay": 0.0, "steps": 9}]}}, "steps=9 is not one of"),
        ({"task_overrides": {"cnv": []}}, "unknown task(s) ['cnv']"),
        ({"task_fractions": {"rpd": [0.2, 2.0]}}, "label fractions must lie in (0, 1]; got [2.0]"),
        ({"inits": {"ssl/faf": "x"}}, "must be a plain word"),
    ],
)
def test_config_errors_name_the_key(sweep_raw, change, reason) -> None:
    if reason is None:
        parse_sweep_config(sweep_raw(**change))
        return
    with pytest.raises(ConfigError) as err:
        parse_sweep_config(sweep_raw(**change))
    assert reason in str(err.value)


def test_group_search_routes_each_group_to_its_own_sampler(sweep_raw) -> None:
    raw = sweep_raw(fractions=[0.5, 1.0], inits={"scratch": "scratch", "ssl": "w"}, seeds=[0, 1])
    raw["search"] = {"num_samples": 3, "steps": [4, 8], "lr": [1e-4, 1e-1], "algorithm": "random"}
    config = parse_sweep_config(raw)
    search = GroupSearch(config.groups, 3, lambda g: make_sampler(config.search, g))
    suggestions = []
    while (s := search.suggest(f"id{len(suggestions)}")) != Searcher.FINISHED:
        suggestions.append(s)
    assert len(suggestions) == 3 * len(config.groups) == 24
    assert len({s["trial"] for s in suggestions}) == 24  # unique run names
    for s in suggestions:
        assert 1e-4 <= s["lr"] <= 1e-1 and s["steps"] in (4, 8)
    by_group = {}
    for s in suggestions:
        by_group.setdefault(s["group"], []).append((s["lr"], s["weight_decay"], s["steps"]))
    # scratch and ssl try the same hyperparameters (paired); other fractions and seeds draw others
    assert by_group["ga-f0.5-scratch-fpn-s0"] == by_group["ga-f0.5-ssl-fpn-s0"]
    assert by_group["ga-f0.5-scratch-fpn-s0"] != by_group["ga-f0.5-scratch-fpn-s1"]
    assert by_group["ga-f0.5-scratch-fpn-s0"] != by_group["ga-f1-scratch-fpn-s0"]


def test_optuna_sampler_starts_from_the_given_points(sweep_raw) -> None:
    point = {"lr": 0.004, "weight_decay": 1e-4, "steps": 6}
    config = parse_sweep_config(sweep_raw(search={"num_samples": 2, "steps": [6], "points": [point]}))
    search = GroupSearch(config.groups, 2, lambda g: make_sampler(config.search, g))
    first, second = search.suggest("a"), search.suggest("b")
    assert (first["lr"], first["weight_decay"], first["steps"]) == (0.004, 1e-4, 6)
    assert second["lr"] != 0.004 and 1e-3 <= second["lr"] <= 3e-2
    search.on_trial_complete("a", {METRIC: 0.5, "step": 6})
    search.on_trial_complete("b", None, error=True)  # a failed trial is told to Optuna without a value
    assert search.suggest("c") == Searcher.FINISHED


def test_asha_compares_trials_only_within_their_group(sweep_raw) -> None:
    config = parse_sweep_config(sweep_raw(search={"num_samples": 4, "steps": [12], "grace_steps": 3,
                                                   "reduction_factor": 2}))
    asha = GroupASHA(config.search)

    def trial(name: str, group: str) -> SimpleNamespace:
        return SimpleNamespace(trial_id=name, config={"group": group, "steps": 12})

    good, bad, other = trial("good", "g1"), trial("bad", "g1"), trial("other", "g2")
    for t in (good, bad, other):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"step": 3, METRIC: 0.8}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, bad, {"step": 3, METRIC: 0.1}) == TrialScheduler.STOP
    # the same poor Dice in another group (e.g. another label fraction) is not judged against g1
    assert asha.on_trial_result(None, other, {"step": 3, METRIC: 0.1}) == TrialScheduler.CONTINUE
    # reaching its own last step is a normal end, not an early stop
    assert asha.on_trial_result(None, good, {"step": 12, METRIC: 0.9}) == TrialScheduler.CONTINUE
    assert asha.stopped == 1


def test_the_sampler_used_is_named_and_a_missing_optuna_fails(sweep_raw, monkeypatch) -> None:
    """No silent fallback to random search while the results say 'optuna'."""
    import sys

    from ray.tune.search.optuna import OptunaSearch

    config = parse_sweep_config(sweep_raw(search={"algorithm": "optuna"}))
    assert isinstance(make_sampler(config.search, config.groups[0]), OptunaSearch)
    assert sampler_name(config.search).startswith("optuna ") and sampler_name(config.search).endswith("TPESampler")
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    with pytest.raises(ConfigError, match="search.algorithm is 'optuna' but Optuna cannot be imported"):
        make_sampler(config.search, config.groups[0])
    with pytest.raises(ConfigError, match="search.algorithm=random"):
        sampler_name(config.search)
    random = parse_sweep_config(sweep_raw(search={"algorithm": "random"}))
    assert sampler_name(random.search) == "random"
