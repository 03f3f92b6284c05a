"""How octssl's costs grow with the work: wall time and peak memory at work sizes 10x apart, and the growth
exponent of each (the slope of log cost against log size).

    python benchmarks/bench_growth.py                 # 10^3..10^5 volumes, 10 and 100 trials (`make bench`)
    python benchmarks/bench_growth.py --large         # adds 10^6 volumes and 500 trials
    python benchmarks/bench_growth.py --only corpus,shards --sizes 1000,10000

What is synthetic: the corpus rows are a metadata-only manifest (``manifest.parquet`` of N rows with real
columns, ids, patients, splits, labels and digests, and an empty ``volumes.zarr``; the arrays do not matter
to opening, filtering, counting or planning), except the appended batch, which is 16 real 4x8x8 volumes in
a bucket of their own. The shard index is a synthetic ``index.json`` (N samples, 20 per shard, no tar files:
loading and planning never open them). The sweep runs Ray Tune with octssl's own search and scheduler
(``GroupSearch``, ``GroupASHA``) around a trivial trainable that reports three results and returns.

The corpus operations of one size run in one fresh process, in the order listed, and so do the index
operations (a process per operation cost more than the small sizes' work on the loaded 2-core machine): the
wall time is the median of the repeats (1 at 10^6, else 3), the peak memory the largest rise of the resident
set above its level before the operation (sampled every 5 ms; memory an earlier operation left cached, such
as the id index built by "open + first row", is not counted again). Results: ``results/growth-<cpu>.json`` and a log-log PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SMALL_SIZES = (1_000, 10_000, 100_000)
LARGE_SIZES = (*SMALL_SIZES, 1_000_000)
SMALL_TRIALS = (10, 100)
LARGE_TRIALS = (10, 100, 500)
WORLDS = (8, 64, 1024)
BATCH = 8  # per rank, for the epoch plan's steps
APPEND = 16  # volumes per appended batch
VERIFY_MAX = 100_000  # verify's planning walks every row in Python: minutes at 10^6 on a loaded 2-core machine
STREAM_MAX = 100_000  # a StreamSource parses the whole index.json: ~10 s at 10^5 on the loaded machine
PER_SHARD = 20  # samples per shard in the synthetic index (12 MB paper volumes, 256 MB shards)


# ---------------------------------------------------------------- memory
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median wall and CPU seconds (all threads of the process: what the work costs when the machine is shared)
    over ``repeats`` calls of ``fn``, and the largest resident-set rise (MB) during one."""
    times, cpu, peak = [], [], 0
    for _ in range(repeats):
        base, top, stop = _rss(), [0], threading.Event()

        def sample(base: int = base, top: list[int] = top, stop: threading.Event = stop) -> None:
            while not stop.wait(0.005):
                top[0] = max(top[0], _rss() - base)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        stop.set()
        watcher.join()
        peak = max(peak, top[0], _rss() - base)
        del result
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu), "peak_MB": peak / 2**20,
            "first_seconds": times[0]}


