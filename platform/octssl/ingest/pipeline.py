"""`octssl ingest`: walk sources, convert units in parallel, append to the corpus in atomic batches.

Per unit: hash its content (a worker task); skip it when the corpus already holds that ``source`` hash
(so re-running an ingest is a no-op); else convert it (a second worker task) into records or a reject
reason. The driver appends records in batches of ``batch_size`` through ``Corpus.append`` (atomic: a crash
mid-ingest leaves every earlier batch committed and the corpus as it was before the failing batch) and
records rejects in ``rejects.parquet`` after each batch. Workers: Ray tasks when a Ray cluster is
already there (``RAY_ADDRESS`` set, or ``ray.init`` done in this process), else a process pool of
``workers`` processes (in-process when ``workers`` is 1).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from octssl.cluster.local import telemetry_off
from octssl.corpus.manifest import parse_grid as parse
from octssl.errors import IngestError, OctsslError, SampleError
from octssl.ingest import sink
from octssl.ingest.convert import Record, UnitResult, convert_unit, strip_path
from octssl.ingest.detect import content_hash, find_units
from octssl.ingest.grid import DEPTH_WINDOW_MM
from octssl.ingest.phi import (
    DATES_SETTING,
    EPHEMERAL_WARNING,
    FINGERPRINT_SETTING,
    REAL,
    SHIFTED,
    check_dates,
    check_key,
    key_fingerprint,
    load_key,
)
from octssl.ingest.pictures import png, volume_preview
from octssl.observe import progress as progress_display
from octssl.storage.files import atomic_write
from octssl.vocab import MASKS

logger = logging.getLogger("octssl.ingest")
DEFAULT_GRID = (49, 128, 512)


@dataclass
class IngestReport:
    """What one ingest did. ``rejected``: (path, reason); ``skipped``: paths already in the corpus."""

    corpus: str
    units: int = 0
    ingested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    executor: str = "inline"
    ephemeral_key: bool = False
    previews: list[str] = field(default_factory=list)


def parse_grid(text: str) -> tuple[int, int, int]:
    """``--grid`` for ingest: :func:`octssl.corpus.manifest.parse_grid`, failing as an IngestError."""

    try:
        return parse(text)
    except ValueError as err:
        raise IngestError(f"--{err}") from None


def parse_maps(items: list[str]) -> dict[str, str]:
    """``--map NAME=KIND`` options -> {map name in the file: label kind}; IngestError naming a bad one."""

    maps: dict[str, str] = {}
    for item in items:
        name, _, kind = item.rpartition("=")
        if not name or kind not in MASKS:
            raise IngestError(f"--map {item!r}: expected NAME=KIND with KIND one of {MASKS}, e.g. --map GA=ga")
        maps[name] = kind
    return maps


def ingest(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    grid: tuple[int, int, int] = DEFAULT_GRID,
    workers: int | None = None,
    ephemeral_key: bool = False,
    batch_size: int = 16,
    depth_mm: float = DEPTH_WINDOW_MM,
    progress: bool = True,
    on_reject: Callable[[str, str], None] | None = None,
    maps: dict[str, str] | None = None,
    previews: int = 16,
    keep_real_dates: bool = False,
) -> IngestReport:
    """Ingest every unit under ``sources`` into the corpus at ``out`` (created when absent). ``maps`` names
    the annotation maps of eyepy ``.eye`` files to keep as labels ({map name: ga|rpd}). The first
    ``previews`` volumes ingested get a picture in ``out/previews/<id>.png`` (B-scans, and the localizer with
    the scan positions drawn) for a person to check the registration. Acquisition dates are stored shifted
    by a keyed offset per patient unless ``keep_real_dates`` (recorded in the corpus settings; the two never
    mix in one corpus)."""
    start = time.perf_counter()
    key, ephemeral = load_key(ephemeral_key)  # refuse before touching anything
    if ephemeral:
        logger.warning(EPHEMERAL_WARNING)
    if not (math.isfinite(depth_mm) and depth_mm > 0):
        raise IngestError(f"--depth-mm {depth_mm}: the depth window must be a positive number of mm (default "
                          f"{DEPTH_WINDOW_MM})")
    if batch_size < 1:
        raise IngestError(f"--batch-size {batch_size}: must be at least 1")
    units, unusable = find_units([Path(s) for s in sources])
    if not units:
        raise IngestError(_nothing_to_ingest(sources, unusable))
    out = Path(out)
    fingerprint = key_fingerprint(key)
    corpus = sink.open_corpus(out, fingerprint)
    check_key(corpus.settings.get(FINGERPRINT_SETTING), key, out, "ingest")  # before anything is appended
    dates = REAL if keep_real_dates else SHIFTED
    check_dates(corpus.settings.get(DATES_SETTING), len(corpus) > 0, dates, out)  # before anything is appended
    known = sink.ingested_sources(corpus)
    report = IngestReport(corpus=str(out), units=len(units) + len(unusable), ephemeral_key=ephemeral)
    batch: list[Record] = []
    rejects: list[tuple[str, str, str]] = []
    taken: set[str] = set()

    def reject(path: str, sha: str, reason: str) -> None:
        rejects.append((path, sha, reason))
        report.rejected.append((path, reason))
        if on_reject is not None:
            on_reject(path, reason)

    def flush() -> None:
        appended = _append_batch(corpus, batch, reject, {FINGERPRINT_SETTING: fingerprint, DATES_SETTING: dates})
        report.ingested.extend(appended)
        report.previews += write_previews(out, [r for r in batch if r.sample["id"] in set(appended)],
                                          previews - len(report.previews))
        batch.clear()
        sink.record_rejects(out, rejects)

    for path, reason in unusable:
        reject(path, "", reason)
    workers = max(1, workers or os.cpu_count() or 1)
    with _executor(min(workers, max(1, len(units)))) as (submit, kind), progress_display.stage("ingest", len(units), progress) as tick:
        report.executor = kind
        pending: dict[Future, tuple[str, str]] = {}
        queue = [str(u) for u in units]
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                path = queue.pop(0)
                pending[submit(content_hash, Path(path))] = ("hash", path)
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                stage, path = pending.pop(future)
                if stage == "hash":
                    try:
                        sha = future.result()
                    except (OSError, OctsslError) as err:
                        reject(path, "", strip_path(str(err), path) if isinstance(err, OctsslError)
                               else f"cannot read ({err})")
                        tick()
                        continue
                    if sha in known or sha in taken:
                        report.skipped.append(path)
                        tick()
                        continue
                    taken.add(sha)
                    pending[submit(convert_unit, path, sha, key, grid, depth_mm, maps or {},
                                   keep_real_dates)] = ("convert", path)
                    continue
                result: UnitResult = future.result()
                report.bytes_read += result.nbytes
                tick()
                if result.reason is not None:
                    reject(result.path, result.sha256, result.reason)
                    continue
                for record in result.records:
                    record.path = result.path
                batch.extend(result.records)
                if len(batch) >= batch_size:
                    flush()
        flush()
    report.seconds = time.perf_counter() - start
    return report


PREVIEWS_DIR = "previews"


def write_previews(out: Path, records: list[Record], limit: int) -> list[str]:
    """``out/previews/<id>.png`` for up to ``limit`` of ``records``; returns the paths written."""

    written = []
    for record in records[: max(0, limit)]:
        path = out / PREVIEWS_DIR / f"{record.sample['id']}.png"
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, png(volume_preview(record.sample, record.localizer, record.localizer_spacing_mm,
                                              record.positions_mm)))
        written.append(str(path))
    return written


def _nothing_to_ingest(sources: Sequence[str | Path], unusable: list[tuple[str, str]]) -> str:
    """The refusal when the sources hold no scan: no corpus is created for nothing."""
    named = ", ".join(str(s) for s in sources)
    why = f"; {len(unusable)} unusable: {unusable[0][0]}: {unusable[0][1]}" if unusable else ""
    return (f"{named}: no scans found (looked for .vol, .e2e, .fds/.fda, DICOM, HEYEX XML, .eye files and image "
            f"stacks){why}; nothing ingested and no corpus written")


def _append_batch(corpus, batch: list[Record], reject: Callable[[str, str, str], None],
                  settings: dict[str, str]) -> list[str]:
    """Append ``batch`` atomically (``settings`` the corpus lacks recorded in the same commit); when the
    corpus refuses a sample, retry one by one and reject it."""
    if not batch:
        return []
    try:
        return sink.append_records(corpus, batch, settings)
    except SampleError:
        pass
    ids: list[str] = []
    for record in batch:
        try:
            ids.extend(sink.append_records(corpus, [record], settings))
        except SampleError as err:
            source = record.sample["meta"]["source"]
            where = record.path or f"sample {record.sample['id']}"
            reject(where, source, f"corpus refused sample {record.sample['id']} ({err})")
    return ids


def _ray_wanted() -> bool:
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@contextmanager
def _executor(workers: int) -> Iterator[tuple[Callable[..., Future], str]]:
    """A ``submit(fn, *args) -> Future`` backed by Ray, a process pool or the calling process."""
    if _ray_wanted():
        import ray

        if not ray.is_initialized():
            telemetry_off()
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
        remotes: dict[Any, Any] = {}

        def submit_ray(fn: Callable[..., Any], *args: Any) -> Future:
            if fn not in remotes:
                remotes[fn] = ray.remote(num_cpus=1)(fn)
            return remotes[fn].remote(*args).future()

        yield submit_ray, "ray"
    elif workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            yield pool.submit, f"processes:{workers}"
    else:

        def submit_inline(fn: Callable[..., Any], *args: Any) -> Future:
            future: Future = Future()
            try:
                future.set_result(fn(*args))
            except Exception as err:  # noqa: BLE001 - delivered through the future like a pool would
                future.set_exception(err)
            return future

        yield submit_inline, "inline"


#: ``with unit_executor(workers) as (submit, kind)``: Ray tasks when a cluster is there, else processes or
#: inline; shared with ``octssl predict`` so that files spread over a cluster the same way.
unit_executor = _executor
