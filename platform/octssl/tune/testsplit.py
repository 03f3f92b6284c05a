"""The test split of a sweep: each group's chosen weights evaluated per test volume (Ray tasks sized like
trials), and the arrays behind the report's figures (segmentations, pretrained reconstructions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from octssl.cluster.local import root_cause
from octssl.config.sweep import SCRATCH, SweepConfig
from octssl.corpus.store import Corpus
from octssl.observe.progress import stage
from octssl.vocab import ENFACE_IMAGES, THRESHOLD, VOLUME


def evaluate_chosen(config: SweepConfig, chosen: dict[str, dict[str, Any]], facts: dict[str, Any],
                    progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, str]]:
    """Evaluate each group's chosen weights on the test split, as Ray tasks sized like trials."""
    import ray

    from octssl.tune.evaluate import evaluate_segmentation

    res = config.resources
    task_fn = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial)(evaluate_segmentation)
    pending = {}
    for group in config.groups:
        if group.key not in chosen:
            continue
        show = facts["figure"][group.cell.task] if group.seed == config.seeds[0] else []
        ref = task_fn.remote(config.corpus, chosen[group.key]["best_weights"], group.cell.task,  # type: ignore[call-arg]
                             facts["test"][group.cell.task], threshold=chosen[group.key][THRESHOLD],
                             show=show, threads=int(res.cpus_per_trial),
                             gpu=res.gpus_per_trial > 0)
        pending[ref] = group
    rows: list[dict[str, Any]] = []
    previews: dict[str, Any] = {}
    errors: dict[str, str] = {}
    with stage("test split: chosen trials evaluated", len(pending), progress) as advance:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(ref)
            try:
                volume_rows, preview = ray.get(ref)
            except Exception as err:  # one group's failure is recorded, the others still count
                errors[group.key] = root_cause(err)
                advance()
                continue
            cell = group.cell
            for row in volume_rows:
                rows.append({"task": cell.task, "fraction": cell.fraction, "init": cell.init, "model": cell.model,
                             "seed": group.seed, "trial": chosen[group.key]["trial"],
                             THRESHOLD: chosen[group.key][THRESHOLD], **row})
            if preview:
                previews[cell.key] = preview
            advance()
    rows.sort(key=lambda r: (r["task"], r["fraction"], r["init"], r["model"], r["seed"], r["id"]))
    return rows, previews, errors


def figure_data(config: SweepConfig, sweep_dir: Path, previews: dict[str, Any], facts: dict[str, Any]) -> None:
    """figures/segmentations.npz (test predictions) and figures/reconstructions.npz (pretrained inits)."""
    import ray

    from octssl.tune.evaluate import reconstruct

    out = sweep_dir / "figures"
    out.mkdir(exist_ok=True)
    np.savez_compressed(out / "segmentations.npz",
                        **{f"{cell}|{k}": v for cell, arrays in previews.items() for k, v in arrays.items()})
    res = config.resources
    task_fn = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial)(reconstruct)

    corpus = Corpus.open(config.corpus)
    refs = {}
    for init, path in config.inits.items():
        if path == SCRATCH:
            continue
        from octssl.models.transfer import read_metadata

        target = ((read_metadata(path).get("card") or {}).get("objective") or {}).get("target")
        if target not in ENFACE_IMAGES:
            continue  # not a reconstruction checkpoint: nothing to show
        ids = corpus.ids(split="val", require=(VOLUME, target))[: config.figure_volumes]
        if ids:
            refs[init] = (task_fn.remote(config.corpus, path, ids, threads=int(res.cpus_per_trial),  # type: ignore[call-arg]
                                         gpu=res.gpus_per_trial > 0), ids)
    arrays = {}
    for init, (ref, ids) in refs.items():
        for key, value in ray.get(ref).items():
            arrays[f"{init}|{key}"] = value
        arrays[f"{init}|ids"] = np.array(ids)
    np.savez_compressed(out / "reconstructions.npz", **arrays)  # type: ignore[arg-type]


