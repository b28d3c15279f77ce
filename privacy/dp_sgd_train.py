"""Local DP-SGD steps of the LungVL model with Opacus (the wiring; the model plumbing is :mod:`privacy.dp_sgd`).

:func:`dp_sgd_steps` runs ``steps`` DP-SGD steps with the *patient* as the privacy unit:

* sampling (:class:`PatientPoissonSampler`): every step each patient is included independently with
  probability ``q`` (Poisson, at the patient level), and an included patient contributes exactly one
  of its studies, drawn uniformly. A patient is so at most one study of a step, and the step's
  sensitivity to adding or removing a patient is one clipped per-study gradient, ``C``; the
  accountant is charged ``q`` per patient (``q = expected patients per step / patients``), not per
  study (sampling studies would include a patient with a prior and a current study at about twice
  the rate, and up to twice in one step);
* per-study gradients clipped to ``max_grad_norm`` (the model's losses are per-study quantities, so a
  study's per-sample gradient depends on that study alone, :mod:`lungvl_model.models.lungvl`);
* Gaussian noise ``N(0, (σ·C)²)`` on their sum, division by the expected batch ``q · patients``.

The noise and the sample come from OS entropy (:mod:`secrets`), never from a seed the server knows.
Which parameters have a correct per-study gradient is decided once per stage by
:func:`~privacy.dp_sgd.per_sample_parameters` on a *public* synthetic batch (a chest phantom and a
template report, :func:`~lungvl_model.benchmarks.train_bench.synthetic_batch`), never on the site's
studies, whose use outside the noisy steps would not be accounted; the others are frozen for the steps.

Two implementations of the same mechanism (``clipping``): ``"hooks"``, Opacus' ``GradSampleModule`` +
``DPOptimizer`` (per-study gradients of a batch from hooks), and ``"microbatch"``
(:mod:`privacy.dp_sgd_microbatch`: each study forwarded and backwarded alone, clipped, summed, noised;
measured on CPU at 0.8x the non-DP step where the hooks cost 2.9x, :mod:`privacy.bench_dp_sgd`), which
trains every parameter the stage uses (only the unused ones are frozen).
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any, Final, cast

import torch
from opacus.grad_sample import GradSampleModule  # type: ignore[import-untyped]
from opacus.optimizers import DPOptimizer  # type: ignore[import-untyped]
from torch.utils.data import DataLoader, Dataset

from lungvl_model.benchmarks.train_bench import synthetic_batch
from lungvl_model.data.dataset import collate
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.training.loop import TrainResult, cycle, run_steps, seed_everything, to_device
from privacy.dp_sgd import (
    EmptyBatchSafe,
    PoissonCollate,
    dp_sgd_ready,
    empty_like,
    per_sample_parameters,
    reset_opacus_state,
)
from privacy.dp_sgd_microbatch import MicrobatchDPSGD, microbatch_steps, stage_parameters

__all__ = ["CLIPPING", "PatientPoissonSampler", "check_patient_groups", "dp_sgd_steps"]

#: How per-study gradients are clipped: Opacus' per-sample hooks, or one forward/backward per study.
CLIPPING: Final = ("hooks", "microbatch")

logger = logging.getLogger(__name__)


def _public_probe(model: LungVLModel, device: torch.device) -> dict[str, Any]:
    """Two synthetic studies at the model's input size: what decides the per-study parameters (no site data)."""
    cfg = model.config.input
    size = cfg.size or (32, 32, 32)
    batch = synthetic_batch(
        (int(size[0]), int(size[1]), int(size[2])), 2, spacing_mm=cfg.spacing_mm, hu_window=cfg.hu_window
    )
    return to_device(batch, device)


def check_patient_groups(patients: Sequence[Sequence[int]], n: int) -> None:
    """Raise ``ValueError`` unless ``patients`` partitions ``range(n)`` into non-empty groups."""
    if any(len(group) == 0 for group in patients):
        raise ValueError("a patient group is empty")
    seen = [int(i) for group in patients for i in group]
    if sorted(seen) != list(range(n)):
        raise ValueError(
            f"patient groups must partition the {n} studies (each index in exactly one group); got {len(seen)} "
            f"indices, {len(set(seen))} distinct, from {min(seen, default=None)} to {max(seen, default=None)}"
        )


