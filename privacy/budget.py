"""Privacy budgets on top of :class:`~privacy.accountant.PrivacyAccountant`: the server's and a site's.

* the server, for client-level DP: :class:`ClientLevelAccountant`, one sampled-Gaussian step per round
  with ``q = expected_sites / total_sites``, and a refusal of the round that would pass the target ε;
* a site, for patient-level DP-SGD: :class:`SiteBudget`, which keeps the site's accountant in
  ``<state_dir>/privacy_accountant.json``, refuses local training that would take ε past the site's
  budget, whatever the server asks, and refuses to start from a state that has forgotten spending its
  audit ledger records (:meth:`SiteBudget.reconcile`, :class:`AccountantStateMismatch`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from privacy.accountant import (
    ACCOUNTANT_STATE_FILE,
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    _check_mechanism,
    check_delta,
    check_epsilon,
)

__all__ = ["AccountantStateMismatch", "ClientLevelAccountant", "SiteBudget"]

#: ε the accountant may fall short of a recorded ε by (relative, plus 1e-9 absolute): float round-off only.
RECONCILE_RTOL = 1e-6


class ClientLevelAccountant:
    """Server-side accounting for client-level DP-FedAvgM: one sampled-Gaussian step per round.

    Args:
        total_sites: number of sites in the federation ``N``.
        expected_sites: expected number of sites sampled per round ``m`` (so ``q = m / N``).
        noise_multiplier: σ of the aggregation noise (std ``σ·C`` on the clipped sum).
        delta: δ at which ε is reported.
        target_epsilon: optional budget; :meth:`check_next_round` raises past it.
        accountant: registry name ("rdp" or "prv").
    """

    def __init__(
        self,
        *,
        total_sites: int,
        expected_sites: float,
        noise_multiplier: float,
        delta: float,
        target_epsilon: float | None = None,
        accountant: str = "rdp",
    ) -> None:
        if isinstance(total_sites, bool) or int(total_sites) != total_sites or total_sites < 1:
            raise ValueError(f"total_sites must be an integer >= 1, got {total_sites!r}")
        if not 0 < float(expected_sites) <= total_sites:
            raise ValueError(f"expected_sites must be in (0, total_sites={total_sites}], got {expected_sites!r}")
        self.total_sites = int(total_sites)
        self.expected_sites = float(expected_sites)
        self.noise_multiplier, self.sample_rate, _ = _check_mechanism(
            noise_multiplier, self.expected_sites / self.total_sites, 1
        )
        self.delta = check_delta(delta)
        self.target_epsilon = None if target_epsilon is None else check_epsilon("target_epsilon", target_epsilon)
        self.accountant = PrivacyAccountant(accountant)

    @property
    def rounds(self) -> int:
        """Rounds accounted so far."""
        return self.accountant.steps

    @property
    def epsilon(self) -> float:
        """ε spent so far at :attr:`delta`."""
        return self.accountant.get_epsilon(self.delta)

    def next_round_epsilon(self) -> float:
        """ε after one more round."""
        return self.accountant.epsilon_after(
            delta=self.delta, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
        )

    def check_next_round(self) -> None:
        """Raise :class:`PrivacyBudgetExceeded` when one more round would pass ``target_epsilon``."""
        if self.target_epsilon is None:
            return
        after = self.next_round_epsilon()
        if after > self.target_epsilon:
            raise PrivacyBudgetExceeded(
                spent=self.epsilon, requested=after, target=self.target_epsilon, delta=self.delta, who="server"
            )

    def step_round(self) -> float:
        """Record one aggregation round; returns ε after it."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return self.epsilon

    def state_dict(self) -> dict[str, Any]:
        """The accountant state (settings are constructor arguments; the history records what was used)."""
        return self.accountant.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history saved by :meth:`state_dict`."""
        self.accountant.load_state_dict(state)


# --------------------------------------------------------------------------------------------- site side


class AccountantStateMismatch(RuntimeError):
    """A site's accountant state is missing, or holds less ε than its audit ledger records as spent."""


