r"""Aggregation benchmark: lungvl's DP-FedAvgM next to Flower's FedAvgM on the same updates (DESIGN.md 6).

For each ``(sites, params)`` pair one synthetic round is built: global weights ``w_t``, a server momentum
buffer ``v`` (steady state, round >= 2), and one float32 update ``Δ_k`` per site, split into ``layers``
arrays. The methods, all timed on aggregation only (inputs are built outside the timed region):

* ``flower FedAvgM`` (the peer): ``FedAvgM.aggregate_train`` on Flower reply ``Message``\\ s carrying
  ``w_t + Δ_k`` as an ``ArrayRecord`` plus a ``MetricRecord`` with the example count; its own
  ``current_arrays`` / ``momentum_vector`` are set to ``w_t`` / ``-v`` (Flower's sign convention).
* ``lungvl batch``: :func:`~server.aggregation.dp_fedavgm_step` on all ``Δ_k`` held as numpy arrays.
* ``lungvl stream``: :class:`~server.aggregation.StreamingAggregator`; each ``Δ_k`` is generated lazily
  (untimed) just before it is folded and dropped after, so one update is held at a time.
* ``lungvl stream+unpack``: the same streaming fold fed the very reply messages Flower gets, unpacking
  each ``ArrayRecord`` (bytes -> numpy, minus ``w_t``) inside the timed region, like Flower must.

With DP off, every lungvl method computes what FedAvgM computes (``max_diff`` records the largest
difference of ``w_{t+1}``); with DP on (clip to ``clip_norm``, noise ``σ·C``, divide by the number of
sites), the peer stays plain FedAvgM, so the ratio is the price of the DP step.

Memory: ``tracemalloc`` (numpy registers its buffers with it, and Flower's ``bytes`` are Python objects),
in one extra untimed run per method. ``peak`` is the largest traced allocation beyond the inputs the
method is given (for ``stream``, minus the one update in hand); ``held`` counts those inputs (updates or
reply bytes, ``w_t``, ``v``, Flower's ``current_arrays``), and memory ratios compare ``held + peak``.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import platform
import statistics
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM

from federation.records import arrays_from_record
from server.aggregation import Arrays, Shape, StreamingAggregator, apply_server_momentum, dp_fedavgm_step

PEER = "flower FedAvgM"
METHODS = (PEER, "lungvl batch", "lungvl stream", "lungvl stream+unpack")
HELD = {
    PEER: "all replies (ArrayRecord bytes)",
    "lungvl batch": "all updates (numpy)",
    "lungvl stream": "1 update at a time (lazy)",
    "lungvl stream+unpack": "all replies (ArrayRecord bytes)",
}
KEY = "num-examples"
MiB = 2**20


@dataclass(frozen=True)
class AggBenchConfig:
    """Resolved settings of one ``lungvl bench aggregate`` run (saved beside the results).

    Attributes:
        sites: numbers of sites to try.
        params: numbers of model parameters to try.
        repeats: timed runs per method (median reported); memory comes from one more traced run.
        dp: client-level DP settings to run lungvl with (``False``: example-weighted mean; ``True``: clip +
            noise).
        layers: arrays the parameters are split into.
        server_lr: ``η`` for lungvl and FedAvgM's ``server_learning_rate``.
        server_momentum: ``β`` for lungvl and FedAvgM's ``server_momentum``.
        clip_norm: ``C``; update norms are drawn around it, so about half the sites get clipped.
        noise_multiplier: ``σ``.
        seed: seed of the synthetic round and of the noise.
        mem_fraction: skip a method whose estimated footprint exceeds this share of available memory.
    """

    sites: tuple[int, ...] = (10, 50)
    params: tuple[int, ...] = (1_000_000, 10_000_000)
    repeats: int = 3
    dp: tuple[bool, ...] = (False, True)
    layers: int = 20
    server_lr: float = 1.0
    server_momentum: float = 0.9
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    seed: int = 0
    mem_fraction: float = 0.7

    def __post_init__(self) -> None:
        if not self.sites or min(self.sites) < 1 or not self.params or min(self.params) < 1:
            raise ValueError(f"sites and params must be positive, got sites={self.sites} params={self.params}")
        if not 0 < self.mem_fraction <= 1:
            raise ValueError(f"mem_fraction must be in (0, 1], got {self.mem_fraction}")
        if self.repeats < 1 or self.layers < 1 or not self.dp:
            raise ValueError(f"need repeats, layers >= 1 and a dp setting: {self.repeats}, {self.layers}, {self.dp}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class AggRow:
    """One method at one ``(sites, params)``; times in seconds, memory in MiB; NaN where skipped."""

    sites: int
    params: int
    method: str
    dp: bool | None
    held: str
    held_mib: float = math.nan
    time_s: float = math.nan
    times_s: list[float] = field(default_factory=list)
    peak_mib: float = math.nan
    time_ratio: float = math.nan
    mem_ratio: float = math.nan
    max_diff: float | None = None
    note: str = ""

    @property
    def total_mib(self) -> float:
        """Inputs held plus peak working memory."""
        return self.held_mib + self.peak_mib

    @property
    def label(self) -> str:
        """Method and DP setting, e.g. ``lungvl stream dp``."""
        return self.method + {None: "", False: "", True: " dp"}[self.dp]


def layer_shapes(params: int, layers: int = 20) -> list[Shape]:
    """Split ``params`` into ``layers`` arrays like a network: small 1-D biases between 2-D weights.

    Returns:
        Shapes whose sizes add up to ``params`` exactly (the last weight absorbs the remainder).
    """
    n_w = max(1, min((layers + 1) // 2, params))
    n_b = max(0, min(layers - n_w, params - n_w))
    bias = min(512, max(1, params // (8 * layers)), (params - n_w) // n_b) if n_b else 0
    rest = params - n_b * bias
    share = np.array([2.0 ** (i % 4) for i in range(n_w)])
    sizes = 1 + np.floor((rest - n_w) * share / share.sum()).astype(int)
    sizes = np.where(sizes >= 64, sizes // 64 * 64, sizes)
    sizes[-1] += rest - int(sizes.sum())
    shapes: list[Shape] = []
    for i, s in enumerate(sizes.tolist()):
        shapes.append((s // 64, 64) if s % 64 == 0 else (s,))
        if i < n_b:
            shapes.append((bias,))
    return shapes


def _uniform(rng: np.random.Generator, shape: Shape, scale: float) -> np.ndarray:
    a = rng.random(shape, dtype=np.float32)
    a -= 0.5
    a *= scale
    return a


class Workload:
    """One synthetic round; site ``k``'s update is regenerated from the seed on demand (never cached)."""

    def __init__(self, sites: int, params: int, *, layers: int = 20, clip_norm: float = 1.0, seed: int = 0) -> None:
        self.sites, self.params, self._seed = sites, params, (seed, sites, params)
        self.shapes = layer_shapes(params, layers)
        rng = np.random.default_rng(self._seed)
        self.num_examples: list[int] = rng.integers(50, 500, sites).tolist()
        # uniform(-s/2, s/2) has std s/sqrt(12): norms land around C·U(0.5, 1.5)
        self.scales = clip_norm * rng.uniform(0.5, 1.5, sites) * math.sqrt(12.0 / params)
        self.weights: Arrays = [_uniform(rng, s, 1.0) for s in self.shapes]
        self.momentum: Arrays = [_uniform(rng, s, 0.01) for s in self.shapes]

    def delta(self, k: int) -> Arrays:
        """Site ``k``'s update ``Δ_k`` (float32, shapes as the model)."""
        rng = np.random.default_rng((*self._seed, k + 1))
        return [_uniform(rng, s, float(self.scales[k])) for s in self.shapes]

    def replies(self) -> list[Message]:
        """Flower train replies carrying ``w_t + Δ_k`` and ``{"num-examples": n_k}``."""
        out = []
        for k in range(self.sites):
            arrays = [w + d for w, d in zip(self.weights, self.delta(k), strict=True)]
            metrics = MetricRecord({KEY: self.num_examples[k]})
            content = RecordDict({"arrays": keyed_record(arrays), "metrics": metrics})
            meta = Metadata(1, f"r{k}", k + 1, 0, "i", "1", 0.0, 3600.0, MessageType.TRAIN)
            # a reply as the SuperLink hands it over (metadata given), without touching TaskIdentity
            out.append(Message(content=content, metadata=meta))  # type: ignore[call-overload]
        return out


