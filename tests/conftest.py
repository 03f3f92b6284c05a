"""Shared fixtures: paths to ../shared, synthetic corpora (a shared read-only one and a private factory)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The suite phones no one: no Ray usage statistics, no MLflow telemetry (docs/integrity.md).
os.environ.update(RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")


def skip_unless_ci(message: str) -> NoReturn:
    """Skip a test whose tool is absent on a developer's machine; under ``CI=true`` fail it instead: CI must
    not pass by skipping what it claims to test (install the tool in .ci/run or the CI image)."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it sits beside the clone in CI); this test needs its files")
    return SHARED


TINY_VOLUMES = 24
TINY_GRID = (16, 64, 64)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a synthetic corpus (24 volumes of 16x64x64, seed 0, half labelled). Treat it as read-only."""
    from octssl.corpus.synth import synthesize

    path = tmp_path_factory.mktemp("tiny") / "corpus"
    synthesize(path, volumes=TINY_VOLUMES, grid=TINY_GRID, seed=0, labelled=0.5)
    return path


@pytest.fixture
def make_corpus(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_corpus(volumes=8, grid=(8, 32, 32), seed=0, labelled=0.5, name="corpus")`` -> path.

    Each call writes a fresh synthetic corpus under the test's tmp_path (yours to modify or damage).
    """
    from octssl.corpus.synth import synthesize

    def make(volumes: int = 8, grid: tuple[int, int, int] = (8, 32, 32), seed: int = 0,
             labelled: float = 0.5, name: str = "corpus") -> Path:
        path = tmp_path / name
        synthesize(path, volumes=volumes, grid=grid, seed=seed, labelled=labelled)
        return path

    return make



FINETUNE_OVERRIDES = ("data.crop=[16, 64]", "data.batch_size=2", "data.crops_per_volume=1", "data.val_volumes=4",
                      "model.width=0.25", "run.max_steps=4", "run.eval_every=2", "run.ckpt_every=100",
                      "optim.warmup_steps=0")


@pytest.fixture(scope="session")
def growth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fully labelled synthetic corpus (20 volumes of 16x64x64, seed 5) whose GA grows at known rates."""
    from octssl.corpus.synth import synthesize

    path = tmp_path_factory.mktemp("growth") / "corpus"
    synthesize(path, volumes=20, grid=(16, 64, 64), seed=5, labelled=1.0, ga_growth=True)
    return path


@pytest.fixture(scope="session")
def finetuned_run(growth_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GA fine-tuning run directory as the train loop leaves it (config.yaml, best/model.safetensors with its
    card), with untrained weights: training itself is tested in tests/train (and end to end, slow, in
    tests/test_predict.py); what reads a run needs only its files."""
    from octssl.config.job import dump_config, load_config
    from octssl.data.version import corpus_version
    from octssl.models import build_model, save_weights

    run_dir = tmp_path_factory.mktemp("runs") / "ga"
    job = load_config(REPO / "jobs" / "finetune_ga.yaml", [
        f"data.corpus={growth_corpus}", f"run.storage_path={run_dir.parent}", "run.name=ga", *FINETUNE_OVERRIDES])
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(job))
    torch_model = build_model("fpn", width=0.25)
    card = {"objective": job.objective.model_dump(), "grid": ["16x64x64"], "crop": [16, 64],
            "corpus_version": corpus_version(str(growth_corpus)), **_val_choice(torch_model, growth_corpus),
            "training_data": {"volumes": 6, "patients": 3, "devices": {"synthetic": 6}}}  # as the loop writes it
    save_weights(torch_model, run_dir / "best" / "model.safetensors", {"card": card})
    return run_dir


def _val_choice(model: Any, corpus_path: Path) -> dict:
    """What the trainer's validation writes into a best checkpoint's card: the threshold with the best
    pooled Dice on the val split (through the same Predictor and metrics), its metrics and volume count."""
    from octssl.apply.metrics import choose_threshold, dice
    from octssl.apply.predictor import Predictor
    from octssl.corpus.store import Corpus

    corpus = Corpus.open(corpus_path)
    samples = [corpus.read(i) for i in corpus.ids(split="val", label="ga")]
    probs = Predictor.for_model(model).probabilities([s["oct"] for s in samples],
                                                     [s["meta"]["spacing_mm"] for s in samples])
    threshold, pooled = choose_threshold(probs, [s["ga"] for s in samples])
    mean = sum(dice(p >= threshold, s["ga"]) for p, s in zip(probs, samples, strict=True)) / len(samples)
    spacings = np.array([r["spacing_mm"] for r in corpus.rows], float)
    return {"threshold": threshold, "val": {"threshold": threshold, "dice_pooled": pooled, "dice": mean},
            "val_volumes": len(samples), "summary": {"step": 1},
            "spacing_mm": {"min": spacings.min(axis=0).tolist(), "max": spacings.max(axis=0).tolist()}}


def kill_after_checkpoint(run_dir: Any, beats: Path, rank: int, timeout: float = 240.0, poll: float = 0.02) -> dict:
    """SIGKILL worker ``rank`` (by pid, from outside) once Ray has registered a checkpoint in ``run_dir`` (a
    path or an s3:// Location) and the worker's heartbeat in ``beats/workers`` shows it has stepped past it,
    so the resumed run must replay steps. Returns what it did (``killed_at``, ``checkpoint``, ``thread``)."""
    from octssl.storage.location import Location

    snapshot_file = Location.parse(run_dir) / "checkpoint_manager_snapshot.json"
    done: dict = {}

    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                snapshot = json.loads(snapshot_file.read_bytes())
                ckpt_step = snapshot["latest_checkpoint_result"]["metrics"]["step"]
                beat = json.loads((beats / "workers" / f"rank{rank}.json").read_text())
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                time.sleep(poll)
                continue
            if beat["step"] > ckpt_step:
                os.kill(beat["pid"], signal.SIGKILL)
                done.update(killed_at=beat["step"], checkpoint=ckpt_step)
                return
            time.sleep(poll)

    done["thread"] = threading.Thread(target=watch, daemon=True)
    done["thread"].start()
    return done


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on loopback (SQLite backend, local artifact folder, a free port, telemetry off);
    yields its URI. The mlflow tests set MLFLOW_TRACKING_URI to it themselves (monkeypatch)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")],
        env=env, stdout=(folder / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a loaded machine: do not leave it behind
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
