"""Train-step benchmark: the FPN at the paper's crop, the paper's setup against octssl's tuned path, one process.

    python benchmarks/bench_step.py                     # the current device, its default sizes
    python benchmarks/bench_step.py --device cpu --batch 1 --repeats 2

Rows, each with and without activation checkpointing (``ckpt``):
(a) ``paper``: fp32, default layout, plain PyTorch, SGD (lr 0.1, momentum 0.9, wd 1e-4), batch 8 on GPU
    (cuDNN benchmark on, as the reference GPU measurement had it: benchmarks/README.md); the baseline every ratio refers to.
(b) ``octssl``: what the platform's loop runs on this device: a DeepSpeed ZeRO-1 engine from
    ``octssl.train.engine.build_engine`` with the precision ``auto`` resolves to (GPU: bf16 through
    DeepSpeed's torch_autocast, channels_last_3d inputs, contiguous parameters; CPU: fp32), the same SGD.
    On a CPU with native bf16 also ``octssl bf16`` (the same engine with ``deepspeed.precision=bf16``).
    On GPU also ``octssl+compile`` (``engine.compile()``), the eager path at doubling batches up to
    ``--max-batch`` (the largest that fits), and the compiled one at the best of those batches if compiling
    helped at the base batch.
Policy probes (plain PyTorch, ckpt off): every precision x layout pair, so that the fastest pair can be
checked against what ``resolve_precision("auto")`` picks for this device.

Per row: seconds per step (median, min, max over repeats after warm-up, device synchronised), volumes/s,
peak memory, ratio to (a) and achieved model TFLOP/s (fwd+bwd FLOPs from ``octssl.models.profile``,
recomputation under checkpointing not counted). A configuration that fails (e.g. out of memory) stays in
the table as ``failed`` with its error; one not run as ``skipped`` with the reason: half precision on a
CPU without native bf16 (emulated there, ~100x slower than fp32), or the time budget. Every row is bounded
by the time left in ``--budget-s``: a row whose earlier comparable rows took longer than what is left is
not started; a started row times only the repeats its first step says will fit, and one still running at
the deadline is stopped (between two PyTorch calls) and reported as skipped with what it had measured.
Writes ``benchmarks/results/step-<device>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

import common

PAPER_CROP = (32, 128, 256)  # nB x D x W


@dataclass(frozen=True)
class StepConfig:
    name: str
    role: str  # baseline | tuned | probe
    engine: str  # plain | deepspeed
    precision: str  # fp32 | bf16
    channels_last: bool
    compile: bool
    checkpointing: bool
    batch: int

    @property
    def label(self) -> str:
        return f"{self.name} b{self.batch}{' ckpt' if self.checkpointing else ''}"


def plan(device: torch.device, batch: int, compile_gpu: bool) -> list[StepConfig]:
    """The configurations at the base batch, cheapest and most needed first (a time budget cuts the tail;
    the batch sweep is planned after these ran)."""
    from octssl.models.precision import resolve_precision

    gpu = device.type == "cuda"
    auto = resolve_precision("auto", gpu=gpu)

    def paper(ckpt: bool) -> StepConfig:
        return StepConfig("paper", "baseline", "plain", "fp32", False, False, ckpt, batch)

    def octssl(ckpt: bool, compiled: bool = False) -> StepConfig:
        name = "octssl+compile" if compiled else "octssl"
        return StepConfig(name, "tuned", "deepspeed", auto.name, auto.channels_last, compiled, ckpt, batch)

    rows = [paper(False), octssl(False)]
    for precision, channels_last in (("fp32", True), ("bf16", False), ("bf16", True)):
        layout = "cl" if channels_last else "default"
        rows.append(StepConfig(f"plain {precision} {layout}", "probe", "plain", precision, channels_last, False,
                               False, batch))
    if not gpu and _cpu_bf16():  # octssl's engine with deepspeed.precision=bf16, accepted on such CPUs
        rows.append(StepConfig("octssl bf16", "tuned", "deepspeed", "bf16", False, False, False, batch))
    rows += [paper(True), octssl(True)]
    if gpu and compile_gpu:
        rows += [octssl(False, compiled=True), octssl(True, compiled=True)]
    return rows


def _cpu_bf16() -> bool:
    try:
        from octssl.models.precision import cpu_has_native_bf16
    except ImportError:  # an older engine without the check: bf16 is refused on every CPU
        return False
    return cpu_has_native_bf16()


def unsupported(cfg: StepConfig, device: torch.device) -> str | None:
    """Why ``cfg`` is not worth measuring on ``device`` (None: it is)."""
    if device.type == "cpu" and cfg.precision != "fp32" and not _cpu_bf16():
        return (f"{cfg.precision} on a CPU without native bf16 (no avx512_bf16/amx_bf16 in /proc/cpuinfo): "
                "emulated there, ~100x slower than fp32")
    return None


class OutOfTime(BaseException):
    """The benchmark's time budget ran out inside a row (a BaseException: library code must not swallow it)."""