class Probe:
    """Adds up the seconds (and, when tracing, the peak traced bytes) of the aggregation spans of one run."""

    def __init__(self, trace: bool) -> None:
        self.trace, self.seconds, self.peak = trace, 0.0, 0

    @contextmanager
    def span(self, held: int = 0) -> Iterator[None]:
        """Time the block; when tracing, count its peak allocation less ``held`` traced input bytes."""
        if self.trace:
            tracemalloc.reset_peak()
        t0 = perf_counter()
        yield
        self.seconds += perf_counter() - t0
        if self.trace:
            self.peak = max(self.peak, tracemalloc.get_traced_memory()[1] - held)


def run_method(
    method: str, w: Workload, cfg: AggBenchConfig, *, dp: bool, probe: Probe, inputs: dict[str, Any]
) -> Arrays:
    """Run one aggregation and return ``w_{t+1}``; ``inputs`` holds ``replies``/``record`` or ``deltas``."""
    lr, beta = cfg.server_lr, cfg.server_momentum
    rng = np.random.default_rng(cfg.seed)
    if method == PEER:
        strat = FedAvgM(weighted_by_key=KEY, server_learning_rate=lr, server_momentum=beta)
        strat.current_arrays, strat.momentum_vector = inputs["record"], inputs["flower_momentum"]
        with probe.span():
            arrays, _ = strat.aggregate_train(1, inputs["replies"])
        assert arrays is not None
        return arrays_from_record(arrays)
    dpkw: dict[str, Any] = (
        {"clip_norm": cfg.clip_norm, "noise_multiplier": cfg.noise_multiplier, "expected_sites": float(w.sites)}
        if dp
        else {}
    )
    if method == "lungvl batch":
        with probe.span():
            new_w, _ = dp_fedavgm_step(
                w.weights, inputs["deltas"], w.momentum, num_examples=w.num_examples, server_lr=lr,
                server_momentum=beta, rng=rng, **dpkw,
            )  # fmt: skip
        return new_w
    with probe.span():
        agg = StreamingAggregator(w.shapes, clip_norm=dpkw.get("clip_norm"))
    for k in range(w.sites):
        if method == "lungvl stream":
            delta = w.delta(k)
            with probe.span(held=sum(a.nbytes for a in delta)):
                agg.add(delta, w.num_examples[k])
            del delta
        else:
            with probe.span():
                msg = inputs["replies"][k]
                got = arrays_from_record(msg.content.array_records["arrays"])
                n = int(msg.content.metric_records["metrics"][KEY])  # type: ignore[arg-type]
                agg.add([np.subtract(a, b, out=a) for a, b in zip(got, w.weights, strict=True)], n)
                del got
    with probe.span():
        mean = agg.finalize(
            expected_sites=dpkw.get("expected_sites"), noise_multiplier=dpkw.get("noise_multiplier", 0.0), rng=rng
        )
        new_w, _ = apply_server_momentum(w.weights, mean, w.momentum, server_lr=lr, server_momentum=beta)
    return new_w


