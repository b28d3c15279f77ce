"""Privacy accounting with persistent state (DESIGN.md section 4; STYLE.md habits 7, 8, 9).

:class:`PrivacyAccountant` wraps an Opacus accountant chosen by name from a small registry ("rdp" and
"prv" built in). Its state is the Opacus mechanism history, a list of ``(σ, q, steps)`` entries
(noise multiplier, sampling rate, number of consecutive steps with those values), plus the accountant's
name; it is JSON-serialisable, and loading rebuilds the Opacus accountant by replaying the history, so
ε survives restarts. ε is recomputed from the whole history on demand (cached until the next step).

Two users of it, in :mod:`privacy.budget`:

* the server, for client-level DP: :class:`~privacy.budget.ClientLevelAccountant`, one sampled-Gaussian
  step per round with ``q = expected_sites / total_sites``;
* a site, for patient-level DP-SGD: :class:`~privacy.budget.SiteBudget`, which keeps the site's accountant
  in ``<state_dir>/privacy_accountant.json`` and refuses local training that would take ε past the site's
  budget, whatever the server asks.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant  # type: ignore[import-untyped]
from opacus.accountants.accountant import IAccountant  # type: ignore[import-untyped]
from opacus.accountants.utils import (  # type: ignore[import-untyped]
    get_noise_multiplier as _opacus_get_noise_multiplier,
)

from lungvl_model.atomic_file import write_json_atomic

__all__ = [
    "ACCOUNTANT_STATE_FILE",
    "HistoryEntry",
    "PrivacyAccountant",
    "PrivacyBudgetExceeded",
    "available_accountants",
    "create_accountant",
    "get_noise_multiplier",
    "get_noise_multiplier_for_schedule",
    "register_accountant",
]

ACCOUNTANT_STATE_FILE = "privacy_accountant.json"
"""File name of a site's accountant state inside its state directory."""

STATE_FORMAT = 1
_EPS_CACHE_SIZE = 64

HistoryEntry = tuple[float, float, int]
"""``(noise_multiplier σ, sample_rate q, steps)``: ``steps`` consecutive sampled-Gaussian steps."""

_ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}


# --------------------------------------------------------------------------------------------- registry


def register_accountant(name: str, cls: type[IAccountant], force: bool = False) -> None:
    """Register an Opacus-style accountant class under ``name``.

    Args:
        name: registry key, e.g. ``"rdp"``.
        cls: a subclass of ``opacus.accountants.accountant.IAccountant`` (it must keep its mechanism
            history in ``self.history`` as ``(σ, q, steps)`` entries, as Opacus' accountants do).
        force: replace an existing registration.

    Raises:
        ValueError: ``name`` is already registered and ``force`` is False.
        TypeError: ``cls`` is not an ``IAccountant`` subclass.
    """
    if not (isinstance(cls, type) and issubclass(cls, IAccountant)):
        raise TypeError(f"accountant {name!r}: expected an opacus IAccountant subclass, got {cls!r}")
    if name in _ACCOUNTANTS and not force:
        raise ValueError(
            f"accountant {name!r} is already registered ({_ACCOUNTANTS[name].__name__}); pass force=True to replace it"
        )
    _ACCOUNTANTS[name] = cls


def available_accountants() -> list[str]:
    """Registered accountant names, sorted."""
    return sorted(_ACCOUNTANTS)


def create_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant registered under ``name``.

    Raises:
        KeyError: unknown name, with a "did you mean" suggestion.
    """
    try:
        cls = _ACCOUNTANTS[name]
    except KeyError:
        hint = difflib.get_close_matches(str(name), _ACCOUNTANTS, n=1)
        raise KeyError(
            f"unknown accountant {name!r}; known: {available_accountants()}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
        ) from None
    return cls()


# --------------------------------------------------------------------------------------------- validation


def check_delta(delta: float) -> float:
    """``delta`` as a float in (0, 1), or ``ValueError`` naming the value (the one rule for every δ)."""
    if isinstance(delta, bool) or not isinstance(delta, int | float):
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return d


def _check_mechanism(noise_multiplier: float, sample_rate: float, num_steps: int) -> HistoryEntry:
    """Validated ``(σ, q, steps)``."""
    sigma, q = float(noise_multiplier), float(sample_rate)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise_multiplier must be finite and > 0 (σ = 0 gives no privacy), got {noise_multiplier!r}")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    return sigma, q, int(num_steps)


def check_epsilon(name: str, epsilon: float) -> float:
    """``epsilon`` as a float > 0, or ``ValueError`` naming ``name`` and the value (the one rule for every ε)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float):
        raise ValueError(f"{name} must be a number > 0, got {epsilon!r}")
    e = float(epsilon)
    if not (e > 0):  # also rejects nan
        raise ValueError(f"{name} must be > 0, got {epsilon!r}")
    return e


def _append(history: list[HistoryEntry], entry: HistoryEntry) -> None:
    """Append to an Opacus history, merging with the last entry when σ and q are unchanged (as Opacus does)."""
    sigma, q, n = entry
    if history and history[-1][0] == sigma and history[-1][1] == q:
        history[-1] = (sigma, q, history[-1][2] + n)
    else:
        history.append((sigma, q, n))


