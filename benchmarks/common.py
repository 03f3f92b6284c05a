"""Shared timing helpers for the benchmarks: environment record, warm-up + synchronised repeats, peak memory.

Every benchmark records the same facts beside its numbers (:func:`environment`): versions of torch, CUDA,
cuDNN, DeepSpeed and Ray, the device name, the CPU threads torch uses and the load average before and after
(the CPU machine is shared with other people's test runs). Timings are medians over repeats with their
spread, after warm-up, with the device synchronised before every clock read (:func:`time_repeats`).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def version(package: str) -> str | None:
    """Installed version without importing the package (DeepSpeed and Ray imports cost seconds)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def device_name(device: torch.device) -> str:
    """Human name: 'NVIDIA H200' or 'AMD EPYC (2 cores)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


#: CPU flags that change what a benchmark measures (native bf16 and AMX matmuls, AVX-512), by their slug names
SLUG_FLAGS = {"avx512f": "avx512", "avx512_bf16": "bf16", "amx_bf16": "amx"}


def device_slug(device: torch.device) -> str:
    """File-name form of the device: 'cuda-nvidia-h200', 'cpu-amd-epyc-avx512-bf16'. A CPU's slug carries its
    distinguishing flags: one model name covers EPYCs with and without avx512_bf16, whose numbers differ."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    slug = f"{device.type}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if device.type == "cuda":
        return slug
    flags = cpu_flags()
    return "-".join([slug, *(short for flag, short in SLUG_FLAGS.items() if flag in flags)])


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
        return torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    return torch.device(requested)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (Linux PSI), in percent.

    On the shared machine this says more than the load average: near 0 the benchmark had the cores to
    itself; at 80-90 other people's processes were taking turns with it (and torch's OpenMP threads, which
    spin at barriers, then slow down far more than the share of CPU lost).
    """
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(item.split("=") for item in line.split()[1:])
    return float(fields["avg10"])


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (the numbers then come from code no commit holds)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """What every result file records at its top: the code (commit, uncommitted changes) and the CPU flags."""
    return {"git_commit": git_commit(), "git_dirty": git_dirty(),
            "cpu_flags": sorted(cpu_flags() & set(SLUG_FLAGS))}


def file_digests(paths: list[Path]) -> list[dict[str, str]]:
    """``{"file", "sha256"}`` of each of ``paths`` that exists (names relative to the results folder): a
    suite file lists its outputs so that a check can tell they were committed together."""
    import hashlib

    return [{"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in paths if p.is_file()]


def environment(device: torch.device) -> dict[str, Any]:
    """The facts a reader needs to judge a number: where, with what, under what load."""
    cuda = device.type == "cuda"
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Whether bf16 can be fast on this CPU (native bf16 dot products): what the CPU precision policy hinges on.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"}),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "deepspeed": version("deepspeed"),
        "ray": version("ray"),
        "numpy": version("numpy"),
        "git_commit": git_commit(),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
        "cpu_pressure_avg10_start": cpu_pressure(),
        "shared_machine": not cuda,
    }


def finish(env: dict[str, Any]) -> dict[str, Any]:
    """Close an environment record: load average at the end."""
    env["load_average_end"] = load_average()
    env["cpu_pressure_avg10_end"] = cpu_pressure()
    env["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements (spread = (max - min) / median)."""
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / med if med else None,
        "n": len(values),
        "values": [round(v, 6) for v in values],
    }


def time_repeats(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int,
                 inner: int = 1) -> dict[str, Any]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``repeats`` timings of ``inner`` calls each.

    The device is synchronised before each clock read, so queued GPU work is counted where it was issued.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        seconds.append((time.perf_counter() - start) / inner)
    return summarize(seconds)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_row_memory(device: Any, compiled: bool) -> None:
    """After a benchmark row: drop compiled graphs, empty the CUDA cache, give heap pages back to the OS."""
    import torch

    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    release_host_memory()


def release_host_memory() -> None:
    """Give freed heap pages back to the OS so that the next CPU peak-memory reading starts clean."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the work inside the ``with`` block.

    GPU: ``torch.cuda.max_memory_allocated`` (what tensors used, allocator slack excluded). CPU: the rise of
    the process's resident set above its level at entry, sampled every ``interval`` s by a thread (CPU
    allocators keep no peak counter; short spikes between samples can be missed).
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device, self.interval = device, interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            release_host_memory()
            self._base = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() - self._base)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() - self._base)

    @property
    def what(self) -> str:
        return "max_memory_allocated" if self.device.type == "cuda" else "rss_rise_sampled"


def result_path(kind: str, device: torch.device, suffix: str = "", out_dir: Path | None = None) -> Path:
    """``results/<kind>-<device slug>[-suffix].json``."""
    name = f"{kind}-{device_slug(device)}" + (f"-{suffix}" if suffix else "")
    return (out_dir or RESULTS) / f"{name}.json"


def write_json(path: Path, payload: dict[str, Any], indent: int = 1) -> Path:
    """``payload`` as JSON at ``path``, :func:`provenance` first: every result names the commit and CPU."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**provenance(), **payload}, indent=indent, default=str) + "\n")
    return path


def error_text(err: BaseException) -> str:
    """One line naming the error, for a 'failed' row."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:400]


def init_single_process_group(device: torch.device) -> None:
    """A world of one (DeepSpeed needs a process group even in one process): nccl on GPU, gloo on CPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def bar_plot(path: Path, labels: list[str], values: list[float | None], *, title: str, xlabel: str,
             notes: list[str] | None = None) -> Path:
    """Horizontal bars (matplotlib Agg); a missing value (failed/skipped) is drawn as an empty bar, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.4))
    shown = [v if v is not None else 0.0 for v in values]
    bars = ax.barh(range(len(labels)), shown, color=["#4c72b0" if v is not None else "#dddddd" for v in values])
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    for i, (bar, v) in enumerate(zip(bars, values, strict=True)):
        note = notes[i] if notes else ""
        text = (f"{v:.3g} {note}" if v is not None else f"failed/skipped {note}").strip()
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text, va="center", fontsize=7)
    ax.margins(x=0.25)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
