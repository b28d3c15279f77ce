"""Group DRO over sites: the server weights each site's update by how badly the model fits that site.

Slice protocol, scanner and case mix differ *between* hospitals far more than inside one, so the group
that domain generalisation should protect is the site. With ``site_dro_step = η > 0`` the server keeps
one log-weight per site and aggregates ``Σ_s λ_s Δ_s`` instead of the example-weighted mean, where

    λ = softmax(log-weights) over the round's sites,   log-weight_s ← log-weight_s + η · L_s

after every round in which site ``s`` reported its training loss ``L_s`` (the exponentiated-gradient
ascent of group DRO, Sagawa et al. 2020, with sites as groups; the federated form of DRFA, Deng et al.
2020). A site whose loss stays high gains weight until the model serves it as well as the others; with
``η = 0`` nothing changes.

How the weights enter the aggregate (:meth:`server.aggregation.StreamingAggregator.add`'s ``scale``):
each site's contribution is multiplied by ``λ_s / max_s λ_s`` (at most 1) and the sum is divided by the
sum of those factors (a λ-weighted mean; with clipping but no noise, by the fixed ``q·N``). Site DRO is
refused with client-level DP: the weights are normalised over the sites, so one site's losses move every
other site's weight, and the noisy sum would no longer change by at most ``C`` when one site is added or
removed. It is refused with DP-SGD too: DP-SGD sites withhold their training losses. The weights are
computed from the losses the sites already report and lungvl records in the clear.

The log-weights start at 0 (uniform) for every site, a site seen for the first time included, and start
again at 0 with every curriculum phase (losses of different stages are not comparable).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["dro_scales", "dro_weights", "update_log_weights"]


def dro_weights(log_weights: Mapping[str, float], sites: Iterable[str]) -> dict[str, float]:
    """``λ``: the softmax of the sites' log-weights over ``sites`` (unknown sites at 0); sums to 1.

    Raises:
        ValueError: no site, or a non-finite log-weight (naming the site).
    """
    names = list(dict.fromkeys(sites))
    if not names:
        raise ValueError("dro_weights needs at least one site")
    logs = {s: float(log_weights.get(s, 0.0)) for s in names}
    for s, v in logs.items():
        if not math.isfinite(v):
            raise ValueError(f"site {s!r} has a non-finite DRO log-weight {v!r}")
    top = max(logs.values())
    raw = {s: math.exp(v - top) for s, v in logs.items()}
    total = sum(raw.values())
    return {s: r / total for s, r in raw.items()}


def dro_scales(log_weights: Mapping[str, float], sites: Iterable[str]) -> dict[str, float]:
    """The factor each site's update is multiplied by: ``λ_s / max λ`` in (0, 1] (the heaviest site: 1)."""
    lam = dro_weights(log_weights, sites)
    top = max(lam.values())
    return {s: w / top for s, w in lam.items()}


def update_log_weights(log_weights: Mapping[str, float], losses: Mapping[str, float], step: float) -> dict[str, float]:
    """``log-weight_s + step · L_s`` for every site with a finite reported loss; the others unchanged.

    Args:
        log_weights: the current log-weights (a site missing from it starts at 0).
        losses: the round's training loss per site (a non-finite loss is ignored).
        step: ``η >= 0``.

    Returns:
        A new mapping; the input is not modified.

    Raises:
        ValueError: a negative or non-finite ``step``.
    """
    if not math.isfinite(step) or step < 0:
        raise ValueError(f"site DRO step must be a finite number >= 0, got {step!r}")
    out = dict(log_weights)
    for site, loss in losses.items():
        if math.isfinite(loss):
            out[site] = out.get(site, 0.0) + step * float(loss)
    return out
