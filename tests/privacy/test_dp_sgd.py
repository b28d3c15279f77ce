"""Patient-level DP-SGD: the patient is the sampling unit, and a study's per-sample gradient is its own.

* :class:`~privacy.dp_sgd_train.PatientPoissonSampler` includes each patient with probability ``q`` per
  step and then one of its studies: a patient with a prior and a current study is never twice in a step.
* :func:`~privacy.dp_sgd_train.dp_sgd_steps` samples through it and divides by ``q · patients``.
* Every loss term of :class:`~lungvl_model.models.lungvl.LungVLModel` is per study with fixed weights
  ``1/B``, so study 0's Opacus per-sample gradient is the same whatever the other studies of its batch
  are (labels known or not, a mask or not, a report or not, longer or shorter reports).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from torch.utils.data import default_collate

import privacy.dp_sgd_train as dp_sgd_train
from lungvl_model.data.preprocess import PreprocessConfig
from lungvl_model.models.config import HeadsConfig, LungVLConfig, TextConfig, VisionConfig
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.text.tokenizer import train_tokenizer
from privacy.dp_sgd import dp_sgd_ready, per_sample_parameters, reset_opacus_state
from privacy.dp_sgd_train import PatientPoissonSampler, check_patient_groups, dp_sgd_steps

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny preset made smaller still (as simulations/scenarios/tiny.toml): 32³ voxels, a 1-layer decoder.
# The tiny preset itself takes ~60 s per stage for these per-sample gradients on one CPU core.
CFG = LungVLConfig(
    preset="test",
    vision=VisionConfig(channels=(4, 8, 8, 16, 16), aggregation_channels=8, attention_scales=(3, 4)),
    text=TextConfig(vocab_size=400, n_layer=1, n_head=2, n_embd=32, n_positions=64, visual_scales=(2, 3), dropout=0.0),
    heads=HeadsConfig(hidden=16),
    input=PreprocessConfig(spacing_mm=(8.0, 8.0, 8.0), size=(32, 32, 32)),
)
TEXTS = [
    "A 9 mm solid nodule in the right upper lobe with spiculated margins. Lung-RADS 4A.",
    "No pulmonary nodules. Mild centrilobular emphysema. Lung-RADS 1.",
    "A 5 mm ground-glass nodule in the left lower lobe. Lung-RADS 2.",
    "Part-solid nodule in the right lower lobe measuring 12 mm, stable since the prior CT. Lung-RADS 4B. "
    "No pleural effusion. The central airways are patent.",
]
NAN = math.nan


def study(seed: int, *, known: bool, text: str, mask: bool) -> dict[str, Any]:
    """One item as :class:`~lungvl_model.data.dataset.SiteDataset` yields it (a cube nodule, two lobes)."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = CFG.input.size
    image = torch.rand(1, d, h, w, generator=g) * 0.2
    seg = torch.zeros(1, d, h, w)
    cy, cx = h // 3 + seed % 5, w // 3 + seed % 7
    seg[0, d // 2 - 3 : d // 2 + 3, cy - 3 : cy + 3, cx - 3 : cx + 3] = 1
    image[seg > 0] = 0.8
    lobes = torch.zeros(1, d, h, w, dtype=torch.long)
    lobes[0, :, : h // 2, : w // 2] = 1
    lobes[0, :, h // 2 :, w // 2 :] = 5
    targets = {
        "malignant": 1.0 if known else NAN,
        "lung_rads": 3 if known else -1,
        "growth_mm": 1.5 if known else NAN,
        "nodule_type": 0 if known else -1,
        "spiculated": 1.0 if known else NAN,
        "calcified": 0.0 if known else NAN,
        "juxtapleural": 0.0 if known else NAN,
        "roundness": 0.7 if known else NAN,
        "diameter_mm": 9.0 if known else NAN,
    }
    return {
        "image": image,
        "seg": seg,
        "lobes": lobes,
        "has_mask": torch.tensor(mask),
        "has_lobes": torch.tensor(mask),
        "targets": {
            k: torch.tensor(v, dtype=torch.int64 if isinstance(v, int) else torch.float32) for k, v in targets.items()
        },
        "text": text,
    }


@pytest.fixture(scope="module")
def model() -> LungVLModel:
    torch.manual_seed(0)
    m = LungVLModel(CFG, train_tokenizer(TEXTS * 6, vocab_size=CFG.text.vocab_size))
    m.train()  # Opacus records activations in training mode only
    m.heads.text_dropout = 0.0  # random masks are not coupling, but they would differ between the passes
    return m


# ------------------------------------------------------------------------------------------- sampling


def test_sampler_takes_each_patient_at_rate_q_and_at_most_one_study_of_it() -> None:
    patients = [[0, 1], [2], [3, 4, 5], [6, 7], [8]]  # two studies: a prior and a current CT
    owner = {i: k for k, group in enumerate(patients) for i in group}
    q, steps = 0.3, 4000
    sampler = PatientPoissonSampler(patients, q, steps=steps, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == steps
    included = Counter[int]()
    picked = Counter[int]()
    for batch in batches:
        owners = [owner[i] for i in batch]
        assert len(owners) == len(set(owners)), batch  # never two studies of one patient in a step
        included.update(owners)
        picked.update(batch)
    se = math.sqrt(q * (1 - q) / steps)
    for k in range(len(patients)):  # the rate is per patient, whatever its number of studies
        assert abs(included[k] / steps - q) < 5 * se, (k, included[k] / steps)
    for k, group in enumerate(patients):  # the study of an included patient is drawn uniformly
        for i in group:
            share = picked[i] / included[k]
            assert abs(share - 1 / len(group)) < 5 * math.sqrt(1 / len(group) / included[k]), (i, share)
    empty = sum(not b for b in batches) / steps  # Poisson: an empty step happens (a noise-only step)
    assert abs(empty - (1 - q) ** len(patients)) < 0.03


def test_sampler_and_groups_reject_bad_input() -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="sample_rate"):
        PatientPoissonSampler([[0]], 0.0, steps=1, generator=gen)
    with pytest.raises(ValueError, match="empty"):
        PatientPoissonSampler([[0], []], 0.5, steps=1, generator=gen)
    check_patient_groups([[1, 0], [2]], 3)
    for bad in ([[0, 1], [1, 2]], [[0], [2]], [[0, 1, 2, 3]]):
        with pytest.raises(ValueError, match="partition"):
            check_patient_groups(bad, 3)


class RecordingDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Studies in memory; records the index list of every batch the DataLoader fetches."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.batches: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        self.batches.append(list(indices))
        return [self.items[i] for i in indices]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dp_sgd_steps_sample_patients_and_divide_by_expected_patients(model, monkeypatch) -> None:
    patients = [[0, 1], [2, 3], [4], [5]]
    owner = {i: k for k, group in enumerate(patients) for i in group}
    data = RecordingDataset([study(i, known=True, text=TEXTS[i % 4], mask=True) for i in range(6)])
    seen: dict[str, Any] = {}

    class SpyOptimizer(dp_sgd_train.DPOptimizer):  # type: ignore[misc,name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(dp_sgd_train, "DPOptimizer", SpyOptimizer)
    spent: list[int] = []
    dp_sgd_steps(
        model=model,
        dataset=data,
        patients=patients,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        stage="seg",
        steps=4,
        sample_rate=0.5,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        device=torch.device("cpu"),
        bf16=False,
        seed=0,
        on_steps=spent.append,
    )
    assert spent == [4] and len(data.batches) == 4
    assert seen["expected_batch_size"] == 2  # q · patients (4), not q · studies (6)
    for batch in data.batches:
        assert len({owner[i] for i in batch}) == len(batch), batch
    with pytest.raises(ValueError, match="partition"):
        dp_sgd_steps(
            model=model,
            dataset=data,
            patients=[[0, 1, 2, 3, 4]],  # study 5 in no group
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            stage="seg",
            steps=1,
            sample_rate=0.5,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            device=torch.device("cpu"),
            bf16=False,
            seed=0,
        )


# ------------------------------------------------------------------------------------------- per-study gradients


def study0_grad_sample(model: LungVLModel, batch: dict[str, Any], stage: str, kept: set[str]) -> torch.Tensor:
    """Study 0's per-sample gradient (Opacus hooks, mean reduction) over the parameters ``kept``."""
    reset_opacus_state(model, params=True)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        out = gsm(batch, stage=stage, generator=torch.Generator().manual_seed(5))  # same SSL mask for study 0
        out.loss.backward()
        return torch.cat([p.grad_sample[0].detach().flatten() for n, p in model.named_parameters() if n in kept])
    finally:
        gsm.to_standard_module()
        reset_opacus_state(model, params=True)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("stage", ["ssl", "seg", "vl"])
def test_per_sample_gradient_of_a_study_does_not_depend_on_the_others(model, stage: str) -> None:
    first = study(0, known=True, text=TEXTS[0], mask=True)
    a = default_collate([first] + [study(i, known=True, text=TEXTS[i], mask=True) for i in (1, 2, 3)])
    # the others now: labels unknown, no mask, no report, shorter reports (the batch's token width changes)
    b = default_collate(
        [
            first,
            study(11, known=False, text="", mask=False),
            study(12, known=False, text=TEXTS[2], mask=True),
            study(13, known=True, text="", mask=False),
        ]
    )
    with dp_sgd_ready(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        kept, _ = per_sample_parameters(model, a, stage=stage)
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            for n, p in model.named_parameters():
                p.requires_grad_(n in kept)
            ga = study0_grad_sample(model, a, stage, kept)
            gb = study0_grad_sample(model, b, stage, kept)
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(before[n])
    assert float(ga.norm()) > 0
    # before: x2.0 (seg: Dice/boundary over the studies with a mask) and x2.0 (vl: report CE over the
    # batch's tokens, risk heads over the known labels); now equal up to float rounding
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-4 * float(ga.abs().max()))
