"""DP-FedAvgM aggregation as pure numpy functions (DESIGN.md section 4).

One round ``t`` with client-level DP:

1. every sampled site ``k`` returns its update ``Δ_k = w_k − w_t``;
2. each update is clipped to L2 norm ``C`` (over all arrays together), the clipped updates are summed,
   Gaussian noise ``N(0, σ²C²)`` is added to every coordinate, and the sum is divided by the *expected*
   number of sampled sites (not the realised one, and not weighted by example counts);
3. server momentum on the noisy mean ``Δ̄``: ``v ← β·v + Δ̄``, ``w_{t+1} = w_t + η·v``. This is
   post-processing of a DP release, so the momentum costs no privacy.

Without client-level DP the mean is example-weighted, followed by the same momentum step; with
``server_momentum=0`` and ``server_lr=1`` that is plain FedAvg.

Everything here takes and returns ``list[np.ndarray]`` (one array per model tensor, in a fixed order)
and knows nothing about Flower. :class:`StreamingAggregator` folds one site at a time into a running
sum, so the memory needed does not grow with the number of sites; :func:`dp_fedavgm_step` is the same
computation for a list of updates that are already in memory, and gives bit-identical results.

Noise comes from a ``numpy.random.Generator``. Pass a seeded one for reproducible simulations; for a
deployment, pass one seeded from a cryptographically secure source (the default draws fresh OS
entropy, but PCG64 itself is not a CSPRNG).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

__all__ = [
    "AggregationError",
    "Arrays",
    "FoldInfo",
    "StreamingAggregator",
    "apply_server_momentum",
    "check_update",
    "clip_update",
    "dp_fedavgm_step",
    "l2_norm",
    "shapes_of",
]

Arrays = list[npt.NDArray[Any]]
"""One array per model tensor, in the model's fixed order."""

Shape = tuple[int, ...]


class AggregationError(ValueError):
    """An update or an aggregation argument cannot be used (wrong shape, non-finite, bad setting)."""


class FoldInfo(TypedDict):
    """What :meth:`StreamingAggregator.add` learned about one update.

    Attributes:
        norm: L2 norm of the update before clipping (over all arrays).
        clipped: whether the update was scaled down to ``clip_norm``.
    """

    norm: float
    clipped: bool


