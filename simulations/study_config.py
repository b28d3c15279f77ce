"""A study: a grid of simulation runs over one federation (strategy × DP × seed, plus DG rows).

::

    [study]
    name = "screening-vs-referral"
    scenario = "../scenarios/screening_vs_referral.toml"   # the federation; relative to this file
    seeds = [0, 1, 2]
    rounds = 20                  # optional: overrides the scenario's rounds
    bootstrap = 2000             # resamples of the report's 95 % intervals
    init_model = "../../models/lungvl-tiny-v1"   # optional: every cell starts from this model package
                                                  # (relative to this file; default: one built per seed)

    [grid]
    strategies = ["initial", "local", "fedavg", "fedavgm", "centralised"]
    fedavgm_server_lr = [0.5, 1.0]          # the FedAvgM sweep (DP off), every lr × momentum
    fedavgm_momentum = [0.5, 0.9]
    dp = ["none", "sample", "client"]       # sample: DP-SGD at the sites; client: DP-FedAvgM noise
    epsilons = [2.0, 8.0]                   # ε targets of the DP cells (at [dp] delta, over the whole run)
    dp_strategies = ["fedavg", "fedavgm", "local"]
    dp_fedavgm = [1.0, 0.9]                 # (server lr, momentum) of FedAvgM in DP and DG cells
    dg_penalty = [1.0]                      # DG rows: FedAvgM (dp_fedavgm), DP off, variance penalty λ
    dro_step = 0.0                          # group-DRO step size of the DG rows
    site_dro = [0.5]                        # site-DRO rows: FedAvgM (dp_fedavgm), DP off, group DRO over sites η

    [dp]
    delta = 1e-5
    client_clip_norm = 0.1       # per-site update clip C of client-level DP
    sample_max_grad_norm = 1.0   # per-study gradient clip of DP-SGD

Grid rules (:func:`expand_grid`), for each seed, in this order:

* ``initial``: the starting model scored by every site without any training (the reference a
  fine-tuning study is measured against; with a model built from scratch, what chance looks like);
* ``local``: DP off; DP-SGD at each ε when ``local`` is in ``dp_strategies`` (client-level DP has no
  meaning without aggregation);
* ``fedavg`` (FedAvg: server lr 1, momentum 0): DP off, then each DP kind × ε (if in ``dp_strategies``);
* ``fedavgm``: every ``fedavgm_server_lr × fedavgm_momentum`` with DP off, then ``dp_fedavgm`` with
  each DP kind × ε (if in ``dp_strategies``);
* ``centralised``: DP off only (pooled data has no site boundary to protect);
* one FedAvgM cell (``dp_fedavgm``, DP off) per ``dg_penalty`` value (slice-thickness groups inside
  each site's batches);
* one FedAvgM cell (``dp_fedavgm``, DP off) per ``site_dro`` value: group DRO over sites at the server
  (:mod:`server.site_dro`), the sites as the groups.

Unknown tables or keys raise ``KeyError`` with a "did you mean" hint; bad values raise ``ValueError``
naming the key and the value.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

from simulations.scenario import read_toml

__all__ = ["DP_KINDS", "STRATEGIES", "Cell", "StudyConfig", "expand_grid"]

STRATEGIES: Final = ("initial", "local", "fedavg", "fedavgm", "centralised")
DP_KINDS: Final = ("none", "sample", "client")
#: TOML table -> keys (StudyConfig field names).
_TABLES: Final = {
    "study": ("name", "scenario", "seeds", "rounds", "bootstrap", "init_model"),
    "grid": (
        "strategies", "fedavgm_server_lr", "fedavgm_momentum", "dp", "epsilons", "dp_strategies", "dp_fedavgm",
        "dg_penalty", "dro_step", "site_dro",
    ),
    "dp": ("delta", "client_clip_norm", "sample_max_grad_norm"),
}  # fmt: skip
_TUPLES: Final = (
    "seeds", "strategies", "fedavgm_server_lr", "fedavgm_momentum", "dp", "epsilons", "dp_strategies", "dp_fedavgm",
    "dg_penalty", "site_dro",
)  # fmt: skip
_PATHS: Final = ("scenario", "init_model")


def _unknown(key: str, known: Sequence[str], where: str) -> KeyError:
    hint = difflib.get_close_matches(key, list(known), n=1)
    return KeyError(f"unknown {where} key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))


def _num(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"study {name} must hold finite numbers, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Cell:
    """One grid cell: an ordinary run (federated, local-only or centralised).

    Attributes:
        strategy: ``initial`` (no training), ``local``, ``fedavg``, ``fedavgm`` or ``centralised``.
        server_lr: server learning rate η (1 for FedAvg; 0 where no server step exists).
        server_momentum: server momentum β (0 for FedAvg and the baselines).
        dp: ``none``, ``sample`` (DP-SGD at the sites) or ``client`` (DP-FedAvgM).
        epsilon: ε target over the whole run (0 with ``dp = "none"``).
        seed: run seed (initial model, site sampling, local data order).
        dg_penalty: subgroup variance penalty λ (0 = off).
        dro_step: group-DRO step size η (0 = off).
        site_dro_step: group DRO over sites at the server, step η (0 = off; :mod:`server.site_dro`).
    """

    strategy: str
    server_lr: float = 0.0
    server_momentum: float = 0.0
    dp: str = "none"
    epsilon: float = 0.0
    seed: int = 0
    dg_penalty: float = 0.0
    dro_step: float = 0.0
    site_dro_step: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"cell strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.dp not in DP_KINDS:
            raise ValueError(f"cell dp must be one of {DP_KINDS}, got {self.dp!r}")
        if (self.dp == "none") != (self.epsilon == 0):
            raise ValueError(
                f"cell dp={self.dp!r} needs epsilon {'0' if self.dp == 'none' else '> 0'}, got {self.epsilon}"
            )
        if self.dp == "client" and self.strategy in ("local", "centralised"):
            raise ValueError(f"client-level DP needs aggregation; strategy {self.strategy!r} has none")
        if self.strategy in ("centralised", "initial") and self.dp != "none":
            raise ValueError(f"the {self.strategy} baseline runs without DP")

    @property
    def federated(self) -> bool:
        """Whether the cell is a Flower simulation (FedAvg / FedAvgM)."""
        return self.strategy in ("fedavg", "fedavgm")

    @property
    def arm(self) -> str:
        """The cell without its seed: what the report groups replicates by (e.g. ``fedavgm-lr1-m0.9-client2``)."""
        name = self.strategy
        if self.strategy == "fedavgm":
            name += f"-lr{self.server_lr:g}-m{self.server_momentum:g}"
        if self.dp != "none":
            name += f"-{self.dp}{self.epsilon:g}"
        if self.dg_penalty:
            name += f"-dg{self.dg_penalty:g}"
        if self.dro_step:
            name += f"-dro{self.dro_step:g}"
        if self.site_dro_step:
            name += f"-sitedro{self.site_dro_step:g}"
        return name

    @property
    def cell_id(self) -> str:
        """Unique name of the cell (its run directory): :attr:`arm` plus the seed."""
        return f"{self.arm}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plus ``cell_id`` and ``arm``, ignored by :meth:`from_dict`)."""
        return {**asdict(self), "cell_id": self.cell_id, "arm": self.arm}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cell:
        """Inverse of :meth:`to_dict`."""
        known = [f.name for f in fields(cls)]
        extra = set(d) - set(known) - {"cell_id", "arm"}
        if extra:
            raise _unknown(sorted(extra)[0], known, "cell")
        return cls(**{k: d[k] for k in known if k in d})


