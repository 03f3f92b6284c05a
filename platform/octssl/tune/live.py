"""Live sweep progress: a rich table of cells (trials running / finished / failed, best pooled val Dice) on the
terminal (a plain line at a steady cadence when stderr is not one) and the ``octssl_sweep_trials`` gauge for
Prometheus, both fed by a Ray Tune callback."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ray.tune import Callback
from rich.live import Live
from rich.table import Table

from octssl.config.sweep import SweepConfig
from octssl.observe.metrics import SweepMetrics
from octssl.observe.progress import Ticker, console, interactive
from octssl.tune.results import METRIC, stopped_early

STATES = ("PENDING", "RUNNING", "TERMINATED", "ERROR")


class SweepProgress(Callback):
    """Counts trials per state and cell; renders them when ``enabled`` (a rich Live display)."""

    def __init__(self, config: SweepConfig, run: str, total: int, enabled: bool = True) -> None:
        self.config, self.total, self.enabled = config, total, enabled
        self.metrics = SweepMetrics(run)
        self.state: dict[str, str] = {}  # trial id -> state
        self.group_of: dict[str, str] = {}
        self.best: dict[str, float] = {}  # cell key -> best val dice so far
        self.stopped_early = 0
        self.live: Any = None
        self.ticker: Ticker | None = None

    # ---------------------------------------------------------------- display
    def start(self) -> None:
        self._publish()
        if self.enabled and not interactive():
            self.ticker = Ticker(self.line).start()
        elif self.enabled:

            self.live = Live(self.render(), console=console(), refresh_per_second=2, transient=False)
            self.live.start()

    def stop(self) -> None:
        if self.ticker is not None:
            self.ticker.stop()
            self.ticker = None
        if self.live is not None:
            self.live.update(self.render())
            self.live.stop()
            self.live = None

    def counts(self) -> dict[str, int]:
        seen = Counter(self.state.values())
        return {"PENDING": self.total - sum(seen.values()) + seen.get("PENDING", 0), "RUNNING": seen["RUNNING"],
                "TERMINATED": seen["TERMINATED"], "ERROR": seen["ERROR"]}

    def title(self) -> str:
        counts = self.counts()
        return (f"sweep: {counts['TERMINATED'] + counts['ERROR']}/{self.total} trials finished, "
                f"{counts['RUNNING']} running, {counts['ERROR']} failed, {self.stopped_early} stopped early by ASHA")

    def line(self) -> str:
        """The sweep's state as one plain line (non-terminal output)."""
        best = ", ".join(f"{cell} {dice:.3f}" for cell, dice in sorted(self.best.items()))
        return self.title() + (f"; best pooled val Dice: {best}" if best else "")

    def render(self) -> Any:

        per_cell: dict[str, Counter] = {}
        for trial_id, state in self.state.items():
            cell_key = self.group_of[trial_id].rsplit("-s", 1)[0]
            per_cell.setdefault(cell_key, Counter())[state] += 1
        per_trial = self.config.search.num_samples * len(self.config.seeds)
        table = Table(title=self.title(), title_justify="left")
        for column in ("cell", "finished", "running", "failed", "best pooled val Dice"):
            table.add_column(column, justify="left" if column == "cell" else "right")
        for cell in self.config.cells:
            c = per_cell.get(cell.key, Counter())
            best = self.best.get(cell.key)
            table.add_row(cell.key, f"{c['TERMINATED'] + c['ERROR']}/{per_trial}", str(c["RUNNING"]),
                          str(c["ERROR"]) if c["ERROR"] else "", f"{best:.3f}" if best is not None else "")
        return table

    def _publish(self) -> None:
        self.metrics.update(self.counts())
        if self.live is not None:
            self.live.update(self.render())

    def restored(self, results: Any) -> None:
        """Count the trials a resumed sweep keeps (Tune starts none of them again, so no hook sees them)."""
        for result in results:
            trial_id = (result.metrics or {}).get("trial_id")
            if trial_id is None or result.config is None:
                continue
            self.state[trial_id] = "ERROR" if result.error is not None else "TERMINATED"
            self.group_of[trial_id] = result.config["group"]
        self._publish()

    # ---------------------------------------------------------------- Tune callback hooks
    def _set(self, trial: Any, state: str) -> None:
        self.state[trial.trial_id] = state
        self.group_of[trial.trial_id] = trial.config["group"]
        self._publish()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._set(trial, "RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        dice = result.get(METRIC)
        cell = trial.config["group"].rsplit("-s", 1)[0]
        if dice is not None and dice == dice and dice > self.best.get(cell, -1.0):
            self.best[cell] = float(dice)
        self._publish()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if stopped_early(last.get("step", trial.config["steps"]), trial.config["steps"]):
            self.stopped_early += 1
        self._set(trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._set(trial, "ERROR")
