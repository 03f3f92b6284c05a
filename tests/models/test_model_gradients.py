"""Gradients reach every parameter; checkpointing keeps results and saves memory; BatchNorm stays fp32."""

from __future__ import annotations

import pytest
import torch

from octssl.models import build_model
from octssl.models.blocks import BatchNorm3d
from octssl.models.profile import count_flops, saved_activation_bytes

SMALL = {
    "fpn": (2, 1, 4, 64, 32),
    "resensnet": (2, 1, 4, 128, 16),
    "lachinov": (2, 1, 3, 16, 16),
    "ipn": (2, 1, 3, 32, 8),
    "unet2d": (2, 1, 4, 8, 32),
}


def train_step(model: torch.nn.Module, volume: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # A weighted sum, not a plain sum: the sum of a BatchNorm output has zero gradient by construction.
    logits = model(volume)
    (logits * weights).sum().backward()
    return logits.detach()


@pytest.mark.parametrize("name", list(SMALL))
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, width=0.25)
    volume = torch.randn(SMALL[name])
    b, _, bscans, _, ascans = SMALL[name]
    train_step(model, volume, torch.randn(b, 1, bscans, ascans))
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"{name}: parameters without gradient: {dead}"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_checkpointing_same_results_less_saved_memory(name: str) -> None:
    torch.manual_seed(1)
    plain = build_model(name, width=0.25)
    checkpointed = build_model(name, width=0.25, checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    volume = torch.randn(SMALL[name])
    b, _, bscans, _, ascans = SMALL[name]
    weights = torch.randn(b, 1, bscans, ascans)

    out_plain = train_step(plain, volume, weights)
    out_ckpt = train_step(checkpointed, volume, weights)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=1e-5, atol=1e-5)
    for (key, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {key}")
    # Recomputation in backward must not update BatchNorm running statistics a second time.
    for (key, b1), b2 in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        torch.testing.assert_close(b2, b1, msg=f"buffer {key}")

    ratio = saved_activation_bytes(checkpointed, volume) / saved_activation_bytes(plain, volume)
    print(f"{name}: saved-for-backward bytes with/without checkpointing = {ratio:.3f}")
    assert ratio < 0.6


def test_checkpointing_is_off_in_eval_and_without_grad(monkeypatch) -> None:
    model = build_model("fpn", width=0.25, checkpointing=True).eval()
    volume = torch.randn(SMALL["fpn"])

    def refuse(*args, **kwargs):
        raise AssertionError("activation checkpointing ran without autograd")

    import octssl.models.blocks as blocks

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", refuse)
    if hasattr(blocks, "checkpoint"):
        monkeypatch.setattr(blocks, "checkpoint", refuse)
    with torch.no_grad():
        assert model(volume).shape[1] == 1


def test_batchnorm_runs_in_fp32_under_bf16_autocast() -> None:
    # Tiny on purpose: this CPU has no bf16 units (bf16 convs are ~100x slower than fp32 here).
    torch.manual_seed(0)
    model = build_model("fpn", width=1 / 16)
    outputs: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.dtype))
             for m in model.modules() if isinstance(m, BatchNorm3d)]
    conv_dtypes: list[torch.dtype] = []
    hooks.append(model.encoder[0][0].layers[0][0].register_forward_hook(
        lambda _m, _i, out: conv_dtypes.append(out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 1, 4, 64, 16))
    for hook in hooks:
        hook.remove()
    assert conv_dtypes == [torch.bfloat16], "autocast was not active: the test would prove nothing"
    assert outputs and set(outputs) == {torch.float32}
    stats = [buf.dtype for m in model.modules() if isinstance(m, BatchNorm3d) for buf in (m.running_mean, m.running_var)]
    assert set(stats) == {torch.float32}
    assert logits.shape == (2, 1, 4, 16)


def test_fpn_flops_match_the_paper() -> None:
    # The paper: "One fwd+bwd is 228 GFLOP per volume at this crop" (docs/models.md) (32 B-scans x 128 depth x 256 A-scans).
    flops = count_flops("fpn", (32, 128, 256))
    assert flops["forward_backward"] / 1e9 == pytest.approx(228, abs=0.5)
    assert 2.5 < flops["forward_backward"] / flops["forward"] < 3.0  # backward ~ 2x forward