def _measure(fn: Callable[[Probe], Arrays], repeats: int) -> tuple[list[float], int, Arrays]:
    """``repeats`` timed runs, then one run under tracemalloc: (seconds, peak bytes, result)."""
    times = []
    for _ in range(repeats):
        gc.collect()
        probe = Probe(trace=False)
        fn(probe)
        times.append(probe.seconds)
    gc.collect()
    probe = Probe(trace=True)
    tracemalloc.start()
    try:
        result = fn(probe)
    finally:
        tracemalloc.stop()
    return times, probe.peak, result


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


PHASES = (("replies", (PEER, "lungvl stream+unpack")), ("deltas", ("lungvl batch",)), ("lazy", ("lungvl stream",)))


def keyed_record(arrays: Sequence[np.ndarray]) -> ArrayRecord:
    """One ``Array`` per key ``"0"``..``"n-1"``: the layout Flower's strategies aggregate key by key.

    lungvl's own messages travel packed (``server.strategy.arrays_to_record``); the bench compares
    aggregation, so both sides get this layout and ``arrays_from_record`` reads it too.
    """
    return ArrayRecord({str(i): Array(np.ascontiguousarray(a, dtype=np.float32)) for i, a in enumerate(arrays)})


def _inputs(phase: str, w: Workload) -> tuple[dict[str, Any], int]:
    """Build one phase's inputs (untimed) and count the bytes held: updates or replies, ``w_t``, ``v``."""
    held = 2 * 4 * w.params
    if phase == "replies":
        replies = w.replies()
        held += sum(len(a.data) for m in replies for a in m.content.array_records["arrays"].values())
        return {
            "replies": replies,
            "record": keyed_record(w.weights),
            "flower_momentum": [-v for v in w.momentum],
        }, held
    if phase == "deltas":
        return {"deltas": [w.delta(k) for k in range(w.sites)]}, held + w.sites * 4 * w.params
    return {}, held + 4 * w.params


