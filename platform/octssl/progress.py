"""Terminal progress, one module for every long stage: a bar for N items (:func:`stage`) and a live view of
a training run (:class:`RunWatcher`, which tails ``RUN_DIR/metrics.jsonl``). The sweep's live table
(:class:`octssl.tune.progress.SweepProgress`) draws on the same console.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def console() -> Any:
    """The console progress is drawn on (stderr: stdout stays for results)."""
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def stage(what: str, total: int | None, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A progress bar for a stage of ``total`` items; yields ``advance(n=1)`` (a no-op when disabled)."""
    if not enabled:
        yield _ignore
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console()) as bar:
        task = bar.add_task(what, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance


def _ignore(n: int = 1) -> None:
    """``advance`` when progress is off."""


def track(items: Any, what: str, enabled: bool = True) -> Iterator[Any]:
    """Iterate ``items`` with a progress bar (its total from ``len`` when it has one)."""
    total = len(items) if hasattr(items, "__len__") else None
    with stage(what, total, enabled) as advance:
        for item in items:
            yield item
            advance(1)


class RunWatcher:
    """Shows step, loss, samples/s and ETA on the terminal by tailing RUN_DIR/metrics.jsonl."""

    def __init__(self, run_dir: Path, enabled: bool = True, interval: float = 0.5) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled, self.interval = enabled, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        with Progress(*columns, transient=False) as bar:
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

