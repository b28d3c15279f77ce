"""Microbatch DP-SGD (privacy.dp_sgd_microbatch): the same mechanism as Opacus' hooks, one study at a time.

* with σ = 0 the clipped sum ÷ E equals Opacus' (GradSampleModule per-sample gradients, clipped with the
  same C, summed, ÷ expected batch) on the parameters Opacus handles, stages seg and vl;
* a study whose gradient norm exceeds C contributes exactly C;
* an empty Poisson batch is a noise-only step with std σC/E;
* ``dp_sgd_steps(clipping="microbatch")`` runs end to end and charges the accountant its steps;
* the site's ``[compute] dp_sgd_clipping`` is validated.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.utils.data import default_collate

import privacy.dp_sgd_train as dp_sgd_train
from client.config import ClientConfig
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.text.tokenizer import train_tokenizer
from privacy.dp_sgd import PoissonCollate, dp_sgd_ready, per_sample_parameters, reset_opacus_state
from privacy.dp_sgd_microbatch import MicrobatchDPSGD, split_studies
from privacy.dp_sgd_train import dp_sgd_steps
from tests.privacy.test_dp_sgd import CFG, TEXTS, study

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> LungVLModel:
    torch.manual_seed(0)
    m = LungVLModel(CFG, train_tokenizer(TEXTS * 6, vocab_size=CFG.text.vocab_size))
    m.train()
    m.heads.text_dropout = 0.0  # the same forward in both implementations
    return m


def batch_of(n: int) -> dict[str, Any]:
    return default_collate([study(i, known=i % 2 == 0, text=TEXTS[i % 4], mask=i != 1) for i in range(n)])


def microbatch(params: list[nn.Parameter], *, sigma: float, clip: float, expected: int, **kw: Any) -> MicrobatchDPSGD:
    return MicrobatchDPSGD(
        params,
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected,
        noise_generator=torch.Generator().manual_seed(1),
        **kw,
    )


def test_split_studies_keeps_every_field_batched() -> None:
    batch = batch_of(3)
    parts = split_studies(batch)
    assert len(parts) == 3 and parts[1]["image"].shape == (1, *batch["image"].shape[1:])
    assert parts[2]["text"] == [batch["text"][2]] and parts[1]["targets"]["lung_rads"].shape == (1,)
    assert torch.equal(default_collate([study(1, known=False, text=TEXTS[1], mask=False)])["seg"], parts[1]["seg"])
    assert split_studies(PoissonCollate(batch)([])) == []


def as_double(obj: Any) -> Any:
    """``obj`` with every floating-point tensor in float64 (dicts and lists walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: as_double(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [as_double(v) for v in obj]
    return obj


@pytest.mark.parametrize("stage", ["seg", "vl"])
def test_sigma_zero_equals_opacus_hooks_clipped_sum(model: LungVLModel, stage: str) -> None:
    # float64: a study's forward alone and inside a batch of three differ by float32 rounding (~1e-7), and an
    # untrained model has GroupNorm outputs within 1e-5 of a LeakyReLU's kink, where that rounding flips the
    # slope (1 vs 0.01) of one voxel and moves a whole per-study gradient by several per cent (measured).
    batch, expected = as_double(batch_of(3)), 4
    model.double()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with dp_sgd_ready(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            kept, _ = per_sample_parameters(model, batch, stage=stage)
            for n, p in model.named_parameters():
                p.requires_grad_(n in kept)
            params = [p for p in model.parameters() if p.requires_grad]
            # Opacus hooks: per-study gradients of the mean loss (scaled back to each study's own loss)
            reset_opacus_state(model, params=True)
            gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            try:
                gsm(batch, stage=stage).loss.backward()
                samples = [p.grad_sample.detach().clone() for p in params]
            finally:
                gsm.to_standard_module()
                reset_opacus_state(model, params=True)
                model.zero_grad(set_to_none=True)
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples], 1).norm(dim=1)  # (3,)
            mid, high = norms.sort().values[1:]
            clip = float((mid * high).sqrt())  # the largest study over C, the others under it
            factors = (clip / (norms + 1e-6)).clamp(max=1.0)
            hooks = torch.cat([torch.einsum("i,i...->...", factors, g).flatten() for g in samples]) / expected
            # microbatches: each study alone
            dp = microbatch(params, sigma=0.0, clip=clip, expected=expected)
            logged = dp.step(model, batch, stage=stage)
            micro = torch.cat([p.grad.flatten() for p in params])
        finally:
            model.zero_grad(set_to_none=True)
            model.float()
            for n, p in model.named_parameters():
                p.requires_grad_(before[n])
    assert math.isfinite(logged["loss"]) and float(micro.norm()) > 0
    assert int((norms > clip).sum()) == 1 and float(mid) > 0
    torch.testing.assert_close(micro, hooks, rtol=1e-4, atol=1e-4 * float(hooks.abs().max()))


class Scaled(nn.Module):
    """The model with each study's loss multiplied by its ``batch["scale"]`` (batches of one only)."""

    def __init__(self, model: LungVLModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any], stage: str = "seg", generator: torch.Generator | None = None) -> Any:
        out = self.model(batch, stage=stage, generator=generator)
        out.loss = out.loss * batch["scale"][0]
        return out


