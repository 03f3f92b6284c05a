"""Data benchmark: volumes/s and MB/s of voxels for ZarrSource and StreamSource beside a raw memmap read.

One run synthesises a corpus, exports its shards, writes the same volumes as one uncompressed ``.npy``
memmap, then reads every volume through each path: the raw memmap, ZarrSource and StreamSource with
0 (in-process) and 1..N DataLoader workers. ``--cold`` also evicts the files from the page cache
(posix_fadvise DONTNEED on this run's files only) before each read, so the numbers include the disk.
It also times writing the shards with ``tarfile`` (what export_shards uses) against
``webdataset.TarWriter``. Prints a table with the ratios to raw and per-worker rates, and writes JSON to
``benchmarks/results/data-<host>.json``. Targets (issue 2): >= 200 MB/s per loader worker, >= 0.5x raw.

    python benchmarks/bench_data.py --volumes 48 --grid 32,128,256 --workers 2
"""

from __future__ import annotations

import argparse
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

    from octssl.data.shards import _add_member, _npy_bytes, _png_bytes

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


def run(volumes: int, grid: tuple[int, int, int], max_workers: int, batch: int, repeats: int, cold: bool,
        passes: int, work: Path) -> dict[str, Any]:
    from octssl.data.shards import export_shards
    from octssl.data.sources import StreamSource, ZarrSource
    from octssl.data.synth import synthesize

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
    rows += bench_writers(corpus, ids[: min(len(ids), 16)], work)
    return {
        "host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "note": "shared machine: other users' load varies; best of repeats",
        "volumes": len(ids), "grid": list(grid), "MB_per_volume": round(np.prod(grid) / MB, 3),
        "batch": batch, "cold_cache": cold, "repeats": repeats, "passes": passes,
        "synth_s": round(synth_s, 2), "export_s": round(export_s, 2),
        "export_MB_per_s": round(nbytes / MB / export_s, 1), "rows": rows,
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
        print(f"{row['path']:32s} {row['workers']:7d} {row['volumes_per_s']:8.1f} {row['MB_per_s']:8.1f} "
              f"{row['MB_per_s_per_worker']:9.1f} {ratio:>6s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=48)
    parser.add_argument("--grid", default="32,128,256", help="nB,D,W of each synthetic volume")
    parser.add_argument("--workers", type=int, default=2, help="largest DataLoader worker count (0..N)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--passes", type=int, default=4, help="reads of each volume per timed source epoch")
    parser.add_argument("--cold", action="store_true", help="evict this run's files from the page cache first")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/data-<host>.json)")
    args = parser.parse_args()
    grid = tuple(int(n) for n in args.grid.split(","))
    with tempfile.TemporaryDirectory(prefix="octssl-bench-data-") as tmp:
        result = run(args.volumes, grid, args.workers, args.batch, args.repeats, args.cold, args.passes,
                     Path(tmp))
    print_table(result)
    name = (socket.gethostname() or result["cpu"]).replace("/", "_")
    out = args.out or RESULTS / f"data-{name}{'-cold' if args.cold else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
