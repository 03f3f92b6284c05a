"""Resume never unpickles code: DeepSpeed's checkpoint files load ``weights_only`` with an allow-list of
DeepSpeed's own state classes, and a tampered file is refused naming it (real DeepSpeed on CPU, gloo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from octssl.errors import CheckpointError
from octssl.train import checkpoint as ckpt


def engine(stage: int, seed: int = 0):
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29571")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0, "steps_per_print": 10**9}
    built, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config,
                                          dist_init_required=False)
    return built


class RunsCode:
    """Unpickling this runs ``exec``: what a tampered checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_resume_loads_honest_checkpoints_and_refuses_code(tmp_path: Path, stage: int) -> None:
    trained = engine(stage)
    loss = trained(torch.randn(2, 4)).sum()
    trained.backward(loss)
    trained.step()
    trained.save_checkpoint(str(tmp_path / "ckpt"), tag=ckpt.TAG)
    fresh = engine(stage, seed=1)
    ckpt.load_checkpoint(fresh, tmp_path / "ckpt")  # every file DeepSpeed wrote passes the allow-list
    if stage < 3:
        for a, b in zip(trained.module.parameters(), fresh.module.parameters(), strict=True):
            torch.testing.assert_close(a, b)
    assert fresh.global_steps == trained.global_steps == 1
    marker = tmp_path / "pwned"
    for target in sorted((tmp_path / "ckpt" / ckpt.TAG).glob("*.pt")):
        state = torch.load(target, weights_only=False)  # the test's own file: trusted here
        torch.save({**state, "extra": RunsCode(marker)}, target)
        with pytest.raises(CheckpointError, match=f"{target}.*refused"):
            ckpt.load_checkpoint(engine(stage), tmp_path / "ckpt")
        assert not marker.exists(), "a tampered checkpoint ran code on resume"
        torch.save(state, target)


def test_checkpoint_dirs_the_run_never_registered_are_pruned(tmp_path: Path) -> None:
    """What a driver killed between a checkpoint's upload and its registration leaves: a checkpoint_* folder
    that Ray's checkpoint manager does not know, so never deletes. Resume prunes it, and only it."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    def result(name: str, step: int) -> _TrainingResultState:
        return _TrainingResultState(checkpoint_dir_name=name, metrics={"step": step})

    registered = ["checkpoint_2026-01-01_00-00-01.000001", "checkpoint_2026-01-01_00-00-02.000002"]
    stray = "checkpoint_2026-01-01_00-00-03.000003"
    for name in [*registered, stray]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_rank0.json").write_text("{}")
    snapshot = _CheckpointManagerState(
        checkpoint_results=[result(registered[0], 3), result(registered[1], 6)], checkpoint_report_indices=[0, 1],
        latest_checkpoint_result=result(registered[1], 6), pending_training_results=[], pending_validation_specs=[],
        current_report_index=2, validated_checkpoint_dir_names=[], timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[],
    )
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(snapshot.json())
    assert ckpt.prune_unregistered(tmp_path) == [tmp_path / stray]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*") if p.is_dir()) == registered
    (tmp_path / "checkpoint_manager_snapshot.json").unlink()  # killed before the first registration
    assert ckpt.prune_unregistered(tmp_path) == [tmp_path / name for name in registered]
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{garbage")
    (tmp_path / stray).mkdir()
    assert ckpt.prune_unregistered(tmp_path) == []  # an unreadable snapshot: touch nothing