def _atomic_write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` via a temporary file in the same directory and ``os.replace``."""
    write_json_atomic(path, payload, sort_keys=True, allow_nan=True)


# --------------------------------------------------------------------------------------------- exceptions


class PrivacyBudgetExceeded(RuntimeError):
    """The requested training would take ε past the target.

    Attributes:
        spent: ε spent so far.
        requested: ε after the requested steps.
        target: the budget.
        delta: the δ at which ε is measured.
    """

    def __init__(self, *, spent: float, requested: float, target: float, delta: float, who: str = "") -> None:
        self.spent = spent
        self.requested = requested
        self.target = target
        self.delta = delta
        prefix = f"{who}: " if who else ""
        super().__init__(
            f"{prefix}privacy budget exceeded: ε spent so far {spent:.4g}, the requested training would reach "
            f"ε = {requested:.4g} > target ε = {target:.4g} (δ = {delta:g})"
        )


# --------------------------------------------------------------------------------------------- accountant


class PrivacyAccountant:
    """An Opacus accountant chosen by name, with keyword-only steps and JSON-serialisable state.

    Args:
        name: registry name ("rdp" or "prv" built in; see :func:`register_accountant`).

    Example:
        >>> acc = PrivacyAccountant("rdp")
        >>> acc.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=100)
        >>> eps = acc.get_epsilon(1e-5)
    """

    def __init__(self, name: str = "rdp") -> None:
        self.name = name
        self._acc: IAccountant = create_accountant(name)
        # ε by (history, δ): check-then-record (epsilon_after, then step and get_epsilon) computes ε once.
        self._eps_cache: dict[tuple[tuple[HistoryEntry, ...], float], float] = {}

    # ---- state
    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the mechanism history: ``(σ, q, steps)`` entries in order."""
        return [(float(s), float(q), int(n)) for s, q, n in self._acc.history]

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(int(n) for _, _, n in self._acc.history)

    def __len__(self) -> int:
        """Number of history entries (runs of identical ``(σ, q)``), as Opacus' ``len(accountant)``."""
        return len(self._acc.history)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: ``{"format", "name", "mechanism", "history": [[σ, q, steps], ...]}``."""
        return {
            "format": STATE_FORMAT,
            "name": self.name,
            "mechanism": str(self._acc.mechanism()),
            "history": [[s, q, n] for s, q, n in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this accountant's history by replaying the one in ``state``.

        Raises:
            ValueError: a malformed state, or one saved by an accountant of another name.
        """
        if not isinstance(state, Mapping) or "history" not in state or "name" not in state:
            raise ValueError(f"not a PrivacyAccountant state (needs 'name' and 'history'): {state!r:.200}")
        if state["name"] != self.name:
            raise ValueError(f"state of accountant {state['name']!r} cannot be loaded into a {self.name!r} accountant")
        fmt = state.get("format", STATE_FORMAT)
        if fmt != STATE_FORMAT:
            raise ValueError(f"unsupported accountant state format {fmt!r}, expected {STATE_FORMAT}")
        replay: list[HistoryEntry] = []
        for i, entry in enumerate(state["history"]):
            try:
                sigma, q, n = entry
                _append(replay, _check_mechanism(sigma, q, n))
            except (TypeError, ValueError) as err:
                raise ValueError(f"accountant state: history entry {i} = {entry!r} is invalid: {err}") from None
        fresh = create_accountant(self.name)
        fresh.history = replay
        self._acc = fresh
        self._eps_cache.clear()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` to a JSON file atomically (temporary file + rename)."""
        _atomic_write_json(Path(path), self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyAccountant:
        """An accountant rebuilt from a file written by :meth:`save` (its name comes from the file)."""
        p = Path(path)
        try:
            state = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}: not a JSON accountant state ({err})") from None
        if not isinstance(state, dict) or "name" not in state:
            raise ValueError(f"{p}: not a PrivacyAccountant state (no 'name')")
        acc = cls(str(state["name"]))
        acc.load_state_dict(state)
        return acc

    # ---- accounting
    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` sampled-Gaussian steps with noise multiplier ``σ`` and sampling rate ``q``.

        Raises:
            ValueError: ``σ <= 0``, ``q`` outside ``(0, 1]`` or ``num_steps < 1``.
        """
        entry = _check_mechanism(noise_multiplier, sample_rate, num_steps)
        history: list[HistoryEntry] = self._acc.history
        _append(history, entry)

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0.0 before any step)."""
        return self._epsilon_of(self.history, check_delta(delta))

    def epsilon_after(self, *, delta: float, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> float:
        """ε at ``delta`` if the given steps were added; this accountant is not changed."""
        d = check_delta(delta)
        history = list(self.history)
        _append(history, _check_mechanism(noise_multiplier, sample_rate, num_steps))
        return self._epsilon_of(history, d)

    def would_exceed(
        self,
        *,
        target_epsilon: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        num_steps: int = 1,
    ) -> bool:
        """Whether ε after the hypothetical steps would be above ``target_epsilon`` (nothing is recorded)."""
        target = check_epsilon("target_epsilon", target_epsilon)
        eps = self.epsilon_after(
            delta=delta, noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=num_steps
        )
        return eps > target

    def _epsilon_of(self, history: list[HistoryEntry], delta: float) -> float:
        if not history:
            # Opacus' PRV accountant fails on an empty history (NaN domain); no step, no privacy spent.
            return 0.0
        key = (tuple(history), delta)
        if key not in self._eps_cache:
            if len(self._eps_cache) >= _EPS_CACHE_SIZE:
                self._eps_cache.clear()
            acc = type(self._acc)()  # same class as this accountant, whatever the registry holds now
            acc.history = list(history)
            self._eps_cache[key] = float(acc.get_epsilon(delta=delta))
        return self._eps_cache[key]

    def __repr__(self) -> str:
        return f"PrivacyAccountant(name={self.name!r}, steps={self.steps}, entries={len(self)})"


def get_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest σ (within ``epsilon_tolerance`` in ε) such that ``steps`` steps at ``sample_rate`` stay ≤ target.

    Wraps ``opacus.accountants.utils.get_noise_multiplier`` (a doubling then bisection search whose
    result satisfies ``ε(σ) < target_epsilon``).

    Args:
        target_epsilon: ε budget (> 0).
        delta: δ in (0, 1).
        sample_rate: q in (0, 1].
        steps: number of steps the budget must cover (>= 1).
        accountant: registry name of the accountant used in the search.
        epsilon_tolerance: bisection stops when ``target − ε(σ) <= epsilon_tolerance``.

    Returns:
        The noise multiplier σ.

    Raises:
        ValueError: invalid arguments, or a budget too small for any σ up to 1e6.
    """
    target = check_epsilon("target_epsilon", target_epsilon)
    d = check_delta(delta)
    _check_mechanism(1.0, sample_rate, steps)
    check_epsilon("epsilon_tolerance", epsilon_tolerance)
    create_accountant(accountant)  # did-you-mean on a bad name before Opacus' plain error
    try:
        sigma = _opacus_get_noise_multiplier(
            target_epsilon=target,
            target_delta=d,
            sample_rate=float(sample_rate),
            steps=int(steps),
            accountant=accountant,
            epsilon_tolerance=float(epsilon_tolerance),
        )
    except ValueError as err:
        raise ValueError(
            f"no noise multiplier reaches ε = {target_epsilon} at δ = {delta} for {steps} steps at q = {sample_rate} "
            f"({err})"
        ) from None
    return float(sigma)