@contextmanager
def time_limit(deadline: float | None) -> Iterator[None]:
    """Raise :class:`OutOfTime` in this thread once ``time.monotonic()`` passes ``deadline``.

    A SIGALRM timer, so only in the main thread (elsewhere no limit); the exception is raised between two
    Python-level calls, i.e. a single long PyTorch call (one backward pass) finishes first.
    """
    if deadline is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise OutOfTime("no time left")

    def expire(signum: int, frame: object) -> None:
        raise OutOfTime("the time budget ran out")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def repeats_that_fit(first_step_s: float, warmup: int, repeats: int, inner: int, left_s: float) -> int:
    """How many of ``repeats`` timed repeats (``inner`` steps each, after ``warmup`` untimed steps) fit in
    ``left_s``, taking the first step's time as every step's (an over-estimate: it includes setup)."""
    spare = left_s - first_step_s * warmup
    return max(0, min(repeats, int(spare // (first_step_s * inner))))


def check_layout(model: torch.nn.Module, volume: torch.Tensor, channels_last: bool) -> None:
    """DeepSpeed's first broadcast views parameters as bytes and fails on channels_last_3d ones
    ("stride(-1) must be 1"): parameters stay contiguous, only the input batch is channels_last_3d."""
    bad = [name for name, p in model.named_parameters() if not p.is_contiguous()]
    if bad:
        raise ValueError(f"parameters must be contiguous for DeepSpeed: {', '.join(bad[:3])}")
    if channels_last and not volume.is_contiguous(memory_format=torch.channels_last_3d):
        raise ValueError("the input volume is not channels_last_3d")


def make_batch(device: torch.device, batch: int, crop: tuple[int, int, int], channels_last: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    volume = torch.randn(batch, 1, *crop, generator=gen).to(device)
    if channels_last:
        volume = volume.contiguous(memory_format=torch.channels_last_3d)
    mask = (torch.rand(batch, 1, crop[0], crop[2], generator=gen) > 0.7).float().to(device)
    return {"oct": volume, "ga": mask, "id": [f"v{i}" for i in range(batch)]}


def ds_job(cfg: StepConfig) -> Any:
    """A job config for build_engine with the paper's optimiser (no clipping: the same maths as the baseline)."""
    from octssl.config.job import load_config

    return load_config(None, [
        "data.corpus=synthetic", f"data.batch_size={cfg.batch}", "optim.name=sgd", "optim.lr=0.1",
        "optim.momentum=0.9", "optim.weight_decay=0.0001", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.grad_clip=0", "deepspeed.zero_stage=1", f"deepspeed.precision={cfg.precision}",
        "run.max_steps=1000000",
    ])


def build_step(cfg: StepConfig, device: torch.device, crop: tuple[int, int, int]) -> tuple[Any, list[Any]]:
    """A closure doing one train step for ``cfg``, and the objects to drop afterwards."""
    from octssl.models import build_model
    from octssl.train.objectives import build_objective

    torch.manual_seed(0)
    model = build_model("fpn", checkpointing=cfg.checkpointing)
    objective = build_objective("segmentation", target="ga")
    batch = make_batch(device, cfg.batch, crop, cfg.channels_last)
    if cfg.engine == "plain":
        model = model.to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        network = torch.compile(model) if cfg.compile else model
        dtype = torch.bfloat16 if cfg.precision == "bf16" else None

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
            with autocast:
                logits = network(batch["oct"])
            objective.loss(logits.float(), batch).backward()
            optimizer.step()

        return step, [model, network, optimizer, batch]
    from octssl.models.precision import resolve_precision
    from octssl.train.engine import build_engine

    precision = resolve_precision(cfg.precision, gpu=device.type == "cuda")
    check_layout(model, batch["oct"], precision.channels_last)
    common.init_single_process_group(device)
    engine, _ = build_engine(model, ds_job(cfg), 1_000_000, precision)
    if cfg.compile:
        engine.compile()

    def ds_step() -> None:
        logits = engine(batch["oct"])
        engine.backward(objective.loss(logits.float(), batch))
        engine.step()

    return ds_step, [engine, batch]


def run_config(cfg: StepConfig, device: torch.device, crop: tuple[int, int, int], gflop: float,
               warmup: int, repeats: int, inner: int, deadline: float | None = None) -> dict[str, Any]:
    """Measure one configuration; stop it (reported as skipped) if it would run past ``deadline``."""
    row: dict[str, Any] = {**asdict(cfg), "label": cfg.label, "crop": list(crop), "status": "ok"}
    keep: list[Any] = []
    step = None
    began = time.monotonic()
    try:
        with time_limit(deadline), common.PeakMemory(device) as peak:
            step, keep = build_step(cfg, device, crop)
            start = time.perf_counter()
            step()  # first step: kernel selection, cuDNN benchmark, compilation
            common.synchronize(device)
            row["first_step_s"] = round(time.perf_counter() - start, 3)
            fit = repeats if deadline is None else repeats_that_fit(
                row["first_step_s"], max(0, warmup - 1), repeats, inner, deadline - time.monotonic())
            if fit == 0:
                raise OutOfTime(f"the first step took {row['first_step_s']:.1f} s: no timed repeat fits in the "
                                f"{deadline - time.monotonic():.0f} s left")
            if fit < repeats:
                row["repeats_cut"] = f"{fit} of {repeats} repeats: the rest would overrun the time budget"
            timing = common.time_repeats(step, device, warmup=max(0, warmup - 1), repeats=fit, inner=inner)
        row["seconds_per_step"] = timing
        row["volumes_per_s"] = cfg.batch / timing["median"]
        row["volumes_per_s_best"] = cfg.batch / timing["min"]
        row["model_tflop_per_s"] = row["volumes_per_s"] * gflop / 1e3
        row["peak_mib"] = peak.peak_bytes / 2**20
        row["peak_what"] = peak.what
    except OutOfTime as err:
        row.update(status="skipped", error=f"stopped after {time.monotonic() - began:.0f} s at the time budget: {err}")
    except Exception as err:  # every failure is a result: reported, never dropped
        row.update(status="failed", error=common.error_text(err))
    finally:  # drop every reference to the model, optimiser and batch before the next configuration
        keep.clear()
        del keep, step
        common.release_row_memory(device, cfg.compile)
    row["row_s"] = round(time.monotonic() - began, 1)
    shown = f"{row['volumes_per_s']:.3f} vol/s" if row["status"] == "ok" else row["error"]
    print(f"  {cfg.label:36s} {shown}", flush=True)
    return row


def over_budget(cfg: StepConfig, rows: list[dict[str, Any]], deadline: float, budget_s: float) -> str | None:
    """Why ``cfg`` should not start with the time left (None: start it): the budget is spent, or every
    earlier measured row at the same batch took longer than what is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        return f"time budget of {budget_s:.0f} s spent"
    took = [r["row_s"] for r in rows if r["status"] == "ok" and r["batch"] == cfg.batch and "row_s" in r]
    if took and min(took) > left:
        return f"would need ~{min(took):.0f} s (the quickest earlier row at batch {cfg.batch}), {left:.0f} s left"
    return None


def skipped(cfg: StepConfig, crop: tuple[int, int, int], reason: str) -> dict[str, Any]:
    print(f"  {cfg.label:36s} skipped: {reason}", flush=True)
    return {**asdict(cfg), "label": cfg.label, "crop": list(crop), "status": "skipped", "error": reason}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratio of each row's volumes/s to (a) without checkpointing, and to (a) with the same checkpointing."""
    base = {r["checkpointing"]: r.get("volumes_per_s") for r in rows if r["role"] == "baseline" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        if base.get(False):
            r["ratio_to_paper"] = r["volumes_per_s"] / base[False]
        if base.get(r["checkpointing"]):
            r["ratio_to_paper_same_ckpt"] = r["volumes_per_s"] / base[r["checkpointing"]]


def policy_check(rows: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The fastest precision x layout among the plain-PyTorch rows without checkpointing at the base batch,
    against what ``resolve_precision("auto")`` picks on this device."""
    from octssl.models.precision import resolve_precision

    auto = resolve_precision("auto", gpu=device.type == "cuda")
    pairs = {(r["precision"], r["channels_last"]): r["volumes_per_s"] for r in rows
             if r["engine"] == "plain" and not r["checkpointing"] and not r["compile"] and r["status"] == "ok"
             and r["role"] in ("baseline", "probe")}
    if not pairs:
        return {"auto": {"precision": auto.name, "channels_last": auto.channels_last}, "matches": None,
                "note": "no plain rows succeeded"}
    best = max(pairs, key=pairs.__getitem__)
    return {
        "auto": {"precision": auto.name, "channels_last": auto.channels_last},
        "fastest": {"precision": best[0], "channels_last": best[1], "volumes_per_s": pairs[best]},
        "measured": [{"precision": p, "channels_last": c, "volumes_per_s": v} for (p, c), v in pairs.items()],
        "matches": best == (auto.name, auto.channels_last),
    }


def batch_sweep(rows: list[dict[str, Any]], base: int, max_batch: int) -> list[StepConfig]:
    """octssl's eager path at doubling batches, with and without checkpointing (the largest batch that fits).

    Eager, because a compiled model recompiles for every new batch (about a minute each): the compiled
    variant is tried once more, at the best batch of the sweep, by :func:`compile_at_best_batch`.
    """
    eager = [r for r in rows if r["role"] == "tuned" and r["status"] == "ok" and not r["compile"]]
    if not eager:
        return []
    r = eager[0]
    template = StepConfig(r["name"], "tuned", r["engine"], r["precision"], r["channels_last"], False, False, base)
    out = []
    for ckpt in (False, True):
        b = base * 2
        while b <= max_batch:
            out.append(replace(template, checkpointing=ckpt, batch=b))
            b *= 2
    return out


def compile_at_best_batch(rows: list[dict[str, Any]], base: int) -> StepConfig | None:
    """If torch.compile beat eager at the base batch (no checkpointing), compile at the sweep's best batch."""
    ok = [r for r in rows if r["role"] == "tuned" and r["status"] == "ok" and not r["checkpointing"]]
    at_base = {r["compile"]: r for r in ok if r["batch"] == base}
    if True not in at_base or False not in at_base or at_base[True]["volumes_per_s"] <= at_base[False]["volumes_per_s"]:
        return None
    best = max((r for r in ok if not r["compile"]), key=lambda r: r["volumes_per_s"])
    if best["batch"] == base:
        return None
    c = at_base[True]
    return StepConfig(c["name"], "tuned", c["engine"], c["precision"], c["channels_last"], True, False, best["batch"])


def run(device: torch.device, crop: tuple[int, int, int], batch: int, warmup: int, repeats: int, inner: int,
        max_batch: int, compile_gpu: bool, budget_s: float, only: set[str] | None = None) -> dict[str, Any]:
    from octssl.models.profile import count_flops

    env = common.environment(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gflop = count_flops("fpn", crop)["forward_backward"] / 1e9
    deadline = time.monotonic() + budget_s
    rows: list[dict[str, Any]] = []
    print(f"FPN train step at {crop} (nB x D x W) on {env['device']}: {gflop:.1f} GFLOP per volume fwd+bwd")

    def measure(cfg: StepConfig, steps_per_repeat: int) -> dict[str, Any]:
        reason = unsupported(cfg, device) or over_budget(cfg, rows, deadline, budget_s)
        if reason:
            return skipped(cfg, crop, reason)
        return run_config(cfg, device, crop, gflop, warmup, repeats, steps_per_repeat, deadline)

    for cfg in plan(device, batch, compile_gpu):
        if only is not None and cfg.name not in only:
            rows.append(skipped(cfg, crop, "not selected (--only)"))
        else:
            rows.append(measure(cfg, inner))
    for cfg in batch_sweep(rows, batch, max_batch):
        smaller_failed = any(r["status"] == "failed" and r["checkpointing"] == cfg.checkpointing
                             and r["name"] == cfg.name and r["batch"] < cfg.batch for r in rows)
        if smaller_failed:
            rows.append(skipped(cfg, crop, "a smaller batch already failed"))
        else:  # about as many volumes per timed repeat as at the base batch
            rows.append(measure(cfg, max(1, inner * batch // cfg.batch)))
    compiled = compile_at_best_batch(rows, batch)
    if compiled is not None:
        rows.append(measure(compiled, max(1, inner * batch // compiled.batch)))
    add_ratios(rows)
    ok = [r for r in rows if r["status"] == "ok" and r["role"] == "tuned"]
    winner = max(ok, key=lambda r: r["volumes_per_s"]) if ok else None
    return {
        "benchmark": "step", "env": common.finish(env), "model": "fpn", "crop": list(crop),
        "gflop_fwd_bwd_per_volume": gflop, "loss": "segmentation (Dice + BCE) / 2",
        "optimizer": "SGD lr 0.1 momentum 0.9 wd 1e-4, no clipping",
        "timing": {"warmup_steps": warmup, "repeats": repeats, "steps_per_repeat": inner,
                   "cudnn_benchmark": device.type == "cuda",
                   # PyTorch's default: fp32 convolutions may use TF32 on Ampere and later (as the paper's did)
                   "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None},
        "rows": rows,
        "winner": winner["label"] if winner else None,
        "winner_ratio_to_paper": winner.get("ratio_to_paper") if winner else None,
        "policy": policy_check(rows, device),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'config':38s} {'status':7s} {'vol/s':>8s} {'spread':>7s} {'peak MiB':>9s} {'x paper':>8s} {'TFLOP/s':>8s}")
    for r in result["rows"]:
        if r["status"] != "ok":
            print(f"{r['label']:38s} {r['status']:7s} {r.get('error', '')}")
            continue
        print(f"{r['label']:38s} ok      {r['volumes_per_s']:8.3f} {r['seconds_per_step']['spread']:7.2f} "
              f"{r['peak_mib']:9.0f} {r.get('ratio_to_paper', float('nan')):8.2f} {r['model_tflop_per_s']:8.3f}")
    p = result["policy"]
    print(f"auto policy: {p['auto']}; fastest plain pair: {p.get('fastest')}; matches: {p['matches']}")


def plot(result: dict[str, Any], path: Path) -> Path:
    rows = result["rows"]
    return common.bar_plot(
        path, [r["label"] for r in rows], [r.get("volumes_per_s") for r in rows],
        notes=[f"(x{r['ratio_to_paper']:.2f})" if r.get("ratio_to_paper") else "" for r in rows],
        title=f"FPN train step {tuple(result['crop'])} on {result['env']['device']}", xlabel="volumes/s",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--crop", default="32x128x256", help="nB x D x W (the paper's crop by default)")
    parser.add_argument("--batch", type=int, default=None, help="base batch (default: 8 on GPU, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: GPU 3, CPU 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: GPU 5, CPU 2)")
    parser.add_argument("--inner", type=int, default=None, help="steps per timed repeat (default: GPU 5, CPU 1)")
    parser.add_argument("--max-batch", type=int, default=128, help="largest batch tried by the GPU batch sweep")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows on GPU")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip (and report) rows after this many s")
    parser.add_argument("--only", default=None, help="comma-separated row names to run (others: skipped)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/step-<device>.json)")
    args = parser.parse_args(argv)
    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    crop = tuple(int(v) for v in args.crop.lower().split("x"))
    result = run(
        device, crop,  # type: ignore[arg-type]
        batch=args.batch or (8 if gpu else 1), warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
        repeats=args.repeats or (5 if gpu else 2), inner=args.inner or (5 if gpu else 1),
        max_batch=args.max_batch if gpu else 0, compile_gpu=gpu and not args.no_compile, budget_s=args.budget_s,
        only=set(args.only.split(",")) if args.only else None,
    )
    print_table(result)
    out = args.out or common.result_path("step", device)
    common.write_json(out, result)
    print(f"wrote {out} and {plot(result, out.with_suffix('.png'))}")
    return result


if __name__ == "__main__":
    main()
