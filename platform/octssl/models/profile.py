"""Model cost measurements: FLOPs per volume (counted on the meta device) and bytes saved for backward."""

from __future__ import annotations

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
