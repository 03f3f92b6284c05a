"""Checkpoints: DeepSpeed state + per-rank trainer state (step, data position, RNG), and weight export.

A checkpoint directory holds DeepSpeed's files under the tag ``state`` (model, optimiser, LR schedule;
ZeRO shards from every rank, merged by Ray Train) and ``trainer_rank{r}.json`` per rank. RNG states are
stored as base64 bytes in JSON: nothing here is ever unpickled except by DeepSpeed's own loader.
Exported weights are safetensors plus a ``model.json`` model card.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octssl.fsutil import atomic_write
from octssl.train.state import RunState

TAG = "state"


def rng_state() -> dict[str, Any]:
    """torch, numpy and Python RNG states as JSON-ready values."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_state(ckpt_dir: Path, rank: int, state: RunState) -> None:
    """Write this rank's run state and RNG states beside DeepSpeed's files (``trainer_rank{r}.json``)."""
    atomic_write(ckpt_dir / f"trainer_rank{rank}.json", json.dumps({**state.to_dict(), "rng": rng_state()}))


def load_state(ckpt_dir: Path, rank: int) -> RunState:
    """This rank's run state (its RNG restored); after a change of world size a new rank takes rank 0's
    position and keeps its own freshly seeded RNG."""
    path = ckpt_dir / f"trainer_rank{rank}.json"
    if not path.exists():
        path = ckpt_dir / "trainer_rank0.json"
    raw = json.loads(path.read_text())
    if path.name == f"trainer_rank{rank}.json":
        set_rng_state(raw["rng"])
    return RunState.from_dict(raw)


def export_weights(engine: Any, out_dir: Path, card: dict[str, Any]) -> Path | None:
    """Write ``model.safetensors`` + ``model.json`` into ``out_dir`` on rank 0; every rank must call
    (under ZeRO-3 the partitioned parameters are gathered collectively first)."""
    import deepspeed

    from octssl.models.transfer import save_weights

    module = engine.module
    stage3 = engine.zero_optimization_stage() == 3
    gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gather if stage3 else contextlib.nullcontext():
        if engine.global_rank != 0:
            return None
        path = save_weights(module, out_dir / "model.safetensors", {"card": card})
    meta = {"model": getattr(module, "name", type(module).__name__), "options": getattr(module, "options", {})}
    (out_dir / "model.json").write_text(json.dumps({**meta, **card}, indent=2, default=str))
    return path
