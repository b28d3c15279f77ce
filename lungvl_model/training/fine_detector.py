"""Training of the native-resolution nodule detector (:mod:`lungvl_model.models.fine_detector`).

``lungvl train SITE... --stage detector --out CKPT`` writes ``fine_detector.pt`` / ``.json`` beside a
checkpoint. No other part of the checkpoint is read or changed.

Data: every usable study of the synthetic sites with a nodule mask is cropped to its lungs and
resampled to the detector's grid (:func:`~lungvl_model.inference.fine_detection.to_fine_grid`; the mask
by linear interpolation, ``>= 0.5``). Patches of ``patch``³ voxels are centred on

* ``nodule`` (probability ``fg_prob``): a nodule drawn uniformly over all the training nodules (not
  over their voxels: a 30 mm mass would otherwise crowd out the 4 mm nodules; the first run, drawing
  voxels, touched none of the 3-4 mm held-out nodules), then one of its voxels, the centre jittered
  by up to a quarter patch so that a nodule is seen at every position of the window;
* ``hard`` (``hard_prob``): a random dense voxel (>= ``dense_hu``) of the lungs' envelope at least
  ``exclusion_mm`` from every nodule voxel: vessels, fissures, airway walls, the pleura, the hilum;
* ``lung``: any voxel of the lungs.

LIDC case folders (``lidc_dirs``) give hard and lung patches only, from the cranio-caudal training slabs
of :func:`~lungvl_model.training.candidate_filter.lidc_slabs`, and only where the whole patch is at least
``exclusion_mm`` from every reader mark and consensus nodule voxel: real anatomy as negatives, never
the real nodule (the case is also an evaluation case).

Augmentation: flips along each axis, an intensity scale and offset (``+-5 %``, ``+-20 HU``). Loss: the
project's :class:`~lungvl_model.losses.segmentation.SegmentationLoss` (soft Dice + BCE, no boundary
term: a patch's distance transform costs more than the network). AdamW, linear warm-up then cosine.

Held-out check: ``holdout`` of the studies (at least one) are not trained on; after training the
detector runs over their whole lungs (:func:`~lungvl_model.inference.fine_detection.detect`) and
:func:`component_recall` counts the nodules that a component above 0.5 touches and the components that
touch none (false candidates per scan, before the refinement and the candidate filter).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.anatomy import lung_mask
from lungvl_model.inference.fine_detection import (
    CROP_MARGIN_MM,
    detect,
    fine_candidates,
    lung_box,
    resample_to,
    to_fine_grid,
)
from lungvl_model.losses.segmentation import SegmentationLoss
from lungvl_model.models.fine_detector import (
    DETECTOR_FILES,
    FineDetector,
    FineDetectorConfig,
    load_fine_detector,
    save_fine_detector,
)

Log = Callable[[str], None]
OnStep = Callable[[int, int, dict[str, float]], None]
#: Patch kinds in sampling order.
PATCH_KINDS: tuple[str, ...] = ("nodule", "hard", "lung")
#: At most this many centre candidates are kept per pool and study (memory).
MAX_POOL = 20000


@dataclass(frozen=True)
class DetectorTrainConfig:
    """How the fine detector is trained.

    Attributes:
        max_steps: optimiser steps.
        batch_size: patches per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up before the cosine decay.
        fg_prob: share of nodule-centred patches.
        hard_prob: share of hard-negative patches (the rest are random lung patches).
        dense_hu: a hard-negative centre is at least this dense.
        exclusion_mm: hard negatives (and LIDC patches) keep this distance from nodules.
        pos_weight: BCE weight of nodule voxels.
        subsolid_weight: how much more often a subsolid nodule (median HU below -400 on the detector's
            grid: ground glass, part-solid, and small nodules blurred by thick slices) is drawn than a
            solid one (the first training cohorts held 14 ground-glass nodules below -600 HU among 102; the
            held-out test 9 of 38, 8 of them missed). 1,500 more steps from the shipped detector with 72 more
            training studies (23 more such nodules, up to 27 mm) found 27 of 41 nodules of fresh
            low-resource and referral sites against 25, the same 45 of 58 validation and second-set nodules,
            and still none of the ground glass below -650 HU.
        small_weight: how much more often (on top of ``subsolid_weight``) a nodule whose volume on the
            detector's grid is that of a ball under ``small_mm`` is drawn. The shipped detector (2,500 +
            1,200 steps, weight 1) missed 13 of 23 nodules under 7.5 mm on fresh synthetic sites and none
            of 35 larger; 1,200 more steps from it with weight 3 and 30 more training studies found the
            same 16 of 19 validation nodules (held-out training-site nodules 12 of 14), so the default
            stays 1 until a longer run shows a gain.
        small_mm: the equivalent diameter (mm) below which ``small_weight`` applies.
        holdout: share of studies held out for the recall check (at least one when there are two).
        seed: random seed (split, sampling, initialisation).
    """

    max_steps: int = 1500
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    fg_prob: float = 0.5
    hard_prob: float = 0.3
    dense_hu: float = -500.0
    exclusion_mm: float = 10.0
    pos_weight: float = 3.0
    subsolid_weight: float = 3.0
    small_weight: float = 1.0
    small_mm: float = 8.0
    holdout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size"):
            v = getattr(self, key)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"DetectorTrainConfig.{key} must be an int >= 1, got {v!r}")
        for key in ("lr", "exclusion_mm", "pos_weight", "subsolid_weight", "small_weight", "small_mm"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"DetectorTrainConfig.{key} must be > 0, got {v!r}")
        for key in ("fg_prob", "hard_prob", "holdout"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ValueError(f"DetectorTrainConfig.{key} must be in [0, 1), got {v!r}")
        if self.fg_prob + self.hard_prob > 1.0:
            raise ValueError(
                f"DetectorTrainConfig: fg_prob + hard_prob must be <= 1, got {self.fg_prob} + {self.hard_prob}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


@dataclass
class DetectorStudy:
    """One study on the detector's grid, with its patch-centre pools.

    Attributes:
        name: study identifier.
        image: ``(D, H, W)`` float16 intensities in ``[0, 1]``.
        target: ``(D, H, W)`` bool nodule mask (all False for negatives-only studies).
        pools: kind → ``(N, 3)`` int32 centre voxels.
        nodule_ids: ``(N,)`` the 26-connected nodule each ``pools["nodule"]`` voxel belongs to (1, 2, ...).
        nodule_weights: ``(K,)`` sampling weight of nodule ``k + 1`` (``subsolid_weight`` and ``small_weight``, or 1).
    """

    name: str
    image: np.ndarray
    target: np.ndarray
    pools: dict[str, np.ndarray]
    nodule_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    nodule_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _subsample(idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if len(idx) > MAX_POOL:
        idx = idx[rng.choice(len(idx), MAX_POOL, replace=False)]
    return idx.astype(np.int32)


def fine_target(frac: np.ndarray, floor: float = 0.05) -> np.ndarray:
    """The nodule mask on the detector's grid from the resampled nodule fraction of each voxel.

    ``frac >= 0.5``, and for a nodule that no voxel covers by half (a 3-4 mm nodule on 5 mm slices
    spreads over two or three 2 mm voxels), its voxels of at least half its own peak fraction. The first
    detector run thresholded at 0.5 only: such nodules vanished from the target, were neither nodule
    patches nor excluded from the negative ones, and the detector learnt to score them ~1e-6.

    Args:
        frac: ``(D, H, W)`` fraction of each voxel inside a nodule (linear resampling of the mask).
        floor: fractions below this are no nodule at all.

    Returns:
        ``(D, H, W)`` bool target.
    """
    out = frac >= 0.5
    lab, n = ndimage.label(frac >= floor, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return out
    idx = np.arange(1, n + 1)
    covered = np.asarray(ndimage.maximum(out, lab, idx), bool)
    peaks = np.asarray(ndimage.maximum(frac, lab, idx), float)
    for i in np.flatnonzero(~covered):
        out |= (lab == i + 1) & (frac >= 0.5 * peaks[i])
    return out


def prepare_study(
    name: str,
    volume: CTVolume,
    labels: np.ndarray | None,
    config: FineDetectorConfig,
    train: DetectorTrainConfig,
    rng: np.random.Generator,
    *,
    negatives_only: bool = False,
    allowed: np.ndarray | None = None,
) -> DetectorStudy:
    """A study on the detector's grid with its centre pools.

    Args:
        name: study identifier.
        volume: the CT.
        labels: ``(Z, Y, X)`` nodule label map (None: no nodules).
        config: the detector config (grid, window).
        train: sampling parameters.
        rng: random generator (pool subsampling).
        negatives_only: no nodule patches, and every patch at least ``exclusion_mm`` from every labelled
            voxel (LIDC: ``labels`` holds the nodules and reader marks to keep away from).
        allowed: ``(Z, Y, X)`` bool, where centres may lie (e.g. training slabs).

    Returns:
        The :class:`DetectorStudy`.
    """
    lungs = lung_mask(volume.hu)
    fg = to_fine_grid(volume, lungs, config.spacing_mm)
    s = config.spacing_mm
    box = lung_box(lungs, volume.spacing, CROP_MARGIN_MM)  # the crop of to_fine_grid

    def fraction(arr: np.ndarray) -> np.ndarray:
        return resample_to(arr[box].astype(np.float32), volume.spacing, s, order=1, cval=0.0)

    def on_grid(arr: np.ndarray) -> np.ndarray:
        return fraction(arr) >= 0.5

    nod = np.zeros(fg.hu.shape, bool)
    if labels is not None:
        nod = fine_target(fraction(labels > 0))
    lo, hi = config.hu_window
    image = ((np.clip(fg.hu, lo, hi) - lo) / (hi - lo)).astype(np.float16)
    envelope = ndimage.binary_dilation(fg.lungs, iterations=max(1, round(4.0 / s)))
    far = ndimage.distance_transform_edt(~nod) * s >= train.exclusion_mm if nod.any() else np.ones(nod.shape, bool)
    if negatives_only:
        if nod.any():  # the whole patch away from the nodules, not only its centre
            far = ~ndimage.maximum_filter(~far, size=config.patch, mode="constant", cval=False)
        nod = np.zeros_like(nod)
    ok = far if allowed is None else far & on_grid(allowed)
    pools = {
        "nodule": np.argwhere(nod),
        "hard": _subsample(np.argwhere((fg.hu >= train.dense_hu) & envelope & ok), rng),
        "lung": _subsample(np.argwhere(fg.lungs & ok), rng),
    }
    comps, k = ndimage.label(nod, structure=np.ones((3, 3, 3), bool))
    ids = comps[tuple(pools["nodule"].T)] if len(pools["nodule"]) else np.zeros(0, np.int32)
    medians = [float(np.median(fg.hu[comps == i])) for i in range(1, k + 1)]
    counts = np.bincount(comps.ravel(), minlength=k + 1)[1:]
    diameters = np.cbrt(6.0 * counts / math.pi) * s  # of a ball with the component's volume
    weights = np.asarray(
        [
            (train.subsolid_weight if m < -400.0 else 1.0) * (train.small_weight if d < train.small_mm else 1.0)
            for m, d in zip(medians, diameters, strict=True)
        ],
        float,
    )
    pools = {key: v.astype(np.int32) for key, v in pools.items()}
    return DetectorStudy(name, image, nod, pools, ids.astype(np.int32), weights)


def crop_patch(arr: np.ndarray, start: np.ndarray, size: int, fill: float) -> np.ndarray:
    """``size``³ crop of ``arr`` from ``start`` (may lie outside: padded with ``fill``)."""
    out = np.full((size, size, size), fill, dtype=np.float32)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, arr.shape)
    if np.any(hi <= lo):
        return out
    src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start, strict=True))
    out[dst] = arr[src]
    return out


def sample_batch(
    studies: Sequence[DetectorStudy], size: int, train: DetectorTrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One augmented batch: ``(B, 1, size, size, size)`` images, the same-shaped targets, the kinds."""
    probs = np.array([train.fg_prob, train.hard_prob, 1.0 - train.fg_prob - train.hard_prob])
    nodules = [(i, int(k)) for i, st in enumerate(studies) for k in np.unique(st.nodule_ids)]
    weights = np.asarray([studies[i].nodule_weights[k - 1] for i, k in nodules], float)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    kinds: list[str] = []
    while len(xs) < train.batch_size:
        kind = PATCH_KINDS[int(rng.choice(3, p=probs))]
        if kind == "nodule":
            if not nodules:
                continue
            si, k = nodules[int(rng.choice(len(nodules), p=weights / weights.sum()))]
            st = studies[si]
            voxels = st.pools["nodule"][st.nodule_ids == k]
            c = voxels[int(rng.integers(len(voxels)))].astype(int) + rng.integers(-size // 4, size // 4 + 1, size=3)
        else:
            having = [st for st in studies if len(st.pools[kind])]
            if not having:
                continue
            st = having[int(rng.integers(len(having)))]
            c = st.pools[kind][int(rng.integers(len(st.pools[kind])))].astype(int)
        start = c - size // 2
        x = crop_patch(st.image, start, size, 0.0)
        y = crop_patch(st.target, start, size, 0.0)
        for axis in range(3):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        x = np.clip(x * (1.0 + rng.uniform(-0.05, 0.05)) + rng.uniform(-20.0, 20.0) / 1400.0, 0.0, 1.0)
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
        kinds.append(kind)
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))[:, None], kinds


