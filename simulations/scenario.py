"""A simulation scenario: which sites (cohort mix, sizes, seeds), which model, which server settings.

::

    [run]
    name = "screening-vs-referral"
    rounds = 10
    seed = 0
    preset = "tiny"            # model preset (lungvl_model.models.config.PRESETS)
    matrix = 64                # defaults for generated sites (in-plane pixels, z coverage in mm)
    z_extent_mm = 120.0
    num_cpus = 2               # Ray CPUs for the simulated sites (each site's ClientApp takes 1)

    [model]                    # optional overrides of the preset, nested like LungVLConfig.to_dict()
    vision.channels = [4, 8, 8, 16, 16]

    [strategy]                 # ServerConfig keys (server/config.py)
    strategy = "fedavgm"
    server_momentum = 0.9

    [dp]                       # ServerConfig keys too (client-level DP; dp_sgd asks the sites for DP-SGD)
    client_noise_multiplier = 1.0
    clip_norm = 1.0

    [training]                 # ServerConfig keys too (what the sites do each round)
    local_steps = 2

    [[sites]]                  # generated with lungvl_model.data.synth.generate_site ...
    name = "screening-a"
    cohort = "screening"
    studies = 4
    seed = 1
    [[sites]]                  # ... or an existing site directory (relative: to the scenario file)
    name = "lidc"
    path = "../shared/data/lidc_site"

``[run] rounds`` and ``seed`` become the server's ``rounds`` and ``seed``. ``[[curriculum]]`` tables
schedule the stages over rounds (:mod:`server.curriculum`; ``[run] rounds`` may then be left out).
Unknown keys raise ``KeyError`` with a "did you mean" hint.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from lungvl_model.config_file import read_toml as read_toml_file
from lungvl_model.data.split import check_holdout_fraction
from lungvl_model.data.synth import PROFILES
from lungvl_model.models.config import LungVLConfig, get_preset
from privacy.site_policy import SitePolicy
from server.config import ServerConfig

__all__ = ["Scenario", "SiteSpec", "deep_merge"]


def _check_keys(where: str, given: Mapping[str, Any], known: list[str]) -> None:
    for key in given:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise KeyError(f"unknown {where} key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any], where: str = "model") -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, table by table; a key not in ``base`` raises ``KeyError``."""
    out = dict(base)
    _check_keys(f"[{where}]", overrides, list(base))
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(base[k], Mapping):
            out[k] = deep_merge(base[k], v, f"{where}.{k}")
        else:
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


