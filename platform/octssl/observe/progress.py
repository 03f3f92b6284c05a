"""Terminal progress, one module for every long stage: a bar for N items (:func:`stage`, :func:`track`) and a
live view of a training run (:class:`RunWatcher`, which tails ``RUN_DIR/metrics.jsonl``). The sweep's live
table (:class:`octssl.tune.live.SweepProgress`) draws on the same console and the same :class:`Ticker`.

On a terminal these are rich bars and tables. When stderr is not a terminal (CI, ``make demo > log``, a
RayJob's logs) they print one plain line at a steady cadence instead (every ``OCTSSL_PROGRESS_EVERY``
seconds, 30 by default) and a last line when the stage ends, so a long stage never looks hung.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

EVERY_ENV = "OCTSSL_PROGRESS_EVERY"


def console() -> Any:
    """The console progress is drawn on (stderr: stdout stays for results)."""

    return Console(stderr=True)


def interactive() -> bool:
    """Whether progress can redraw in place (stderr is a terminal)."""
    return sys.stderr.isatty()


def cadence() -> float:
    """Seconds between two plain progress lines ($OCTSSL_PROGRESS_EVERY, default 30)."""
    try:
        return max(0.05, float(os.environ.get(EVERY_ENV, "30")))
    except ValueError:
        return 30.0


def elapsed(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    s = int(seconds)
    hours, minutes = s // 3600, s % 3600 // 60
    return f"{hours}h{minutes:02d}m{s % 60:02d}s" if hours else f"{minutes}m{s % 60:02d}s" if minutes else f"{s}s"


_ELAPSED = re.compile(r", (\d+h)?(\d+m)?\d+s$")  # a line's trailing elapsed time (:func:`elapsed`)


class Ticker:
    """Prints ``line()`` to stderr every :func:`cadence` seconds from a thread, and once more at ``stop``
    unless that line would only repeat the last one with a later elapsed time (its final ``, <time>``)."""

    def __init__(self, line: Callable[[], str | None]) -> None:
        self.line = line
        self._last: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(cadence()):
            self._emit()

    def _emit(self, final: bool = False) -> None:
        text = self.line()
        if not text:
            return
        state = _ELAPSED.sub("", text)
        if final and state == self._last:
            return
        self._last = state
        print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._emit(final=True)


@contextmanager
def stage(what: str, total: int | None, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Progress of a stage of ``total`` items; yields ``advance(n=1)`` (a no-op when disabled)."""
    if not enabled:
        yield _ignore
        return
    if not interactive():
        done = [0]
        started = time.monotonic()

        def line() -> str:
            share = f" ({100 * done[0] / total:.0f}%)" if total else ""
            return f"{what}: {done[0]}/{total if total is not None else '?'}{share}, {elapsed(time.monotonic() - started)}"

        ticker = Ticker(line).start()
        lock = threading.Lock()

        def advance(n: int = 1) -> None:
            with lock:
                done[0] += n

        try:
            yield advance
        finally:
            ticker.stop()
        return

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console()) as bar:
        task = bar.add_task(what, total=total)

        def advance_bar(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance_bar


def _ignore(n: int = 1) -> None:
    """``advance`` when progress is off."""


def track(items: Any, what: str, enabled: bool = True) -> Iterator[Any]:
    """Iterate ``items`` with progress (its total from ``len`` when it has one)."""
    total = len(items) if hasattr(items, "__len__") else None
    with stage(what, total, enabled) as advance:
        for item in items:
            yield item
            advance(1)


class RunWatcher:
    """Shows step, loss, samples/s and ETA of a training run by tailing RUN_DIR/metrics.jsonl."""

    def __init__(self, run_dir: Path, enabled: bool = True, interval: float = 0.5) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled, self.interval = enabled, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticker: Ticker | None = None
        self._started = time.monotonic()

    def start(self) -> None:
        if not self.enabled:
            return
        if interactive():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        else:
            self._ticker = Ticker(self.line).start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._ticker is not None:
            self._ticker.stop()

    def line(self) -> str:
        """The run's state as one plain line."""
        name = self.path.parent.name
        last = _last_record(self.path)
        if not last:
            return f"{name}: starting workers, {elapsed(time.monotonic() - self._started)}"
        loss = f", loss {last['loss']:.4f}" if last.get("loss") is not None else ""
        rate = f", {last['samples_per_s']:.1f} samples/s" if last.get("samples_per_s") is not None else ""
        return (f"{name}: step {last['step']}/{last['total_steps']}{loss}{rate}, "
                f"{elapsed(time.monotonic() - self._started)}")

    def _run(self) -> None:

        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        with Progress(*columns, transient=False, console=console()) as bar:
            task = bar.add_task(self.path.parent.name, total=None, info="starting workers...")
            while not self._stop.wait(self.interval):
                last = _last_record(self.path)
                if last:
                    info = f"loss {last['loss']:.4f}  {last['samples_per_s']:.1f} samples/s" if last.get("loss") is not None else ""
                    bar.update(task, completed=last["step"], total=last["total_steps"], info=info)
            last = _last_record(self.path)
            if last:
                bar.update(task, completed=last["step"], total=last["total_steps"])


def _last_record(path: Path) -> dict[str, Any] | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None
