"""The federated curriculum: which stage the sites train in each round, with its own settings.

A consortium trains the whole model in one run by scheduling the stages over rounds, in the order the
model is built centrally (``text`` warm-up → ``ssl`` → ``seg`` on patches → ``vl``)::

    [[curriculum]]
    stage = "text"
    rounds = 2
    local_steps = 20

    [[curriculum]]
    stage = "seg"
    rounds = 6
    seg_patch = 32             # foreground-biased 32³ patches, as central training's seg_crop
    lr = 1e-3

A phase's unset keys take the run's ``[training]`` values. The round config of round ``r`` is a pure
function of the schedule and ``r`` (:func:`phase_at`, :func:`scheduled_lr`), so a run resumed from a
checkpoint after round ``r`` continues with the phase of round ``r + 1``: resumption across a stage
boundary needs no extra state.

Learning-rate schedules per phase (the sites' local optimiser is fresh every round, so the schedule
lives here, over rounds): ``"constant"``, or ``"cosine"``: ``lr · (0.1 + 0.9 · ½(1 + cos(π·i/(R−1))))``
for the phase's ``i``-th of ``R`` rounds (``i`` from 0), from the peak down to 10 % of it, as central
training decays over steps (:func:`lungvl_model.training.loop.lr_lambda`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

from federation.protocol import TRAIN_STAGES

__all__ = ["LR_SCHEDULES", "PHASE_KEYS", "CurriculumPhase", "phase_at", "phase_starts", "scheduled_lr"]

#: How a phase's learning rate moves over its rounds.
LR_SCHEDULES: Final = ("constant", "cosine")


@dataclass(frozen=True)
class CurriculumPhase:
    """One stage of the curriculum, trained for ``rounds`` consecutive rounds.

    Attributes:
        stage: the sites' training stage (:data:`~federation.protocol.TRAIN_STAGES`).
        rounds: rounds in the phase (>= 1).
        local_steps: optimisation steps per site per round.
        lr: the phase's peak local learning rate.
        batch_size: local batch size.
        lr_schedule: ``"constant"`` or ``"cosine"`` over the phase's rounds (:func:`scheduled_lr`).
        seg_patch: ``seg`` stage: cubic patch edge in voxels (multiple of 16; 0 = whole volumes).
        seg_fg_prob: ``seg`` stage: probability that a patch is centred on a nodule voxel.
        seg_hard_negative_prob: ``seg`` stage: probability that a patch not centred on a nodule is
            centred on a hard-negative point.
        reset_momentum: start the phase with the server momentum buffer at zero. On by default: the
            velocity of the previous stage points along that stage's objective (e.g. the decoder's
            warm-up) and would keep moving parameters the new stage does not train.
    """

    stage: str
    rounds: int
    local_steps: int
    lr: float
    batch_size: int
    lr_schedule: str = "constant"
    seg_patch: int = 0
    seg_fg_prob: float = 0.67
    seg_hard_negative_prob: float = 0.5
    reset_momentum: bool = True

    def __post_init__(self) -> None:
        where = f"stage {self.stage!r}"
        if self.stage not in TRAIN_STAGES:
            raise ValueError(f"stage must be one of {TRAIN_STAGES}, got {self.stage!r}")
        for name in ("rounds", "local_steps", "batch_size", "seg_patch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
        for name in ("lr", "seg_fg_prob", "seg_hard_negative_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
        if self.rounds < 1:
            raise ValueError(f"{where}: rounds must be >= 1, got {self.rounds}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"{where}: lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not isinstance(self.reset_momentum, bool):
            raise ValueError(f"{where}: reset_momentum must be true or false, got {self.reset_momentum!r}")
        if self.seg_patch and self.stage != "seg":
            raise ValueError(f"{where}: seg_patch = {self.seg_patch} applies to the seg stage only")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], defaults: Mapping[str, Any], *, index: int) -> CurriculumPhase:
        """Build phase ``index`` (1-based, for messages) from its TOML table; unset keys from ``defaults``.

        Raises:
            KeyError: an unknown key (with a "did you mean" hint) or no ``stage``/``rounds``.
            ValueError: a bad value, naming the phase, the key and the value.
        """
        known = [f.name for f in fields(cls)]
        for key in table:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise KeyError(
                    f"[[curriculum]] #{index}: unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                )
        for key in ("stage", "rounds"):
            if key not in table:
                raise KeyError(f"[[curriculum]] #{index}: {key!r} is required")
        kw = {k: defaults[k] for k in known if k in defaults and k not in ("stage", "rounds")}
        kw.update(table)
        for f in fields(cls):  # TOML integers are fine where a float is expected
            v = kw.get(f.name)
            if f.type == "float" and isinstance(v, int) and not isinstance(v, bool):
                kw[f.name] = float(v)
        try:
            return cls(**kw)
        except ValueError as err:
            raise ValueError(f"[[curriculum]] #{index}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the phase's TOML table, every key resolved)."""
        return asdict(self)


#: Keys a ``[[curriculum]]`` table accepts.
PHASE_KEYS: Final = frozenset(f.name for f in fields(CurriculumPhase))


def phase_at(phases: Sequence[CurriculumPhase], rnd: int) -> tuple[int, int]:
    """``(phase index, round index inside the phase)`` of round ``rnd`` (1-based; indices from 0).

    Raises:
        ValueError: ``rnd`` outside ``1 .. sum(rounds)``.
    """
    total = sum(p.rounds for p in phases)
    if not 1 <= rnd <= total:
        raise ValueError(f"round {rnd} is outside the curriculum's {total} rounds")
    left = rnd - 1
    for i, p in enumerate(phases):
        if left < p.rounds:
            return i, left
        left -= p.rounds
    raise AssertionError("unreachable")  # pragma: no cover


def phase_starts(phases: Sequence[CurriculumPhase]) -> list[int]:
    """The first round of each phase (1-based)."""
    starts, r = [], 1
    for p in phases:
        starts.append(r)
        r += p.rounds
    return starts


def scheduled_lr(phase: CurriculumPhase, index: int) -> float:
    """The local learning rate of the phase's ``index``-th round (from 0); see the module docstring."""
    if phase.lr_schedule == "constant" or phase.rounds == 1:
        return phase.lr
    t = index / (phase.rounds - 1)
    return phase.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))
