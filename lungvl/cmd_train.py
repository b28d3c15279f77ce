"""``lungvl train``: one training stage, centrally, on site directories."""

from __future__ import annotations

from pathlib import Path

import typer

from lungvl.console import err, print_error, progress_callback
from lungvl.params import DEVICE, PEERS, PRESETS, TRAIN_STAGES, choice


def train(
    site_dirs: list[Path] = typer.Argument(..., help="site directories to train on"),
    stage: str = typer.Option(
        ...,
        "--stage",
        click_type=choice(TRAIN_STAGES),
        help="training stage; findings: finding sentences from slot attributes (needs --init; decoder and slots "
        "only); risk: the nodule risk head (needs --init); candidates: the candidate filter; detector: the "
        "native-resolution nodule detector (written beside --out's checkpoint files)",
    ),
    preset: str = typer.Option("tiny", "--preset", click_type=choice(PRESETS), help="model size (ignored with --init)"),
    out_dir: Path = typer.Option(..., "--out", help="output directory"),
    init: Path | None = typer.Option(
        None, "--init", help="checkpoint directory training starts from (the previous stage's --out/checkpoint)"
    ),
    max_steps: int = typer.Option(50, "--max-steps", min=1),
    batch_size: int = typer.Option(2, "--batch-size", min=1),
    lr: float = typer.Option(3e-4, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", click_type=DEVICE, help="auto: CUDA when available"),
    peer: str | None = typer.Option(
        None, "--peer", click_type=choice(PEERS), help="train this segmentation anchor instead (with --stage seg)"
    ),
    seg_crop: tuple[int, int, int] | None = typer.Option(
        None, "--seg-crop", help="seg stage: foreground-biased D H W crops (multiples of 16) instead of whole volumes"
    ),
    seg_fg_prob: float = typer.Option(0.67, "--seg-fg-prob", help="share of seg crops centred on a nodule"),
    seg_hard_negative_prob: float = typer.Option(
        0.5,
        "--seg-hard-negative-prob",
        help="share of the seg crops not centred on a nodule that are centred on a hard-negative point (heart "
        "border, hilar vessels, chest wall...: synthetic sites' annotations); the rest lie anywhere",
    ),
    detector_spacing: float | None = typer.Option(
        None,
        "--detector-spacing",
        help="detector stage: isotropic voxel size (mm) of a new detector's grid (default 2; with --init the "
        "grid of the detector continued from)",
    ),
    detector_small_weight: float = typer.Option(
        1.0,
        "--detector-small-weight",
        help="detector stage: how much more often nodules under 8 mm are drawn as patch centres",
    ),
) -> None:
    """Train one stage; writes checkpoint/, config.json, metrics.json and loss_curve.png to --out."""
    from lungvl_model.models.config import get_preset
    from lungvl_model.training.config import TrainConfig
    from lungvl_model.training.stages import run_stage

    if peer is not None and stage != "seg":
        print_error(f"--peer {peer} trains a segmentation anchor: give --stage seg, not {stage!r}")
        raise typer.Exit(2)
    if stage == "risk":
        _train_risk(site_dirs, out_dir, init, seed)
        return
    if stage == "candidates":
        _train_candidates(site_dirs, out_dir, seed)
        return
    if stage != "detector" and (detector_spacing is not None or detector_small_weight != 1.0):
        print_error(f"--detector-spacing and --detector-small-weight apply to --stage detector, not {stage!r}")
        raise typer.Exit(2)
    if stage == "detector":
        _train_detector(
            site_dirs, out_dir, init=init, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed,
            spacing_mm=detector_spacing, small_weight=detector_small_weight,
        )  # fmt: skip
        return
    try:
        cfg = TrainConfig(
            stage=stage, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
            seg_crop=seg_crop, seg_fg_prob=seg_fg_prob, seg_hard_negative_prob=seg_hard_negative_prob,
        )  # fmt: skip
        model_cfg = None if init else get_preset(preset)
    except (ValueError, KeyError) as e:
        print_error(e)
        raise typer.Exit(2) from e
    with progress_callback(f"train {stage}") as cb:

        def on_step(step: int, total: int, losses: dict[str, float]) -> None:
            cb(step, total, f"loss {losses.get('loss', float('nan')):.3f}")

        if peer is not None:
            from lungvl_model.training.peer import train_dynunet

            res = train_dynunet(site_dirs, out_dir, model_cfg or get_preset(preset), cfg, on_step=on_step)
            err.print({k: round(v, 4) for k, v in res.summary().items()}, highlight=False)
            return
        run = run_stage(
            site_dirs,
            out_dir,
            cfg,
            config=model_cfg,
            init=init,
            on_step=on_step,
            log=lambda m: err.print(m, highlight=False, markup=False),
        )
    s = run.metrics["summary"]
    err.print({k: round(v, 4) for k, v in s.items() if isinstance(v, float)}, highlight=False)


def _train_risk(site_dirs: list[Path], out_dir: Path, init: Path | None, seed: int) -> None:
    """``--stage risk``: the nodule risk head on a frozen checkpoint (copied to ``--out``/checkpoint)."""
    from lungvl_model.training.nodule_risk import RiskTrainConfig, run_risk_stage

    if init is None:
        print_error("--stage risk needs --init: the checkpoint whose encoder the nodule risk head uses")
        raise typer.Exit(2)
    with progress_callback("train risk") as cb:
        metrics = run_risk_stage(
            site_dirs,
            out_dir,
            init=init,
            train=RiskTrainConfig(seed=seed),
            on_step=lambda step, total, m: cb(step, total, f"loss {m.get('loss', float('nan')):.3f}"),
            log=lambda m: err.print(m, highlight=False, markup=False),
        )
    err.print({k: round(v, 4) for k, v in metrics["summary"].items()}, highlight=False)


def _train_candidates(site_dirs: list[Path], out_dir: Path, seed: int) -> None:
    """``--stage candidates``: the nodule-candidate filter, written to ``--out``/candidate_filter.json.

    Point ``--out`` at the checkpoint directory the filter belongs beside. LIDC case folders and sites
    imported from one give hard negatives only (never their nodules); the others are synthetic sites with masks.
    When ``--out`` holds a fine detector (``--stage detector``), the filter is fitted on its probability and
    on its own candidates, as the explanation pipeline will score them: train the detector first.
    """
    from lungvl_model.errors import CorruptStateError
    from lungvl_model.models.fine_detector import load_fine_detector
    from lungvl_model.training.candidate_filter import is_lidc_site, train_candidate_filter

    lidc = [d for d in site_dirs if is_lidc_site(d)]
    sites = [d for d in site_dirs if d not in lidc]
    if not sites:
        print_error("--stage candidates needs at least one synthetic site directory (nodule masks) for positives")
        raise typer.Exit(2)
    log = lambda m: err.print(m, highlight=False, markup=False)  # noqa: E731
    try:
        detector = load_fine_detector(out_dir) if out_dir.is_dir() else None
        if detector is not None:
            log(f"{out_dir}: fitting on its fine detector's candidates and probability")
        flt = train_candidate_filter(sites, out_dir, lidc_dirs=lidc, seed=seed, detector=detector, log=log)
    except CorruptStateError as e:
        print_error(e)
        raise typer.Exit(1) from e
    except ValueError as e:  # e.g. too few studies for a fold with both classes
        print_error(e)
        raise typer.Exit(2) from e
    err.print({k: v for k, v in flt.metrics.items() if k in ("kind", "oof_auc", "oof_sensitivity")}, highlight=False)


def _train_detector(
    site_dirs: list[Path],
    out_dir: Path,
    *,
    init: Path | None,
    max_steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    spacing_mm: float | None = None,
    small_weight: float = 1.0,
) -> None:
    """``--stage detector``: the native-resolution nodule detector, written to ``--out``/fine_detector.{pt,json}.

    Point ``--out`` at the checkpoint directory the detector belongs beside. LIDC case folders and sites
    imported from one give negative patches only (never their nodules); the others are synthetic sites
    with masks. ``--init`` continues from the fine detector stored in that checkpoint folder (on its grid:
    ``--detector-spacing`` is refused there).
    """
    from lungvl_model.models.fine_detector import FineDetectorConfig
    from lungvl_model.training.candidate_filter import is_lidc_site
    from lungvl_model.training.fine_detector import DetectorTrainConfig, run_detector_stage

    lidc = [d for d in site_dirs if is_lidc_site(d)]
    sites = [d for d in site_dirs if d not in lidc]
    try:
        train = DetectorTrainConfig(
            max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, small_weight=small_weight
        )
        if spacing_mm is not None and init is not None:
            raise ValueError(
                f"--detector-spacing {spacing_mm:g} with --init {init}: a continued detector keeps its own grid"
            )
        config = None if spacing_mm is None else FineDetectorConfig(spacing_mm=spacing_mm)
        if not sites:
            raise ValueError("--stage detector needs at least one synthetic site directory (nodule masks)")
        with progress_callback("train detector") as cb:
            metrics = run_detector_stage(
                sites,
                out_dir,
                lidc_dirs=lidc,
                config=config,
                train=train,
                init_dir=init,
                on_step=lambda step, total, m: cb(step, total, f"loss {m.get('loss', float('nan')):.3f}"),
                log=lambda m: err.print(m, highlight=False, markup=False),
            )
    except ValueError as e:
        print_error(e)
        raise typer.Exit(2) from e
    err.print({k: v for k, v in metrics.items() if k.startswith("held_out")}, highlight=False)
