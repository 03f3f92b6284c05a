"""Paper-size volumes: what a training crop read costs at 49 x 496 x 512, and the loader workers a GPU needs.

One run synthesises two corpora of the same volumes: ``sub`` in sub-volume chunks (the default for large
volumes, ``octssl.corpus.layout.volume_chunking``: 4 B-scans x 64 A-scans at full depth) and ``whole`` in one
chunk per volume (the format before, forced with ``volume_chunk=(49, 512)``). The synthetic renderer costs
~20 s per volume at this grid, so ``--distinct`` volumes are rendered and cycled under distinct ids (every
volume is stored and read on its own; the bytes per volume are those of a rendered one).

For each corpus, from local disk (page cache evicted before each pass with posix_fadvise DONTNEED, and
warm) and from S3 (SeaweedFS on loopback, ``octssl.dev.s3local``, smaller corpora ``--s3-volumes``), it
reads paper crops (32 B-scans x 256 A-scans, full depth) at the positions the training transform draws,
in-process (one loader worker's work): ``read`` = the crop read alone (``octssl.corpus.region.read_crop``),
``train`` = ``ZarrSource`` + ``TrainTransform`` (read, flips, z-score to float32, intensity), the sample a
loader worker hands to collate. Bytes are counted, not computed: every byte through Zarr's stores and the
shard fast path's reads (``bytes_per_crop``), and on local disk also the process's ``rchar`` (bytes
through read syscalls). The two corpora are measured in one process, interleaved, best of ``--repeats``:
their ratio is what to trust on a shared machine. Writes ``results/paper-<cpu>.json``.

    python benchmarks/bench_paper.py --volumes 240 --distinct 4 --crops 40 [--no-s3] [--work /tmp/x]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import common

MB = 1e6
GRID = (49, 496, 512)
CROP = (32, 256)
#: The reference FPN on one H200 at the paper crop (README.md, "Reference GPU measurements"): volumes/s.
GPU_RATES = {"paper fp32, batch 8": 34.7, "bf16 channels_last_3d, batch 8": 105.6,
             "bf16 channels_last_3d, batch 64": 130.7}


class Meter:
    """Counts the bytes this process reads through Zarr's stores and the shard fast path's preads."""

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0  # reads (on S3: range requests)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Meter]:
        from zarr.storage import FsspecStore, LocalStore

        from octssl.corpus import chunkread

        saved = [(LocalStore, "get", LocalStore.get), (FsspecStore, "get", FsspecStore.get),
                 (chunkread, "_pread", chunkread._pread), (chunkread, "_pread_into", chunkread._pread_into)]
        meter, original_pread, original_pread_into = self, chunkread._pread, chunkread._pread_into

        def store_get(original: Any) -> Any:
            async def get(self: Any, *args: Any, **kwargs: Any) -> Any:
                buffer = await original(self, *args, **kwargs)
                meter.bytes += 0 if buffer is None else len(buffer)
                meter.requests += 1
                return buffer
            return get

        def pread(fd: Any, count: int, offset: int) -> bytes:
            data: bytes = original_pread(fd, count, offset)
            meter.bytes += len(data)
            meter.requests += 1
            return data

        def pread_into(fd: Any, buffer: memoryview, offset: int) -> int:
            got: int = original_pread_into(fd, buffer, offset)
            meter.bytes += got
            meter.requests += 1
            return got

        LocalStore.get, FsspecStore.get = store_get(saved[0][2]), store_get(saved[1][2])  # type: ignore[method-assign]
        chunkread._pread, chunkread._pread_into = pread, pread_into
        try:
            yield self
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)


def rchar() -> int:
    """Bytes this process passed through read syscalls so far (/proc/self/io)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def evict(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def base_volumes(count: int, grid: tuple[int, int, int]) -> list[dict[str, Any]]:
    from octssl.corpus.synth import samples

    return list(samples(count, grid, seed=0, labelled=0.0))


def cycled(bases: list[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
    """``count`` samples: the rendered volumes in turn, each under its own id and patient."""
    for i in range(count):
        base = bases[i % len(bases)]
        meta = {**base["meta"], "patient": f"paper-{i:04d}", "split": "train"}
        yield {**base, "id": f"paper-{i:04d}", "meta": meta}


def build(path: Path, count: int, bases: Any, chunk: tuple[int, int] | None) -> dict[str, Any]:
    """Write the corpus at ``path`` (kept when there from an earlier run: ``--keep``); what it cost."""
    from octssl.corpus.store import Corpus

    info = path.with_suffix(".json")
    if info.is_file() and (path / "volumes.zarr").is_dir():
        return dict(json.loads(info.read_text()))
    seconds = None
    if not (path / "volumes.zarr").is_dir():
        start = time.perf_counter()
        Corpus.create(path, volume_chunk=chunk).append(cycled(bases(), count), progress=False)
        seconds = time.perf_counter() - start
    corpus = Corpus.open(path)
    stored = sum(f.stat().st_size for f in (path / "volumes.zarr" / "oct").rglob("*") if f.is_file())
    grid = corpus.grids[0]
    arr = corpus.array("oct", grid)
    volume_mb = np.prod([int(n) for n in grid.split("x")]) / MB
    result = {"volumes": len(corpus), "append_s": None if seconds is None else round(seconds, 1),
              "append_MB_per_s": None if seconds is None else round(count * volume_mb / seconds, 1),
              "stored_MB_per_volume": round(stored / count / MB, 2), "chunk": list(arr.chunks),
              "shard": list(arr.shards or ())}
    info.write_text(json.dumps(result))
    return result


def measure(where: str | Path, mode: str, crops: int, cold: bool, meter: Meter) -> dict[str, Any]:
    """``crops`` paper-crop reads (``read``) or training samples (``train``) of the corpus at ``where``."""
    from octssl.corpus.region import read_crop
    from octssl.corpus.store import Corpus
    from octssl.data.sources import ZarrSource
    from octssl.data.transforms import TrainTransform

    transform = TrainTransform(crop=CROP, targets=("faf",), seed=0)
    corpus = Corpus.open(where)
    source = ZarrSource(corpus, split=None, transform=transform, repeats=20)  # the paper's 20 crops per scan
    draws = np.random.default_rng(1).permutation(len(source))[:crops].tolist()
    if cold:
        evict(Path(where))
    for draw in draws if isinstance(where, Path) and not cold else draws[:1]:  # warm: page cache, connections
        source[draw]
    bytes_before, requests_before, rchar_before, start = meter.bytes, meter.requests, rchar(), time.perf_counter()
    for draw in draws:
        if mode == "train":
            source[draw]
        else:
            sid = source.ids[draw % len(source.ids)]
            read_crop(corpus, sid, *transform.window(sid, corpus.row(sid)["shape"], 0, draw))
    seconds = time.perf_counter() - start
    read = meter.bytes - bytes_before
    row = {"seconds": round(seconds, 3), "volumes_per_s": round(crops / seconds, 2),
           "bytes_per_crop": int(read / crops), "MB_read_per_s": round(read / MB / seconds, 1),
           "reads_per_crop": round((meter.requests - requests_before) / crops, 1)}
    if isinstance(where, Path):
        row["rchar_per_crop"] = int((rchar() - rchar_before) / crops)
    return row


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    env = common.environment(torch.device("cpu"))
    grid = tuple(int(n) for n in args.grid.split(","))
    rendered: list[Any] = []

    def bases() -> list[dict[str, Any]]:  # rendered when a corpus is built (not when kept from a run before)
        if not rendered:
            start = time.perf_counter()
            rendered.extend(base_volumes(args.distinct, grid))  # type: ignore[arg-type]
            rendered.append(time.perf_counter() - start)
        return rendered[:-1]
    layouts = {"sub": None if grid == GRID else (4, 64), "whole": (grid[0], grid[2])}
    corpora = {name: build(work / name, args.volumes, bases, chunk) for name, chunk in layouts.items()}
    places: list[tuple[str, str | Path, bool]] = []
    for name in layouts:
        places += [(f"{name} local cold", work / name, True), (f"{name} local warm", work / name, False)]
    s3_info: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if args.s3_volumes:
            from octssl.corpus.publish import publish
            from octssl.dev.s3local import LocalS3

            s3 = stack.enter_context(LocalS3(work / "s3"))
            os.environ.update(s3.env())
            for name, chunk in layouts.items():
                build(work / f"{name}-s3", args.s3_volumes, bases, chunk)
                if args.build_only:
                    continue
                begin = time.perf_counter()
                publish(work / f"{name}-s3", f"s3://{s3.bucket}/paper/{name}", progress=False)
                s3_info[name] = {"volumes": args.s3_volumes, "publish_s": round(time.perf_counter() - begin, 1)}
                places.append((f"{name} S3", f"s3://{s3.bucket}/paper/{name}", False))
        if args.build_only:
            return {}
        meter = Meter()
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        with meter.installed():
            for _ in range(args.repeats):  # interleaved: both layouts see the same spells of load
                for mode in ("read", "train"):
                    for label, where, cold in places:
                        crops = args.crops if "S3" not in label else max(8, args.crops // 2)
                        row = measure(where, mode, crops, cold, meter)
                        best = rows.get((label, mode))
                        if best is None or row["seconds"] / crops < best["seconds"] / best["crops"]:
                            rows[(label, mode)] = {"place": label, "mode": mode, "crops": crops, **row}
    table = list(rows.values())
    for row in table:
        other = rows.get((row["place"].replace("sub", "whole"), row["mode"]))
        if row["place"].startswith("sub") and other:
            row["bytes_ratio_to_whole"] = round(row["bytes_per_crop"] / other["bytes_per_crop"], 3)
            row["speed_ratio_to_whole"] = round(row["volumes_per_s"] / other["volumes_per_s"], 2)
    return {"env": common.finish(env), "grid": list(grid), "crop": list(CROP), "render_s": round(rendered[-1], 1) if rendered else None,
            "distinct_volumes": args.distinct, "corpora": corpora, "s3": s3_info, "rows": table,
            "capacity": capacity(table), "volume_MB": round(np.prod(grid) / MB, 2),
            "crop_MB": round(CROP[0] * grid[1] * CROP[1] / MB, 2),
            "note": "shared 2-core machine: ratios within one run are what to trust; absolute rates vary with load"}


def capacity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Loader workers per GPU (each worker as fast as this run's in-process ``train`` rate) and the storage
    bandwidth per GPU, at each measured H200 rate of the reference FPN."""
    out = []
    for row in rows:
        if row["mode"] != "train":
            continue
        for gpu, rate in GPU_RATES.items():
            out.append({"place": row["place"], "gpu": gpu, "gpu_volumes_per_s": rate,
                        "workers_per_gpu": round(rate / row["volumes_per_s"], 1),
                        "storage_MB_per_s_per_gpu": round(rate * row["bytes_per_crop"] / MB, 1)})
    return out


def print_table(result: dict[str, Any]) -> None:
    print(f"grid {result['grid']} ({result['volume_MB']} MB), crop {result['crop']} ({result['crop_MB']} MB); "
          f"load {result['env']['load_average_start']} -> {result['env']['load_average_end']}")
    for name, info in result["corpora"].items():
        print(f"corpus {name}: {info}")
    print(f"{'place':18s} {'mode':6s} {'vol/s':>7s} {'MB/crop':>8s} {'rchar MB':>9s} {'reads':>6s} {'MB/s':>7s} "
          f"{'x whole':>8s}")
    for row in result["rows"]:
        rc = f"{row['rchar_per_crop'] / MB:9.2f}" if "rchar_per_crop" in row else f"{'':9s}"
        ratio = f"{row['bytes_ratio_to_whole']:.2f}B {row['speed_ratio_to_whole']:.2f}v" if "bytes_ratio_to_whole" in row else ""
        print(f"{row['place']:18s} {row['mode']:6s} {row['volumes_per_s']:7.2f} {row['bytes_per_crop'] / MB:8.2f} "
              f"{rc} {row['reads_per_crop']:6.1f} {row['MB_read_per_s']:7.1f} {ratio:>8s}")
    for row in result["capacity"]:
        print(f"{row['place']:18s} {row['gpu']:34s} {row['workers_per_gpu']:6.1f} workers/GPU "
              f"{row['storage_MB_per_s_per_gpu']:7.1f} MB/s/GPU")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=240)
    parser.add_argument("--grid", default=",".join(map(str, GRID)), help="nB,D,W (smaller: a smoke run)")
    parser.add_argument("--distinct", type=int, default=4, help="volumes rendered (cycled to --volumes)")
    parser.add_argument("--s3-volumes", type=int, default=24, help="volumes of the S3 corpora (0: no S3)")
    parser.add_argument("--crops", type=int, default=40, help="crop reads per measured pass")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None,
                        help="folder for the corpora, kept and reused by later runs (default: a temp folder)")
    parser.add_argument("--build-only", action="store_true", help="write the corpora into --keep and stop")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="octssl-bench-paper-") as tmp:
            result = run(args, Path(tmp))
    if args.build_only:
        return result
    print_table(result)
    out = args.out or common.RESULTS / f"paper-{result['env']['device_slug']}.json"
    common.write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
