"""GPU levers of the FPN train step, one guarded row each, against the paper's setup, in one bounded call.

    python benchmarks/bench_levers.py --budget-s 280            # on a GPU (benchmarks/gpu.sh runs this)
    python benchmarks/bench_levers.py --only paper,cl-model     # some rows; the others are reported skipped
    python benchmarks/bench_levers.py --smoke                   # on CPU, tiny crop: the plumbing, in seconds

Rows (see ROWS; batch 8 at the paper crop 32 x 128 x 256 unless named ``...-bN``): ``paper`` (fp32, plain
PyTorch, SGD, the baseline of every ratio); ``octssl`` (the loop's default GPU path: DeepSpeed ZeRO-1 engine
from ``build_engine``, ``auto`` precision = bf16 through DeepSpeed's torch_autocast, channels_last_3d
inputs); then one lever at a time: bf16 autocast, channels_last_3d on the inputs or through the whole
network, torch.compile ``max-autotune-no-cudagraphs`` (BatchNorm/ReLU fusion), a CUDA graph of the whole
step, ZeRO-0 against ZeRO-1, torch.autocast around the engine against DeepSpeed's, the engine with a
channels_last network, a host batch copied from pageable or pinned memory each step, and batch sweeps.

Every row runs in a worker process that the supervisor (this script's main) watches: a row past its bound
(``bound_s``, cut to the time left in ``--budget-s``) is killed and reported ``timed out``; a worker that dies
(CUDA error, OOM kill) costs only its row, reported ``failed``; a fresh worker takes the next rows. Rows
that do not fit in the budget are reported ``skipped``; a batch after a failed smaller one likewise. The
results JSON is rewritten after every row, so a run cut short still leaves every finished row on disk.
``--smoke`` runs the same rows on CPU at a tiny crop (half precision measured as fp32 on CPUs without
native bf16, torch.compile with dynamo's eager backend, CUDA-only rows reported skipped).
Writes ``benchmarks/results/levers-<device>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import common

PAPER_CROP = (32, 128, 256)
SMOKE_CROP = (4, 64, 64)
SMOKE_BOUND_S = 120.0  # smoke rows run on shared CPUs, where a DeepSpeed engine alone can take half a minute
MARK = "@@levers "


@dataclass(frozen=True)
class Row:
    name: str
    lever: str
    engine: str = "plain"  # plain | deepspeed
    precision: str = "bf16"  # fp32 | bf16 | auto (what octssl's policy picks on the device)
    layout: str = "model"  # default | input (channels_last_3d batch) | model (network too)
    compile: str | None = None  # a torch.compile mode
    cuda_graph: bool = False
    zero_stage: int = 1
    autocast: str = "deepspeed"  # deepspeed (torch_autocast section) | torch (around the engine's forward)
    data: str = "device"  # device (batch already there) | pageable | pinned (copied every step)
    batch: int = 8
    bound_s: float = 40.0

    @property
    def channels_last(self) -> bool:
        return self.layout != "default"


OCTSSL = dict(engine="deepspeed", layout="input", precision="auto")
# In run order: the most needed first, the costly compiles last (a budget cuts the tail).
ROWS = [
    Row("paper", "baseline: the paper's setup", precision="fp32", layout="default"),
    Row("octssl", "octssl's default GPU path (auto policy, DeepSpeed ZeRO-1)", **OCTSSL),
    Row("bf16", "bf16 autocast (default layout)", layout="default"),
    Row("cl-input", "bf16 + channels_last_3d inputs", layout="input"),
    Row("cl-model", "bf16 + channels_last_3d through the network"),
    Row("cuda-graph", "CUDA graph of the whole step (on cl-model)", cuda_graph=True),
    Row("octssl-zero0", "ZeRO-0 instead of ZeRO-1", **OCTSSL | {"zero_stage": 0}),
    Row("octssl-torch-autocast", "torch.autocast around the engine instead of DeepSpeed's", **OCTSSL | {"autocast": "torch"}),
    Row("octssl-cl-model", "the engine (ZeRO-0) with a channels_last_3d network", **OCTSSL | {"layout": "model", "zero_stage": 0}),
    Row("cl-model-pageable", "host batch from pageable memory each step", data="pageable"),
    Row("cl-model-pinned", "host batch from pinned memory, non_blocking", data="pinned"),
    *[Row(f"octssl-b{b}", "batch sweep of octssl's path", **OCTSSL | {"batch": b}) for b in (32, 64, 128)],
    *[Row(f"cl-model-b{b}", "batch sweep of bf16 + channels_last network", batch=b) for b in (32, 64, 128)],
    Row("compile", "torch.compile max-autotune-no-cudagraphs (on cl-model)", compile="max-autotune-no-cudagraphs",
        bound_s=150),
    Row("octssl-compile", "engine.compile max-autotune-no-cudagraphs", **OCTSSL | {"compile": "max-autotune-no-cudagraphs"},
        bound_s=150),
]


# ---------------------------------------------------------------- worker: one row
def channels_last_network(model: Any) -> Any:
    """Weights in the channels-last layout of their rank (3D convs channels_last_3d, 2D convs channels_last),
    so that activations keep that layout from block to block (``Module.to`` takes one format for all)."""
    import torch

    formats = {5: torch.channels_last_3d, 4: torch.channels_last}
    for param in model.parameters():
        if param.dim() in formats:
            param.data = param.data.contiguous(memory_format=formats[param.dim()])
    return model


def smoke_batch(batch: int) -> int:
    """The batch a smoke run uses for a row of ``batch`` (the plumbing, not the numbers)."""
    return 1 if batch <= 8 else 2


def resolve(row: Row, gpu: bool, smoke: bool) -> Any:
    """The octssl Precision of ``row`` on this device (smoke on a CPU without native bf16: fp32, since
    emulated bf16 would take minutes there and the plumbing is what a smoke run checks)."""
    import bench_step
    from octssl.models.precision import resolve_precision

    requested = "fp32" if smoke and not gpu and not bench_step._cpu_bf16() else row.precision
    return resolve_precision(requested, gpu=gpu)


def build(row: Row, device: Any, crop: tuple[int, int, int], smoke: bool) -> tuple[Any, list[Any]]:
    """A closure doing one train step of ``row``, and the objects to keep alive while it is timed."""
    import torch

    import bench_step
    from octssl.models import build_model
    from octssl.train.objectives import build_objective

    gpu = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model("fpn").to(device).train()
    objective = build_objective("segmentation", target="ga")
    batch = smoke_batch(row.batch) if smoke else row.batch
    on_device = bench_step.make_batch(device, batch, crop, row.channels_last)
    precision = resolve(row, gpu, smoke)
    dtype = precision.autocast_dtype
    compile_options = {"backend": "eager"} if smoke and not gpu else {"mode": row.compile}
    host = None
    if row.data != "device":
        host = on_device["oct"].to("cpu").contiguous()
        host = host.pin_memory() if row.data == "pinned" else host

    def volume() -> Any:
        if host is None:
            return on_device["oct"]
        moved = host.to(device, non_blocking=row.data == "pinned")
        return moved.contiguous(memory_format=torch.channels_last_3d) if row.channels_last else moved

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype, cache_enabled=not row.cuda_graph) if dtype else nullcontext()

    if row.engine == "deepspeed":
        from octssl.models.precision import resolve_precision
        from octssl.train.engine import build_engine

        engine_precision = precision if row.autocast == "deepspeed" else resolve_precision("fp32", gpu=gpu)
        job = bench_step.ds_job(bench_step.StepConfig(row.name, "tuned", "deepspeed", engine_precision.name,
                                                      row.channels_last, False, False, batch))
        job.deepspeed.zero_stage = row.zero_stage
        common.init_single_process_group(device)
        engine, _ = build_engine(model, job, 1_000_000, engine_precision)
        if row.layout == "model":
            channels_last_network(engine.module)  # after DeepSpeed's broadcast of contiguous weights
        if row.compile:
            engine.compile(**({"backend": "eager"} if "backend" in compile_options else {"compile_kwargs": compile_options}))
        outer = autocast if row.autocast == "torch" else nullcontext

        def ds_step() -> None:
            with outer():
                logits = engine(volume())
            engine.backward(objective.loss(logits.float(), on_device))
            engine.step()

        return ds_step, [engine, on_device, host]
    if row.layout == "model":
        model = channels_last_network(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    network = torch.compile(model, **compile_options) if row.compile else model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = network(volume())
        objective.loss(logits.float(), on_device).backward()
        optimizer.step()

    if not row.cuda_graph:
        return step, [model, network, optimizer, on_device, host]
    side = torch.cuda.Stream()  # the documented recipe: warm up on a side stream, then capture the whole step
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        with autocast():
            logits = network(on_device["oct"])
        objective.loss(logits.float(), on_device).backward()
        optimizer.step()
    return graph.replay, [graph, model, optimizer, on_device]


def measure(row: Row, device: Any, crop: tuple[int, int, int], gflop: float, smoke: bool, timing: dict[str, int],
            fault: str | None) -> dict[str, Any]:
    """One row's numbers (volumes/s, peak memory, TFLOP/s), or its failure."""

    out = described(row, crop) | {"status": "ok"}
    if fault == "hang":
        time.sleep(10**6)
    if fault == "crash":
        os._exit(70)
    if (row.cuda_graph or row.data == "pinned") and device.type != "cuda":
        return {**out, "status": "skipped", "error": "needs CUDA"}
    keep: list[Any] = []
    try:
        with common.PeakMemory(device) as peak:
            out["precision"] = resolve(row, device.type == "cuda", smoke).name
            out["batch"] = batch = smoke_batch(row.batch) if smoke else row.batch
            if row.compile and smoke and device.type != "cuda":
                out["compile_mode"] = "dynamo's eager backend (smoke)"
            step, keep = build(row, device, crop, smoke)
            start = time.perf_counter()
            step()
            common.synchronize(device)
            out["first_step_s"] = round(time.perf_counter() - start, 3)
            seconds = common.time_repeats(step, device, warmup=timing["warmup"], repeats=timing["repeats"],
                                          inner=max(1, timing["inner"] * 8 // row.batch))
        out.update(seconds_per_step=seconds, volumes_per_s=batch / seconds["median"],
                   model_tflop_per_s=batch / seconds["median"] * gflop / 1e3, peak_mib=peak.peak_bytes / 2**20)
    except Exception as err:  # every failure is a row
        out.update(status="failed", error=common.error_text(err))
        if "CUDA error" in str(err) or "cuDNN error" in str(err):
            out["fatal"] = True  # the CUDA context is lost: the supervisor starts a fresh worker
    finally:
        keep.clear()
        common.release_row_memory(device, row.compile)
    return out


def worker(args: argparse.Namespace) -> int:
    """Run the named rows in order, announcing each on stdout for the supervisor."""
    import torch

    from octssl.models.profile import count_flops

    device = torch.device("cpu") if args.smoke else common.pick_device("cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.smoke:
        torch.set_num_threads(1)  # tiny steps: threads would only wait for each other
    crop = SMOKE_CROP if args.smoke else PAPER_CROP
    gflop = count_flops("fpn", crop)["forward_backward"] / 1e9
    timing = {"warmup": 1, "repeats": 1, "inner": 1} if args.smoke else {"warmup": 2, "repeats": 3, "inner": 3}
    faults = dict(item.split("=") for item in args.fault)
    rows = {r.name: r for r in ROWS}
    for name in args.rows.split(","):
        print(MARK + json.dumps({"start": name}), flush=True)
        result = measure(rows[name], device, crop, gflop, args.smoke, timing, faults.get(name))
        print(MARK + json.dumps({"row": result}, default=str), flush=True)
        if result.get("fatal"):
            return 3
    return 0


# ---------------------------------------------------------------- supervisor
class Worker:
    """A worker process and a thread turning its marked stdout lines into events (others are echoed)."""

    def __init__(self, names: list[str], args: argparse.Namespace) -> None:
        argv = [sys.executable, __file__, "--worker", "--rows", ",".join(names), *sum((["--fault", f] for f in args.fault), [])]
        # a world of its own: an inherited MASTER_PORT may be the caller's own process group (address in use)
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                                "LOCAL_RANK")}
        self.proc = subprocess.Popen(argv + (["--smoke"] if args.smoke else []), stdout=subprocess.PIPE, text=True,
                                     start_new_session=True, cwd=common.REPO, env=env)
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.events.put(json.loads(line[len(MARK):]))
            else:
                print("   | " + line.rstrip(), flush=True)
        self.events.put(None)

    def next_event(self, deadline: float) -> dict[str, Any] | None:
        """The next event; None once the worker ended; {"timeout": True} at the deadline."""
        try:
            return self.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return {"timeout": True}

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def described(row: Row, crop: tuple[int, int, int]) -> dict[str, Any]:
    """A row's configuration in the fields bench_step's rows use too (the dry run reads both)."""
    return {**asdict(row), "label": row.name, "crop": list(crop), "channels_last": row.channels_last,
            "checkpointing": False, "compile": bool(row.compile), "compile_mode": row.compile}


def skipped(row: Row, reason: str, crop: tuple[int, int, int], status: str = "skipped") -> dict[str, Any]:
    return described(row, crop) | {"status": status, "error": reason}


def supervise(args: argparse.Namespace, out: Path, env: dict[str, Any]) -> dict[str, Any]:
    """Run every selected row under its bound and the budget; write the results after every row."""
    crop = SMOKE_CROP if args.smoke else PAPER_CROP
    deadline = time.monotonic() + args.budget_s
    only = set(args.only.split(",")) if args.only else None
    bounds = {name: float(value) for name, value in (item.split("=") for item in args.bound)}
    results: dict[str, dict[str, Any]] = {}
    todo = [r for r in ROWS if only is None or r.name in only]
    for r in ROWS:
        if r not in todo:
            results[r.name] = skipped(r, "not selected (--only)", crop)

    def write() -> None:
        payload = summary(env, crop, [results[r.name] for r in ROWS if r.name in results], args)
        tmp = out.with_suffix(".tmp")
        common.write_json(tmp, payload)
        os.replace(tmp, out)

    while todo:
        todo = [r for r in todo if not _drop(r, results, crop, deadline)]
        if not todo:
            break
        proc = Worker([r.name for r in todo], args)
        current: Row | None = None
        started_any, row_deadline = False, deadline
        while True:
            event = proc.next_event(row_deadline)
            if event is not None and "start" in event:
                current = next(r for r in todo if r.name == event["start"])
                started, started_any = time.monotonic(), True
                own = current.bound_s if not args.smoke else max(current.bound_s, SMOKE_BOUND_S)
                bound = min(bounds.get(current.name, own), deadline - started)
                row_deadline = started + bound
                print(f"== {current.name}: {current.lever} (bound {bound:.0f} s)", flush=True)
                continue
            if event is not None and "row" in event:
                row = event["row"]
                results[row["name"]] = row
                todo = [r for r in todo if r.name != row["name"]]
                current, row_deadline = None, deadline
                shown = f"{row['volumes_per_s']:.2f} vol/s" if row["status"] == "ok" else row.get("error", "")
                print(f"   {row['name']}: {row['status']} {shown}", flush=True)
                write()
                continue
            proc.kill()  # the worker ended, or the row (or the budget) ran out of time
            if current is not None:
                results[current.name] = (
                    skipped(current, f"stopped after {time.monotonic() - started:.0f} s (bound {bound:.0f} s)", crop,
                            "timed out") if event is not None
                    else skipped(current, f"the worker died (exit {proc.proc.returncode}) during this row", crop,
                                 "failed"))
                todo.remove(current)
                write()
            elif event is None and not started_any:  # it could not even start: say so for every row left
                for r in todo:
                    results[r.name] = skipped(r, f"the worker exited ({proc.proc.returncode}) before any row", crop,
                                              "failed")
                todo = []
            break
    write()
    return json.loads(out.read_text())


def _drop(row: Row, results: dict[str, dict[str, Any]], crop: tuple[int, int, int], deadline: float) -> bool:
    """Record ``row`` as skipped (and say so) when the budget is spent or a smaller batch of its series failed."""
    series = row.name.rsplit("-b", 1)[0]
    nominal = {r.name: r.batch for r in ROWS}  # smoke rows record the smaller batch they ran
    failed = [r for r in results.values() if r["name"].rsplit("-b", 1)[0] == series
              and nominal[r["name"]] < row.batch and r["status"] in ("failed", "timed out")]
    reason = None
    if time.monotonic() >= deadline - 1:
        reason = "time budget spent"
    elif failed:
        reason = f"a smaller batch ({failed[0]['name']}) {failed[0]['status']}"
    if reason:
        results[row.name] = skipped(row, reason, crop)
    return reason is not None


def summary(env: dict[str, Any], crop: tuple[int, int, int], rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The result file: environment, rows with ratios, what each lever gave, the data path's need."""
    ok = {r["name"]: r for r in rows if r["status"] == "ok"}
    base = ok.get("paper", {}).get("volumes_per_s")
    for r in ok.values():
        if base:
            r["ratio_to_paper"] = r["volumes_per_s"] / base
    compare = {"bf16": "paper", "cl-input": "bf16", "cl-model": "cl-input", "cuda-graph": "cl-model",
               "compile": "cl-model", "octssl-zero0": "octssl", "octssl-torch-autocast": "octssl",
               "octssl-cl-model": "octssl-zero0", "cl-model-pageable": "cl-model", "cl-model-pinned": "cl-model-pageable",
               "octssl-compile": "octssl"}
    levers = {name: {"against": other, "gain": ok[name]["volumes_per_s"] / ok[other]["volumes_per_s"]}
              for name, other in compare.items() if name in ok and other in ok}
    fastest = max(ok.values(), key=lambda r: r["volumes_per_s"], default=None)
    fastest_octssl = max((r for r in ok.values() if r["engine"] == "deepspeed"), key=lambda r: r["volumes_per_s"],
                         default=None)
    return {
        "benchmark": "levers", "env": common.finish(dict(env)), "model": "fpn", "crop": list(crop), "smoke": args.smoke,
        "budget_s": args.budget_s, "optimizer": "SGD lr 0.1 momentum 0.9 wd 1e-4", "loss": "segmentation (Dice + BCE) / 2",
        "rows": rows, "levers": levers,
        "octssl_default_ratio": ok.get("octssl", {}).get("ratio_to_paper"),
        "best": _brief(fastest), "best_octssl_engine": _brief(fastest_octssl),
        "data_need": fastest and data_need(fastest, crop),
    }


def _brief(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return row and {k: row.get(k) for k in ("name", "volumes_per_s", "ratio_to_paper", "peak_mib")}


def data_need(best: dict[str, Any], crop: tuple[int, int, int]) -> dict[str, Any]:
    """MB/s of fp32 crops the fastest row consumes per GPU, against the loader rate bench_data measured."""
    need = best["volumes_per_s"] * 4 * crop[0] * crop[1] * crop[2] / 1e6
    out: dict[str, Any] = {"volumes_per_s": best["volumes_per_s"], "MB_per_s": need}
    for path in sorted(common.RESULTS.glob("data-*.json")):
        data = json.loads(path.read_text())
        rows = [r for r in data.get("rows", [])
                if r.get("path", "").startswith("ZarrSource + TrainTransform") and r.get("workers") == 1]
        if rows:
            per_worker = rows[0]["volumes_per_s"]
            out[path.name] = {"grid": data.get("grid"), "loader_volumes_per_s_per_worker": per_worker,
                              "loader_workers_needed": math.ceil(best["volumes_per_s"] / per_worker)}
    return out


def plot(result: dict[str, Any], path: Path) -> Path:
    rows = result["rows"]
    return common.bar_plot(path, [f"{r['name']} ({r['lever']})"[:70] for r in rows], [r.get("volumes_per_s") for r in rows],
                           notes=[f"(x{r['ratio_to_paper']:.2f})" if r.get("ratio_to_paper") else r["status"] for r in rows],
                           title=f"FPN train step {tuple(result['crop'])}: levers on {result['env']['device']}",
                           xlabel="volumes/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=280.0, help="every row ends (or is skipped) by then")
    parser.add_argument("--bound", action="append", default=[], help="ROW=SECONDS: that row's time bound")
    parser.add_argument("--only", default=None, help="comma-separated row names (the others: skipped)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny crop, one repeat: check the plumbing")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/levers-<device>.json)")
    parser.add_argument("--fault", action="append", default=[], help="tests: ROW=hang|crash")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    device = torch.device("cpu") if args.smoke else common.pick_device("cuda")
    if device.type != "cuda" and not args.smoke:
        print("bench_levers: no CUDA GPU visible; use --smoke on CPU", file=sys.stderr)
        return 2
    out = args.out or common.result_path("levers", device)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = supervise(args, out, common.environment(device))
    print(f"\n{'row':24s} {'status':10s} {'vol/s':>9s} {'x paper':>8s} {'peak MiB':>9s}  lever")
    for r in result["rows"]:
        print(f"{r['name']:24s} {r['status']:10s} {r.get('volumes_per_s', float('nan')):9.2f} "
              f"{r.get('ratio_to_paper', float('nan')):8.2f} {r.get('peak_mib', float('nan')):9.0f}  "
              f"{r['lever'] if r['status'] == 'ok' else r.get('error', '')}")
    print(f"octssl default x paper: {result['octssl_default_ratio']}; best: {result['best']}")
    print(f"wrote {out} and {plot(result, out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