def _out_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Floating dtypes are kept; anything else is promoted to float64."""
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``value`` as float, or raise AggregationError naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AggregationError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise AggregationError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def shapes_of(arrays: Sequence[npt.NDArray[Any]]) -> list[Shape]:
    """The shapes of ``arrays``, e.g. to build the ``reference_shapes`` of the global model."""
    return [tuple(int(d) for d in a.shape) for a in arrays]


def l2_norm(arrays: Sequence[npt.NDArray[Any]]) -> float:
    """L2 norm over all arrays taken together, as if they were flattened into one vector.

    Args:
        arrays: any shapes; accumulated in float64.

    Returns:
        ``sqrt(sum_i sum(a_i**2))``; ``nan``/``inf`` when an array is not finite.
    """
    total = 0.0
    for a in arrays:
        flat = np.asarray(a, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_update(delta: Sequence[npt.NDArray[Any]], clip_norm: float) -> tuple[Arrays, float]:
    """Scale an update so that its L2 norm (over all arrays) is at most ``clip_norm``.

    Args:
        delta: the update ``Δ = w_site − w_global``; not modified.
        clip_norm: ``C > 0``.

    Returns:
        ``(clipped, norm)``: a copy of ``delta`` scaled by ``min(1, C / ‖Δ‖)`` with each array's dtype
        kept, and the original norm ``‖Δ‖``.

    Raises:
        AggregationError: when ``clip_norm`` is not a finite positive number or ``delta`` is not finite.
    """
    c = _check_positive("clip_norm", clip_norm)
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise AggregationError(f"cannot clip a non-finite update (L2 norm {norm})")
    scale = min(1.0, c / norm) if norm > 0 else 1.0
    clipped = [np.multiply(a, scale, dtype=np.float64).astype(_out_dtype(a.dtype), copy=False) for a in delta]
    return clipped, norm


def check_update(delta: Sequence[npt.NDArray[Any]], reference_shapes: Sequence[Shape]) -> None:
    """Check that an update fits the global model and is finite.

    Args:
        delta: the update, one array per model tensor.
        reference_shapes: the global model's array shapes (see :func:`shapes_of`).

    Raises:
        AggregationError: naming the number of arrays, or the index of the first bad array with its
            shape, dtype or count of non-finite values.
    """
    if len(delta) != len(reference_shapes):
        raise AggregationError(f"update has {len(delta)} arrays, expected {len(reference_shapes)}")
    for i, (a, ref) in enumerate(zip(delta, reference_shapes, strict=True)):
        arr = np.asarray(a)
        if tuple(arr.shape) != tuple(ref):
            raise AggregationError(f"update array {i}: shape {tuple(arr.shape)}, expected {tuple(ref)}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise AggregationError(f"update array {i}: dtype {arr.dtype} is not a real number type")
        if np.issubdtype(arr.dtype, np.floating):
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise AggregationError(f"update array {i}: {bad} non-finite values (nan/inf) out of {arr.size}")


class StreamingAggregator:
    """Fold site updates one at a time into a running sum; then release the (noisy) mean update.

    Memory is one accumulator per model array, whatever the number of sites; :meth:`add` keeps no
    reference to the update it folds.

    Modes:
        * ``clip_norm`` set (client-level DP): each update is clipped to ``clip_norm`` and summed with
          weight 1; :meth:`finalize` adds ``N(0, (σ·C)²)`` per coordinate and divides by
          ``expected_sites``.
        * ``clip_norm=None``, ``weighted=True``: example-weighted mean ``Σ n_k Δ_k / Σ n_k``.
        * ``clip_norm=None``, ``weighted=False``: plain mean over the updates received.

    Args:
        reference_shapes: shapes of the global model's arrays; every update must match them.
        clip_norm: L2 clipping bound ``C > 0``, or None for no clipping (and no DP).
        weighted: weight by example counts; None (default) means "weighted unless clipping". Weighting
            cannot be combined with clipping: the DP sum must have sensitivity ``C`` per site.
        accumulate_dtype: dtype of the running sum (float64 by default; float32 halves the memory).

    Raises:
        AggregationError: on a bad ``clip_norm`` or ``weighted=True`` together with ``clip_norm``.
    """

    def __init__(
        self,
        reference_shapes: Sequence[Shape],
        *,
        clip_norm: float | None = None,
        weighted: bool | None = None,
        accumulate_dtype: npt.DTypeLike = np.float64,
    ) -> None:
        self.reference_shapes: list[Shape] = [tuple(int(d) for d in s) for s in reference_shapes]
        self.clip_norm = None if clip_norm is None else _check_positive("clip_norm", clip_norm)
        if weighted and self.clip_norm is not None:
            raise AggregationError(
                f"weighted=True cannot be combined with clip_norm={clip_norm}: client-level DP uses the "
                "uniform sum divided by expected_sites"
            )
        self.weighted = (self.clip_norm is None) if weighted is None else bool(weighted)
        acc_dtype = np.dtype(accumulate_dtype)
        if not np.issubdtype(acc_dtype, np.floating):
            raise AggregationError(f"accumulate_dtype must be a floating dtype, got {acc_dtype}")
        self._sum: Arrays = [np.zeros(s, dtype=acc_dtype) for s in self.reference_shapes]
        self._out_dtypes: list[np.dtype[Any] | None] = [None] * len(self.reference_shapes)
        self._total_weight = 0.0
        self._count = 0
        self._finalized = False

    @property
    def count(self) -> int:
        """Number of updates folded so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights used so far (example counts when weighted, else the count)."""
        return self._total_weight

    def add(self, delta: Sequence[npt.NDArray[Any]], num_examples: int = 1, *, scale: float = 1.0) -> FoldInfo:
        """Check one site's update and fold it into the running sum.

        Args:
            delta: ``Δ_k = w_k − w_global``, shapes as ``reference_shapes``.
            num_examples: the site's example count; used as the weight in weighted mode, ignored otherwise
                (it must still be a positive integer in weighted mode).
            scale: a factor in ``(0, 1]`` on the site's contribution (group DRO over sites,
                :mod:`server.site_dro`): it multiplies the weight (and so enters the denominator of the
                mean without clipping); with clipping it multiplies the clipped update, whose norm stays
                at most ``C``, while the divisor stays ``expected_sites``.

        Returns:
            ``{"norm": ‖Δ_k‖ before clipping, "clipped": whether it was scaled down}``.

        Raises:
            AggregationError: a wrong shape or non-finite value (naming the array index), a bad
                ``num_examples`` or ``scale``, or a call after :meth:`finalize`.
        """
        if self._finalized:
            raise AggregationError("add() after finalize(); start a new StreamingAggregator for the next round")
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale <= 1:
            raise AggregationError(f"scale must be in (0, 1], got {scale!r}")
        check_update(delta, self.reference_shapes)
        if self.weighted:
            if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) or num_examples < 1:
                raise AggregationError(f"num_examples must be a positive integer, got {num_examples!r}")
            weight = float(num_examples) * scale
        else:
            weight = float(scale)
        norm = l2_norm(delta)
        clipped = False
        factor = weight
        if self.clip_norm is not None and norm > self.clip_norm:
            factor = scale * self.clip_norm / norm
            clipped = True
        for i, a in enumerate(delta):
            acc = self._sum[i]
            acc += np.multiply(a, factor, dtype=acc.dtype)
            dt = _out_dtype(np.asarray(a).dtype)
            prev = self._out_dtypes[i]
            self._out_dtypes[i] = dt if prev is None else np.promote_types(prev, dt)
        self._total_weight += weight
        self._count += 1
        return {"norm": norm, "clipped": clipped}

    def finalize(
        self,
        *,
        expected_sites: float | None = None,
        noise_multiplier: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> Arrays:
        """Release the mean update ``Δ̄``; the aggregator cannot be used afterwards.

        Args:
            expected_sites: with clipping, the expected number of sampled sites (``q · N``, >= 1) that
                divides the noisy sum; required with clipping, not allowed without.
            noise_multiplier: ``σ >= 0``; the noise std per coordinate of the sum is ``σ · C``. Requires
                clipping when > 0.
            rng: source of the Gaussian noise (default: a fresh ``np.random.default_rng()``).

        Returns:
            ``Δ̄``, one array per model tensor; float32 where the updates were float32. Noise is drawn in
            float64, array by array in model order, then cast.

        Raises:
            AggregationError: on invalid arguments, a second call, or no update to average without DP.
        """
        if self._finalized:
            raise AggregationError("finalize() was already called on this aggregator")
        sigma = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
        if self.clip_norm is None:
            if sigma > 0:
                raise AggregationError(f"noise_multiplier={noise_multiplier} needs clip_norm (noise scale is σ·C)")
            if expected_sites is not None:
                raise AggregationError(f"expected_sites={expected_sites} only applies with clip_norm (client-level DP)")
            if self._count == 0:
                raise AggregationError("no updates to aggregate")
            denom = self._total_weight
        else:
            if expected_sites is None:
                raise AggregationError("expected_sites is required with clip_norm (the DP mean divides by it)")
            denom = _check_positive("expected_sites", expected_sites)
            if denom < 1:
                raise AggregationError(f"expected_sites must be >= 1, got {expected_sites!r}")
        self._finalized = True
        if sigma > 0 and rng is None:
            rng = np.random.default_rng()
        std = sigma * (self.clip_norm or 0.0)
        out: Arrays = []
        for i, acc in enumerate(self._sum):
            total = acc.astype(np.float64, copy=False)
            if std > 0:
                assert rng is not None
                total = total + rng.normal(0.0, std, size=acc.shape)
            dt = self._out_dtypes[i] or np.dtype(np.float64)
            out.append((total / denom).astype(dt, copy=False))
            self._sum[i] = np.empty(0, dtype=acc.dtype)  # release the accumulator
        return out


def _check_server_args(server_lr: float, server_momentum: float) -> tuple[float, float]:
    """Validated ``(η, β)``."""
    eta = _check_positive("server_lr", server_lr)
    beta = _check_positive("server_momentum", server_momentum, allow_zero=True)
    if beta >= 1:
        raise AggregationError(f"server_momentum must be in [0, 1), got {server_momentum!r}")
    return eta, beta


def apply_server_momentum(
    weights: Sequence[npt.NDArray[Any]],
    mean_delta: Sequence[npt.NDArray[Any]],
    momentum: Sequence[npt.NDArray[Any]] | None,
    *,
    server_lr: float,
    server_momentum: float,
) -> tuple[Arrays, Arrays]:
    """Server momentum step: ``v ← β·v + Δ̄``, ``w ← w + η·v``.

    Args:
        weights: global weights ``w_t``.
        mean_delta: the (noisy) mean update ``Δ̄``, shapes as ``weights``.
        momentum: the momentum buffer ``v``, or None to start from zeros.
        server_lr: ``η > 0``.
        server_momentum: ``β`` in ``[0, 1)``; ``β = 0`` and ``η = 1`` is FedAvg.

    Returns:
        ``(w_{t+1}, v_new)``, each array in the dtype of the matching weight (float64 for non-float weights).

    Raises:
        AggregationError: bad ``server_lr`` / ``server_momentum`` or mismatched array counts or shapes.
    """
    eta, beta = _check_server_args(server_lr, server_momentum)
    ref = shapes_of(weights)
    for name, arrays in (("mean_delta", mean_delta), ("momentum", momentum)):
        if arrays is None:
            continue
        if len(arrays) != len(ref):
            raise AggregationError(f"{name} has {len(arrays)} arrays, weights have {len(ref)}")
        for i, (a, s) in enumerate(zip(arrays, ref, strict=True)):
            if tuple(a.shape) != s:
                raise AggregationError(f"{name} array {i}: shape {tuple(a.shape)}, expected {s}")
    new_w: Arrays = []
    new_v: Arrays = []
    for i, w in enumerate(weights):
        dt = _out_dtype(w.dtype)
        v = np.asarray(mean_delta[i], dtype=np.float64)
        if momentum is not None and beta > 0:
            v = beta * np.asarray(momentum[i], dtype=np.float64) + v
        v_out = v.astype(dt)
        new_v.append(v_out)
        new_w.append((np.asarray(w, dtype=np.float64) + eta * v_out.astype(np.float64, copy=False)).astype(dt))
    return new_w, new_v


def dp_fedavgm_step(
    weights: Sequence[npt.NDArray[Any]],
    deltas: Sequence[Sequence[npt.NDArray[Any]]],
    momentum: Sequence[npt.NDArray[Any]] | None,
    *,
    num_examples: Sequence[int] | None = None,
    clip_norm: float | None = None,
    noise_multiplier: float = 0.0,
    expected_sites: float | None = None,
    server_lr: float = 1.0,
    server_momentum: float = 0.9,
    rng: np.random.Generator | None = None,
) -> tuple[Arrays, Arrays]:
    """One DP-FedAvgM round on updates already in memory (same result as :class:`StreamingAggregator`).

    Args:
        weights: global weights ``w_t``.
        deltas: one update ``Δ_k = w_k − w_t`` per site.
        momentum: server momentum buffer, or None to start from zeros.
        num_examples: example count per site; required (positive) without ``clip_norm``; accepted and
            ignored with it (the DP mean is uniform), but its length must still match ``deltas``.
        clip_norm: per-site L2 clipping bound ``C``; enables client-level DP.
        noise_multiplier: ``σ``; noise std ``σ·C`` per coordinate of the clipped sum.
        expected_sites: expected number of sampled sites (>= 1); required with ``clip_norm``.
        server_lr: ``η``.
        server_momentum: ``β``.
        rng: source of the noise.

    Returns:
        ``(w_{t+1}, v_{t+1})``.

    Raises:
        AggregationError: invalid arguments or updates (see :class:`StreamingAggregator`).
    """
    _check_server_args(server_lr, server_momentum)
    if num_examples is not None and len(num_examples) != len(deltas):
        raise AggregationError(f"num_examples has {len(num_examples)} entries for {len(deltas)} updates")
    if clip_norm is None:
        if num_examples is None:
            raise AggregationError("num_examples is required without clip_norm (example-weighted mean)")
        if noise_multiplier:
            raise AggregationError(f"noise_multiplier={noise_multiplier} needs clip_norm (noise scale is σ·C)")
        if expected_sites is not None:
            raise AggregationError(f"expected_sites={expected_sites} only applies with clip_norm (client-level DP)")
    elif expected_sites is None:
        raise AggregationError("expected_sites is required with clip_norm (the DP mean divides by it)")
    agg = StreamingAggregator(shapes_of(weights), clip_norm=clip_norm)
    for k, delta in enumerate(deltas):
        n = 1 if num_examples is None or clip_norm is not None else num_examples[k]
        try:
            agg.add(delta, n)
        except AggregationError as err:
            raise AggregationError(f"site {k}: {err}") from err
    mean_delta = agg.finalize(expected_sites=expected_sites, noise_multiplier=noise_multiplier, rng=rng)
    return apply_server_momentum(weights, mean_delta, momentum, server_lr=server_lr, server_momentum=server_momentum)