@dataclass(frozen=True)
class SiteSpec:
    """One simulated site: generated (``cohort``, ``studies``, ``seed``) or an existing ``path``.

    Attributes:
        name: site name (unique in the scenario; the generated site.toml gets it).
        cohort: ``screening``, ``referral`` or ``low_resource`` (generated sites).
        studies: current studies to generate.
        seed: generator seed.
        path: an existing site directory instead of a generated one.
        matrix: in-plane pixels (None: the scenario's ``[run] matrix``).
        z_extent_mm: cranio-caudal coverage (None: the scenario's).
        epsilon_budget: the site's own patient-level ε budget written to its site.toml (None: keep).
    """

    name: str
    cohort: str | None = None
    studies: int | None = None
    seed: int = 0
    path: Path | None = None
    matrix: int | None = None
    z_extent_mm: float | None = None
    epsilon_budget: float | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"site name must be non-empty without '/', got {self.name!r}")
        if self.path is None:
            if self.cohort not in PROFILES:
                raise ValueError(f"site {self.name!r}: cohort must be one of {sorted(PROFILES)}, got {self.cohort!r}")
            if not isinstance(self.studies, int) or isinstance(self.studies, bool) or self.studies < 1:
                raise ValueError(f"site {self.name!r}: studies must be an integer >= 1, got {self.studies!r}")
        elif self.cohort is not None or self.studies is not None:
            raise ValueError(f"site {self.name!r}: give either path or cohort/studies, not both")

    @property
    def generated(self) -> bool:
        """Whether the simulation generates this site."""
        return self.path is None

    def to_dict(self) -> dict[str, Any]:
        """TOML-ready dict (None values dropped)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["path"] = None if self.path is None else str(self.path)
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: Path | None = None) -> SiteSpec:
        """Build from a ``[[sites]]`` table; a relative ``path`` is taken relative to ``base_dir``."""
        _check_keys("[[sites]]", d, [f.name for f in fields(cls)])
        kw = dict(d)
        if "path" in kw:
            p = Path(str(kw["path"])).expanduser()
            kw["path"] = p if p.is_absolute() or base_dir is None else (base_dir / p).resolve()
        return cls(**kw)


T = TypeVar("T")


def read_toml(path: str | Path, build: Callable[..., T]) -> T:
    """``build(doc, base_dir=<file's folder>, source=<file>)`` on a TOML file; its errors name the file.

    Raises:
        KeyError, ValueError: from ``build``, prefixed with the file's path.
    """
    p = Path(path).expanduser().resolve()
    doc = read_toml_file(p, what="config")
    try:
        return build(doc, base_dir=p.parent, source=p)
    except (KeyError, ValueError) as err:
        raise type(err)(f"{p}: {err.args[0] if err.args else err}") from None


_RUN_KEYS = (
    "name", "rounds", "seed", "preset", "matrix", "z_extent_mm", "num_cpus", "holdout_fraction", "min_eval_studies",
)  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """A resolved simulation scenario.

    Attributes:
        name: run name (the registry's run name).
        server: the server settings (``rounds`` and ``seed`` from ``[run]``).
        sites: the simulated sites.
        preset: model preset name.
        model_overrides: nested overrides of the preset (``[model]``).
        matrix: default in-plane pixels of generated sites.
        z_extent_mm: default z coverage of generated sites.
        num_cpus: CPUs Ray may use for the simulated sites.
        holdout_fraction: fraction of each site's patients kept out of local training and used for the
            per-round federated evaluation (0: sites are scored on their training studies, which a site
            allows only without DP).
        min_eval_studies: overrides every simulated site's ``[privacy] min_eval_studies`` (the fewest
            hold-out studies behind an evaluation metric; None keeps each site's own, default 5). Small
            synthetic sites hold out 2–5 studies: a research scenario on public data may lower it.
        source: the TOML file it came from (informational).
    """

    name: str
    server: ServerConfig
    sites: tuple[SiteSpec, ...]
    preset: str = "tiny"
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    matrix: int = 64
    z_extent_mm: float = 120.0
    num_cpus: int = 2
    holdout_fraction: float = 0.0
    min_eval_studies: int | None = None
    source: Path | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("scenario [run] name must not be empty")
        if not self.sites:
            raise ValueError(f"scenario {self.name!r} has no [[sites]]")
        names = [s.name for s in self.sites]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"scenario {self.name!r}: duplicate site names {dup}")
        if self.server.min_sites > len(self.sites):
            raise ValueError(
                f"scenario {self.name!r}: min_sites={self.server.min_sites} > {len(self.sites)} site(s), "
                "no round could complete"
            )
        if self.num_cpus < 1:
            raise ValueError(f"scenario [run] num_cpus must be >= 1, got {self.num_cpus}")
        frac = check_holdout_fraction(self.holdout_fraction, key="scenario [run] holdout_fraction")
        object.__setattr__(self, "holdout_fraction", frac)
        if self.min_eval_studies is not None:  # SitePolicy's rule, the one every site applies
            SitePolicy(min_eval_studies=self.min_eval_studies)
        self.model_config()  # fail early on a bad preset or override

    @property
    def rounds(self) -> int:
        """Federated rounds."""
        return self.server.rounds

    @property
    def seed(self) -> int:
        """The run seed."""
        return self.server.seed

    def model_config(self) -> LungVLConfig:
        """The model configuration: the preset with ``[model]`` overrides applied."""
        base = get_preset(self.preset)
        if not self.model_overrides:
            return base
        return LungVLConfig.from_dict(deep_merge(base.to_dict(), self.model_overrides))

    def to_dict(self) -> dict[str, Any]:
        """The resolved scenario in the TOML layout (what ``config.json`` of a run holds)."""
        tables = self.server.to_tables()
        strategy = tables["strategy"]  # rounds and seed live there; a scenario gives them in [run]
        run = {"name": self.name, "rounds": strategy.pop("rounds"), "seed": strategy.pop("seed"), "preset": self.preset}
        run |= {"matrix": self.matrix, "z_extent_mm": self.z_extent_mm, "num_cpus": self.num_cpus}
        run["holdout_fraction"] = self.holdout_fraction
        if self.min_eval_studies is not None:
            run["min_eval_studies"] = self.min_eval_studies
        return {"run": run, "model": dict(self.model_overrides), **tables, "sites": [s.to_dict() for s in self.sites]}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, base_dir: Path | None = None, source: Path | None = None) -> Scenario:
        """Build from a parsed scenario document (see the module docstring).

        Raises:
            KeyError: unknown table or key (with a "did you mean" hint), missing ``[run] name``.
            ValueError: bad values.
        """
        run = dict(doc.get("run", {}))
        _check_keys("[run]", run, list(_RUN_KEYS))
        if "name" not in run:
            raise KeyError("scenario needs [run] name")
        if not isinstance(doc.get("sites"), list) or not doc["sites"]:
            raise KeyError("scenario needs at least one [[sites]] table (a generated or an existing site)")
        server_doc = {k: v for k, v in doc.items() if k not in ("run", "sites", "model")}
        server = ServerConfig.from_mapping({**server_doc, **{k: run[k] for k in ("rounds", "seed") if k in run}})
        sites = tuple(SiteSpec.from_dict(s, base_dir) for s in doc.get("sites", []))
        return cls(
            name=str(run["name"]),
            server=server,
            sites=sites,
            preset=str(run.get("preset", "tiny")),
            model_overrides=dict(doc.get("model", {})),
            matrix=int(run.get("matrix", 64)),
            z_extent_mm=float(run.get("z_extent_mm", 120.0)),
            num_cpus=int(run.get("num_cpus", 2)),
            holdout_fraction=run.get("holdout_fraction", 0.0),
            min_eval_studies=run.get("min_eval_studies"),
            source=source,
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> Scenario:
        """Read a scenario file; relative site paths are relative to the file's folder."""
        return read_toml(path, cls.from_dict)

    def with_server(self, **changes: Any) -> Scenario:
        """A copy with server settings changed (e.g. ``rounds=1``)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw["server"] = self.server.with_updates(**changes)
        return Scenario(**kw)
