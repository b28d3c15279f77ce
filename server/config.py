"""The consortium server's settings: one frozen dataclass, built from TOML, saved with every run.

A ``server.toml`` holds the settings either at the top level or under ``[server]`` (any key), or in
the tables ``[strategy]``, ``[dp]`` and ``[training]``, each of which accepts only its own keys
(:data:`TABLE_KEYS`); so these three files mean the same::

    [server]                        [strategy]                      rounds = 10
    rounds = 10                     rounds = 10                     client_noise_multiplier = 1.0
    client_noise_multiplier = 1.0   [dp]
                                    client_noise_multiplier = 1.0

Unknown keys raise ``KeyError`` with a "did you mean" hint; bad values raise ``ValueError`` naming the
key and the value. The sites' per-round settings (``stage``, ``local_steps``, ``lr``, ``batch_size``,
``seg_patch``, ``seg_fg_prob``, ``dp_sgd*``, ``dg_penalty``, ``dro_step``) are validated by the
:class:`~federation.protocol.RoundConfig` they become, the same rules a site applies on receipt.

A run that trains several stages lists them as ``[[curriculum]]`` tables (:mod:`server.curriculum`);
``[training]`` then holds the defaults of their unset keys, ``rounds`` is the phases' sum (given or
not), and ``stage`` is set per phase only.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

import numpy as np

from federation.protocol import RoundConfig
from lungvl_model.config_file import read_toml
from server.curriculum import LR_SCHEDULES, CurriculumPhase, phase_at, phase_starts, scheduled_lr
from server.round_types import DEFAULT_MAX_FAILED_ROUNDS

__all__ = ["CURRICULUM", "SITE_SAMPLINGS", "STRATEGIES", "TABLES", "TABLE_KEYS", "ServerConfig", "round_seed"]

STRATEGIES: Final = ("fedavg", "fedavgm")
#: How the sites of a round are drawn: independently with probability ``fraction_train`` (Poisson;
#: what the client-level accountant analyses) or a fixed number without replacement (no client-level
#: DP with ``fraction_train < 1``: lungvl has no without-replacement analysis).
SITE_SAMPLINGS: Final = ("poisson", "fixed")
#: The keys each strict table accepts; ``[server]`` and the top level accept all of them.
TABLE_KEYS: Final[dict[str, frozenset[str]]] = {
    "strategy": frozenset(
        {"rounds", "fraction_train", "fraction_evaluate", "min_sites", "strategy", "server_lr", "server_momentum",
         "max_update_norm", "site_sampling", "seed", "round_timeout_s", "site_dro_step", "max_failed_rounds"}
    ),
    "dp": frozenset(
        {"clip_norm", "client_noise_multiplier", "target_epsilon", "delta", "accountant", "reproducible_noise",
         "noise_key", "dp_sgd", "dp_sgd_noise_multiplier", "dp_sgd_max_grad_norm"}
    ),
    "training": frozenset(
        {"stage", "local_steps", "lr", "batch_size", "lr_schedule", "seg_patch", "seg_fg_prob",
         "seg_hard_negative_prob", "dg_penalty", "dro_step"}
    ),
}  # fmt: skip
#: The list of tables that schedules the stages over rounds (``[[curriculum]]``).
CURRICULUM: Final = "curriculum"
#: TOML tables whose keys are merged into one flat settings dict.
TABLES: Final = ("server", *TABLE_KEYS)


def round_seed(seed: int, rnd: int) -> int:
    """The data-order seed sent to the sites in round ``rnd`` (a function of ``(seed, rnd)``; never DP noise)."""
    return int(np.random.SeedSequence([seed, rnd]).generate_state(1)[0] & 0x7FFFFFFF)


def _phases(tables: Any, settings: Mapping[str, Any]) -> tuple[CurriculumPhase, ...]:
    """The curriculum phases of ``[[curriculum]]`` tables (or phases); unset keys from ``settings``.

    A phase's ``local_steps``, ``lr``, ``batch_size``, ``lr_schedule`` and ``seg_fg_prob`` default to the
    run's (``settings``, else :class:`ServerConfig`'s defaults); ``seg_patch`` does so for seg phases only.
    """
    if not isinstance(tables, list | tuple):
        raise ValueError(f"ServerConfig.curriculum must be a list of phases, got {tables!r}")
    base = {f.name: f.default for f in fields(ServerConfig)}
    out = []
    for i, t in enumerate(tables, 1):
        if isinstance(t, CurriculumPhase):
            out.append(t)
            continue
        if not isinstance(t, Mapping):
            raise ValueError(f"[[curriculum]] #{i} must be a table, got {t!r}")
        keys = ["local_steps", "lr", "batch_size", "lr_schedule", "seg_fg_prob", "seg_hard_negative_prob"]
        if t.get("stage") == "seg":
            keys.append("seg_patch")
        defaults = {k: settings.get(k, base[k]) for k in keys}
        out.append(CurriculumPhase.from_mapping(t, defaults, index=i))
    return tuple(out)


def _unknown_key_error(key: str, known: list[str], where: str) -> KeyError:
    if key == "noise_multiplier":  # two σ, named for what they are
        return KeyError(
            f"unknown {where} key 'noise_multiplier'; did you mean 'client_noise_multiplier' (the server's noise on "
            "the sum of site updates) or 'dp_sgd_noise_multiplier' (DP-SGD at the sites)?"
        )
    hint = difflib.get_close_matches(key, known, n=1)
    return KeyError(f"unknown {where} key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))


@dataclass(frozen=True)
class ServerConfig:
    """How the consortium server runs DP-FedAvgM.

    Attributes:
        rounds: federated rounds to run.
        fraction_train: with ``site_sampling = "poisson"`` the probability that a site is sampled in a
            round (the client-level accountant's ``q``); with ``"fixed"`` the share of the connected
            sites drawn (at least ``min_sites``).
        fraction_evaluate: share of the sites asked to evaluate the new global model (0 = no
            federated evaluation).
        min_sites: fewest valid replies for a round to move the model (with ``"fixed"`` sampling also
            the fewest sites drawn).
        strategy: ``"fedavgm"`` (server momentum) or ``"fedavg"`` (``server_momentum`` ignored, i.e. 0).
        server_lr: server learning rate ``η``.
        server_momentum: server momentum ``β`` in ``[0, 1)``.
        clip_norm: per-site L2 clip ``C`` of the update (client-level DP); 0 = no clipping.
        client_noise_multiplier: client-level noise ``σ`` (std ``σ·C`` on the clipped sum of the site
            updates); 0 = no client-level DP. Not the sites' DP-SGD σ (``dp_sgd_noise_multiplier``).
        target_epsilon: client-level ε budget at ``delta``; 0 = no budget. The run stops before a round
            that would pass it.
        delta: δ at which ε is reported.
        accountant: ``"rdp"`` or ``"prv"``.
        max_update_norm: updates with a larger L2 norm are rejected (before clipping); 0 = no limit.
        site_sampling: ``"poisson"`` or ``"fixed"`` (:data:`SITE_SAMPLINGS`).
        reproducible_noise: research only: draw the client-level noise and the site sample from
            ``seed`` so that a simulation can be repeated bit for bit. Such a run is *not private* (anyone
            who knows the seed can subtract the noise); the registry and ``server status`` say so. By
            default both come from OS entropy and are never stored or sent.
        noise_key: with ``reproducible_noise``, a name mixed into the seed of the noise so that runs with
            the same ``seed`` draw different noise (a study sets it to the cell's identity); must be empty
            without ``reproducible_noise``.
        stage: training stage at the sites (``text``/``ssl``/``seg``/``vl``) of a run without a
            curriculum.
        local_steps: optimisation steps per site per round (a curriculum phase's default).
        lr: local learning rate (peak of ``lr_schedule``; a curriculum phase's default).
        batch_size: local batch size (a curriculum phase's default).
        lr_schedule: ``"constant"`` or ``"cosine"`` over the rounds (over each phase's rounds in a
            curriculum; :func:`server.curriculum.scheduled_lr`).
        seg_patch: ``seg`` stage: cubic foreground-biased patch edge in voxels (multiple of 16; 0 = whole
            volumes; a curriculum phase's default for its seg phases).
        seg_fg_prob: ``seg`` stage: probability that a patch is centred on a nodule voxel.
        seg_hard_negative_prob: ``seg`` stage: probability that a patch not centred on a nodule is
            centred on a hard-negative point (the rest lie anywhere).
        curriculum: the stages over rounds (:class:`~server.curriculum.CurriculumPhase`, in order); empty:
            every round trains ``stage``.
        dp_sgd: ask the sites to run Opacus DP-SGD (patient-level DP, the sites' own budgets apply).
        dp_sgd_noise_multiplier: DP-SGD noise multiplier σ at the sites.
        dp_sgd_max_grad_norm: DP-SGD per-study clip at the sites.
        dg_penalty: weight of the sites' variance penalty across slice-thickness subgroups
            (domain generalisation, ``lungvl_model.losses.group_penalty``; 0 = off; not with DP-SGD).
        dro_step: group-DRO step size for the subgroup weights at the sites (0 = off; not with DP-SGD).
        seed: seed of the sites' data order (per round, :func:`round_seed`); seeds site sampling and
            the aggregation noise only with ``reproducible_noise``.
        round_timeout_s: seconds to wait for the replies of a round; missing replies count as timeouts.
        site_dro_step: group DRO over sites (:mod:`server.site_dro`): the step ``η`` of the sites'
            log-weights on their reported training losses; the round's aggregate weights each site by
            its softmax weight (0 = off). Not with ``dp_sgd`` (DP-SGD sites withhold their losses) nor
            with client-level DP (the normalised weights couple the sites).
        max_failed_rounds: abort the run (recorded ``failed``) after this many failed rounds in a row
            (0 = never). Flower's run config key ``max-consecutive-failed-rounds`` overrides it.
    """

    rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    strategy: str = "fedavgm"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    clip_norm: float = 0.0
    client_noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    accountant: str = "rdp"
    max_update_norm: float = 0.0
    site_sampling: str = "poisson"
    reproducible_noise: bool = False
    noise_key: str = ""
    stage: str = "vl"
    local_steps: int = 5
    lr: float = 3e-4
    batch_size: int = 2
    lr_schedule: str = "constant"
    seg_patch: int = 0
    seg_fg_prob: float = 0.67
    seg_hard_negative_prob: float = 0.5
    curriculum: tuple[CurriculumPhase, ...] = ()
    dp_sgd: bool = False
    dp_sgd_noise_multiplier: float = 1.0
    dp_sgd_max_grad_norm: float = 1.0
    dg_penalty: float = 0.0
    dro_step: float = 0.0
    seed: int = 0
    round_timeout_s: float = 3600.0
    site_dro_step: float = 0.0
    max_failed_rounds: int = DEFAULT_MAX_FAILED_ROUNDS

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"ServerConfig.{f.name} must be a number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ValueError(f"ServerConfig.{f.name} must be an integer, got {value!r}")
            if f.type == "float" and not math.isfinite(value):
                raise ValueError(f"ServerConfig.{f.name} must be finite, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"ServerConfig.{f.name} must be true or false, got {value!r}")
        if self.max_failed_rounds < 0:
            raise ValueError(
                f"ServerConfig.max_failed_rounds must be >= 0 (0 = never abort), got {self.max_failed_rounds}"
            )
        if self.rounds < 1 or self.min_sites < 1:
            raise ValueError(f"ServerConfig: rounds and min_sites must be >= 1, got {self.rounds}, {self.min_sites}")
        if not 0 < self.fraction_train <= 1 or not 0 <= self.fraction_evaluate <= 1:
            raise ValueError(
                f"ServerConfig: need 0 < fraction_train <= 1 and 0 <= fraction_evaluate <= 1, got "
                f"{self.fraction_train}, {self.fraction_evaluate}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"ServerConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.site_sampling not in SITE_SAMPLINGS:
            raise ValueError(f"ServerConfig.site_sampling must be one of {SITE_SAMPLINGS}, got {self.site_sampling!r}")
        if self.server_lr <= 0 or not 0 <= self.server_momentum < 1:
            raise ValueError(
                f"ServerConfig: need server_lr > 0 and 0 <= server_momentum < 1, got {self.server_lr}, "
                f"{self.server_momentum}"
            )
        non_negative = ("clip_norm", "client_noise_multiplier", "target_epsilon", "max_update_norm", "round_timeout_s")
        for name in (*non_negative, "site_dro_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.site_dro_step > 0 and self.dp_sgd:
            raise ValueError(
                f"ServerConfig.site_dro_step={self.site_dro_step} needs the sites' training losses, which DP-SGD sites "
                "withhold: set site_dro_step = 0 or dp_sgd = false"
            )
        if self.site_dro_step > 0 and self.client_noise_multiplier > 0:
            raise ValueError(
                f"ServerConfig.site_dro_step={self.site_dro_step} cannot be combined with client-level DP: the DRO "
                "weights are normalised over the sites, so one site's losses move every other site's weight and the "
                "per-site sensitivity C of the noisy sum would not hold; set site_dro_step = 0 or "
                "client_noise_multiplier = 0"
            )
        if self.round_timeout_s == 0:
            raise ValueError("ServerConfig.round_timeout_s must be > 0, got 0")
        if self.client_noise_multiplier > 0 and self.clip_norm == 0:
            raise ValueError(
                f"ServerConfig.client_noise_multiplier={self.client_noise_multiplier} needs clip_norm > 0 "
                "(noise std is σ·C)"
            )
        if self.target_epsilon > 0 and self.client_noise_multiplier == 0:
            raise ValueError(
                f"ServerConfig.target_epsilon={self.target_epsilon} needs client_noise_multiplier > 0 (client-level DP)"
            )
        if self.client_dp and self.site_sampling == "fixed" and self.fraction_train < 1:
            raise ValueError(
                f"ServerConfig: site_sampling='fixed' with fraction_train={self.fraction_train} < 1 under client-level "
                "DP: the accountant analyses Poisson sampling only; use site_sampling='poisson'"
            )
        if not isinstance(self.noise_key, str):
            raise ValueError(f"ServerConfig.noise_key must be a string, got {self.noise_key!r}")
        if self.noise_key and not self.reproducible_noise:
            raise ValueError(
                f"ServerConfig.noise_key={self.noise_key!r} only applies with reproducible_noise = true (secret "
                "noise needs no key)"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"ServerConfig.delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"ServerConfig.accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        if self.seed < 0:
            raise ValueError(f"ServerConfig.seed must be >= 0, got {self.seed}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"ServerConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not isinstance(self.curriculum, tuple) or not all(isinstance(p, CurriculumPhase) for p in self.curriculum):
            raise ValueError(f"ServerConfig.curriculum must be a tuple of CurriculumPhase, got {self.curriculum!r}")
        if self.curriculum and self.rounds != sum(p.rounds for p in self.curriculum):
            raise ValueError(
                f"ServerConfig: rounds = {self.rounds} but the curriculum's phases add up to "
                f"{sum(p.rounds for p in self.curriculum)} rounds; leave rounds out or make them agree"
            )
        if not self.curriculum and self.seg_patch and self.stage != "seg":
            raise ValueError(f"ServerConfig.seg_patch = {self.seg_patch} applies to the seg stage only (stage is "
                             f"{self.stage!r})")  # fmt: skip
        for number, start in enumerate(phase_starts(self.phases), 1):
            try:  # the sites' settings: RoundConfig's rules, the ones a site applies on receipt
                self.round_config(start)
            except ValueError as err:
                where = f"[[curriculum]] #{number}: " if self.curriculum else ""
                raise ValueError(f"ServerConfig: {where}{err}") from None

    # ---- derived
    @property
    def client_dp(self) -> bool:
        """Whether client-level DP is on (clipping plus noise, uniform mean over the expected sites)."""
        return self.client_noise_multiplier > 0

    @property
    def momentum(self) -> float:
        """The server momentum actually used (0 for ``"fedavg"``)."""
        return 0.0 if self.strategy == "fedavg" else self.server_momentum

    def sample_size(self, available: int) -> int:
        """``"fixed"`` sampling: sites drawn from ``available``: ``max(⌊fraction·N⌋, min_sites)``, at most N."""
        return min(available, max(int(available * self.fraction_train), self.min_sites))

    def expected_sites(self, available: int) -> float:
        """The divisor of the DP mean: ``q·N`` for Poisson sampling, the fixed sample size otherwise."""
        if self.site_sampling == "poisson":
            return self.fraction_train * available
        return float(self.sample_size(available))

    @property
    def phases(self) -> tuple[CurriculumPhase, ...]:
        """The curriculum, or one phase of ``stage`` over all ``rounds`` for a run without one."""
        if self.curriculum:
            return self.curriculum
        return (
            CurriculumPhase(
                stage=self.stage, rounds=self.rounds, local_steps=self.local_steps, lr=self.lr,
                batch_size=self.batch_size, lr_schedule=self.lr_schedule, seg_patch=self.seg_patch,
                seg_fg_prob=self.seg_fg_prob, seg_hard_negative_prob=self.seg_hard_negative_prob,
                reset_momentum=False,
            ),
        )  # fmt: skip

    def phase_index(self, rnd: int) -> int:
        """The index in :attr:`phases` of round ``rnd``'s phase (a round past ``rounds``: the last phase)."""
        return phase_at(self.phases, min(rnd, self.rounds))[0]

    def momentum_reset(self, since: int, rnd: int) -> bool:
        """Whether the server momentum last updated in round ``since`` starts again from zero in round ``rnd``.

        True when a phase with ``reset_momentum`` (not the first) begins in ``since + 1 .. rnd``: the
        buffer is reset by the first round of the new phase that moves the model, even if the phase's
        opening round failed.
        """
        starts = phase_starts(self.phases)
        return any(since < s <= rnd and p.reset_momentum for s, p in zip(starts[1:], self.phases[1:], strict=True))

    def round_config(self, rnd: int) -> RoundConfig:
        """The config record sent with round ``rnd``'s messages (raises ``ValueError`` naming a bad value).

        Its stage, steps, batch, learning rate and patch are those of the round's curriculum phase; a
        round past ``rounds`` (a resumed run asked for more) keeps the last phase at its last rate.
        """
        phases = self.phases
        index, inside = phase_at(phases, min(rnd, self.rounds))
        p = phases[index]
        return RoundConfig(
            server_round=rnd,
            stage=p.stage,
            local_steps=p.local_steps,
            lr=scheduled_lr(p, inside),
            batch_size=p.batch_size,
            seg_patch=p.seg_patch,
            seg_fg_prob=p.seg_fg_prob,
            seg_hard_negative_prob=p.seg_hard_negative_prob,
            seed=round_seed(self.seed, rnd),
            dp_sgd=self.dp_sgd,
            dp_sgd_noise_multiplier=self.dp_sgd_noise_multiplier,
            dp_sgd_max_grad_norm=self.dp_sgd_max_grad_norm,
            dg_penalty=self.dg_penalty,
            dro_step=self.dro_step,
        )

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict (the curriculum as a list of phase dicts); :meth:`from_dict` inverts it."""
        d = asdict(self)
        d[CURRICULUM] = [p.to_dict() for p in self.curriculum]
        return d

    def to_tables(self) -> dict[str, Any]:
        """The settings in the TOML layout :meth:`from_mapping` reads back.

        ``[strategy]``/``[dp]``/``[training]`` hold their keys, ``[server]`` the rest, and a curriculum
        goes to ``[[curriculum]]`` (its phases name their stages, so ``stage`` is left out); empty
        tables are omitted.
        """
        flat = self.to_dict()
        curriculum = flat.pop(CURRICULUM)
        if curriculum:
            flat.pop("stage")
        tables: dict[str, Any] = {t: {} for t in TABLE_KEYS}
        rest: dict[str, Any] = {}
        for key, value in flat.items():
            home = next((t for t, keys in TABLE_KEYS.items() if key in keys), None)
            (tables[home] if home else rest)[key] = value
        out: dict[str, Any] = {t: v for t, v in tables.items() if v}
        if rest:
            out["server"] = rest
        if curriculum:
            out[CURRICULUM] = curriculum
        return out

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
        if CURRICULUM in kw:
            kw[CURRICULUM] = _phases(kw[CURRICULUM], kw)
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
            if key == CURRICULUM:
                if not isinstance(value, list) or not value or not all(isinstance(v, Mapping) for v in value):
                    raise ValueError(f"[[{CURRICULUM}]] must be one or more tables, got {value!r}")
                items = [(key, value)]
            elif key in TABLES and not (key == "strategy" and isinstance(value, str)):  # strategy: a table and a key
                if not isinstance(value, Mapping):
                    raise ValueError(f"[{key}] must be a table, got {value!r}")
                items = list(value.items())
                own = TABLE_KEYS.get(key)
                for k, _ in items:
                    if own is not None and k not in own:
                        home = [t for t, keys in TABLE_KEYS.items() if k in keys]
                        where = f"; it belongs in [{home[0]}]" if home else ""
                        if not home:
                            raise _unknown_key_error(k, sorted(own), f"[{key}]")
                        raise KeyError(f"[{key}] does not take {k!r}{where}")
            elif isinstance(value, Mapping) or (
                isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value)
            ):
                brackets = f"[{key}]" if isinstance(value, Mapping) else f"[[{key}]]"
                hint = difflib.get_close_matches(key, [*TABLES, *ignore], n=1)
                raise KeyError(f"unknown table {brackets}" + (f"; did you mean [{hint[0]}]?" if hint else ""))
            else:
                items = [(key, value)]
            for k, v in items:
                if k in flat:
                    raise KeyError(f"server setting {k!r} is given twice")
                flat[k] = v
        if CURRICULUM in flat:
            if "stage" in flat:
                raise KeyError(
                    f"'stage' = {flat['stage']!r} is given with [[{CURRICULUM}]]: each phase names its own stage"
                )
            flat[CURRICULUM] = _phases(flat[CURRICULUM], flat)
            flat.setdefault("rounds", sum(p.rounds for p in flat[CURRICULUM]))
        return cls.from_dict(flat)

    @classmethod
    def from_toml(cls, path: str | Path) -> ServerConfig:
        """Read a server TOML file (see the module docstring for its layout)."""
        p = Path(path)
        doc = read_toml(p, what="server config")
        try:
            return cls.from_mapping(doc, ignore=("deployment",))  # [deployment]: server/deploy.py
        except (KeyError, ValueError) as err:
            raise type(err)(f"{p}: {err.args[0] if err.args else err}") from None

    def with_updates(self, **changes: Any) -> ServerConfig:
        """A copy with some settings changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})