def get_noise_multiplier_for_schedule(
    *,
    target_epsilon: float,
    delta: float,
    schedule: Sequence[tuple[float, int]],
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest σ (within ``epsilon_tolerance`` in ε) keeping a schedule of sampling rates under the target.

    A federated curriculum changes the batch (so ``q``) and the steps from phase to phase; one σ for
    the whole run must keep the composition of every phase's steps under ``target_epsilon``. A one-phase
    schedule gives :func:`get_noise_multiplier`'s value.

    Args:
        target_epsilon: ε budget (> 0).
        delta: δ in (0, 1).
        schedule: ``(sample_rate q, steps)`` per phase, in order (each q in (0, 1], steps >= 1).
        accountant: registry name of the accountant.
        epsilon_tolerance: the search stops when ``target − ε(σ) <= epsilon_tolerance``.

    Returns:
        σ with ``ε(σ) < target_epsilon`` for the whole schedule.

    Raises:
        ValueError: an empty schedule, a bad entry (named by index), or a budget no σ up to 1e6 reaches.
    """
    if not schedule:
        raise ValueError("noise schedule must hold at least one (sample_rate, steps) phase")
    for i, (q, steps) in enumerate(schedule):
        try:
            _check_mechanism(1.0, q, steps)
        except ValueError as err:
            raise ValueError(f"noise schedule phase {i}: {err}") from None
    if len(schedule) == 1:
        q, steps = schedule[0]
        return get_noise_multiplier(
            target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps, accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
        )  # fmt: skip
    target = check_epsilon("target_epsilon", target_epsilon)
    d = check_delta(delta)
    check_epsilon("epsilon_tolerance", epsilon_tolerance)
    acc = PrivacyAccountant(accountant)

    def eps(sigma: float) -> float:
        return acc._epsilon_of([(sigma, float(q), int(n)) for q, n in schedule], d)

    low, high = 0.0, 1.0
    while eps(high) >= target:  # ε falls as σ grows
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(
                f"no noise multiplier reaches ε = {target_epsilon} at δ = {delta} for the schedule {list(schedule)}"
            )
    for _ in range(200):  # the gap halves each time; 200 halvings of [0, 1e6] is far below any tolerance
        if target - eps(high) <= epsilon_tolerance:
            break
        mid = (low + high) / 2
        if eps(mid) < target:
            high = mid
        else:
            low = mid
    return high
