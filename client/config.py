"""The site client's settings, read from the site's ``site.toml`` (DESIGN.md section 2; STYLE.md habit 1).

::

    [site]                  # the data-side table (see lungvl_model.data.site_layout.SiteManifest)
    name = "hospital-a"
    cohort = "screening"

    [privacy]               # the site's own DP budget and policy, enforced whatever the server asks
    epsilon_budget = 8.0    # patient-level ε budget for DP-SGD
    delta = 1e-5
    require_dp_sgd = false          # refuse training without DP-SGD
    min_dp_sgd_noise_multiplier = 0 # refuse DP-SGD with a smaller σ (0 = no floor)
    max_steps_per_round = 0         # local steps per server round (0 = no cap)
    max_rounds = 0                  # distinct server rounds the site trains in, ever (0 = no cap)
    min_eval_studies = 5            # fewest hold-out studies behind any evaluation metric (>= 1)
    max_evaluations_per_round = 1   # evaluate answers per server round (0 = answer none)

    [compute]
    device = "auto"         # auto | cpu | cuda | cuda:N
    bf16 = true             # bf16 autocast on CUDA
    dp_sgd_clipping = "auto"  # auto | hooks | microbatch: how DP-SGD gets per-study gradients

    [training]              # optional
    batch_size = 4          # the site's cap on studies per step (overrides the round's batch size)
    num_workers = 2
    model_dir = "/opt/lungvl/initial_model"   # the consortium's initial model package (relative: to site_dir)
    holdout_fraction = 0.25 # patients kept out of local training and used for federated evaluation (0 = none)

The policy keys of ``[privacy]`` are :class:`privacy.site_policy.SitePolicy`'s (``ClientConfig.policy``);
the site trainer applies them to every train and evaluate request. Values are validated here, once:
a bad one raises ``ValueError`` naming the file, the table, the key and the value. Unknown keys of
``[privacy]``, ``[compute]`` and ``[training]`` raise ``KeyError`` naming the table and the key (with a
"did you mean"). ``[site]`` keeps free extra keys, as :class:`SiteManifest` does
(the synthetic generator writes provenance there), but a near miss of one of its known keys
(``nmae = ...``) is refused the same way. Other tables (``[synth]``, ...) belong to other tools.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lungvl_model.data.split import check_holdout_fraction
from privacy.accountant import check_delta, check_epsilon
from privacy.site_policy import POLICY_KEYS, SitePolicy

__all__ = ["STATE_DIRNAME", "ClientConfig"]

#: Default state directory name inside the site directory (accountant state, audit ledger).
STATE_DIRNAME = ".lungvl_state"

# table -> {key in the table: ClientConfig field}
_TABLES: dict[str, dict[str, str]] = {
    "site": {"name": "name", "cohort": "cohort", "description": "description"},
    "privacy": {"epsilon_budget": "epsilon_budget", "delta": "delta", **{k: k for k in POLICY_KEYS}},
    "compute": {"device": "device", "bf16": "bf16", "dp_sgd_clipping": "dp_sgd_clipping"},
    "training": {
        "batch_size": "batch_size",
        "num_workers": "num_workers",
        "model_dir": "model_dir",
        "holdout_fraction": "holdout_fraction",
    },
}
_STRICT_TABLES = ("privacy", "compute", "training")
#: ``[compute] dp_sgd_clipping`` values (``"auto"`` resolves by device: :meth:`ClientConfig.clipping_for`).
DP_SGD_CLIPPING = ("auto", "hooks", "microbatch")


def _did_you_mean(key: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


@dataclass(frozen=True)
class ClientConfig:
    """Resolved settings of one site client.

    Attributes:
        site_dir: the site directory (DICOM, reports, annotations, site.toml).
        name: site name, unique in the consortium (``[site] name``).
        cohort: cohort kind (``[site] cohort``).
        description: free text (``[site] description``).
        epsilon_budget: the site's patient-level ε budget for DP-SGD (``[privacy] epsilon_budget``).
        delta: δ of that budget (``[privacy] delta``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``[compute] device``).
        bf16: bf16 autocast on CUDA (``[compute] bf16``).
        dp_sgd_clipping: how DP-SGD gets the per-study gradients (``[compute] dp_sgd_clipping``):
            ``"hooks"`` (Opacus per-sample hooks), ``"microbatch"`` (one forward/backward per study,
            :mod:`privacy.dp_sgd_microbatch`) or ``"auto"``: microbatch on CPU (measured there, tiny
            preset, batch 4: 0.8x the non-DP step against 2.9x for the hooks), hooks on CUDA (a choice
            not measured here). The mechanism and the privacy guarantee are the same.
        batch_size: the site's cap on studies per step; ``None`` uses the round's batch size.
        num_workers: DataLoader workers.
        state_dir: accountant state and audit ledger (default ``<site_dir>/.lungvl_state``).
        model_dir: the consortium's initial model package (a lungvl checkpoint directory).
        holdout_fraction: fraction of the site's patients held out of local training and used for
            federated evaluation (``lungvl_model.data.split``; 0 = none: evaluation then scores the
            training studies, which the site allows only without any DP).
        require_dp_sgd, min_dp_sgd_noise_multiplier, max_steps_per_round, max_rounds, min_eval_studies,
            max_evaluations_per_round: the site's policy (``[privacy]``; see
            :class:`~privacy.site_policy.SitePolicy` and :attr:`policy`).
    """

    site_dir: Path
    name: str
    cohort: str = "screening"
    description: str = ""
    epsilon_budget: float = 8.0
    delta: float = 1e-5
    device: str = "auto"
    bf16: bool = True
    dp_sgd_clipping: str = "auto"
    batch_size: int | None = None
    num_workers: int = 0
    state_dir: Path | None = None
    model_dir: Path | None = None
    holdout_fraction: float = 0.0
    require_dp_sgd: bool = False
    min_dp_sgd_noise_multiplier: float = 0.0
    max_steps_per_round: int = 0
    max_rounds: int = 0
    min_eval_studies: int = 5
    max_evaluations_per_round: int = 1

    def __post_init__(self) -> None:
        site_dir = Path(self.site_dir).expanduser()
        object.__setattr__(self, "site_dir", site_dir)
        state = site_dir / STATE_DIRNAME if self.state_dir is None else Path(self.state_dir).expanduser()
        object.__setattr__(self, "state_dir", state)
        if self.model_dir is not None:
            object.__setattr__(self, "model_dir", Path(self.model_dir).expanduser())
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"ClientConfig.name must be a non-empty string, got {self.name!r}")
        try:  # privacy.accountant's rules, the ones SiteBudget applies
            check_epsilon("[privacy] epsilon_budget", self.epsilon_budget)
            check_delta(self.delta)
        except ValueError as err:
            raise ValueError(str(err).replace("delta must", "[privacy] delta must")) from None
        if not isinstance(self.device, str) or (
            self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:")
        ):
            raise ValueError(f"[compute] device must be auto, cpu or cuda[:N], got {self.device!r}")
        if not isinstance(self.bf16, bool):
            raise ValueError(f"[compute] bf16 must be true or false, got {self.bf16!r}")
        if self.dp_sgd_clipping not in DP_SGD_CLIPPING:
            raise ValueError(
                f"[compute] dp_sgd_clipping must be one of {', '.join(DP_SGD_CLIPPING)}, got {self.dp_sgd_clipping!r}"
            )
        bs = self.batch_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
            raise ValueError(f"[training] batch_size must be an integer >= 1, got {bs!r}")
        check_holdout_fraction(self.holdout_fraction, key="[training] holdout_fraction")
        nw = self.num_workers
        if isinstance(nw, bool) or not isinstance(nw, int) or nw < 0:
            raise ValueError(f"[training] num_workers must be an integer >= 0, got {nw!r}")
        policy = SitePolicy(**{k: getattr(self, k) for k in POLICY_KEYS})  # validates the policy keys
        for k in POLICY_KEYS:
            object.__setattr__(self, k, getattr(policy, k))

    def clipping_for(self, device: str) -> str:
        """The DP-SGD clipping on ``device`` (a device type): ``"auto"`` is microbatch on CPU, hooks elsewhere."""
        if self.dp_sgd_clipping != "auto":
            return self.dp_sgd_clipping
        return "microbatch" if device == "cpu" else "hooks"

    @property
    def policy(self) -> SitePolicy:
        """The site's policy (``[privacy]`` beside the ε budget), enforced by the site trainer."""
        return SitePolicy(**{k: getattr(self, k) for k in POLICY_KEYS})

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> ClientConfig:
        """Read a site's ``site.toml``.

        Args:
            path: the ``site.toml`` file, or the site directory holding it.
            **overrides: field values that win over the file (e.g. ``model_dir=...``, ``state_dir=...``,
                ``device="cpu"``); ``site_dir`` defaults to the file's folder.

        Returns:
            The resolved config.

        Raises:
            FileNotFoundError: no site.toml there.
            ValueError: the file is not valid TOML, a table is not a table, or a value is invalid (the
                message names the file, the key and the value).
            KeyError: an unknown key in ``[privacy]``/``[compute]``/``[training]``, a near miss of a
                ``[site]`` key, a missing ``[site] name``, or an unknown override.
        """
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "site.toml"
        if not p.is_file():
            raise FileNotFoundError(f"no site.toml at {p}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:  # its message has the line and column, not the file
            raise ValueError(f"{p}: not valid TOML ({e})") from e
        except UnicodeDecodeError as e:  # its args[0] is the codec name: name the file and the byte
            raise ValueError(f"{p}: not UTF-8 text (byte offset {e.start}: {e.reason}); TOML is UTF-8") from e
        known_fields = [f.name for f in fields(cls)]
        bad = sorted(set(overrides) - set(known_fields))
        if bad:
            raise KeyError(
                f"unknown ClientConfig override {bad[0]!r}{_did_you_mean(bad[0], known_fields)}; known: {known_fields}"
            )
        kw: dict[str, Any] = {"site_dir": p.parent}
        for table, keys in _TABLES.items():
            values = data.get(table, {})
            if not isinstance(values, Mapping):
                raise ValueError(f"{p}: [{table}] must be a table, got {values!r}")
            for key, value in values.items():
                if key in keys:
                    kw[keys[key]] = value
                    continue
                hint = _did_you_mean(key, sorted(keys))
                if table in _STRICT_TABLES or hint:
                    raise KeyError(f"{p}: unknown key {key!r} in table [{table}]{hint}; known: {sorted(keys)}")
        if "name" not in kw and "name" not in overrides:
            raise KeyError(f"{p}: the [site] table needs a 'name' key")
        if isinstance(kw.get("model_dir"), str):  # relative to the site directory
            kw["model_dir"] = p.parent / Path(kw["model_dir"]).expanduser()
        kw.update(overrides)
        try:
            return cls(**kw)
        except ValueError as err:
            raise ValueError(f"{p}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (paths as strings); :meth:`from_dict` reverses it."""
        d = asdict(self)
        for k in ("site_dir", "state_dir", "model_dir"):
            d[k] = None if d[k] is None else str(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClientConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``KeyError`` with a suggestion."""
        known = [f.name for f in fields(cls)]
        for k in d:
            if k not in known:
                raise KeyError(f"unknown ClientConfig key {k!r}{_did_you_mean(k, known)}")
        return cls(**dict(d))