def lr_at(step: int, train: DetectorTrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine to 5 % of the peak."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    t = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    return train.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


def component_recall(
    prob: np.ndarray, target: np.ndarray, lungs: np.ndarray, spacing_mm: float, threshold: float = 0.5
) -> tuple[int, int, int]:
    """``(nodules touched by a candidate, nodules, candidates touching none)`` of one study's map."""
    cands = fine_candidates(prob, lungs, spacing_mm, threshold=threshold, max_candidates=10_000)
    lab, n = ndimage.label(target, structure=np.ones((3, 3, 3), bool))
    hit = set()
    false = 0
    for mask, _ in cands:
        ids = set(np.unique(lab[mask]).tolist()) - {0}
        hit |= ids
        false += not ids
    return len(hit), n, false


def train_fine_detector(
    studies: Sequence[DetectorStudy],
    held_out: Sequence[tuple[DetectorStudy, np.ndarray]],
    config: FineDetectorConfig,
    train: DetectorTrainConfig,
    *,
    init: FineDetector | None = None,
    on_step: OnStep | None = None,
    log: Log = print,
) -> tuple[FineDetector, dict[str, Any]]:
    """Train a detector on prepared studies and check it on held-out ones.

    Args:
        studies: training studies.
        held_out: ``(study, lungs on its grid)`` pairs for :func:`component_recall`.
        config: the detector config.
        train: training parameters.
        init: a detector to continue from (its config must be ``config``); None: fresh weights.
        on_step: ``(step, total, {"loss": ...})`` progress callback.
        log: progress lines.

    Returns:
        The trained detector (eval mode) and its metrics.
    """
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    if init is not None and init.config != config:
        raise ValueError("the --init detector's config differs from the one to train")
    det = init if init is not None else FineDetector(config)
    opt = torch.optim.AdamW(det.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    loss_fn = SegmentationLoss(boundary_weight=0.0, pos_weight=train.pos_weight)
    curve: list[float] = []
    t0 = time.perf_counter()
    det.train()
    for step in range(train.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, train)
        x, y, _ = sample_batch(studies, config.patch, train, rng)
        loss = loss_fn(det(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, train.max_steps, {"loss": float(np.mean(curve[-20:]))})
    seconds = time.perf_counter() - t0
    det.eval()
    hits = total = false = 0
    for st, lungs in held_out:
        lo, hi = config.hu_window
        prob = detect(det, st.image.astype(np.float32) * (hi - lo) + lo)  # back to HU
        h, n, f = component_recall(prob, st.target, lungs, config.spacing_mm)
        hits, total, false = hits + h, total + n, false + f
    metrics = {
        "steps": train.max_steps,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / train.max_steps, 3),
        "loss_first_50": float(np.mean(curve[:50])),
        "loss_last_50": float(np.mean(curve[-50:])),
        "train_studies": len(studies),
        "held_out_studies": len(held_out),
        "held_out_nodules": total,
        "held_out_recall": hits / total if total else math.nan,
        "held_out_false_candidates_per_scan": false / len(held_out) if held_out else math.nan,
    }
    log(
        f"fine detector: {train.max_steps} steps in {seconds:.0f} s; held-out nodules touched "
        f"{hits}/{total}, false candidates per scan {metrics['held_out_false_candidates_per_scan']:.2f}"
    )
    return det, metrics


def run_detector_stage(
    site_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    lidc_dirs: Sequence[str | Path] = (),
    config: FineDetectorConfig | None = None,
    train: DetectorTrainConfig | None = None,
    init_dir: str | Path | None = None,
    on_step: OnStep | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Read the sites, train the detector and store it in ``out_dir``.

    Args:
        site_dirs: synthetic site folders with nodule masks.
        out_dir: the checkpoint directory the detector belongs beside (created when missing).
        lidc_dirs: LIDC case folders (negatives only, see the module docstring).
        config: the detector config.
        train: training parameters.
        init_dir: a checkpoint folder whose fine detector training continues from (its config wins).
        on_step: progress callback.
        log: progress lines.

    Returns:
        The metrics (also in ``fine_detector.json``).

    Raises:
        ValueError: when the sites hold no nodule, or ``init_dir`` holds no fine detector.
    """
    from lungvl_model.training.candidate_filter import (
        lidc_far_mask,
        lidc_slabs,
        read_lidc,
        read_synthetic_site,
    )

    init = None
    if init_dir is not None:
        init = load_fine_detector(init_dir)
        if init is None:
            raise ValueError(f"--init {init_dir}: no {DETECTOR_FILES[0]} there to continue from")
    cfg = init.config if init is not None else config or FineDetectorConfig()
    tr = train or DetectorTrainConfig()
    rng = np.random.default_rng(tr.seed)
    t0 = time.perf_counter()
    entries = [
        (f"{Path(site).name}:{uid}", vol, lab) for site in site_dirs for uid, vol, lab in read_synthetic_site(site)
    ]
    if not entries:
        raise ValueError(f"no study with a nodule mask in {', '.join(str(s) for s in site_dirs)}")
    order = rng.permutation(len(entries))
    n_held = 0 if len(entries) < 2 else max(1, round(tr.holdout * len(entries)))
    held_ids = set(order[:n_held].tolist())
    studies, held = [], []
    for i, (name, vol, lab) in enumerate(entries):
        st = prepare_study(name, vol, lab, cfg, tr, rng)
        if i in held_ids:
            lungs = lung_mask(vol.hu)
            held.append((st, to_fine_grid(vol, lungs, cfg.spacing_mm).lungs))
        else:
            studies.append(st)
    for d in lidc_dirs:
        vol, marks, lab = read_lidc(d)
        near = ~lidc_far_mask(vol, marks, lab, 1e-6)  # the nodule voxels and the reader marks
        slabs, _ = lidc_slabs(vol)
        studies.append(
            prepare_study(f"lidc:{d}", vol, near.astype(np.uint8), cfg, tr, rng, negatives_only=True, allowed=slabs)
        )
    n_nod = sum(int(ndimage.label(st.target)[1]) for st in studies)
    if n_nod == 0:
        raise ValueError("the training sites hold no nodule voxel on the detector's grid")
    log(
        f"fine detector data: {len(studies)} training studies ({n_nod} nodules), {len(held)} held out, "
        f"{len(lidc_dirs)} LIDC negative-only; prepared in {time.perf_counter() - t0:.0f} s"
    )
    det, metrics = train_fine_detector(studies, held, cfg, tr, init=init, on_step=on_step, log=log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "train": tr.to_dict(),
        "sites": [str(s) for s in site_dirs],
        "lidc_negative_sites": [str(d) for d in lidc_dirs],
        "init": None if init_dir is None else str(init_dir),
        "metrics": metrics,
    }
    save_fine_detector(out, det, meta)
    return metrics
