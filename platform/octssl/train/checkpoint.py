"""Checkpoints: DeepSpeed state + per-rank trainer state (step, data position, RNG), and weight export.

A checkpoint directory holds DeepSpeed's files under the tag ``state`` (model, optimiser, LR schedule;
ZeRO shards from every rank, merged by Ray Train) and ``trainer_rank{r}.json`` per rank. RNG states are
stored as base64 bytes in JSON. DeepSpeed's own files are pickles: on resume they are loaded
``weights_only`` (tensors, plain containers and the three DeepSpeed state classes of ``SAFE_GLOBALS``), so a
tampered checkpoint directory is refused instead of running code. Exported weights are safetensors plus a
``model.json`` model card.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octssl.errors import CheckpointError
from octssl.storage.files import atomic_write
from octssl.storage.location import Location
from octssl.train.state import RunState

TAG = "state"
#: What DeepSpeed 0.19 pickles besides tensors and plain containers (ZeRO stages 0-3, SGD/AdamW, loss scaling).
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def load_checkpoint(engine: Any, ckpt_dir: Path) -> None:
    """``engine.load_checkpoint(ckpt_dir, tag=TAG)`` with every file unpickled ``weights_only`` under the
    SAFE_GLOBALS allow-list; CheckpointError naming the file when one holds anything else (code to run)."""
    loader = engine.checkpoint_engine
    allowed = [_resolve(name) for name in SAFE_GLOBALS]

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                why = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), str(err)[:200])
                raise CheckpointError(f"{path}: refused: holds more than tensors and DeepSpeed's state ({why}); "
                                      "the checkpoint may have been tampered with") from None
            except (RuntimeError, EOFError, OSError) as err:
                raise CheckpointError(f"{path}: unreadable checkpoint file ({err})") from None

    loader.load = load  # shadows the class's torch.load(weights_only=False) for this load only
    try:
        engine.load_checkpoint(str(ckpt_dir), tag=TAG)
    finally:
        del loader.load


def prune_unregistered(run_dir: Path) -> list[Path]:
    """Delete the ``checkpoint_*`` folders of RUN_DIR that Ray's checkpoint manager never registered (a
    driver killed between a checkpoint's upload and its registration leaves one, which Ray then never
    deletes); returns them. Call it only while no run writes to RUN_DIR (before resuming). An unreadable
    manager snapshot leaves everything in place."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        state = json.loads(snapshot.read_text())
    except FileNotFoundError:
        state = {}
    except (OSError, ValueError):
        return []
    results = [*state.get("checkpoint_results", []), *state.get("pending_training_results", []),
               state.get("latest_checkpoint_result") or {}]
    known = {result.get("checkpoint_dir_name") for result in results}
    stray = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and p.name not in known)
    for path in stray:
        shutil.rmtree(path, ignore_errors=True)
    return stray


def _resolve(name: str) -> Any:

    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


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


def export_weights(engine: Any, out_dir: Path, card: dict[str, Any]) -> Path | Location | None:
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