def _bench_one(sites: int, params: int, cfg: AggBenchConfig, log: Callable[[str], None]) -> list[AggRow]:
    """All methods at one ``(sites, params)``, phase by phase so only one phase's inputs are in memory."""
    group: list[AggRow] = []
    ref: Arrays | None = None
    w: Workload | None = None  # built (w_t and v: two model copies) once a phase fits
    model = 4 * params  # one float32 copy of the model
    for phase, names in PHASES:
        # rough footprint: inputs + float64 accumulator and temporaries (+ serialisation while building)
        need = {"replies": sites + 10, "deltas": sites + 8, "lazy": 9}[phase] * model
        avail = _available_bytes()
        fits = need <= cfg.mem_fraction * avail
        if fits and w is None:
            w = Workload(sites, params, layers=cfg.layers, clip_norm=cfg.clip_norm, seed=cfg.seed)
        inputs, held = _inputs(phase, w) if fits and w is not None else ({}, 0)
        for name in names:
            for dp in (None,) if name == PEER else cfg.dp:
                row = AggRow(sites, params, name, dp, HELD[name])
                group.append(row)
                tag = f"{sites} sites x {params:.0e} params: {name}" + ("" if dp is None else f" dp={dp}")
                if not fits:
                    row.note = f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
                    log(f"{tag}: {row.note}")
                    continue
                log(tag)

                def fn(p: Probe, n: str = name, d: bool = bool(dp), i: dict[str, Any] = inputs, w: Any = w) -> Arrays:
                    return run_method(n, w, cfg, dp=d, probe=p, inputs=i)

                times, peak, out = _measure(fn, cfg.repeats)
                row.times_s, row.time_s, row.peak_mib = times, statistics.median(times), peak / MiB
                row.held_mib = (held + (2 * model if name == PEER else 0)) / MiB  # + current_arrays, -v
                if name == PEER:
                    ref = out
                elif ref is not None and not dp:
                    row.max_diff = max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(out, ref, strict=True))
        del inputs
    for row in group:
        row.time_ratio = row.time_s / group[0].time_s
        row.mem_ratio = row.total_mib / group[0].total_mib
    return group


def bench_aggregate(cfg: AggBenchConfig, log: Callable[[str], None] = lambda _m: None) -> list[AggRow]:
    """Measure every method at every ``(sites, params)`` of ``cfg``; ratios are against :data:`PEER`.

    Args:
        cfg: what to run.
        log: progress messages.

    Returns:
        Rows by ``(sites, params)``, then method, then ``cfg.dp``. A phase whose estimated footprint does
        not fit in ``cfg.mem_fraction`` of the available memory is skipped, with a note, not measured.
    """
    rows: list[AggRow] = []
    flwr_log = logging.getLogger("flwr")  # FedAvg logs every aggregate_train at INFO
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)
    gc.freeze()  # keeps the gc.collect() before each run cheap (the imports leave ~10^6 objects)
    try:
        for sites in cfg.sites:
            for params in cfg.params:
                rows += _bench_one(sites, params, cfg, log)
    finally:
        flwr_log.setLevel(level)
        gc.unfreeze()
    return rows


def machine_info() -> dict[str, Any]:
    """Where the numbers came from."""
    import flwr

    return {
        "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(), "numpy": np.__version__, "flwr": flwr.__version__,
        "platform": platform.platform(), "memory": "tracemalloc peak beyond the inputs, one untimed run",
    }  # fmt: skip


def write_results(out_dir: Path, cfg: AggBenchConfig, rows: list[AggRow], meta: dict[str, Any]) -> list[Path]:
    """Write ``bench_aggregate.json`` (config, machine, rows), ``.csv``, a ``.png`` bar plot and ``config.json``."""
    import csv
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    recs = [{**asdict(r), "total_mib": r.total_mib} for r in rows]
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in recs]
    paths = [out_dir / f"bench_aggregate.{ext}" for ext in ("json", "csv", "png")] + [out_dir / "config.json"]
    doc = {"config": cfg.to_dict(), "machine": meta, "rows": clean}
    paths[0].write_text(json.dumps(doc, indent=2) + "\n")
    paths[3].write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    with paths[1].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[k for k in clean[0] if k != "times_s"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(clean)
    configs = list(dict.fromkeys((r.sites, r.params) for r in rows))
    labels = list(dict.fromkeys(r.label for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(labels)
    for ax, what, unit in ((axes[0], "time_s", "seconds"), (axes[1], "total_mib", "MiB (held + peak)")):
        value = {(r.sites, r.params, r.label): getattr(r, what) for r in rows}
        for j, label in enumerate(labels):
            xs = [i + j * width for i in range(len(configs))]
            ax.bar(xs, [value.get((*c, label), math.nan) for c in configs], width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], [f"{s} x {p:.0e}" for s, p in configs])
        if any(v > 0 for v in value.values()):  # NaN (skipped) compares False
            ax.set_yscale("log")
        ax.set_ylabel(unit)
        ax.set_xlabel("sites x params")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"aggregation, one round; {meta.get('cpus')} CPUs; medians of {cfg.repeats}")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths
