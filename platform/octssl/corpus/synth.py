"""Synthetic paired corpus: OCT volumes with registered FAF and SLO images and GA/RPD masks.

Per eye (shared by all its visits): retinal layer surfaces, a vessel tree, GA lesion seeds and RPD
deposit positions. Per visit: the GA grows (a lower threshold on the same lesion field), plus fresh
speckle, noise and gains. GA shows in the OCT as RPE loss, outer-retina thinning and bright choroidal
hypertransmission beneath; these partly cancel in the mean projection, so the lesion is not one
intensity threshold away there. FAF shows GA as a dark area with a bright rim, SLO as a faint brighter
area: the same information in a softer form, which is what makes en-face reconstruction a useful
pretext task. Everything is a deterministic function of the seed and coordinates in millimetres, so a
patient looks the same on every grid.

GA growth (``ga_growth=True``): each eye with GA gets a known growth rate (:func:`ga_growth_rate`, uniform
in ``GROWTH_RANGE`` mm^2/year, 0 for eyes without GA); its first visit keeps the lesion above, and at a visit
``t`` years later the lesion is the ``A0 + rate x t`` mm^2 of highest lesion-field values (so it grows
outward from the same seeds, to the pixel). The rates are written to ``OUT/ga_growth.csv``. Without the
option the corpus is exactly as before (the default corpus is byte-identical).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from octssl.corpus.preview import write_preview
from octssl.corpus.store import Corpus
from octssl.errors import CorpusError

SCAN_MM = 6.0  # en-face field of view along B-scans and A-scans
GROWTH_RANGE = (0.8, 2.5)  # mm^2/year: per-eye GA growth rates with ga_growth=True
VISIT_DAYS = 180  # days between visits
DEPTH_MM = 1.2  # imaged depth
DEVICE = "synthetic"


@dataclass(frozen=True)
class VolumePlan:
    patient: int
    eye: str
    visit: int
    split: str
    labelled: bool


def plan_volumes(volumes: int, seed: int, labelled: float) -> list[VolumePlan]:
    """Patients with both eyes and 1-3 visits each until ``volumes``; patient-level splits and labels."""
    rng = np.random.default_rng([seed, 101])
    keys: list[tuple[int, str, int]] = []
    patient = 0
    while len(keys) < volumes:
        visits = int(rng.integers(1, 4))
        keys += [(patient, eye, v) for eye in ("OD", "OS") for v in range(visits)]
        patient += 1
    keys = keys[:volumes]
    patients = sorted({k[0] for k in keys})
    order = [patients[i] for i in rng.permutation(len(patients))]
    n = len(order)
    n_val = n_test = max(1, round(0.2 * n)) if n >= 3 else 0
    split_of = {p: "val" if i < n_val else "test" if i < n_val + n_test else "train" for i, p in enumerate(order)}
    rank = {p: i for i, p in enumerate(order)}
    chosen: set[tuple[int, str, int]] = set()
    for split in ("train", "val", "test"):
        in_split = sorted((k for k in keys if split_of[k[0]] == split), key=lambda k: (rank[k[0]], k[1], k[2]))
        chosen.update(in_split[: round(labelled * len(in_split))])
    return [VolumePlan(p, e, v, split_of[p], (p, e, v) in chosen) for p, e, v in keys]


def smooth_field(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cycles_per_mm: float,
                 waves: int = 16) -> np.ndarray:
    """A unit-variance random field as a sum of random plane waves (independent of the sampling grid)."""
    freq = rng.normal(0.0, cycles_per_mm, (waves, 2))
    phase = rng.uniform(0.0, 2 * np.pi, waves)
    arg = 2 * np.pi * (freq[:, 0, None, None] * yy + freq[:, 1, None, None] * xx) + phase[:, None, None]
    return np.cos(arg).sum(axis=0) * np.sqrt(2.0 / waves)


class EyeModel:
    """Anatomy and disease of one eye, shared by all its visits."""

    def __init__(self, seed: int, patient: int, eye: str) -> None:
        self.rng_seed = [seed, patient, 0 if eye == "OD" else 1]
        rng = np.random.default_rng(self.rng_seed)
        self.nasal = 1.0 if eye == "OD" else -1.0  # the optic disc lies off-scan on the nasal side
        self.fovea = rng.normal(0.0, 0.3, 2)
        self.retina_mm = rng.uniform(0.27, 0.33)
        self.rpe_mm = rng.uniform(0.70, 0.85)
        self.tilt = rng.normal(0.0, 0.02, 2)  # mm of depth per mm en-face
        self.has_ga = rng.random() < 0.7
        self.has_rpd = rng.random() < 0.55
        self.ga_centres = self.fovea + rng.normal(0.0, 0.9, (int(rng.integers(1, 4)), 2))
        self.ga_sizes = rng.uniform(0.35, 0.8, len(self.ga_centres))
        self.ga_threshold = rng.uniform(0.55, 0.75)
        self.rpd_centres = np.column_stack([rng.uniform(-3.0, 0.5, 60), rng.uniform(-3.0, 3.0, 60)])
        self.rpd_radii = rng.uniform(0.12, 0.22, 60)
        self.rpd_keep = rng.random(60) < 0.5 + 0.5 * np.exp(-((self.rpd_centres[:, 0] + 1.5) ** 2))
        self.field_seeds = rng.integers(0, 2**31, 6)
        self.vessel_paths = _vessel_tree(rng, self.nasal)
        self._vessel_cache: dict[tuple[Any, ...], np.ndarray] = {}

    def field(self, which: int, yy: np.ndarray, xx: np.ndarray, cycles_per_mm: float) -> np.ndarray:
        return smooth_field(np.random.default_rng(self.field_seeds[which]), yy, xx, cycles_per_mm)

    def ga_mask(self, yy: np.ndarray, xx: np.ndarray, visit: int) -> np.ndarray:
        if not self.has_ga:
            return np.zeros(yy.shape, bool)
        blobs = sum(np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / (2 * s**2))
                    for c, s in zip(self.ga_centres, self.ga_sizes, strict=True))
        lesion = blobs * (1.0 + 0.45 * self.field(0, yy, xx, 0.6))  # irregular edges, no far islands
        return lesion > self.ga_threshold - 0.08 * visit

    def grown_ga_mask(self, yy: np.ndarray, xx: np.ndarray, years: float, rate: float) -> np.ndarray:
        """The first visit's lesion grown by ``rate`` mm^2/year for ``years``: the pixels of highest lesion field."""
        first = self.ga_mask(yy, xx, 0)
        if not first.any():
            return first
        pixel_mm2 = float((yy[1, 0] - yy[0, 0]) * (xx[0, 1] - xx[0, 0]))
        count = int(round((first.sum() * pixel_mm2 + rate * years) / pixel_mm2))
        blobs = sum(np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / (2 * s**2))
                    for c, s in zip(self.ga_centres, self.ga_sizes, strict=True))
        lesion = (blobs * (1.0 + 0.45 * self.field(0, yy, xx, 0.6))).ravel()
        mask = np.zeros(lesion.size, bool)
        mask[np.argsort(-lesion, kind="stable")[: min(count, lesion.size)]] = True
        return mask.reshape(yy.shape)

    def rpd_height(self, yy: np.ndarray, xx: np.ndarray, visit: int) -> np.ndarray:
        """Deposit height above the RPE in mm (0 where there is none)."""
        if not self.has_rpd:
            return np.zeros(yy.shape)
        centres, radii = self.rpd_centres[self.rpd_keep], self.rpd_radii[self.rpd_keep] * (1 + 0.1 * visit)
        d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
        domes = np.clip(1.0 - d2 / radii[:, None, None] ** 2, 0.0, None)
        return 0.05 * domes.max(axis=0, initial=0.0)

    def vessels(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """Vessel density in [0, 1]: Gaussian profiles around the tree's centre lines."""
        key = (yy.shape, float(yy[0, 0]), float(xx[0, 0]))
        if key not in self._vessel_cache:  # the tree does not change between visits
            self._vessel_cache[key] = self._vessel_density(yy, xx)
        return self._vessel_cache[key]

    def _vessel_density(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        density = np.zeros(yy.size, np.float32)
        gy, gx = yy.ravel().astype(np.float32)[:, None], xx.ravel().astype(np.float32)[:, None]
        for points, width in self.vessel_paths:  # plain broadcasting: BLAS threads stall on a busy machine
            py, px = points[:, 0].astype(np.float32)[None, :], points[:, 1].astype(np.float32)[None, :]
            d2 = ((gy - py) ** 2 + (gx - px) ** 2).min(axis=1)
            density = np.maximum(density, np.exp(-d2 / np.float32(width**2)))
        return density.reshape(yy.shape).astype(np.float64)


def _vessel_tree(rng: np.random.Generator, nasal: float) -> list[tuple[np.ndarray, float]]:
    """Centre lines (points in mm, width in mm): two arcades from the off-scan disc around the fovea, and
    branches leaving them."""
    disc = np.array([rng.normal(0.0, 0.2), nasal * 4.3])
    t = np.linspace(0.0, 1.0, 320)
    paths = []
    for side in (-1.0, 1.0):
        wiggle = sum(rng.normal(0, 0.08) * np.sin(rng.uniform(4, 12) * t + rng.uniform(0, 6)) for _ in range(3))
        arcade = np.column_stack([disc[0] + side * (0.3 + rng.uniform(1.8, 2.4) * np.sin(np.pi * 0.85 * t)) + wiggle,
                                  disc[1] - nasal * 9.0 * t])
        paths.append((arcade, 0.11))
        for _ in range(int(rng.integers(3, 6))):
            start = arcade[int(rng.integers(40, 260))]
            angle = rng.uniform(0.3, 1.3) * (side if rng.random() < 0.6 else -side) + (0 if nasal > 0 else np.pi)
            bend = rng.normal(0.0, 0.6)
            s = np.linspace(0.0, rng.uniform(1.0, 3.0), 90)[:, None]
            heading = angle + bend * s[:, 0] / 3.0
            steps = np.column_stack([np.sin(heading), -np.cos(heading)]) * (s[1, 0] - s[0, 0])
            paths.append((start + np.cumsum(steps, axis=0), 0.07))
    return [(p[(np.abs(p) < 3.6).all(axis=1)], w) for p, w in paths if (np.abs(p) < 3.6).all(axis=1).any()]


def _blur(image: np.ndarray, sigma_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    return gaussian_filter(image.astype(np.float64), (sigma_mm / spacing[0], sigma_mm / spacing[1]))


def ga_growth_rate(seed: int, patient: int, eye: str, has_ga: bool | None = None) -> float:
    """The known GA growth rate (mm^2/year) of an eye of a corpus synthesised with ``ga_growth=True``."""
    if not (EyeModel(seed, patient, eye).has_ga if has_ga is None else has_ga):
        return 0.0
    return float(np.random.default_rng([seed, patient, 0 if eye == "OD" else 1, 77]).uniform(*GROWTH_RANGE))


def render(eye: EyeModel, visit: int, grid: tuple[int, int, int], noise_seed: list[int],
           growth: float | None = None) -> dict[str, np.ndarray]:
    """All arrays of one visit of ``eye`` on ``grid`` = (nB, D, W); ``growth`` (mm^2/year) grows GA by a
    known rate instead of the default visit-by-visit threshold."""
    nb, depth, width = grid
    rng = np.random.default_rng(noise_seed)
    sy, sx = SCAN_MM / nb, SCAN_MM / width
    yy, xx = np.meshgrid((np.arange(nb) + 0.5) * sy - 3.0, (np.arange(width) + 0.5) * sx - 3.0, indexing="ij")
    r2 = (yy - eye.fovea[0]) ** 2 + (xx - eye.fovea[1]) ** 2
    pit = np.exp(-r2 / (2 * 0.45**2))
    ga = eye.ga_mask(yy, xx, visit) if growth is None else eye.grown_ga_mask(yy, xx, VISIT_DAYS * visit / 365.25, growth)
    g = np.clip(_blur(ga, 0.06, (sy, sx)) * 1.2, 0.0, 1.0)  # soft lesion edge for the OCT
    rpd_h = eye.rpd_height(yy, xx, visit)
    rpd = rpd_h > 0.02
    vessel = eye.vessels(yy, xx)

    # Surfaces (depth in mm), bottom up: BM, RPE top, EZ, ELM, OPL, INL, IPL, RNFL bottom, ILM.
    bm = eye.rpe_mm + eye.tilt[0] * yy + eye.tilt[1] * xx + 0.015 * eye.field(3, yy, xx, 0.3)
    rpe_top = bm - 0.025
    outer = 0.085 * (1.0 - 0.7 * g)  # ONL + photoreceptors, collapsing over GA
    ez = rpe_top - rpd_h - 0.03 * (1.0 - 0.8 * g)
    elm = ez - 0.02
    inner = (eye.retina_mm - 0.085) * (1.0 - 0.8 * pit) * (1 + 0.1 * eye.field(4, yy, xx, 0.3))
    opl = rpe_top - rpd_h - 0.03 - outer
    inl, ipl = opl - 0.025 - 0.1 * inner, opl - 0.025 - 0.3 * inner
    rnfl = opl - 0.025 - (0.8 - 0.25 * (1 + eye.nasal * np.tanh(xx / 2))) * inner
    ilm = opl - 0.025 - inner
    choroid_end = bm + 0.22 + 0.04 * eye.field(5, yy, xx, 0.4) + 0.08 * g
    # Confounders of the en-face mean: choroidal brightness varies, and media opacity dims whole A-scans.
    choroid = 0.45 + 0.08 * eye.field(4, yy + 11.0, xx, 0.35) + 0.2 * g
    shadow = (1.0 - 0.5 * vessel) * (1.0 + 0.12 * eye.field(5, yy - 11.0, xx, 0.25))

    # (surface, intensity below it): intensities are display values before speckle.
    layers = [
        (ilm, 0.72 + 0.1 * vessel), (rnfl, 0.45), (ipl, 0.42 * shadow + 0.08), (inl, 0.22 * shadow),
        (opl, 0.5 * shadow), (opl + 0.025, 0.18 * shadow), (elm, 0.3 * shadow),
        (ez, (0.75 * (1 - g) + 0.25 * g) * shadow),
        (rpe_top - rpd_h, np.where(rpd_h > 0, 0.62, 0.4) * shadow),
        (rpe_top, (0.9 * (1 - g) + 0.35 * g) * shadow),
        (bm, choroid * shadow), (choroid_end, (0.15 + 0.12 * g) * shadow),
    ]
    z = ((np.arange(depth, dtype=np.float32) + 0.5) / depth)[None, :, None]  # in units of DEPTH_MM
    volume = np.full((nb, depth, width), 0.04, np.float32)
    below_prev = np.full((nb, 1, width), 0.04, np.float32)
    for surface, intensity in layers:
        # A linear ramp one pixel wide: a partial-volume edge, cheaper than a sigmoid.
        edge = (surface[:, None, :] / DEPTH_MM).astype(np.float32)
        step = np.clip((z - edge) * depth + 0.5, 0.0, 1.0)
        level = np.broadcast_to(np.asarray(intensity), surface.shape)[:, None, :].astype(np.float32)
        volume += (level - below_prev) * step
        below_prev = level
    speckle = rng.gamma(5.0, 1.0 / 5.0, volume.shape).astype(np.float32)
    scan = volume * speckle * rng.normal(1.0, 0.05, (nb, 1, 1)) * rng.uniform(0.85, 1.15)  # float64 from here
    scan += rng.normal(0.03, 0.03, volume.shape).astype(np.float32) + np.float32(rng.uniform(-0.05, 0.05))

    ring = np.clip(1.6 * _blur(ga, 0.15, (sy, sx)) - ga, 0.0, 1.0) * (1 - ga)
    faf = (0.55 + 0.08 * eye.field(0, yy + 7.0, xx, 0.2) - 0.22 * pit) * (1 - 0.55 * vessel)
    faf = faf * (1 - 0.85 * np.clip(_blur(ga, 0.08, (sy, sx)) * 1.2, 0, 1)) + 0.35 * ring
    slo = (0.45 + 0.06 * eye.field(1, yy - 7.0, xx, 0.2)) * (1 - 0.35 * vessel)
    slo = slo + 0.15 * _blur(ga, 0.12, (sy, sx)) - 0.12 * np.clip(_blur(rpd, 0.05, (sy, sx)), 0, 1)
    faf = faf * rng.uniform(0.85, 1.15) + rng.normal(0.0, 0.04, faf.shape)
    slo = slo * rng.uniform(0.85, 1.15) + rng.normal(0.0, 0.04, slo.shape)
    return {
        "oct": _to_uint8(scan), "faf": _to_uint8(faf), "slo": _to_uint8(slo),
        "ga": ga.astype(np.uint8), "rpd": rpd.astype(np.uint8),
    }


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def samples(volumes: int, grid: tuple[int, int, int], seed: int, labelled: float,
            ga_growth: bool = False) -> Iterator[dict[str, Any]]:
    """Sample dicts of a synthetic corpus, in patient, eye, visit order (generated lazily)."""
    nb, depth, width = grid
    base_day = np.datetime64("2015-01-01")
    eyes: dict[tuple[int, str], EyeModel] = {}
    for plan in plan_volumes(volumes, seed, labelled):
        if (plan.patient, plan.eye) not in eyes:
            eyes[(plan.patient, plan.eye)] = EyeModel(seed, plan.patient, plan.eye)
        eye = eyes[(plan.patient, plan.eye)]
        rate = ga_growth_rate(seed, plan.patient, plan.eye, eye.has_ga) if ga_growth else None
        arrays = render(eye, plan.visit, grid, [seed, plan.patient, 0 if plan.eye == "OD" else 1, plan.visit, 1], rate)
        if not plan.labelled:
            del arrays["ga"], arrays["rpd"]
        first = int(np.random.default_rng([seed, plan.patient, 9]).integers(0, 2000))
        acquired = (base_day + np.timedelta64(first + VISIT_DAYS * plan.visit, "D")).item()
        patient = f"syn{seed}-{plan.patient:04d}"
        yield {
            "id": f"{patient}-{plan.eye}-v{plan.visit}",
            **arrays,
            "meta": {
                "patient": patient, "eye": plan.eye, "visit": plan.visit, "device": DEVICE,
                "scan_pattern": "raster", "spacing_mm": (SCAN_MM / nb, DEPTH_MM / depth, SCAN_MM / width),
                "split": plan.split, "source": f"synth:{seed}", "acquired": acquired,
            },
        }


class _Counted:
    """A generator with a known length (so the progress bar can show a total)."""

    def __init__(self, items: Iterator[dict[str, Any]], count: int) -> None:
        self.items, self.count = items, count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.items

    def __len__(self) -> int:
        return self.count


def synthesize(
    out: str | Path,
    volumes: int = 100,
    grid: tuple[int, int, int] = (16, 64, 64),
    seed: int = 0,
    labelled: float = 0.5,
    preview: bool = False,
    progress: bool = False,
    ga_growth: bool = False,
) -> Corpus:
    """Write a synthetic corpus to ``out`` (a new directory); ``preview`` also writes ``out/preview.png``;
    ``ga_growth`` grows GA at known per-eye rates (listed in ``out/ga_growth.csv``)."""
    if volumes < 1 or not 0.0 <= labelled <= 1.0 or len(grid) != 3 or min(grid) < 4:
        raise CorpusError(f"{out}: need volumes >= 1, 0 <= labelled <= 1 and a grid of 3 sizes >= 4; "
                          f"got volumes={volumes}, labelled={labelled}, grid={grid}")
    corpus = Corpus.create(out)
    corpus.append(_Counted(samples(volumes, (grid[0], grid[1], grid[2]), seed, labelled, ga_growth), volumes),
                  progress=progress)
    if ga_growth:
        eyes = sorted({(p.patient, p.eye) for p in plan_volumes(volumes, seed, labelled)})
        lines = ["patient,eye,rate_mm2_per_year"] + [
            f"syn{seed}-{patient:04d},{eye},{ga_growth_rate(seed, patient, eye):.6f}" for patient, eye in eyes]
        (Path(out) / "ga_growth.csv").write_text("\n".join(lines) + "\n")
    if preview:
        write_preview(corpus, Path(out) / "preview.png")
    return corpus