class SiteBudget:
    """A site's own ε budget for patient-level DP-SGD, persisted in ``<state_dir>/privacy_accountant.json``.

    The state file is read when the budget is created (so a restarted client continues where it
    stopped) and written atomically by :meth:`record`. A missing file starts a fresh accountant: the
    site checks it with :meth:`reconcile` against what its audit ledger records, so a deleted or reset
    state is refused rather than silently starting ε at 0.

    Args:
        state_dir: the site's state directory.
        epsilon_budget: the site's ε budget (``[privacy] epsilon_budget`` in site.toml).
        delta: δ (``[privacy] delta``).
        accountant: registry name for a new state; an existing file keeps its own and must match.

    Raises:
        ValueError: invalid budget, or a state file written by another accountant.
    """

    def __init__(
        self, state_dir: str | os.PathLike[str], *, epsilon_budget: float, delta: float, accountant: str = "rdp"
    ) -> None:
        self.state_dir = Path(state_dir)
        self.epsilon_budget = check_epsilon("epsilon_budget", epsilon_budget)
        self.delta = check_delta(delta)
        if self.path.exists():
            self.accountant = PrivacyAccountant.load(self.path)
            if self.accountant.name != accountant:
                raise ValueError(
                    f"{self.path} holds a {self.accountant.name!r} accountant state, but {accountant!r} was asked for"
                )
        else:
            self.accountant = PrivacyAccountant(accountant)

    @classmethod
    def from_config(
        cls, state_dir: str | os.PathLike[str], config: Mapping[str, Any] | object, *, accountant: str = "rdp"
    ) -> SiteBudget:
        """Build from a config holding ``epsilon_budget`` and ``delta``.

        Args:
            state_dir: the site's state directory.
            config: a mapping such as site.toml's ``[privacy]`` table, or an object with those attributes.
            accountant: registry name for a new state.

        Returns:
            The site's budget, with any saved state loaded.
        """
        if isinstance(config, Mapping):
            missing = [k for k in ("epsilon_budget", "delta") if k not in config]
            if missing:
                raise KeyError(f"privacy config lacks {missing}; got keys {sorted(config)}")
            eps, delta = config["epsilon_budget"], config["delta"]
        else:
            eps, delta = getattr(config, "epsilon_budget"), getattr(config, "delta")  # noqa: B009
        return cls(state_dir, epsilon_budget=eps, delta=delta, accountant=accountant)

    @property
    def path(self) -> Path:
        """The accountant state file."""
        return self.state_dir / ACCOUNTANT_STATE_FILE

    @property
    def spent(self) -> float:
        """ε spent so far at :attr:`delta`."""
        return self.accountant.get_epsilon(self.delta)

    @property
    def remaining(self) -> float:
        """``epsilon_budget − spent`` (may be negative if training was recorded past the budget)."""
        return self.epsilon_budget - self.spent

    def check_can_train(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Refuse local training that would take ε past the budget.

        Args:
            noise_multiplier: DP-SGD σ.
            sample_rate: Poisson sampling rate ``batch_size / n_examples``.
            steps: optimiser steps of the coming local training.

        Returns:
            ε after that training.

        Raises:
            PrivacyBudgetExceeded: when ε after the training would be above ``epsilon_budget``.
        """
        after = self.accountant.epsilon_after(
            delta=self.delta, noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps
        )
        if after > self.epsilon_budget:
            raise PrivacyBudgetExceeded(
                spent=self.spent, requested=after, target=self.epsilon_budget, delta=self.delta, who="site"
            )
        return after

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record local training that has happened, save the state; returns ε spent afterwards.

        It records even past the budget: the ledger must tell what was spent.
        """
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps)
        self.save()
        return self.spent

    def save(self) -> None:
        """Write the accountant state atomically."""
        self.accountant.save(self.path)

    def reconcile(self, recorded: Mapping[float | None, float], *, record: str | os.PathLike[str]) -> None:
        """Refuse a state that has forgotten spending recorded elsewhere (the site's audit ledger).

        Args:
            recorded: the largest ε recorded as spent, per δ it was recorded at (``None``: at
                :attr:`delta`); e.g. ``AuditLedger.max_epsilon()``. Empty: nothing to check.
            record: where it was recorded (named in the error).

        Raises:
            AccountantStateMismatch: ε was recorded but the state file is missing, or the state's ε at a
                recorded δ is below the recorded ε (beyond float round-off). The message names both
                files and both numbers.
        """
        for rec_delta, rec_eps in sorted(recorded.items(), key=lambda kv: -kv[1]):
            if rec_eps <= 0:
                continue
            delta = self.delta if rec_delta is None else rec_delta
            if not self.path.exists():
                raise AccountantStateMismatch(
                    f"{record} records ε = {rec_eps:.6g} spent (δ = {delta:g}), but the accountant state "
                    f"{self.path} does not exist (ε would restart at 0); restore the state file from a backup "
                    "(the site refuses to start without it)"
                )
            have = self.accountant.get_epsilon(delta)
            if math.isnan(have) or have < rec_eps - (RECONCILE_RTOL * rec_eps + 1e-9):
                raise AccountantStateMismatch(
                    f"the accountant state {self.path} holds ε = {have:.6g} at δ = {delta:g}, less than the "
                    f"ε = {rec_eps:.6g} that {record} records as spent; restore the state file from a backup "
                    "(the site refuses to start with less ε than it has spent)"
                )
