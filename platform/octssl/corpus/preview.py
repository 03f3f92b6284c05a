"""A PNG contact sheet of a corpus for a person to look at: B-scan, mean projection, FAF, SLO, GA, RPD."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from octssl.corpus.store import Corpus

PANELS = ("B-scan", "OCT mean projection", "FAF", "SLO", "GA", "RPD")


def _pick(corpus: Corpus, rows: int) -> list[str]:
    """Labelled volumes with the most GA first (then the most RPD), else whatever there is."""
    labelled = corpus.ids(label="ga")
    scored = []
    for sid in labelled[:64]:
        sample = corpus.read(sid)
        scored.append((-(int(sample["ga"].sum()) + 0.5 * int(sample.get("rpd", 0).sum())), sid))
    chosen = [sid for _, sid in sorted(scored)[:rows]]
    return chosen + [sid for sid in corpus.ids() if sid not in chosen][: rows - len(chosen)]


def write_preview(corpus: Corpus, out: Path, rows: int = 3) -> Path:
    """Write a grid with one row per volume and one column per panel to ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ids = _pick(corpus, rows)
    figure = Figure(figsize=(3.0 * len(PANELS), 2.6 * len(ids)), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(ids), len(PANELS), squeeze=False)
    for r, sid in enumerate(ids):
        sample = corpus.read(sid)
        volume = sample["oct"]
        ga = sample.get("ga")
        bscan = int(np.argmax(ga.sum(axis=1))) if ga is not None and ga.any() else volume.shape[0] // 2
        sy, _, sx = sample["meta"]["spacing_mm"]
        panels = [volume[bscan], volume.mean(axis=1), sample.get("faf"), sample.get("slo"), ga, sample.get("rpd")]
        for c, (title, image) in enumerate(zip(PANELS, panels, strict=True)):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{sid}\nB-scan {bscan}", fontsize=7)
            if r == 0:
                ax.set_title(title, fontsize=9)
            if image is None:
                ax.text(0.5, 0.5, "absent", ha="center", va="center", transform=ax.transAxes)
                continue
            aspect = "auto" if c == 0 else sy / sx  # B-scans are ~5x wider than deep: stretch depth
            ax.imshow(image, cmap="gray", aspect=aspect, interpolation="nearest",
                      vmin=0, vmax=1 if c >= 4 else None)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out