class PatientPoissonSampler:
    """Batch sampler of DP-SGD with the patient as the unit: Poisson over patients, one study each.

    Each of ``steps`` batches includes every patient independently with probability ``sample_rate``
    (so a batch may be empty) and, for each included patient, one of its studies drawn uniformly. The
    inclusion and the draw use ``generator`` only (seed it from OS entropy: a sample the server can
    replay protects nothing).

    Args:
        patients: dataset indices of each patient's studies (a partition of the dataset's indices).
        sample_rate: ``q``, the probability that a patient is in a step.
        steps: batches to yield.
        generator: the sampling randomness.

    Raises:
        ValueError: an empty patient group, ``q`` outside ``(0, 1]`` or ``steps < 0``.
    """

    def __init__(
        self, patients: Sequence[Sequence[int]], sample_rate: float, *, steps: int, generator: torch.Generator
    ) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if any(len(g) == 0 for g in patients):
            raise ValueError("a patient group is empty")
        self.patients = [[int(i) for i in g] for g in patients]
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.generator = generator
        self._sizes = torch.tensor([len(g) for g in self.patients], dtype=torch.long)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.patients)
        for _ in range(self.steps):
            draw = torch.rand(n, generator=self.generator, dtype=torch.float64)
            included = (draw < self.sample_rate).nonzero().squeeze(1)
            sizes = self._sizes[included]
            u = torch.rand(len(included), generator=self.generator, dtype=torch.float64)
            picks = torch.minimum((u * sizes).long(), sizes - 1)  # uniform over the patient's studies
            yield [self.patients[int(p)][int(k)] for p, k in zip(included, picks, strict=True)]


def _poisson_loader(
    dataset: Dataset[dict[str, Any]],
    patients: Sequence[Sequence[int]],
    sample_rate: float,
    steps: int,
    generator: torch.Generator,
    num_workers: int,
) -> DataLoader[dict[str, Any]]:
    """``steps`` patient-Poisson batches of ``dataset`` (an empty draw gives an empty batch)."""
    sampler = PatientPoissonSampler(patients, sample_rate, steps=steps, generator=generator)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=PoissonCollate(empty_like(collate([dataset[0]]))),
        num_workers=num_workers,
    )


def _entropy_generator(device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded from OS entropy (never from a seed the server knows)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))
    return gen


def dp_sgd_steps(
    *,
    model: LungVLModel,
    dataset: Dataset[dict[str, Any]],
    patients: Sequence[Sequence[int]],
    optimizer: torch.optim.Optimizer,
    stage: str,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    device: torch.device,
    bf16: bool,
    seed: int,
    num_workers: int = 0,
    trainable: MutableMapping[str, set[str]] | None = None,
    on_steps: Callable[[int], None] | None = None,
    clipping: str = "hooks",
) -> TrainResult:
    """Run DP-SGD steps on ``model`` in place.

    Args:
        model: the model (on ``device``); parameters' ``requires_grad`` is restored afterwards.
        dataset: the training studies (``len(dataset)`` items).
        patients: the dataset indices of each patient's studies, a partition of ``range(len(dataset))``
            (a study without a known patient is its own group): the sampling unit.
        optimizer: the base optimizer over ``model``'s parameters (wrapped in a ``DPOptimizer`` with hooks).
        stage: ``"ssl"``, ``"seg"`` or ``"vl"``.
        steps: DP-SGD steps.
        sample_rate: Poisson rate ``q`` of each *patient* per step (what the accountant is charged with).
        noise_multiplier: DP-SGD σ.
        max_grad_norm: per-study clip ``C``.
        device: where tensors go.
        bf16: autocast on CUDA.
        seed: seed of the non-private randomness (SSL masks, dropout); never the noise or the sample.
        num_workers: DataLoader workers.
        trainable: cache stage -> names of the parameters with a per-study gradient (filled on first use;
            microbatch: ``"<stage>/microbatch"`` -> the parameters the stage uses).
        on_steps: called once with the number of noisy steps that ran (also when a step fails midway),
            for the accountant.
        clipping: ``"hooks"`` (Opacus per-sample gradient hooks; parameters without a correct hook
            gradient are frozen) or ``"microbatch"`` (each study forwarded and backwarded alone,
            :mod:`privacy.dp_sgd_microbatch`; only parameters the stage does not use are frozen). The
            sampling, clip, noise, divisor and step count are the same.

    Returns:
        The steps' history.

    Raises:
        ValueError: ``patients`` does not partition the dataset's indices, or ``clipping`` is unknown.
    """
    if clipping not in CLIPPING:
        raise ValueError(f"dp_sgd_steps clipping must be one of {CLIPPING}, got {clipping!r}")
    n = len(dataset)  # type: ignore[arg-type]
    check_patient_groups(patients, n)
    if clipping == "microbatch":
        return _microbatch_dp_sgd_steps(
            model=model,
            dataset=dataset,
            patients=patients,
            optimizer=optimizer,
            stage=stage,
            steps=steps,
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            device=device,
            bf16=bf16,
            seed=seed,
            num_workers=num_workers,
            trainable=trainable,
            on_steps=on_steps,
        )
    cache = trainable if trainable is not None else {}
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    steps_done = 0

    def count(_optimizer: DPOptimizer) -> None:  # after the noise of each step: what the accountant counts
        nonlocal steps_done
        steps_done += 1

    with dp_sgd_ready(model):
        if stage not in cache:
            cache[stage], dropped = per_sample_parameters(model, _public_probe(model, device), stage=stage)
            logger.info(
                "DP-SGD stage %s: %d parameter tensors frozen (no per-study gradient): %s",
                stage,
                len(dropped),
                sorted(dropped),
            )
        kept = cache[stage]
        if not kept:
            raise RuntimeError(f"no parameter has a per-study gradient in stage {stage!r}")
        for name, p in model.named_parameters():
            p.requires_grad_(before[name] and name in kept)
        seed_everything(seed)
        reset_opacus_state(model, params=True)
        noise_gen, sample_gen = _entropy_generator(device), _entropy_generator("cpu")
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        try:
            dp_optimizer = DPOptimizer(
                optimizer,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=max(1, round(sample_rate * len(patients))),  # one study per sampled patient
                loss_reduction="mean",
                generator=noise_gen,
            )
            dp_optimizer.attach_step_hook(count)
            loader = _poisson_loader(dataset, patients, sample_rate, steps, sample_gen, num_workers)
            module = EmptyBatchSafe(gsm, [p for p in model.parameters() if p.requires_grad])
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                return run_steps(
                    cast(LungVLModel, module),
                    cycle(loader),
                    dp_optimizer,
                    stage=stage,
                    steps=steps,
                    device=device,
                    grad_clip=0.0,
                    bf16=bf16,
                    seed=seed,
                )
        finally:
            gsm.to_standard_module()  # removes the hooks
            reset_opacus_state(model, params=True)
            model.zero_grad(set_to_none=True)
            for name, p in model.named_parameters():
                p.requires_grad_(before[name])
            if on_steps is not None and steps_done:  # spent even if the round then failed: record what ran
                on_steps(steps_done)


