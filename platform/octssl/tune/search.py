"""One Tune experiment for the whole sweep, with a separate search and a separate ASHA per group.

Running every group (cell x seed) in one ``Tuner`` keeps the trial actors alive from one trial to the
next (``reuse_actors``: no ~7 s of imports per trial) and lets the cells share the cluster. The search
and the early stopping must still stay inside a group: a trial at 5 % labels must never be compared
with one at 100 %. :class:`GroupSearch` therefore holds one sampler per group (Optuna's TPE, or plain
random sampling) and :class:`GroupASHA` one ASHA scheduler per group.

The samplers of the inits of one (task, fraction, model, seed) share their random seed, so scratch and
pretrained trials try the same hyperparameters first: a paired comparison.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from octssl.config.sweep import Group, SearchSection
from octssl.errors import ConfigError
from octssl.vocab import PRIMARY_METRIC, SEGMENTATION

METRIC, MODE, TIME_ATTR = PRIMARY_METRIC[SEGMENTATION], "max", "step"  # ASHA compares trials on it


def search_space(search: SearchSection) -> dict[str, Any]:
    return {
        "lr": tune.loguniform(*search.lr),
        "weight_decay": tune.loguniform(*search.weight_decay),
        "steps": tune.choice(list(search.steps)),
    }


def sampler_seed(group: Group) -> int:
    """Equal for the inits of one (task, fraction, model, seed): paired hyperparameters across inits."""
    cell = group.cell
    return zlib.crc32(f"{cell.task}|{cell.fraction:g}|{cell.model}|{group.seed}".encode())


class RandomSearch(Searcher):
    """Independent draws from the space (seeded), after the given points."""

    def __init__(self, space: dict[str, Any], seed: int, points: list[dict[str, Any]]) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self.space, self.points = space, list(points)
        self.rng = np.random.default_rng(seed)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.points:
            return dict(self.points.pop(0))
        out = {key: domain.sample(random_state=self.rng) for key, domain in self.space.items()}
        return {k: v.item() if hasattr(v, "item") else v for k, v in out.items()}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


def _optuna() -> Any:
    """The optuna module, with Tune's wrapper importable; ConfigError when not (never a silent fallback to
    random search under the name 'optuna')."""
    try:
        import optuna
        from ray.tune.search.optuna import OptunaSearch  # noqa: F401 - what make_sampler builds
    except ImportError as err:
        raise ConfigError(f"search.algorithm is 'optuna' but Optuna cannot be imported ({err}); install it "
                          "(pip install optuna) or set search.algorithm=random") from err
    return optuna


def sampler_name(search: SearchSection) -> str:
    """The sampler every group gets, as recorded in ``summary.json``; ConfigError when it is unavailable."""
    if search.algorithm == "optuna":
        return f"optuna {_optuna().__version__} TPESampler"  # Tune's OptunaSearch default sampler
    return "random"


def make_sampler(search: SearchSection, group: Group) -> Searcher:
    space = search_space(search)
    points = [p.model_dump() for p in search.points]
    if search.algorithm == "optuna":
        optuna = _optuna()
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return OptunaSearch(OptunaSearch.convert_search_space(space), metric=METRIC, mode=MODE,
                            seed=sampler_seed(group), points_to_evaluate=points or None)
    return RandomSearch(space, sampler_seed(group), points)


class GroupSearch(Searcher):
    """``num_samples`` suggestions per group, groups in order; each routed to its group's sampler."""

    def __init__(self, groups: list[Group], num_samples: int, make: Callable[[Group], Searcher]) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self.groups = groups
        self.samplers = {g.key: make(g) for g in groups}
        self.left = {g.key: num_samples for g in groups}
        self.group_of: dict[str, str] = {}
        self.count = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # metric, mode and space are fixed per group

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        for group in self.groups:
            key = group.key
            if self.left[key] <= 0:
                continue
            params = self.samplers[key].suggest(trial_id)
            if params is None or params == Searcher.FINISHED:
                self.left[key] = 0
                continue
            self.left[key] -= 1
            self.count += 1
            self.group_of[trial_id] = key
            return {"group": key, "trial": f"t{self.count:04d}-{key}", "lr": float(params["lr"]),
                    "weight_decay": float(params["weight_decay"]), "steps": int(params["steps"])}
        return Searcher.FINISHED  # type: ignore[return-value]  # Ray's sentinel string ends the search

    def save(self, checkpoint_path: str) -> None:
        pass  # a sweep is never resumed in place (see octssl.tune.sweep), so there is no state to keep

    def restore(self, checkpoint_path: str) -> None:
        pass

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.group_of:
            self.samplers[self.group_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.group_of.get(trial_id)
        if key is not None:
            self.samplers[key].on_trial_complete(trial_id, result=result, error=error or not result
                                                  or METRIC not in result)


class GroupASHA(FIFOScheduler):
    """Asynchronous successive halving on the val Dice, separately inside each group."""

    def __init__(self, search: SearchSection) -> None:
        super().__init__()
        self.max_t = max(search.steps)
        self.grace = min(search.grace_steps, self.max_t)
        self.reduction_factor = search.reduction_factor
        self.by_group: dict[str, AsyncHyperBandScheduler] = {}
        self.stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def _of(self, trial: Any) -> AsyncHyperBandScheduler:
        key = trial.config["group"]
        if key not in self.by_group:
            self.by_group[key] = AsyncHyperBandScheduler(
                time_attr=TIME_ATTR, metric=METRIC, mode=MODE, max_t=self.max_t, grace_period=self.grace,
                reduction_factor=self.reduction_factor,
            )
        return self.by_group[key]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = self._of(trial).on_trial_result(tune_controller, trial, result)
        # A trial that reaches its own last step finishes by itself; STOP is kept for real early stops.
        if action == TrialScheduler.STOP and result.get(TIME_ATTR, 0) < trial.config["steps"]:
            self.stopped += 1
            return action
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def debug_string(self) -> str:
        return f"GroupASHA: {len(self.by_group)} groups, {self.stopped} trials stopped early"
