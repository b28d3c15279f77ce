"""The consortium server's settings: one frozen dataclass, built from TOML, saved with every run.

A ``server.toml`` holds the settings either at the top level or under ``[server]``; the tables
``[strategy]``, ``[dp]`` and ``[training]`` are accepted as well and merged (a scenario file uses
them), so these three files mean the same::

    [server]                 [strategy]               rounds = 10
    rounds = 10              rounds = 10              noise_multiplier = 1.0
    noise_multiplier = 1.0   [dp]
                             noise_multiplier = 1.0

Unknown keys raise ``KeyError`` with a "did you mean" hint; bad values raise ``ValueError`` naming the
key and the value.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

__all__ = ["STRATEGIES", "TABLES", "ServerConfig"]

STRATEGIES: Final = ("fedavg", "fedavgm")
#: TOML tables whose keys are merged into one flat settings dict.
TABLES: Final = ("server", "strategy", "dp", "training")
_STAGES: Final = ("ssl", "seg", "vl")


def _unknown_key_error(key: str, known: list[str], where: str) -> KeyError:
    hint = difflib.get_close_matches(key, known, n=1)
    return KeyError(f"unknown {where} key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))


@dataclass(frozen=True)
class ServerConfig:
    """How the consortium server runs DP-FedAvgM.

    Attributes:
        rounds: federated rounds to run.
        fraction_train: share of the connected sites sampled per round (at least ``min_sites``).
        fraction_evaluate: share of the sites asked to evaluate the new global model (0 = no
            federated evaluation).
        min_sites: fewest valid replies for a round to move the model; also the fewest sites sampled.
        strategy: ``"fedavgm"`` (server momentum) or ``"fedavg"`` (``server_momentum`` ignored, i.e. 0).
        server_lr: server learning rate ``η``.
        server_momentum: server momentum ``β`` in ``[0, 1)``.
        clip_norm: per-site L2 clip ``C`` of the update (client-level DP); 0 = no clipping.
        noise_multiplier: client-level noise ``σ`` (std ``σ·C`` on the clipped sum); 0 = no client-level DP.
        target_epsilon: client-level ε budget at ``delta``; 0 = no budget. The run stops before a round
            that would pass it.
        delta: δ at which ε is reported.
        accountant: ``"rdp"`` or ``"prv"``.
        max_update_norm: updates with a larger L2 norm are rejected (before clipping); 0 = no limit.
        stage: training stage at the sites (``ssl``/``seg``/``vl``).
        local_steps: optimisation steps per site per round.
        lr: local learning rate.
        batch_size: local batch size.
        dp_sgd: ask the sites to run Opacus DP-SGD (sample-level DP, the sites' own budgets apply).
        dp_sgd_noise_multiplier: DP-SGD noise multiplier at the sites.
        dp_sgd_max_grad_norm: DP-SGD per-sample clip at the sites.
        dg_penalty: weight of the sites' variance penalty across slice-thickness subgroups
            (domain generalisation, ``lungvl_model.losses.group_penalty``; 0 = off; not with DP-SGD).
        dro_step: group-DRO step size for the subgroup weights at the sites (0 = off; not with DP-SGD).
        seed: seed of site sampling, of the aggregation noise and of the sites' rounds (per round,
            derived from ``(seed, round)``).
        round_timeout_s: seconds to wait for the replies of a round; missing replies count as timeouts.
    """

    rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    strategy: str = "fedavgm"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    accountant: str = "rdp"
    max_update_norm: float = 0.0
    stage: str = "vl"
    local_steps: int = 5
    lr: float = 3e-4
    batch_size: int = 2
    dp_sgd: bool = False
    dp_sgd_noise_multiplier: float = 1.0
    dp_sgd_max_grad_norm: float = 1.0
    dg_penalty: float = 0.0
    dro_step: float = 0.0
    seed: int = 0
    round_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"ServerConfig.{f.name} must be a number, got {value!r}")
            if f.type == "float" and not math.isfinite(value):
                raise ValueError(f"ServerConfig.{f.name} must be finite, got {value!r}")
        if self.rounds < 1 or self.min_sites < 1 or self.local_steps < 1 or self.batch_size < 1:
            raise ValueError(
                "ServerConfig: rounds, min_sites, local_steps and batch_size must be >= 1, got "
                f"{self.rounds}, {self.min_sites}, {self.local_steps}, {self.batch_size}"
            )
        if not 0 < self.fraction_train <= 1 or not 0 <= self.fraction_evaluate <= 1:
            raise ValueError(
                f"ServerConfig: need 0 < fraction_train <= 1 and 0 <= fraction_evaluate <= 1, got "
                f"{self.fraction_train}, {self.fraction_evaluate}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"ServerConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.stage not in _STAGES:
            raise ValueError(f"ServerConfig.stage must be one of {_STAGES}, got {self.stage!r}")
        if self.server_lr <= 0 or not 0 <= self.server_momentum < 1:
            raise ValueError(
                f"ServerConfig: need server_lr > 0 and 0 <= server_momentum < 1, got {self.server_lr}, "
                f"{self.server_momentum}"
            )
        for name in (
            "clip_norm",
            "noise_multiplier",
            "target_epsilon",
            "max_update_norm",
            "lr",
            "round_timeout_s",
            "dg_penalty",
            "dro_step",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"ServerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr == 0 or self.round_timeout_s == 0:
            raise ValueError(f"ServerConfig: lr and round_timeout_s must be > 0, got {self.lr}, {self.round_timeout_s}")
        if self.noise_multiplier > 0 and self.clip_norm == 0:
            raise ValueError(
                f"ServerConfig.noise_multiplier={self.noise_multiplier} needs clip_norm > 0 (noise std is σ·C)"
            )
        if self.target_epsilon > 0 and self.noise_multiplier == 0:
            raise ValueError(
                f"ServerConfig.target_epsilon={self.target_epsilon} needs noise_multiplier > 0 (client-level DP)"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"ServerConfig.delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"ServerConfig.accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        if self.dp_sgd and (self.dp_sgd_noise_multiplier <= 0 or self.dp_sgd_max_grad_norm <= 0):
            raise ValueError(
                "ServerConfig: dp_sgd needs dp_sgd_noise_multiplier > 0 and dp_sgd_max_grad_norm > 0, got "
                f"{self.dp_sgd_noise_multiplier}, {self.dp_sgd_max_grad_norm}"
            )
        if self.dp_sgd and (self.dg_penalty > 0 or self.dro_step > 0):
            raise ValueError(
                f"ServerConfig: dg_penalty={self.dg_penalty} / dro_step={self.dro_step} cannot be combined with "
                "dp_sgd (the subgroup penalty couples studies, so per-study clipping would not bound them)"
            )
        if self.seed < 0:
            raise ValueError(f"ServerConfig.seed must be >= 0, got {self.seed}")

    # ---- derived
    @property
    def client_dp(self) -> bool:
        """Whether client-level DP is on (clipping plus noise, uniform mean over the expected sites)."""
        return self.noise_multiplier > 0

    @property
    def momentum(self) -> float:
        """The server momentum actually used (0 for ``"fedavg"``)."""
        return 0.0 if self.strategy == "fedavg" else self.server_momentum

    def sample_size(self, available: int) -> int:
        """Sites to sample from ``available`` connected ones: ``max(⌊fraction·N⌋, min_sites)``, at most N."""
        return min(available, max(int(available * self.fraction_train), self.min_sites))

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict; :meth:`from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServerConfig:
        """Build from a flat dict (as :meth:`to_dict` writes).

        Raises:
            KeyError: an unknown key, with a "did you mean" hint.
            ValueError: a bad value (see the attribute docs).
        """
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise _unknown_key_error(key, known, "ServerConfig")
        kw = dict(d)
        for f in fields(cls):
            # TOML integers are fine where a float is expected.
            if f.name in kw and f.type == "float" and isinstance(kw[f.name], int) and not isinstance(kw[f.name], bool):
                kw[f.name] = float(kw[f.name])
        return cls(**kw)

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], *, ignore: tuple[str, ...] = ()) -> ServerConfig:
        """Build from a parsed TOML document: top-level keys plus the tables in :data:`TABLES`.

        Args:
            doc: the parsed document.
            ignore: other top-level tables to leave alone (e.g. a scenario's ``run`` and ``sites``).

        Raises:
            KeyError: an unknown key or table, or a key given twice.
        """
        flat: dict[str, Any] = {}
        for key, value in doc.items():
            if key in ignore:
                continue
            if key in TABLES:
                if not isinstance(value, Mapping):
                    raise ValueError(f"[{key}] must be a table, got {value!r}")
                items = list(value.items())
            elif isinstance(value, Mapping):
                raise _unknown_key_error(key, [*TABLES, *ignore], "server TOML table")
            else:
                items = [(key, value)]
            for k, v in items:
                if k in flat:
                    raise KeyError(f"server setting {k!r} is given twice")
                flat[k] = v
        return cls.from_dict(flat)

    @classmethod
    def from_toml(cls, path: str | Path) -> ServerConfig:
        """Read a server TOML file (see the module docstring for its layout)."""
        p = Path(path)
        with p.open("rb") as fh:
            doc = tomllib.load(fh)
        try:
            return cls.from_mapping(doc, ignore=("deployment",))  # [deployment]: server/deploy.py
        except (KeyError, ValueError) as err:
            raise type(err)(f"{p}: {err.args[0] if err.args else err}") from None

    def with_updates(self, **changes: Any) -> ServerConfig:
        """A copy with some settings changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})