def _microbatch_dp_sgd_steps(
    *,
    model: LungVLModel,
    dataset: Dataset[dict[str, Any]],
    patients: Sequence[Sequence[int]],
    optimizer: torch.optim.Optimizer,
    stage: str,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    device: torch.device,
    bf16: bool,
    seed: int,
    num_workers: int,
    trainable: MutableMapping[str, set[str]] | None,
    on_steps: Callable[[int], None] | None,
) -> TrainResult:
    """:func:`dp_sgd_steps` with ``clipping="microbatch"`` (its arguments, already checked).

    The clipped and noised parameters are the trainable ones the stage uses, found once per stage on
    the public probe (cached in ``trainable`` under ``"<stage>/microbatch"``); the unused ones are frozen.
    """
    cache = trainable if trainable is not None else {}
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    steps_done = 0

    def count() -> None:  # after the noise of each step: what the accountant counts
        nonlocal steps_done
        steps_done += 1

    key = f"{stage}/microbatch"
    with dp_sgd_ready(model):
        try:
            if key not in cache:
                cache[key] = stage_parameters(model, _public_probe(model, device), stage=stage)
                unused = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in cache[key])
                logger.info(
                    "DP-SGD (microbatch) stage %s: %d parameter tensors unused by the stage, frozen: %s",
                    stage,
                    len(unused),
                    unused,
                )
            used = cache[key]
            if not used:
                raise RuntimeError(f"no trainable parameter is used by stage {stage!r}")
            for name, p in model.named_parameters():
                p.requires_grad_(before[name] and name in used)
            seed_everything(seed)
            noise_gen, sample_gen = _entropy_generator(device), _entropy_generator("cpu")
            dp = MicrobatchDPSGD(
                [p for p in model.parameters() if p.requires_grad],
                optimizer,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=max(1, round(sample_rate * len(patients))),  # one study per sampled patient
                noise_generator=noise_gen,
                autocast=bf16,
                on_noised=count,
            )
            loader = _poisson_loader(dataset, patients, sample_rate, steps, sample_gen, num_workers)
            return microbatch_steps(model, cycle(loader), dp, stage=stage, steps=steps, device=device, seed=seed)
        finally:
            model.zero_grad(set_to_none=True)
            for name, p in model.named_parameters():
                p.requires_grad_(before[name])
            if on_steps is not None and steps_done:  # spent even if the round then failed: record what ran
                on_steps(steps_done)
