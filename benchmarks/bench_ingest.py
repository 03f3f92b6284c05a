"""Ingest benchmark: files/s and MB/s (total and per worker) on real .vol files and synthetic raster stacks.

Usage: python benchmarks/bench_ingest.py [--repeats 8] [--stacks 6] [--workers 1,2]
                                         [--out benchmarks/results/ingest-cpu.json]

Real files: the project's two Spectralis test exports (one 496 x 768 B-scan + 768 x 768 SLO each, 2.1 MB;
not in the repository: the benchmark reads them from beside the checkout when they are there), copied ``repeats`` times each. Every copy gets a distinct counter in the header's spare
bytes (offset 300, inside the 1790 reserved bytes) so its content hash differs and ingest does not skip it
as a duplicate. Synthetic: ``stacks`` raster stack folders of 49 PNG B-scans of 496 x 512 (speckle plus a
bright retina band) with a 512 x 512 localizer, gridded to 49 x 128 x 512. Each measurement is one
end-to-end ingest (discover, hash, read, convert, append) into a fresh corpus; MB counts source bytes.
Plus the seconds of each stage for one unit (in-process), to show where the time goes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import common
from common import cpu_name  # benchmarks/ is on sys.path when a script runs
from octssl.ingest.pipeline import ingest
from octssl.ingest.stack import write_stack

SHARED_VOL = Path(__file__).resolve().parents[2] / "shared" / "data" / "heidelberg-vol"
REAL_FILES = ("Willis_B_716_0.vol", "Willis_B_716_2.vol")
SPARE_OFFSET = 300


def real_copies(folder: Path, repeats: int) -> int:
    folder.mkdir(parents=True)
    count = 0
    for name in REAL_FILES:
        data = bytearray((SHARED_VOL / name).read_bytes())
        for i in range(repeats):
            data[SPARE_OFFSET : SPARE_OFFSET + 8] = struct.pack("<Q", i + 1)
            (folder / f"{Path(name).stem}_{i:03d}.vol").write_bytes(data)
            count += 1
    return count


def synthetic_stacks(folder: Path, stacks: int, shape: tuple[int, int, int] = (49, 496, 512)) -> int:
    rng = np.random.default_rng(0)
    n_b, depth, width = shape
    for s in range(stacks):
        bscans = rng.gamma(2.0, 20.0, shape).clip(0, 255).astype(np.uint8)
        bscans[:, 180:300, :] = np.clip(bscans[:, 180:300, :].astype(np.int16) + 120, 0, 255).astype(np.uint8)
        localizer = rng.integers(0, 256, (width, width), dtype=np.uint8)
        sidecar = {"spacing_mm": [0.12, 0.0039, 0.0117], "laterality": "OD" if s % 2 else "OS",
                   "acquired": "2020-01-01", "patient_id": f"bench-{s}", "localizer_spacing_mm": [0.0117, 0.0117]}
        write_stack(folder / f"stack_{s:03d}", bscans, sidecar, localizer=localizer)
    return stacks


def measure(src: Path, work: Path, workers: int, grid: tuple[int, int, int]) -> dict[str, Any]:
    out = work / f"corpus_{workers}_{time.monotonic_ns()}"
    report = ingest([src], out, grid=grid, workers=workers, ephemeral_key=True, progress=False)
    if report.rejected:
        raise RuntimeError(f"benchmark inputs rejected: {report.rejected[:3]}")
    units, mb, sec = report.units, report.bytes_read / 1e6, report.seconds
    shutil.rmtree(out)
    return {
        "workers": workers, "executor": report.executor, "units": units, "volumes": len(report.ingested),
        "source_mb": round(mb, 2), "seconds": round(sec, 3),
        "files_per_s": round(units / sec, 3), "mb_per_s": round(mb / sec, 2),
        "files_per_s_per_worker": round(units / sec / workers, 3), "mb_per_s_per_worker": round(mb / sec / workers, 2),
    }


def phases(unit: Path, work: Path) -> dict[str, float]:
    """Seconds of each stage for one unit, in this process: hash, read, convert (register + grid), append."""
    from octssl.corpus.store import Corpus
    from octssl.ingest.convert import read_scans, to_record
    from octssl.ingest.detect import content_hash, detect_format

    clock = time.perf_counter()
    sha = content_hash(unit)
    hashed = time.perf_counter()
    scans = read_scans(unit, detect_format(unit))
    read = time.perf_counter()
    records = [to_record(s, sample_id=f"p{i}", source=sha, key=b"bench", grid=(49, 128, 512), depth_mm=1.0)
               for i, s in enumerate(scans)]
    converted = time.perf_counter()
    corpus = Corpus.create(work / f"phases_{time.monotonic_ns()}")
    created = time.perf_counter()
    corpus.append([r.sample for r in records], progress=False)
    appended = time.perf_counter()
    shutil.rmtree(corpus.path)
    return {"hash_s": round(hashed - clock, 4), "read_s": round(read - hashed, 4),
            "convert_s": round(converted - read, 4), "append_s": round(appended - created, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="copies of each real file")
    parser.add_argument("--stacks", type=int, default=6, help="synthetic 49 x 496 x 512 stacks")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ingest-cpu.json")
    args = parser.parse_args()
    logging.getLogger("octssl.ingest").setLevel(logging.ERROR)  # the ephemeral-key warning, once per run
    worker_counts = [int(w) for w in args.workers.split(",")]
    results: dict[str, Any] = {
        "benchmark": "ingest", "device": f"CPU: {cpu_name()}", "cpu_count": os.cpu_count(),
        "load_avg_1m_before": round(os.getloadavg()[0], 2),
        "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        if (SHARED_VOL / REAL_FILES[0]).is_file():
            real_copies(work / "real", args.repeats)
            # warm-up: imports (eyepy, construct, zarr) are paid here, not by the first measurement
            ingest([sorted((work / "real").iterdir())[0]], work / "warmup", ephemeral_key=True, progress=False)
            results["real_vol"] = [measure(work / "real", work, w, (49, 128, 512)) for w in worker_counts]
            results["real_vol_phases_one_file"] = phases(sorted((work / "real").iterdir())[0], work)
        else:
            results["real_vol"] = f"skipped: {SHARED_VOL} is absent"
        synthetic_stacks(work / "stacks", args.stacks)
        results["raster_stack_49x496x512"] = [measure(work / "stacks", work, w, (49, 128, 512)) for w in worker_counts]
        results["raster_stack_phases_one_stack"] = phases(work / "stacks" / "stack_000", work)
    results["load_avg_1m_after"] = round(os.getloadavg()[0], 2)  # the machine is shared: read numbers with it
    common.write_json(args.out, results, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