@dataclass(frozen=True)
class StudyConfig:
    """A resolved study file (see the module docstring for the layout and the grid rules)."""

    name: str
    scenario: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int | None = None
    bootstrap: int = 2000
    init_model: Path | None = None
    strategies: tuple[str, ...] = ("local", "fedavg", "fedavgm", "centralised")
    fedavgm_server_lr: tuple[float, ...] = (1.0,)
    fedavgm_momentum: tuple[float, ...] = (0.9,)
    dp: tuple[str, ...] = ("none",)
    epsilons: tuple[float, ...] = ()
    dp_strategies: tuple[str, ...] = ("fedavg", "fedavgm", "local")
    dp_fedavgm: tuple[float, ...] = (1.0, 0.9)
    dg_penalty: tuple[float, ...] = ()
    dro_step: float = 0.0
    site_dro: tuple[float, ...] = ()
    delta: float = 1e-5
    client_clip_norm: float = 0.1
    sample_max_grad_norm: float = 1.0
    source: Path | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or ":" in self.name:
            raise ValueError(f"study name must be non-empty without '/' or ':', got {self.name!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study seeds must be distinct and non-empty, got {list(self.seeds)}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"study seeds must be integers >= 0, got {list(self.seeds)}")
        if self.rounds is not None and (
            isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1
        ):
            raise ValueError(f"study rounds must be an integer >= 1, got {self.rounds!r}")
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 1:
            raise ValueError(f"study bootstrap must be an integer >= 1, got {self.bootstrap!r}")
        for key, allowed in (("strategies", STRATEGIES), ("dp", DP_KINDS), ("dp_strategies", STRATEGIES)):
            bad = [v for v in getattr(self, key) if v not in allowed]
            if bad:
                raise ValueError(f"grid {key} must be among {allowed}, got {bad}")
        if not self.strategies:
            raise ValueError("grid strategies must not be empty")
        if "none" not in self.dp:
            raise ValueError(
                f"grid dp must include 'none' (the reference every DP cell is compared with), got {list(self.dp)}"
            )
        for key in ("fedavgm_server_lr", "fedavgm_momentum", "epsilons", "dp_fedavgm", "dg_penalty", "site_dro"):
            for v in getattr(self, key):
                _num(f"grid {key}", v)
        if any(v <= 0 for v in self.fedavgm_server_lr) or any(not 0 <= v < 1 for v in self.fedavgm_momentum):
            raise ValueError(
                f"grid needs fedavgm_server_lr > 0 and 0 <= fedavgm_momentum < 1, got {list(self.fedavgm_server_lr)}, "
                f"{list(self.fedavgm_momentum)}"
            )
        if len(self.dp_fedavgm) != 2 or self.dp_fedavgm[0] <= 0 or not 0 <= self.dp_fedavgm[1] < 1:
            raise ValueError(f"grid dp_fedavgm must be [server_lr > 0, 0 <= momentum < 1], got {list(self.dp_fedavgm)}")
        if any(e <= 0 for e in self.epsilons) or (set(self.dp) - {"none"} and not self.epsilons):
            raise ValueError(f"grid epsilons must be > 0 (and given when dp has a DP kind), got {list(self.epsilons)}")
        if any(v <= 0 for v in self.dg_penalty) or self.dro_step < 0:
            raise ValueError(
                f"grid dg_penalty must be > 0 and dro_step >= 0, got {list(self.dg_penalty)}, {self.dro_step}"
            )
        if any(v <= 0 for v in self.site_dro):
            raise ValueError(f"grid site_dro must be > 0, got {list(self.site_dro)}")
        if not 0 < self.delta < 1 or self.client_clip_norm <= 0 or self.sample_max_grad_norm <= 0:
            raise ValueError(
                f"[dp] needs 0 < delta < 1, client_clip_norm > 0 and sample_max_grad_norm > 0, got {self.delta}, "
                f"{self.client_clip_norm}, {self.sample_max_grad_norm}"
            )

    def cells(self) -> list[Cell]:
        """The expanded grid (:func:`expand_grid`)."""
        return expand_grid(self)

    def to_dict(self) -> dict[str, Any]:
        """The study in its TOML layout (``scenario`` as a string); :meth:`from_dict` inverts it."""
        out: dict[str, dict[str, Any]] = {}
        for table, keys in _TABLES.items():
            for k in keys:
                v = getattr(self, k)
                if v is None:
                    continue
                out.setdefault(table, {})[k] = str(v) if k in _PATHS else list(v) if k in _TUPLES else v
        return out

    @classmethod
    def from_dict(
        cls, doc: Mapping[str, Any], *, base_dir: Path | None = None, source: Path | None = None
    ) -> StudyConfig:
        """Build from a parsed study document; a relative ``scenario`` or ``init_model`` is relative to ``base_dir``.

        Raises:
            KeyError: unknown table or key (with a "did you mean" hint), or a missing name/scenario.
            ValueError: bad values.
        """
        kw: dict[str, Any] = {}
        for table, body in doc.items():
            if table not in _TABLES:
                raise _unknown(table, list(_TABLES), "study TOML table")
            if not isinstance(body, Mapping):
                raise ValueError(f"[{table}] must be a table, got {body!r}")
            for k, v in body.items():
                if k not in _TABLES[table]:
                    raise _unknown(k, _TABLES[table], f"[{table}]")
                kw[k] = v
        for k in ("name", "scenario"):
            if k not in kw:
                raise KeyError(f"study needs [study] {k}")
        for k in _TUPLES:
            if k in kw:
                if not isinstance(kw[k], list | tuple):
                    raise ValueError(f"study {k} must be a list, got {kw[k]!r}")
                kw[k] = tuple(kw[k])
        for k in ("epsilons", "fedavgm_server_lr", "fedavgm_momentum", "dp_fedavgm", "dg_penalty", "site_dro"):
            if k in kw:
                kw[k] = tuple(_num(k, v) for v in kw[k])
        for k in ("dro_step", "delta", "client_clip_norm", "sample_max_grad_norm"):
            if k in kw:
                kw[k] = _num(k, kw[k])
        for k in _PATHS:
            if k in kw:
                if not isinstance(kw[k], str) or not kw[k]:
                    raise ValueError(f"study {k} must be a non-empty path string, got {kw[k]!r}")
                path = Path(kw[k]).expanduser()
                kw[k] = path if path.is_absolute() or base_dir is None else (base_dir / path).resolve()
        return cls(**kw, source=source)

    @classmethod
    def from_toml(cls, path: str | Path) -> StudyConfig:
        """Read a study file (errors name the file)."""
        return read_toml(path, cls.from_dict)


def expand_grid(study: StudyConfig) -> list[Cell]:
    """The study's cells, seed by seed, in the order of the module docstring's rules."""
    dp_kinds = [k for k in DP_KINDS if k != "none" and k in study.dp]
    lr_dp, m_dp = study.dp_fedavgm
    cells: list[Cell] = []
    for seed in study.seeds:

        def dp_cells(strategy: str, lr: float, m: float, kinds: Sequence[str], seed: int = seed) -> list[Cell]:
            if strategy not in study.dp_strategies:
                return []
            return [Cell(strategy, lr, m, k, e, seed) for k in kinds for e in study.epsilons]

        for strategy in study.strategies:
            if strategy == "initial":
                cells.append(Cell("initial", seed=seed))
            elif strategy == "local":
                cells += [
                    Cell("local", seed=seed),
                    *dp_cells("local", 0.0, 0.0, [k for k in dp_kinds if k == "sample"]),
                ]
            elif strategy == "centralised":
                cells.append(Cell("centralised", seed=seed))
            elif strategy == "fedavg":
                cells += [Cell("fedavg", 1.0, 0.0, seed=seed), *dp_cells("fedavg", 1.0, 0.0, dp_kinds)]
            else:
                cells += [
                    Cell("fedavgm", lr, m, seed=seed) for lr in study.fedavgm_server_lr for m in study.fedavgm_momentum
                ]
                cells += dp_cells("fedavgm", lr_dp, m_dp, dp_kinds)
        cells += [
            Cell("fedavgm", lr_dp, m_dp, seed=seed, dg_penalty=g, dro_step=study.dro_step) for g in study.dg_penalty
        ]
        cells += [Cell("fedavgm", lr_dp, m_dp, seed=seed, site_dro_step=eta) for eta in study.site_dro]
    seen: set[str] = set()
    unique = []
    for c in cells:
        if c.cell_id not in seen:
            seen.add(c.cell_id)
            unique.append(c)
    return unique
