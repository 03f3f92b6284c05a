"""A sweep's bundles: for each task, the chosen trial of its best cell exported with the test metrics the
sweep measured on that trial at the threshold it chose on val (:func:`octssl.apply.metrics.pooled`).

The sweep's summary is read here (tune owns it); :func:`octssl.apply.bundle.export_model` gets the chosen
trial's run directory and a :class:`~octssl.apply.bundle.SweepOrigin`, and opens no corpus.
"""

from __future__ import annotations

from pathlib import Path

from octssl.apply.bundle import SplitMetrics, SweepOrigin, export_model
from octssl.errors import ModelError
from octssl.storage.location import Location
from octssl.tune.summary import SweepSummary, read_sweep_summary


def is_sweep_dir(source: str | Path | Location) -> bool:
    """Whether ``source`` is a sweep directory (a summary.json beside trials/), local or on an object store."""
    where = Location.parse(source)
    return (where / "summary.json").exists() and (where / "trials").is_dir()


def sweep_origin(summary: SweepSummary, task: str, shown: str) -> SweepOrigin:
    """The cell of ``task`` whose chosen trial has the best pooled val Dice, as a :class:`SweepOrigin`."""
    chosen = [(c, c.best_config) for c in summary.cells if c.task == task and c.best_config is not None]
    if not chosen:
        raise ModelError(f"{shown}: the sweep has no finished cell for task {task!r}")
    cell, best = max(chosen, key=lambda pair: pair[1].val_dice_pooled)
    # the bundle's metrics.test is the trial's own test split (its ``trial`` kept beside the numbers)
    test = SplitMetrics.model_validate(cell.best_test.model_dump()) if cell.best_test else None
    return SweepOrigin(sweep=shown, trial=best.trial, threshold=best.threshold,
                       cell={"task": cell.task, "fraction": cell.fraction, "init": cell.init, "model": cell.model},
                       test=test)


def export_sweep(sweep_dir: str | Path | Location, task: str, out: str | Path | Location, *, overwrite: bool = False,
                 summary: SweepSummary | None = None, named: str | None = None) -> Path | Location:
    """The bundle of ``task`` from a sweep directory (a folder or URL): its best cell's chosen trial.
    ``summary``: the sweep's summary when summary.json is not written yet (the sweep itself, at its end);
    ``named``: what provenance calls the sweep directory."""
    where = Location.parse(sweep_dir)
    shown = named or str(where if where.remote else where.local.resolve())
    if summary is None:
        summary = read_sweep_summary((where / "summary.json").read_bytes(), f"{shown}/summary.json")
    origin = sweep_origin(summary, task, shown)
    return export_model(where / "trials" / origin.trial, task, out, overwrite=overwrite, origin=origin,
                        named=f"{shown}/trials/{origin.trial}")


def write_sweep_bundles(sweep_dir: Path, summary: SweepSummary, named: str | None = None) -> dict[str, str]:
    """One bundle per task of ``summary`` (the sweep's, before summary.json is written) for its best cell,
    under ``SWEEP_DIR/bundles/<task>``; a task whose bundle cannot be made is given as ``error: <reason>``
    (the sweep's results stand without it). ``named``: what provenance calls the sweep directory."""
    made = {}
    for task in summary.tasks:
        try:
            made[task] = str(export_sweep(sweep_dir, task, sweep_dir / "bundles" / task, overwrite=True,
                                          summary=summary, named=named))
        except ModelError as err:
            made[task] = f"error: {err}"
    return made
