"""Model cost measurements: FLOPs per volume, bytes saved for backward, a training step's activation memory."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from octssl.models.registry import build_model


def count_flops(name: str, crop: tuple[int, int, int], **options: object) -> dict[str, float]:
    """FLOPs of one forward and one forward+backward for a single (nB, D, W) volume, no memory or compute used.

    Counted by torch's FlopCounterMode: convolutions and matrix products, 2 FLOPs per multiply-add;
    norms, activations, pooling and interpolation are not counted (they are memory-bound and small in FLOPs).
    """
    with torch.device("meta"):
        model = build_model(name, **options)  # type: ignore[arg-type]
        volume = torch.empty(1, model.in_channels, *crop)
    forward = FlopCounterMode(display=False)
    with forward, torch.no_grad():
        model(volume)
    both = FlopCounterMode(display=False)
    with both:
        logits = model(volume)
        (logits * torch.ones_like(logits)).sum().backward()
    return {"forward": float(forward.get_total_flops()), "forward_backward": float(both.get_total_flops())}


def saved_activation_bytes(model: torch.nn.Module, volume: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during one forward of `model` on `volume`.

    Counted with torch.autograd.graph.saved_tensors_hooks; tensors sharing storage count once. Under
    non-reentrant checkpointing this includes each checkpointed stage's inputs (checkpoint saves them
    outside its own hooks) but not the activations it will recompute.
    """
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        seen[key] = max(seen.get(key, 0), tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(volume)
    return sum(seen.values())


def training_activation_bytes(name: str, crop: tuple[int, int, int], batch: int = 1, *,
                              autocast_dtype: torch.dtype | None = None, **options: object) -> dict[str, int]:
    """Peak bytes of one training step on a batch of (nB, D, W) volumes, measured without using memory.

    One forward + backward of the model runs on tensors without storage under torch's ``MemTracker``,
    which follows every tensor's lifetime and reports the peak by category: on the meta device in fp32;
    under ``FakeTensorMode`` with ``torch.autocast`` for half precision (autocast skips meta tensors), on
    CUDA when a GPU is visible, else with the CPU's autocast op lists. ``activations`` is what the step
    holds at that peak beyond parameters and gradients: saved activations plus temporaries (with
    ``checkpointing=True`` in ``options``, the stage inputs plus one recomputed stage). Tensors without
    storage cost the same at any batch, so the batch is measured as given, not extrapolated.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    device = "meta" if autocast_dtype is None else "cuda" if torch.cuda.is_available() else "cpu"
    with FakeTensorMode() if device != "meta" else nullcontext(), torch.device(device):
        model = build_model(name, **options).train()  # type: ignore[arg-type]
        volume = torch.randn(batch, model.in_channels, *crop)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            with torch.autocast(device, dtype=autocast_dtype) if device != "meta" else nullcontext():
                logits = model(volume)
            logits.float().mean().backward()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    by_kind = {str(kind).rsplit(".", 1)[-1]: int(size) for kind, size in peak.items()}
    return {"activations": by_kind.get("ACT", 0) + by_kind.get("TEMP", 0), "peak_total": by_kind["Total"]}
