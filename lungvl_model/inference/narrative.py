"""The generated explanation: sentences, per-sentence entropy confidence, deferral, grounding.

Per sentence: mean predictive entropy (nats) of its tokens; confidence = 1 − entropy / log(V).
A sentence is *low-confidence* when its mean entropy exceeds the threshold calibrated on validation
data (``calibration.json`` beside the checkpoint) or the config default. A *key* sentence is one from
which the report labeler reads a clinical fact (nodule presence, size, lobe, type, Lung-RADS).

The FINDINGS paragraph is written one finding at a time (:func:`write_findings_report`): finding k's
sentence is decoded from its slot (:mod:`lungvl_model.models.slots`: the slot as ``<bos>`` prefix and in
the cross-attention memory, beside the global visual tokens), so
its grounding is that finding's mask by construction (``nodule`` = the finding's index, ``heatmap`` the
mask on the model grid, ``box_lps`` its extent); the mean cross-attention heatmap of its tokens is kept
as a refinement (``attention_heatmap``, ``attention_box_lps``). With no finding the negative sentence
is decoded from the "no finding" slot; the IMPRESSION from all slots. Other sentences are grounded by
their attention heatmap alone (box: the heatmap above half its maximum, in LPS mm).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from lungvl_model.data.targets import MAX_SLOTS, NODULE_ATTRIBUTES, nodule_attribute_row
from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.findings import Finding, GridMap
from lungvl_model.inference.unmeasured import without_margin
from lungvl_model.models.decoder import Generation
from lungvl_model.models.fusion import TokenLayout, attention_to_heatmap
from lungvl_model.models.slots import SEQUENCE_KINDS, ball_mask, slot_memory
from lungvl_model.text.labeler import label_report
from lungvl_model.text.tokenizer import sentence_spans_from_ids


@dataclass(eq=False)  # identity: equality would compare heatmap arrays
class Sentence:
    """One generated sentence.

    Attributes:
        text: the sentence.
        tokens: ``[a, b)`` range of generated token indices.
        mean_entropy: mean predictive entropy of its tokens (nats).
        confidence: ``1 − mean_entropy / log(vocab)`` in [0, 1].
        key: carries a clinical fact (per the labeler).
        low_confidence: entropy above the deferral threshold.
        box_lps: ``[[x0, y0, z0], [x1, y1, z1]]`` LPS mm of the grounding heatmap above half max.
        nodule: index of the finding the sentence is about: by construction for a finding sentence,
            else the finding whose centroid lies in the box (closest), if any.
        heatmap: ``(D, H, W)`` model-grid grounding (max 1), not serialised: the finding's mask for a
            finding sentence, else the attention heatmap.
        section: ``"findings"`` or ``"impression"`` (``""`` for a free-text generation).
        attention_box_lps: LPS box of the cross-attention heatmap (the refinement of a finding sentence).
        attention_heatmap: ``(D, H, W)`` mean cross-attention heatmap of its tokens, not serialised.
        decoding: how it was chosen: ``"greedy"``, or for a finding sentence (or an IMPRESSION) whose
            greedy text the fact check faulted, ``"sampled k/n"`` (candidate k of n sampled ones;
            :class:`CheckedDecoding`), ``"greedy (n sampled, none better)"``, or ``"fact-constrained"`` (re-decoded
            from a contradicted fact restated as measured; :func:`write_findings_report`); ``"measured"`` for a
            sentence written from a measurement, not decoded (the emphysema sentence,
            :mod:`~lungvl_model.inference.densitometry`).
    """

    text: str
    tokens: tuple[int, int]
    mean_entropy: float
    confidence: float
    key: bool
    low_confidence: bool
    box_lps: list[list[float]] | None = None
    nodule: int | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)
    section: str = ""
    attention_box_lps: list[list[float]] | None = None
    attention_heatmap: np.ndarray | None = field(default=None, repr=False)
    decoding: str = "greedy"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {k: v for k, v in self.__dict__.items() if k not in ("heatmap", "attention_heatmap")}


_BARE_MARKER = re.compile(r"\s*(?:\d{1,2}[.)]|[-*•])\s*")


def is_bare_marker(text: str) -> bool:
    """True for a "sentence" that is only a list marker ("1.", "2)", "-").

    That is what is left of an IMPRESSION item when the decoder's repeat of it is cut off (greedy "1. 1."
    stops at the repeat); it states nothing and is not part of the report.
    """
    return _BARE_MARKER.fullmatch(text) is not None


def is_key_sentence(text: str) -> bool:
    """True when the labeler reads a clinical fact from the sentence."""
    lab = label_report(text)
    return bool(lab.nodules) or lab.lung_rads is not None or lab.nodule_present is not None


def heatmap_box(heat: np.ndarray, grid: GridMap, volume: CTVolume, level: float = 0.5) -> list[list[float]] | None:
    """LPS bounding box (mm) of a model-grid heatmap above ``level`` × max."""
    if not np.isfinite(heat).all() or heat.max() <= 0:
        return None
    idx = np.argwhere(heat >= level * heat.max())
    corners = grid.model_to_src(np.stack([idx.min(0) - 0.5, idx.max(0) + 0.5]))
    lps = volume.voxel_to_lps(corners)
    return [[round(float(v), 1) for v in lps.min(0)], [round(float(v), 1) for v in lps.max(0)]]


def build_sentences(
    generation: Generation,
    tokenizer: Any,
    layout: TokenLayout,
    grid_shape: tuple[int, int, int],
    *,
    threshold: float,
    grid: GridMap,
    volume: CTVolume,
) -> tuple[str, list[Sentence]]:
    """Split the first generated sequence into sentences with confidence and grounding.

    Args:
        generation: output of ``ReportDecoder.generate`` for one study.
        tokenizer: the report tokenizer.
        layout: visual token layout.
        grid_shape: model input ``(D, H, W)``.
        threshold: mean-entropy threshold (nats) above which a sentence is low-confidence.
        grid: model grid ↔ source mapping.
        volume: the source CT.

    Returns:
        ``(text, sentences)``.
    """
    ids = generation.tokens[0]
    keep = generation.mask[0]
    text, _, spans = sentence_spans_from_ids(tokenizer, ids[keep])
    vocab = math.log(max(2, len(tokenizer)))
    ent = generation.entropy[0][keep].float()
    attn = generation.cross_attention[0][keep].float()
    out: list[Sentence] = []
    char_spans = sentence_spans_from_ids(tokenizer, ids[keep])[1]
    for (a, b), (cs, ce) in zip(spans, char_spans, strict=True):
        if b <= a:
            continue
        sent = text[cs:ce].strip()
        if not sent or is_bare_marker(sent):
            continue
        h = ent[a:b].mean().item()
        heat = None
        box = None
        if attn.shape[-1] == layout.n_tokens and layout.n_tokens > 0:
            mean_attn = attn[a:b].mean(0, keepdim=True).unsqueeze(0)  # (1, 1, N)
            heat = attention_to_heatmap(mean_attn, layout, grid_shape)[0, 0].numpy()
            box = heatmap_box(heat, grid, volume)
        out.append(
            Sentence(
                text=sent,
                tokens=(int(a), int(b)),
                mean_entropy=round(h, 4),
                confidence=round(max(0.0, 1.0 - h / vocab), 4),
                key=is_key_sentence(sent),
                low_confidence=h > threshold,
                box_lps=box,
                heatmap=heat,
            )
        )
    return text, out


@torch.no_grad()
def generate_for_study(
    model: Any, visual_tokens: torch.Tensor, *, max_new_tokens: int, visual_mask: torch.Tensor | None = None
) -> Generation:
    """Greedy generation of the explanation from visual tokens ``(1, N, E)``."""
    return model.decoder.generate(visual_tokens, max_new_tokens=max_new_tokens, visual_mask=visual_mask)


def finding_mask_on_grid(finding: Finding, grid: GridMap, shape: tuple[int, int, int]) -> np.ndarray:
    """A finding's native mask mapped onto the model grid (nearest model voxel of each native voxel).

    Falls back to a ball of the finding's mean diameter around its centroid when it has no mask or the
    mask maps outside the grid.

    Returns:
        ``(D, H, W)`` bool, never empty for a centroid inside the grid.
    """
    out = np.zeros(shape, bool)
    if finding.mask is not None and finding.mask.any():
        idx = np.argwhere(finding.mask) + np.asarray(finding.offset)
        g = np.rint(grid.src_to_model(idx)).astype(int)
        inside = np.all((g >= 0) & (g < np.asarray(shape)), axis=1)
        out[tuple(g[inside].T)] = True
    if not out.any():
        radius = max(finding.mean_diameter_mm, 1.0) / 2 / np.asarray(grid.dst_spacing, float)
        out = ball_mask(shape, grid.src_to_model(np.asarray(finding.centroid_zyx)), radius)
    return out


#: ``(candidate sentences, section) -> (contradicted, unsupported, missing, supported)``: the fact counts of the
#: sentences, each read as a statement about its ``nodule`` (the finding a finding sentence is written from;
#: for the IMPRESSION the finding its attention points at, :func:`link_by_attention`, or None: grounded by what
#: it says), exactly as the explanation's final fact check reads them (:mod:`.fact_check`); ``missing``: key
#: facts a complete text would state and these do not (e.g. a finding sentence without the finding's size or lobe).
SentenceVerifier = Callable[[list["Sentence"], str], tuple[int, int, int, int]]

#: ``(candidate sentences, section) -> forced beginning or None``: where to restart a text that states a
#: fact the fact check contradicts (the text up to that fact, rewritten as measured;
#: :func:`~lungvl_model.inference.fact_constraint.restated_start`), None when no contradicted fact can be
#: restated.
FactRestater = Callable[[list["Sentence"], str], str | None]

#: Fact-constrained re-decodings tried per finding sentence or IMPRESSION (one per contradicted fact).
MAX_RESTATED_FACTS = 3


def link_by_attention(sentences: Sequence[Sentence], findings: Sequence[Finding]) -> None:
    """Ground each sentence without a ``nodule`` to the finding its attention box points at.

    The finding whose centroid lies inside the sentence's ``box_lps``, the one closest to the box centre; a
    sentence whose box holds no finding's centroid stays ungrounded (None).

    Args:
        sentences: sentences with ``box_lps`` (set in place).
        findings: the kept findings (``centroid_lps``, ``index``).
    """
    for s in sentences:
        if s.nodule is not None or s.box_lps is None or not findings:
            continue
        lo, hi = np.asarray(s.box_lps[0]), np.asarray(s.box_lps[1])
        centre = (lo + hi) / 2
        inside = [
            f for f in findings if np.all(np.asarray(f.centroid_lps) >= lo) and np.all(np.asarray(f.centroid_lps) <= hi)
        ]
        if inside:
            s.nodule = min(inside, key=lambda f: np.linalg.norm(np.asarray(f.centroid_lps) - centre)).index


@dataclass(frozen=True)
class CheckedDecoding:
    """Fact-checked N-best decoding of the finding sentences.

    The greedy sentence is kept when the fact check finds nothing wrong or missing in it. Otherwise
    ``candidates`` sentences are sampled from the same slot (``softmax(logits / temperature)`` over the
    ``top_k`` most likely tokens, one seeded generator per explanation, so an explanation is reproducible)
    and the one with the fewest contradicted facts, then the fewest unsupported facts, then the fewest
    missing key facts (a sentence that says less is not preferred for saying less), then the most
    supported facts, then the lowest mean entropy is kept; the greedy sentence wins ties. Every candidate
    is the decoder's own text: nothing is edited or templated, so a finding none of whose candidates is right keeps its
    faulted sentence, and the report review defers it as before. The IMPRESSION (all its sentences
    together, decoded from every finding slot) is chosen the same way.

    Attributes:
        candidates: sentences sampled when the greedy one is faulted (0: greedy only).
        temperature: sampling temperature (> 0).
        top_k: sample among the k most likely tokens (0: all).
        seed: seed of the sampling generator.
    """

    candidates: int = 24
    temperature: float = 0.8
    top_k: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 0:
            raise ValueError(f"CheckedDecoding.candidates must be an integer >= 0, got {self.candidates!r}")
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"CheckedDecoding.temperature must be > 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"CheckedDecoding.top_k must be an integer >= 0, got {self.top_k!r}")


def _generation_row(gen: Generation, row: int) -> Generation:
    """Row ``row`` of a batched generation, as a batch of one."""
    keep = slice(row, row + 1)
    rs = None if gen.repeat_stopped is None else gen.repeat_stopped[keep]
    return Generation(
        tokens=gen.tokens[keep], token_probs=gen.token_probs[keep], entropy=gen.entropy[keep],
        cross_attention=gen.cross_attention[keep], mask=gen.mask[keep], finished=gen.finished[keep],
        repeat_stopped=rs,
    )  # fmt: skip


def pick_checked(counts: list[tuple[int, int, int, int]], entropies: list[float]) -> int:
    """The candidate :class:`CheckedDecoding` keeps (its docstring gives the order).

    Args:
        counts: ``(contradicted, unsupported, missing, supported)`` of each candidate, the greedy one first.
        entropies: each candidate's mean token entropy (nats), in the same order.

    Returns:
        The index of the chosen candidate (0, the greedy one, on ties).

    Raises:
        ValueError: empty or unequal lists.
    """
    if not counts or len(counts) != len(entropies):
        raise ValueError(f"pick_checked needs one entropy per fact count, got {len(counts)} and {len(entropies)}")

    def key(rank: int) -> tuple[int, int, int, int, float, int]:
        c, u, m, sup = counts[rank]
        return (c, u, m, -sup, 0.0 if rank == 0 else entropies[rank], rank)

    return min(range(len(counts)), key=key)


def _mean_entropy(sentences: list[Sentence]) -> float:
    return float(np.mean([s.mean_entropy for s in sentences])) if sentences else math.inf


def finding_attributes(finding: Finding) -> list[float]:
    """The slot attribute row (``NODULE_ATTRIBUTES``) of a measured finding; margin is not measured.

    The comparison columns come from :func:`~lungvl_model.inference.findings.match_prior`: ``context``
    (``"baseline"`` without a prior study), ``growth_mm`` and ``prior_mean_diameter_mm`` (None, i.e.
    unknown, for a baseline or new finding).
    """
    return nodule_attribute_row(
        mean_diameter_mm=finding.mean_diameter_mm,
        volume_mm3=finding.volume_mm3,
        type=finding.type,
        lobe=finding.lobe,
        calcified=float(finding.calcified),
        margin="",
        lung_rads=finding.lung_rads,
        brock=math.nan if finding.brock_probability is None else float(finding.brock_probability),
        context=finding.context,
        growth_mm=math.nan if finding.growth_mm is None else float(finding.growth_mm),
        prior_mean_diameter_mm=math.nan
        if finding.prior_mean_diameter_mm is None
        else float(finding.prior_mean_diameter_mm),
    )


def write_findings_report(
    model: Any,
    vis: Any,
    visual_tokens: torch.Tensor,
    layout: TokenLayout,
    findings: list[Finding],
    *,
    grid: GridMap,
    volume: CTVolume,
    grid_shape: tuple[int, int, int],
    threshold: float,
    max_new_tokens: int,
    verify: SentenceVerifier | None = None,
    checked: CheckedDecoding | None = None,
    restate: FactRestater | None = None,
) -> tuple[list[Sentence], list[Sentence]]:
    """FINDINGS one finding at a time (ranked order), then the IMPRESSION from all finding slots.

    Args:
        model: the LungVL model (its ``finding_slots`` and ``decoder``).
        vis: the study's :class:`~lungvl_model.models.vision.VisionOutput` (batch of 1).
        visual_tokens: ``(1, N, E)`` global visual tokens.
        layout: their layout.
        findings: the kept findings in ranked order (``index`` set); the first ``MAX_SLOTS`` become slots.
        grid: model grid ↔ source mapping.
        volume: the source CT.
        grid_shape: model input ``(D, H, W)``.
        threshold: the per-sentence entropy deferral threshold (nats).
        max_new_tokens: most tokens per generated sequence.
        verify: the fact check of a candidate text (its sentences grounded as the final check grounds
            them: a finding sentence to its finding, an IMPRESSION sentence by :func:`link_by_attention`);
            with it, a faulted greedy text is replaced by the best of ``checked.candidates`` sampled ones
            (:class:`CheckedDecoding`).
        checked: the N-best settings (default :class:`CheckedDecoding`).
        restate: with ``verify``: when the best text still states a size, lobe or Lung-RADS category the fact
            check contradicts, it is decoded again with its beginning forced up to that fact, restated as
            measured (in the form the decoder wrote; :mod:`~lungvl_model.inference.fact_constraint`), the
            rest written by the decoder; the re-decoded text competes with the others by the same order
            (``decoding`` ``"fact-constrained"``). At most :data:`MAX_RESTATED_FACTS` re-decodings.

    Returns:
        ``(finding sentences, impression sentences)``: one sentence per slotted finding (none for a
        finding whose generation wrote no sentence) or the negative sentence when no finding is kept.
    """
    kept = findings[:MAX_SLOTS]
    k = max(1, len(kept))
    device = visual_tokens.device
    masks = np.zeros((k, *grid_shape), bool)
    attrs = np.full((k, len(NODULE_ATTRIBUTES)), np.nan, np.float32)
    for i, f in enumerate(kept):
        masks[i] = finding_mask_on_grid(f, grid, grid_shape)
        attrs[i] = finding_attributes(f)
    valid = torch.zeros(1, k, dtype=torch.bool, device=device)
    valid[0, : len(kept)] = True
    with torch.no_grad():
        slots = model.finding_slots(
            vis, torch.from_numpy(masks)[None].float().to(device), torch.from_numpy(attrs)[None].to(device), valid
        )
    p = slots.shape[1]

    nbest = checked or CheckedDecoding()
    sampler = torch.Generator(device="cpu").manual_seed(nbest.seed)

    def decode(
        select: list[int], section: str, kind: str, rows: int = 0, forced: list[int] | None = None
    ) -> list[list[Sentence]]:
        """Greedy sentences (``rows = 0``, after the ``forced`` ids if any), or ``rows`` sampled generations."""
        sel = torch.zeros(1, p, dtype=torch.bool, device=device)
        sel[0, select] = True
        memory, mem_mask = slot_memory(slots, visual_tokens, sel)
        with torch.no_grad():
            prefix = model.slots.prefix(slots, sel, torch.tensor([SEQUENCE_KINDS.index(kind)], device=device))
        if rows:
            memory, mem_mask, prefix = memory.repeat(rows, 1, 1), mem_mask.repeat(rows, 1), prefix.repeat(rows, 1)
            gen = model.decoder.generate(
                memory, max_new_tokens=max_new_tokens, visual_mask=mem_mask, prefix=prefix,
                temperature=nbest.temperature, top_k=nbest.top_k, generator=sampler,
            )  # fmt: skip
        else:
            gen = model.decoder.generate(
                memory, max_new_tokens=max_new_tokens, visual_mask=mem_mask, prefix=prefix,
                forced=None if forced is None else [forced],
            )  # fmt: skip
        gen = replace(gen, cross_attention=gen.cross_attention[..., p:])  # attention over the visual tokens
        out = []
        for r in range(max(1, rows)):
            _, sents = build_sentences(
                _generation_row(gen, r), model.tokenizer, layout, grid_shape, threshold=threshold, grid=grid,
                volume=volume,
            )  # fmt: skip
            for s in sents:
                s.section = section
                s.nodule = kept[select[0]].index if kind == "finding" else None
                s.text = without_margin(s.text)  # nothing measures a margin: the decoder's is not stated
            sents = [s for s in sents if s.text]
            link_by_attention(sents, findings)  # IMPRESSION sentences: grounded as the final fact check grounds them
            out.append(sents)
        return out

    def best(select: list[int], section: str, kind: str, limit: int | None) -> list[Sentence]:
        """The greedy sentences, or when the fact check faults them the best sampled or fact-constrained ones."""
        chosen = decode(select, section, kind)[0][:limit]
        if verify is None or not (nbest.candidates or restate):
            return chosen  # (an empty greedy text, e.g. an IMPRESSION cut to a bare "1.", is checked: it misses facts)
        counts = [verify(chosen, section)]
        if counts[0][:3] == (0, 0, 0):  # nothing contradicted, unsupported or missing
            return chosen
        options, labels = [chosen], ["greedy"]
        if nbest.candidates:
            options += [row[:limit] for row in decode(select, section, kind, rows=nbest.candidates) if row]
            counts += [verify(o, section) for o in options[1:]]
            n_sampled = len(options) - 1
            labels = [
                f"greedy ({n_sampled} sampled, none better)",
                *(f"sampled {r}/{n_sampled}" for r in range(1, len(options))),
            ]
        rank = pick_checked(counts, [_mean_entropy(o) for o in options])
        current = options[rank]
        for _ in range(MAX_RESTATED_FACTS if restate is not None and counts[rank][0] else 0):
            assert restate is not None
            start = restate(current, section)
            ids = model.tokenizer(start, add_special_tokens=False)["input_ids"] if start else []
            if not ids or len(ids) >= max_new_tokens:
                break
            current = decode(select, section, kind, forced=list(ids))[0][:limit]
            if not current:
                break
            options.append(current)
            counts.append(verify(current, section))
            labels.append("fact-constrained")
            if not counts[-1][0]:
                break
        rank = pick_checked(counts, [_mean_entropy(o) for o in options])
        for c in options[rank]:
            c.decoding = labels[rank]
        return options[rank]

    finding_sentences: list[Sentence] = []
    if not kept:
        finding_sentences = decode([p - 1], "findings", "negative")[0][:1]
    for i in range(len(kept)):
        for s in best([i], "findings", "finding", 1):  # one sentence per finding
            s.attention_heatmap, s.attention_box_lps = s.heatmap, s.box_lps
            s.heatmap = masks[i].astype(np.float32)
            s.box_lps = heatmap_box(s.heatmap, grid, volume)
            finding_sentences.append(s)
    impression = best(list(range(len(kept))) or [p - 1], "impression", "impression", None)
    return finding_sentences, impression


def compose_report(exam: list[str], findings: list[Sentence], impression: list[Sentence]) -> str:
    """The report text: ``EXAM:`` header sentences (if any), ``FINDINGS:``, ``IMPRESSION:`` (one per line)."""
    parts = [f"EXAM: {' '.join(exam)}"] if exam else []
    parts.append("FINDINGS:\n" + " ".join(s.text for s in findings))
    parts.append("IMPRESSION:\n" + "\n".join(s.text for s in impression))
    return "\n".join(parts)
