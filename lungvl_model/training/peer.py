"""The segmentation anchor: MONAI DynUNet trained for segmentation alone on the same data and budget.

It uses the same loader, loss, optimizer, schedule and number of steps as ``lungvl train --stage seg``,
so the evaluation can put its Dice/HD95/detection next to the vision-language model's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lungvl_model.data.dataset import SiteDataset
from lungvl_model.losses.segmentation import SegmentationLoss
from lungvl_model.models.config import LungVLConfig
from lungvl_model.models.peers import build_dynunet_peer
from lungvl_model.training.config import TrainConfig
from lungvl_model.training.loop import (
    StepCallback,
    TrainResult,
    build_optimizer,
    cycle,
    lr_lambda,
    make_loader,
    resolve_device,
    seed_everything,
    to_device,
)
from lungvl_model.training.stages import seg_crops


def train_dynunet(
    site_dirs: Sequence[str | Path],
    out_dir: str | Path,
    config: LungVLConfig,
    train: TrainConfig,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train the DynUNet anchor; writes ``peer.pt``, ``config.json`` and ``metrics.json`` to ``out_dir``."""
    seed_everything(train.seed)
    device = resolve_device(train.device)
    net = build_dynunet_peer(1, 1, filters=list(config.vision.channels)).to(device)
    loss_fn = SegmentationLoss(dice_weight=1.0, boundary_weight=0.05)
    dataset = SiteDataset(site_dirs, config.input)
    if len(dataset) == 0:
        raise ValueError("no usable studies for the DynUNet anchor")
    batches = cycle(make_loader(seg_crops(dataset, train), train))
    opt = build_optimizer(net, train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    result = TrainResult(stage="seg-dynunet", device=str(device))
    net.train()
    for step in range(train.max_steps):
        batch = to_device(next(batches), device)
        logits = net(batch["image"])
        loss = loss_fn(logits, batch["seg"], batch["has_mask"].bool())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), train.grad_clip)
        opt.step()
        sched.step()
        logged = {"segmentation": float(loss.detach()), "loss": float(loss.detach())}
        result.history.append(logged)
        result.steps += 1
        result.examples += int(batch["image"].shape[0])
        if on_step:
            on_step(step + 1, train.max_steps, logged)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, out / "peer.pt")
    (out / "config.json").write_text(
        json.dumps(
            {"model": config.to_dict(), "train": train.to_dict(), "peer": "monai.networks.nets.DynUNet"}, indent=2
        )
    )
    (out / "metrics.json").write_text(json.dumps({"summary": result.summary(), "history": result.history}, indent=2))
    return result


def load_dynunet(out_dir: str | Path) -> tuple[nn.Module, LungVLConfig]:
    """Rebuild a trained DynUNet anchor (eval mode, CPU)."""
    d = Path(out_dir)
    cfg = LungVLConfig.from_dict(json.loads((d / "config.json").read_text())["model"])
    net = build_dynunet_peer(1, 1, filters=list(cfg.vision.channels))
    net.load_state_dict(torch.load(d / "peer.pt", map_location="cpu", weights_only=True))
    return net.eval(), cfg


def dynunet_seg_fn(net: nn.Module) -> Any:
    """A ``seg_fn`` for :func:`lungvl_model.inference.explain.explain_study`."""

    @torch.no_grad()
    def fn(image: torch.Tensor) -> np.ndarray:
        dev = next(net.parameters()).device
        return torch.sigmoid(net(image.to(dev)))[0, 0].float().cpu().numpy()

    return fn