# ---------------------------------------------------------------- synthetic inputs
def write_manifest_corpus(path: Path, n: int) -> None:
    """A metadata-only corpus of ``n`` rows: a real manifest, an empty ``volumes.zarr``."""
    import numpy as np
    import pyarrow as pa
    import zarr
    from zarr.storage import LocalStore

    from octssl.corpus import manifest as mf
    from octssl.corpus.layout import assign_split

    path.mkdir(parents=True)
    zarr.open_group(LocalStore(path / "volumes.zarr"), mode="w-", zarr_format=3)
    rng = np.random.default_rng(0)
    patients = [f"pat{p:07d}" for p in range(max(1, n // 4))]
    split_of = {p: assign_split(p, (0.6, 0.2, 0.2)) for p in patients}
    patient = [patients[i // 4] for i in range(n)]
    labelled = rng.random(n) < 0.3
    digest = "ab" * 32
    columns = {
        "id": [f"vol{i:08d}" for i in range(n)], "patient": patient, "eye": ["OD" if i % 2 else "OS" for i in range(n)],
        "visit": [i % 4 for i in range(n)], "device": ["heidelberg"] * n, "scan_pattern": ["raster"] * n,
        "raster": [True] * n, "raster_reason": [None] * n, "shape": [[49, 496, 512]] * n,
        "spacing_mm": [[0.12, 0.0039, 0.0117]] * n, "modalities": [["oct"]] * n,
        "labels": [["ga"] if lab else [] for lab in labelled], "split": [split_of[p] for p in patient],
        "grid": ["49x496x512"] * n, "index": list(range(n)),
        "sha256": [{"oct": digest, "ga": digest if lab else None} for lab in labelled],
        "source": [f"src{i:08d}" for i in range(n)], "acquired": [None] * n,
        "localizer_grid": [None] * n, "localizer_index": [None] * n, "localizer_spacing_mm": [None] * n,
        "positions_mm": [None] * n,
    }
    for name in mf.SCHEMA.names:  # optional columns this benchmark does not fill: null
        columns.setdefault(name, [None] * n)
    table = mf.with_settings(pa.table(columns, schema=mf.SCHEMA), dict(mf.DEFAULT_SETTINGS))
    mf.write_manifest(table, path / mf.MANIFEST_NAME)


def write_index(path: Path, n: int) -> None:
    """A synthetic ``index.json`` of ``n`` samples, PER_SHARD per shard (no tar files)."""
    from octssl.webds.index import FORMAT, INDEX_NAME, SHARD_PATTERN

    path.mkdir(parents=True)
    size, digest = 512 * 24_000, "cd" * 32
    shards, samples = [], {}
    for s in range(-(-n // PER_SHARD)):
        ids = [f"vol{i:08d}" for i in range(s * PER_SHARD, min(n, (s + 1) * PER_SHARD))]
        shards.append({"name": SHARD_PATTERN.format(s), "count": len(ids), "bytes": size * len(ids),
                       "sha256": digest, "ids": ids})
        for k, sid in enumerate(ids):
            samples[sid] = {"shard": shards[-1]["name"], "offset": k * size, "size": size, "sha256": {"oct": digest},
                            "split": "train"}
    (path / INDEX_NAME).write_text(json.dumps({"format": FORMAT, "total": n, "shards": shards, "samples": samples}))


def tiny_volumes(start: int) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(start)
    return [{"id": f"new{start + i:08d}", "oct": rng.integers(0, 256, (4, 8, 8), dtype=np.uint8),
             "meta": {"patient": f"newpat{start + i}", "eye": "OD", "visit": 0, "device": "bench",
                      "scan_pattern": "raster", "spacing_mm": (0.1, 0.005, 0.02)}} for i in range(APPEND)]


# ---------------------------------------------------------------- one measurement (in a fresh process)
def _manifest_bytes(path: Path) -> dict[str, tuple[int, int, int]]:
    files = [path / "manifest.parquet", *sorted((path / "manifest.parts").glob("*"))]
    return {str(f): (f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()}


def one(op: str, where: Path, n: int, repeats: int) -> dict[str, Any]:
    """Measure operation ``op`` on the inputs at ``where`` (of size ``n``)."""
    from octssl.corpus import manifest as mf
    from octssl.corpus.store import Corpus

    extra: dict[str, Any] = {}
    if op == "corpus open":
        fn: Callable[[], Any] = lambda: Corpus.open(where)  # noqa: E731
    elif op == "open + first row (a worker ready to read)":
        fn = lambda: Corpus.open(where).row(f"vol{n // 2:08d}")  # noqa: E731
    elif op in ("info", "ids() filtering", "verify planning", "append one batch", "append (whole manifest rewritten)"):
        corpus = Corpus.open(where)
        if op == "info":
            fn = corpus.summary
        elif op == "ids() filtering":
            fn = lambda: corpus.ids(split="train", label="ga")  # noqa: E731
        elif op == "verify planning":  # verify before reading arrays: the row checks and the walk over rows
            fn = lambda: (mf.row_problems(corpus.manifest, str(corpus.manifest_path)),  # noqa: E731
                          sum(1 for _ in corpus.rows))
        elif op == "append one batch":
            counter = iter(range(0, 10**6, APPEND))
            before = _manifest_bytes(where)
            fn = lambda: corpus.append(tiny_volumes(next(counter)), progress=False)  # noqa: E731
        else:  # the commit of an append before manifest parts: the whole manifest written again
            fn = lambda: mf.write_manifest(corpus.manifest, where / "rewritten.parquet")  # noqa: E731
    elif op == "index.json load":
        from octssl.webds.index import load_index

        fn = lambda: load_index(where)  # noqa: E731
    elif op.startswith("stream epoch plan") or op.startswith("stream exact-resume seek"):
        from octssl.data.sources import StreamSource

        world = int(op.rsplit(" ", 1)[1])
        source = StreamSource(where, rank=0, world_size=world, batch_size=BATCH, verify=False)
        steps = source.batches_per_epoch
        extra["steps_per_epoch"] = steps
        if op.startswith("stream epoch plan"):
            fn = lambda: source.epoch_order(1)  # noqa: E731
        else:  # resume at the middle of an epoch: the plan, then the draws left (no sample is read)
            source.load_state_dict({"epoch": 1, "step": steps // 2})

            def fn() -> Any:
                order = source.epoch_order(source.epoch)
                return [order[d] for b in range(source.step, steps) for d in range(b * BATCH, (b + 1) * BATCH)][:1]
    elif op.startswith("zarr epoch plan") or op.startswith("zarr exact-resume seek"):
        from octssl.data import plan

        world = int(op.rsplit(" ", 1)[1])
        steps = plan.steps_per_epoch(n, world, BATCH)
        extra["steps_per_epoch"] = steps
        if op.startswith("zarr epoch plan"):
            fn = lambda: plan.epoch_indices(n, seed=0, epoch=1, rank=0, world_size=world)  # noqa: E731
        else:
            source = _IndexSource(n)
            fn = lambda: next(plan.zarr_epoch(source, lambda b: b, batch_size=BATCH, seed=0, epoch=1,  # noqa: E731
                                              start_step=steps // 2, rank=0, world_size=world, loader_workers=0))
    else:
        raise SystemExit(f"unknown operation {op!r}")
    # an append in a process builds the id and patient lookups once: the first and the next ones are reported
    repeats = max(repeats, 3) if op == "append one batch" else repeats
    result = {**measure(fn, repeats), **extra}
    if op == "append one batch":
        after = _manifest_bytes(where)
        result["manifest_bytes_written_per_append"] = sum(
            size for name, (ino, mtime, size) in after.items() if before.get(name) != (ino, mtime, size)) / repeats
    if "steps_per_epoch" in result:
        result["per_step_us"] = result["seconds"] / result["steps_per_epoch"] * 1e6
    return result


class _IndexSource:
    """A source of ``n`` samples whose sample is its index (the plan, not the reads, is measured)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index

    def set_epoch(self, epoch: int) -> None:
        pass


# ---------------------------------------------------------------- the sweep
def sweep_overhead(trials: int) -> dict[str, Any]:
    """Seconds per trial of Ray Tune with octssl's search and scheduler around a trivial trainable."""
    import logging

    import ray
    from ray import tune

    from octssl.cluster.local import ray_up
    from octssl.config.sweep import SweepConfig
    from octssl.tune.search import METRIC, GroupASHA, GroupSearch, make_sampler

    def trivial(config: dict[str, Any]) -> None:
        for step in (1, 2, 3):
            tune.report({METRIC: config["lr"], "step": step})

    config = SweepConfig(corpus="unused", tasks=["ga"], fractions=[1.0],
                         search={"num_samples": trials, "algorithm": "random", "steps": [3], "grace_steps": 1})
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.pop("RAY_ADDRESS", None)  # a Ray of its own, never another one found on the machine
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    started = time.perf_counter()
    ray_up()  # a local Ray sized to this machine, reaped if this process dies (not counted per trial)
    ray_start_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(trivial, {"CPU": 1}),
            tune_config=tune.TuneConfig(
                search_alg=GroupSearch(config.groups, trials, lambda g: make_sampler(config.search, g)),
                scheduler=GroupASHA(config.search), num_samples=trials, max_concurrent_trials=2, reuse_actors=True),
            run_config=tune.RunConfig(name="growth", storage_path=storage, verbose=0),
        )
        grid = tuner.fit()
        seconds = time.perf_counter() - start
    ray.shutdown()
    assert len(grid) == trials and not grid.errors, grid.errors
    return {"seconds": seconds, "per_trial_s": seconds / trials, "ray_start_s": ray_start_s}


# ---------------------------------------------------------------- the suite
# In this order: the appends come after the read-only operations (they change the corpus).
CORPUS_OPS = ("corpus open", "open + first row (a worker ready to read)", "info", "ids() filtering",
              "verify planning", "append (whole manifest rewritten)", "append one batch")
SHARD_OPS = ("index.json load", *(f"zarr epoch plan {w}" for w in WORLDS), *(f"zarr exact-resume seek {w}" for w in WORLDS),
             *(f"stream epoch plan {w}" for w in WORLDS), *(f"stream exact-resume seek {w}" for w in WORLDS))


def run_child(ops: tuple[str, ...], where: Path, n: int) -> list[dict[str, Any]]:
    """Measure ``ops`` in order in one fresh process (starting one per operation costs more than the small
    sizes' work on a loaded machine); each op's peak is its rise above the level before it."""
    repeats = 1 if n >= 1_000_000 else 3
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "platform"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--one", "|".join(ops), "--where", str(where), "--n", str(n),
                           "--repeats", str(repeats)], capture_output=True, text=True, env=env, timeout=3000)
    if proc.returncode:
        error = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return [{"status": "failed", "error": error} for _ in ops]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_each(ops: list[str], where: Path, n: int, repeats: int) -> list[dict[str, Any]]:
    """:func:`one` for each of ``ops`` (those needing more samples than ranks x batch are skipped)."""
    out = []
    for op in ops:
        last = op.rsplit(" ", 1)[-1]
        world = int(last) if last.isdigit() else 1
        if op == "verify planning" and n > VERIFY_MAX:
            out.append({"status": f"skipped (per-row Python, {VERIFY_MAX:,} rows at most; see the exponent)"})
            continue
        if op.startswith("stream") and n > STREAM_MAX:
            out.append({"status": f"skipped (each StreamSource parses index.json; {STREAM_MAX:,} samples at most)"})
            continue
        if n < world * BATCH:
            out.append({"status": f"skipped (fewer than {world} ranks x batch {BATCH} samples)"})
            continue
        try:
            out.append({"status": "ok", **one(op, where, n, repeats)})
        except Exception as err:  # noqa: BLE001  # recorded; the other operations still run
            out.append({"status": "failed", "error": f"{type(err).__name__}: {err}"})
    return out


def exponent(sizes: list[int], values: list[float]) -> float | None:
    """The least-squares slope of log(value) against log(size): ~1 linear, ~0 constant."""
    import numpy as np

    pairs = [(s, v) for s, v in zip(sizes, values, strict=True) if v and v > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log10([p[0] for p in pairs]), np.log10([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def series(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Per operation: its sizes, the ``key`` values and their growth exponent."""
    out = []
    for op in dict.fromkeys(r["operation"] for r in rows):
        mine = [r for r in rows if r["operation"] == op and r["status"] == "ok"]
        sizes = [r["size"] for r in mine]
        out.append({"operation": op, "unit": mine[0]["unit"] if mine else None, "sizes": sizes,
                    "values": [r[key] for r in mine], "exponent": exponent(sizes, [r[key] for r in mine])})
    return out


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, key, label in ((axes[0], "seconds", "wall time (s)"), (axes[1], "peak_MB", "peak memory rise (MB)")):
        for s in result["growth"][key]:
            if len(s["sizes"]) >= 2 and s["exponent"] is not None:
                ax.loglog(s["sizes"], s["values"], marker="o", label=f"{s['operation']} (k={s['exponent']:.2f})")
        ax.set_xlabel("work size (volumes, samples or trials)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, loc="upper left")
    fig.suptitle(f"growth of octssl's costs, {result['env'].get('device', 'CPU')}: slope k = growth exponent")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="add 10^6 volumes and 500 trials")
    parser.add_argument("--sizes", help="comma-separated corpus/index sizes (overrides the defaults)")
    parser.add_argument("--trials", help="comma-separated sweep sizes (overrides the defaults)")
    parser.add_argument("--only", default="corpus,shards,sweep", help="comma-separated: corpus, shards, sweep")
    parser.add_argument("--out", type=Path, help="result JSON (default results/growth-<cpu>.json)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--where", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_each(args.one.split("|"), args.where, args.n, args.repeats)))
        return 0

    import torch

    import common

    device = torch.device("cpu")
    env = common.environment(device)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(LARGE_SIZES if args.large else SMALL_SIZES)
    trials = [int(t) for t in args.trials.split(",")] if args.trials else list(LARGE_TRIALS if args.large else SMALL_TRIALS)
    only = set(args.only.split(","))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="octssl-growth-") as tmp:
        for n in sizes:
            families = [("corpus", CORPUS_OPS, "volumes", write_manifest_corpus),
                        ("shards", SHARD_OPS, "samples", write_index)]
            for family, ops, unit, write in families:
                if family not in only:
                    continue
                where = Path(tmp) / f"{family}-{n}"
                write(where, n)
                for op, measured in zip(ops, run_child(ops, where, n), strict=True):
                    rows.append({"operation": op, "size": n, "unit": unit, **measured})
                    print(f"{op:45s} n={n:>9,} {_brief(rows[-1])}", flush=True)
                shutil.rmtree(where)
    if "sweep" in only:
        for t in trials:
            try:
                row = {"status": "ok", **sweep_overhead(t), "peak_MB": None}
            except Exception as err:  # noqa: BLE001  # recorded, the other sizes still run
                row = {"status": "failed", "error": common.error_text(err)}
            rows.append({"operation": "sweep overhead per trial", "size": t, "unit": "trials", **row})
            print(f"{'sweep overhead per trial':45s} n={t:>9,} {_brief(rows[-1])}", flush=True)
    for row in rows:
        if row["operation"] == "sweep overhead per trial" and row["status"] == "ok":
            row["seconds"] = row["per_trial_s"]  # the series plotted: seconds per trial
    result = {
        "env": common.finish(env), "sizes": sizes, "trials": trials, "append_batch": APPEND, "batch_per_rank": BATCH,
        "synthetic": "metadata-only manifest and index.json (see the module doc); real appended volumes",
        "rows": rows,
        "growth": {"seconds": series(rows, "seconds"),
                   "cpu_seconds": series([r for r in rows if "cpu_seconds" in r], "cpu_seconds"),
                   "peak_MB": series([r for r in rows if r.get("peak_MB") is not None], "peak_MB"),
                   "per_step_us": series([r for r in rows if "per_step_us" in r], "per_step_us")},
    }
    out = args.out or common.RESULTS / f"growth-{common.device_slug(device)}.json"
    common.write_json(out, result)
    plot(out.with_suffix(".png"), result)
    print(f"\nwrote {out}")
    for s in result["growth"]["seconds"]:
        k = "n/a" if s["exponent"] is None else f"{s['exponent']:.2f}"
        print(f"  {s['operation']:45s} exponent {k}")
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The growth table of benchmarks/README.md: per operation, wall (CPU) seconds and peak MB at each size, k."""
    sizes = sorted({r["size"] for r in result["rows"]})
    by = {(r["operation"], r["size"]): r for r in result["rows"]}
    k = {key: {s["operation"]: s["exponent"] for s in result["growth"].get(key, [])}
         for key in ("seconds", "cpu_seconds", "peak_MB", "per_step_us")}
    lines = ["| operation | " + " | ".join(f"{n:,}" for n in sizes) + " | k wall | k CPU | k peak |",
             "|---|" + "---|" * (len(sizes) + 3)]
    for op in dict.fromkeys(r["operation"] for r in result["rows"]):
        cells = []
        for n in sizes:
            row = by.get((op, n))
            if row is None:
                cells.append("")
            elif row["status"] != "ok":
                cells.append(row["status"].split(" (")[0])
            elif "per_step_us" in row:
                cells.append(f"{row['seconds'] * 1e3:.3g} ms, {row['per_step_us']:.3g} us/step")
            elif op == "sweep overhead per trial":
                cells.append(f"{row['per_trial_s']:.2f} s/trial")
            else:
                cpu = f" ({row['cpu_seconds']:.3g})" if "cpu_seconds" in row else ""
                cells.append(f"{row['seconds']:.3g} s{cpu}, {row['peak_MB']:.0f} MB")

        def fmt(key: str, op: str = op) -> str:
            value = k[key].get(op)
            return "" if value is None else f"{value:.2f}"

        wall = fmt("per_step_us") + " /step" if k["per_step_us"].get(op) is not None else fmt("seconds")
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {wall} | {fmt('cpu_seconds')} | {fmt('peak_MB')} |")
    return "\n".join(lines)


def _brief(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error', '')}"
    peak = f", {row['peak_MB']:.0f} MB" if row.get("peak_MB") is not None else ""
    return f"{row['seconds']:.4f} s{peak}" + (f" ({row['per_step_us']:.1f} us/step)" if "per_step_us" in row else "")


if __name__ == "__main__":
    sys.exit(main())