def test_a_study_over_the_clip_contributes_exactly_c(model: LungVLModel) -> None:
    batch = default_collate([study(i, known=True, text=TEXTS[i], mask=True) for i in (0, 2)])
    batch["scale"] = torch.tensor([1.0, 1e6])  # study 1's loss is a million times study 0's scale
    net = Scaled(model)
    with dp_sgd_ready(model):
        params = [p for n, p in model.named_parameters() if n.startswith(("seg_head.", "vision."))]
        rest = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            for n, p in model.named_parameters():
                p.requires_grad_(n.startswith(("seg_head.", "vision.")))
            raw = microbatch(params, sigma=0.0, clip=1e30, expected=1)  # no clipping: the raw gradients
            g0 = torch.cat([s.flatten() for s in raw.clipped_sum(net, split_studies(batch)[0], stage="seg")[0]])
            g1 = torch.cat([s.flatten() for s in raw.clipped_sum(net, split_studies(batch)[1], stage="seg")[0]])
            clip = 10 * float(g0.norm())
            assert float(g0.norm()) < clip < float(g1.norm()) / 1e3  # study 0 unclipped, study 1 far over C
            sums, logged = microbatch(params, sigma=0.0, clip=clip, expected=1).clipped_sum(net, batch, stage="seg")
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(rest[n])
    total = torch.cat([s.flatten() for s in sums])
    contribution = total - g0
    assert logged["loss"] > 1e4
    assert float(contribution.norm()) == pytest.approx(clip, rel=1e-4)  # exactly C, whatever its loss
    assert float(torch.dot(contribution, g1) / (contribution.norm() * g1.norm())) == pytest.approx(1.0, abs=1e-5)


def test_empty_batch_is_a_noise_only_step(model: LungVLModel) -> None:
    sigma, clip, expected = 1.5, 2.0, 3
    params = [p for n, p in model.named_parameters() if n.startswith(("seg_head.", "vision."))]
    before = [p.detach().clone() for p in params]
    noised: list[int] = []
    dp = microbatch(params, sigma=sigma, clip=clip, expected=expected, on_noised=lambda: noised.append(1))
    empty = PoissonCollate(batch_of(1))([])
    try:
        logged = dp.step(model, empty, stage="seg")
        noise = torch.cat([p.grad.flatten() for p in params])
    finally:
        model.zero_grad(set_to_none=True)
    assert logged == {"loss": 0.0} and noised == [1]
    assert all(torch.equal(b, p) for b, p in zip(before, params, strict=True))  # lr 0: only .grad was set
    n, std = noise.numel(), sigma * clip / expected
    assert n > 10_000
    assert float(noise.std()) == pytest.approx(std, rel=6 / math.sqrt(2 * n))
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)


def test_dp_sgd_steps_microbatch_end_to_end(model: LungVLModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_opacus(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the microbatch path must not build Opacus' hooks or optimizer")

    monkeypatch.setattr(dp_sgd_train, "GradSampleModule", no_opacus)
    monkeypatch.setattr(dp_sgd_train, "DPOptimizer", no_opacus)
    data = [study(i, known=True, text=TEXTS[i % 4], mask=True) for i in range(3)]
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    spent: list[int] = []
    cache: dict[str, set[str]] = {}
    res = dp_sgd_steps(
        model=model,
        dataset=data,  # type: ignore[arg-type]
        patients=[[0, 1], [2]],
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        stage="seg",
        steps=2,
        sample_rate=1.0,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        device=torch.device("cpu"),
        bf16=False,
        seed=0,
        trainable=cache,
        on_steps=spent.append,
        clipping="microbatch",
    )
    try:
        assert spent == [2] and res.steps == 2 and res.examples == 4  # one study per patient per step
        assert all(math.isfinite(h["loss"]) for h in res.history)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        used = cache["seg/microbatch"]
        assert any(n.startswith("vision.") for n in used) and not any(n.startswith("decoder.") for n in used)
        for n, p in model.named_parameters():
            assert torch.equal(w0[n], p.detach()) != (n in used), n  # used: moved by noise; unused: untouched
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(w0[n])
    with pytest.raises(ValueError, match="'ghost'"):
        dp_sgd_steps(
            model=model,
            dataset=data,  # type: ignore[arg-type]
            patients=[[0, 1], [2]],
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            stage="seg",
            steps=1,
            sample_rate=1.0,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            device=torch.device("cpu"),
            bf16=False,
            seed=0,
            clipping="ghost",
        )


def test_site_config_dp_sgd_clipping(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[compute\] dp_sgd_clipping .*'ghost'"):
        ClientConfig(site_dir=tmp_path, name="a", dp_sgd_clipping="ghost")
    auto = ClientConfig(site_dir=tmp_path, name="a")
    assert auto.dp_sgd_clipping == "auto"
    assert (auto.clipping_for("cpu"), auto.clipping_for("cuda")) == ("microbatch", "hooks")
    (tmp_path / "site.toml").write_text('[site]\nname = "a"\n[compute]\ndp_sgd_clipping = "hooks"\n')
    assert ClientConfig.from_toml(tmp_path).clipping_for("cpu") == "hooks"
    (tmp_path / "site.toml").write_text('[site]\nname = "a"\n[compute]\ndp_sgd_clipping = "ghost"\n')
    with pytest.raises(ValueError, match=r"site.toml: \[compute\] dp_sgd_clipping .*'ghost'"):
        ClientConfig.from_toml(tmp_path)
