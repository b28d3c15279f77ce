"""A site's own policy for federated requests (DESIGN.md section 4: "the site enforces its own policy").

The policy sits in site.toml ``[privacy]``, next to the ε budget (``client.config.ClientConfig`` reads it)::

    [privacy]
    epsilon_budget = 8.0
    delta = 1e-5
    require_dp_sgd = true               # refuse any training without DP-SGD (default false)
    min_dp_sgd_noise_multiplier = 0.8   # refuse DP-SGD with a smaller σ (default 0: no floor)
    max_steps_per_round = 50            # local steps per server round (default 0: no cap)
    max_rounds = 200                    # distinct server rounds the site trains in, ever (default 0: no cap)
    min_eval_studies = 5                # fewest hold-out studies behind any evaluation metric (default 5)
    max_evaluations_per_round = 1       # evaluate answers per server round (default 1; 0: answer none)

:class:`SitePolicy` holds and validates these values. :func:`check_train` and :func:`check_evaluate`
apply them to what a request asks and to what the site has already done (counts the site takes from its
audit ledger), and raise :class:`SitePolicyRefusal` naming the rule, the requested value and the limit;
:func:`withhold_thin_metrics` drops the evaluation metrics that stand on too few studies. The ε budget
itself is :class:`privacy.budget.SiteBudget`'s. Pure: no file, no flwr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

__all__ = [
    "POLICY_KEYS",
    "SitePolicy",
    "SitePolicyRefusal",
    "check_evaluate",
    "check_train",
    "withhold_thin_metrics",
]

#: The policy's keys in site.toml ``[privacy]`` (and the :class:`SitePolicy` fields), in order.
POLICY_KEYS: Final = (
    "require_dp_sgd",
    "min_dp_sgd_noise_multiplier",
    "max_steps_per_round",
    "max_rounds",
    "min_eval_studies",
    "max_evaluations_per_round",
)


def _toml(value: Any) -> str:
    """A value as site.toml spells it (``true``, ``0.8``, ``5``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


class SitePolicyRefusal(ValueError):
    """A request outside the site's policy: the site answers it with a refusal and changes nothing.

    Attributes:
        rule: the site.toml key of the rule, e.g. ``"require_dp_sgd"`` or ``"holdout_fraction"``.
        requested: what the request asked for, or would have led to (e.g. ``False``, ``0.5``, ``3``).
        limit: the site's setting it conflicts with.
    """

    def __init__(self, rule: str, *, requested: Any, limit: Any, reason: str, table: str = "privacy") -> None:
        self.rule = rule
        self.requested = requested
        self.limit = limit
        super().__init__(f"site policy [{table}] {rule} = {_toml(limit)}: {reason}")


@dataclass(frozen=True)
class SitePolicy:
    """What a site agrees to, whatever the server asks (site.toml ``[privacy]``).

    Attributes:
        require_dp_sgd: refuse any train request without DP-SGD.
        min_dp_sgd_noise_multiplier: refuse DP-SGD with a noise multiplier σ below this (0 = no floor).
        max_steps_per_round: local steps the site trains in one server round, all train requests of
            that round together (0 = no cap).
        max_rounds: distinct server rounds the site trains in over its life, counted from its audit
            ledger in its state directory (0 = no cap).
        min_eval_studies: the fewest hold-out studies behind any evaluation metric: an evaluation on a
            smaller hold-out is refused, and a metric that stands on fewer studies (e.g. an AUC within a
            slice-thickness group) is withheld.
        max_evaluations_per_round: evaluate requests the site answers per server round (0 = none).
    """

    require_dp_sgd: bool = False
    min_dp_sgd_noise_multiplier: float = 0.0
    max_steps_per_round: int = 0
    max_rounds: int = 0
    min_eval_studies: int = 5
    max_evaluations_per_round: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.require_dp_sgd, bool):
            raise ValueError(f"[privacy] require_dp_sgd must be true or false, got {self.require_dp_sgd!r}")
        sigma = self.min_dp_sgd_noise_multiplier
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"[privacy] min_dp_sgd_noise_multiplier must be a finite number >= 0, got {sigma!r}")
        object.__setattr__(self, "min_dp_sgd_noise_multiplier", float(sigma))
        for name, low in (
            ("max_steps_per_round", 0),
            ("max_rounds", 0),
            ("min_eval_studies", 1),
            ("max_evaluations_per_round", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"[privacy] {name} must be an integer >= {low}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """The policy as site.toml ``[privacy]`` keys and values."""
        return asdict(self)

    def describe(self) -> str:
        """One human line (``lungvl site check`` / ``site join`` print it)."""
        sigma = self.min_dp_sgd_noise_multiplier
        parts = [
            "DP-SGD required" if self.require_dp_sgd else "DP-SGD not required",
            f"σ >= {sigma:g}" if sigma > 0 else "no σ floor",
            f"<= {self.max_steps_per_round} steps per round" if self.max_steps_per_round else "no step cap",
            f"<= {self.max_rounds} rounds" if self.max_rounds else "no round cap",
            f">= {self.min_eval_studies} hold-out studies per evaluation metric",
            f"<= {self.max_evaluations_per_round} evaluation(s) per round",
        ]
        return "; ".join(parts)


def check_train(
    policy: SitePolicy,
    *,
    dp_sgd: bool,
    noise_multiplier: float,
    local_steps: int,
    steps_this_round: int = 0,
    rounds_trained: int = 0,
    new_round: bool = True,
) -> None:
    """Refuse a train request outside ``policy``.

    Args:
        policy: the site's policy.
        dp_sgd: the request asks for DP-SGD.
        noise_multiplier: the request's DP-SGD σ (looked at only with ``dp_sgd``).
        local_steps: the request's local steps.
        steps_this_round: local steps the site has already trained (and answered) in the same server round.
        rounds_trained: distinct server rounds the site has trained in so far.
        new_round: the request's server round is not among those.

    Raises:
        SitePolicyRefusal: DP-SGD required but not asked; σ below the floor; steps past the per-round
            cap; a new round past ``max_rounds``.
    """
    if policy.require_dp_sgd and not dp_sgd:
        raise SitePolicyRefusal(
            "require_dp_sgd", requested=False, limit=True, reason="the server asked to train without DP-SGD"
        )
    floor = policy.min_dp_sgd_noise_multiplier
    if dp_sgd and noise_multiplier < floor:
        raise SitePolicyRefusal(
            "min_dp_sgd_noise_multiplier",
            requested=noise_multiplier,
            limit=floor,
            reason=f"the server asked for DP-SGD with noise multiplier σ = {noise_multiplier:g}",
        )
    cap = policy.max_steps_per_round
    if cap and steps_this_round + local_steps > cap:
        already = f", on top of {steps_this_round} already trained in this round" if steps_this_round else ""
        raise SitePolicyRefusal(
            "max_steps_per_round",
            requested=steps_this_round + local_steps,
            limit=cap,
            reason=f"the server asked for local_steps = {local_steps}{already}",
        )
    if policy.max_rounds and new_round and rounds_trained >= policy.max_rounds:
        raise SitePolicyRefusal(
            "max_rounds",
            requested=rounds_trained + 1,
            limit=policy.max_rounds,
            reason=f"the site has trained in {rounds_trained} server round(s) already; this would be one more",
        )


def check_evaluate(
    policy: SitePolicy,
    *,
    answered_this_round: int,
    holdout: bool,
    dp_reason: str = "",
    holdout_studies: int = 0,
) -> None:
    """Refuse an evaluate request outside ``policy``.

    Args:
        policy: the site's policy.
        answered_this_round: evaluate requests the site has already answered in the same server round.
        holdout: the site holds patients out of training (``[training] holdout_fraction > 0``).
        dp_reason: why DP-SGD is on for this site (required, asked in the round, ε already spent);
            empty when it is not.
        holdout_studies: usable hold-out studies for the request's stage (looked at only with ``holdout``).

    Raises:
        SitePolicyRefusal: one evaluation more than ``max_evaluations_per_round``; no hold-out while
            DP-SGD is on (the metrics would score training studies); a hold-out smaller than
            ``min_eval_studies``.

    Without a hold-out and without DP (a non-private setting, whose training updates already expose
    the studies more than their metrics do) the request passes: the caller scores the training
    studies and must say so.
    """
    if answered_this_round >= policy.max_evaluations_per_round:
        raise SitePolicyRefusal(
            "max_evaluations_per_round",
            requested=answered_this_round + 1,
            limit=policy.max_evaluations_per_round,
            reason=f"the site has answered {answered_this_round} evaluate request(s) in this server round",
        )
    if not holdout:
        if dp_reason:
            raise SitePolicyRefusal(
                "holdout_fraction",
                requested="evaluation on training studies",
                limit=0.0,
                table="training",
                reason=f"the site holds out no patients, so the evaluation would score training studies, "
                f"and DP-SGD is on ({dp_reason})",
            )
        return
    if holdout_studies < policy.min_eval_studies:
        raise SitePolicyRefusal(
            "min_eval_studies",
            requested=holdout_studies,
            limit=policy.min_eval_studies,
            reason=f"the site's hold-out has {holdout_studies} usable studies for this stage",
        )


def withhold_thin_metrics(
    metrics: Mapping[str, float], support: Mapping[str, int], minimum: int
) -> tuple[dict[str, float], list[str]]:
    """Drop the metrics computed on fewer than ``minimum`` studies.

    Args:
        metrics: name -> value.
        support: name -> number of studies behind the metric (metrics without an entry are kept:
            bookkeeping such as ``num_examples``).
        minimum: the fewest studies a metric may stand on (``min_eval_studies``).

    Returns:
        ``(kept, withheld names)``.
    """
    withheld = sorted(k for k in metrics if k in support and support[k] < minimum)
    return {k: v for k, v in metrics.items() if k not in withheld}, withheld
