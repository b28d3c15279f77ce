"""The report written one finding at a time: each finding sentence grounded on its finding's mask."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.findings import Finding, GridMap
from lungvl_model.inference.narrative import (
    CheckedDecoding,
    Sentence,
    compose_report,
    finding_attributes,
    finding_mask_on_grid,
    is_bare_marker,
    link_by_attention,
    pick_checked,
    write_findings_report,
)
from lungvl_model.models.lungvl import LungVLModel
from lungvl_model.text.tokenizer import train_tokenizer
from tests.lungvl_model.test_lungvl_model import SMALL, TEXTS

SHAPE = (32, 32, 32)


def _finding(index: int, offset: tuple[int, int, int], mask: np.ndarray | None, diameter: float) -> Finding:
    centre = tuple(
        float(o + (s - 1) / 2) for o, s in zip(offset, mask.shape if mask is not None else (1, 1, 1), strict=True)
    )
    return Finding(
        centroid_zyx=centre,  # type: ignore[arg-type]
        centroid_lps=centre,  # type: ignore[arg-type]
        longest_diameter_mm=diameter,
        short_axis_mm=diameter,
        mean_diameter_mm=diameter,
        volume_mm3=diameter**3 / 2,
        solid_component_mm=diameter,
        type="solid",
        calcified=False,
        lobe="RUL",
        index=index,
        lung_rads="2",
        brock_probability=0.02,
        offset=offset,
        mask=mask,
    )


def test_finding_mask_on_grid_maps_native_voxels_and_falls_back_to_a_ball() -> None:
    grid = GridMap(src_spacing=(2.0, 2.0, 2.0), dst_spacing=(4.0, 4.0, 4.0), start=(0.0, 0.0, 0.0))
    mask = np.zeros((2, 1, 1), bool)
    mask[:, 0, 0] = True  # native voxels (10, 10, 10) and (11, 10, 10) -> model (5, 5, 5) and (5.5 -> 6, 5, 5)
    on_grid = finding_mask_on_grid(_finding(1, (10, 10, 10), mask, 3.0), grid, (16, 16, 16))
    assert {tuple(v) for v in np.argwhere(on_grid)} == {(5, 5, 5), (6, 5, 5)}
    ball = finding_mask_on_grid(_finding(2, (12, 12, 12), None, 8.0), grid, (16, 16, 16))  # radius 4 mm = 1 voxel
    assert ball.sum() == 7 and ball[6, 6, 6]


def test_finding_attributes_row() -> None:
    row = finding_attributes(_finding(1, (0, 0, 0), None, 6.0))
    assert row[0] == pytest.approx(np.log(7.0)) and row[2:5] == [0.0, 0.0, 0.0]  # solid, RUL, not calcified
    assert np.isnan(row[5]) and row[6] == 1.0 and row[7] == pytest.approx(0.02)  # margin unknown, 2, Brock


@pytest.fixture(scope="module")
def model() -> LungVLModel:
    tok = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    m = LungVLModel(SMALL, tok).eval()
    dot = tok(".", add_special_tokens=False)["input_ids"]
    bias = torch.zeros(m.decoder.vocab_size)
    bias[dot[0]] = 40.0  # every generation writes "." and stops when it repeats: one sentence per call
    m.decoder.lm.lm_head.bias = torch.nn.Parameter(bias)
    return m


def test_one_sentence_per_finding_grounded_on_its_mask(model: LungVLModel) -> None:
    volume = CTVolume(hu=np.zeros(SHAPE, np.float32), spacing=(4.0, 4.0, 4.0))
    grid = GridMap(src_spacing=(4.0, 4.0, 4.0), dst_spacing=(4.0, 4.0, 4.0), start=(0.0, 0.0, 0.0))
    cube = np.ones((2, 2, 2), bool)
    findings = [_finding(1, (20, 4, 4), cube, 8.0), _finding(2, (6, 20, 20), cube, 8.0)]
    with torch.no_grad():
        vis = model.encode_image(torch.rand(1, 1, *SHAPE))
        vt, layout = model.tokens(vis)
    kw = {"grid": grid, "volume": volume, "grid_shape": SHAPE, "threshold": 1.5, "max_new_tokens": 6}
    found, impression = write_findings_report(model, vis, vt, layout, findings, **kw)
    assert [s.nodule for s in found] == [1, 2] and all(s.section == "findings" for s in found)
    for s, (z, y, x) in zip(found, ((20, 4, 4), (6, 20, 20)), strict=True):
        expected = np.zeros(SHAPE, np.float32)
        expected[z : z + 2, y : y + 2, x : x + 2] = 1
        assert np.array_equal(s.heatmap, expected)  # the finding's mask, by construction
        lo = volume.voxel_to_lps(np.array([z - 0.5, y - 0.5, x - 0.5]))
        hi = volume.voxel_to_lps(np.array([z + 1.5, y + 1.5, x + 1.5]))
        assert s.box_lps == [[float(v) for v in np.minimum(lo, hi)], [float(v) for v in np.maximum(lo, hi)]]
        assert s.attention_heatmap is not None and s.attention_heatmap.shape == SHAPE  # the refinement
        assert "heatmap" not in s.to_dict() and "attention_heatmap" not in s.to_dict()
    assert impression and all(s.section == "impression" for s in impression)
    for s in impression:  # grounded by its attention box while decoding, as the final fact check grounds it
        lo, hi = (np.asarray(b) for b in s.box_lps or [[np.inf] * 3, [-np.inf] * 3])
        inside = [f for f in findings if np.all(lo <= f.centroid_lps) and np.all(np.asarray(f.centroid_lps) <= hi)]
        near = min(
            inside, key=lambda f: float(np.linalg.norm(np.asarray(f.centroid_lps) - (lo + hi) / 2)), default=None
        )
        assert s.nodule == (near.index if near is not None else None)
    negative, _ = write_findings_report(model, vis, vt, layout, [], **kw)
    assert len(negative) == 1 and negative[0].nodule is None and negative[0].section == "findings"


def test_compose_report() -> None:
    def s(text: str) -> Sentence:
        return Sentence(text, (0, 1), 0.1, 0.9, True, False)

    text = compose_report(["62-year-old female."], [s("A 6 mm nodule."), s("A 4 mm nodule.")], [s("1. Lung-RADS 2.")])
    assert text == "EXAM: 62-year-old female.\nFINDINGS:\nA 6 mm nodule. A 4 mm nodule.\nIMPRESSION:\n1. Lung-RADS 2."
    assert compose_report([], [s("No nodules.")], []) == "FINDINGS:\nNo nodules.\nIMPRESSION:\n"


def test_bare_list_markers_are_not_sentences() -> None:
    for t in ("1.", " 2) ", "-", "12."):
        assert is_bare_marker(t), t
    for t in ("1. 5 mm solid nodule in the LUL.", "No pulmonary nodules.", "1.5", "A."):
        assert not is_bare_marker(t), t


def test_pick_checked_prefers_fewer_faults_then_support_then_entropy() -> None:
    # greedy: a contradiction; 1: still one; 2 and 3: clean and complete with equal support, 3 surer
    assert pick_checked([(1, 0, 0, 2), (1, 0, 0, 3), (0, 0, 0, 3), (0, 0, 0, 3)], [0.1, 0.9, 0.8, 0.2]) == 3
    assert pick_checked([(0, 1, 0, 0), (0, 2, 0, 5)], [0.5, 0.1]) == 0  # more unsupported facts never win
    assert pick_checked([(0, 1, 0, 0), (0, 1, 0, 1)], [0.5, 0.9]) == 1  # same faults, more support
    assert pick_checked([(0, 0, 2, 1), (0, 0, 0, 3)], [0.1, 0.9]) == 1  # saying less is not a virtue
    assert pick_checked([(1, 0, 0, 0), (1, 0, 0, 0)], [9.0, 0.1]) == 0  # a tie keeps the greedy text
    with pytest.raises(ValueError, match="one entropy per fact count, got 2 and 1"):
        pick_checked([(0, 0, 0, 0), (0, 0, 0, 0)], [0.1])
    with pytest.raises(ValueError, match="candidates must be an integer >= 0, got -1"):
        CheckedDecoding(candidates=-1)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        CheckedDecoding(temperature=0)


def _one_finding_study(
    max_new_tokens: int,
) -> tuple[LungVLModel, Any, torch.Tensor, Any, list[Finding], dict[str, Any]]:
    """An untrained model (samples differ from the greedy text), one study with one finding, the write kwargs."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = LungVLModel(SMALL, tok).eval()
    volume = CTVolume(hu=np.zeros(SHAPE, np.float32), spacing=(4.0, 4.0, 4.0))
    grid = GridMap(src_spacing=(4.0, 4.0, 4.0), dst_spacing=(4.0, 4.0, 4.0), start=(0.0, 0.0, 0.0))
    with torch.no_grad():
        vis = model.encode_image(torch.rand(1, 1, *SHAPE))
        vt, layout = model.tokens(vis)
    kw = {"grid": grid, "volume": volume, "grid_shape": SHAPE, "threshold": 1.5, "max_new_tokens": max_new_tokens}
    return model, vis, vt, layout, [_finding(1, (20, 4, 4), np.ones((2, 2, 2), bool), 8.0)], kw


def test_faulted_sentences_are_replaced_by_sampled_ones_reproducibly() -> None:
    model, vis, vt, layout, findings, kw = _one_finding_study(8)
    found0, impression0 = write_findings_report(model, vis, vt, layout, findings, **kw)
    greedy = {found0[0].text, " ".join(s.text for s in impression0)}
    calls: list[tuple[list[str], list[int | None], str]] = []

    def verify(cands: list[Sentence], section: str) -> tuple[int, int, int, int]:
        texts = [c.text for c in cands]
        calls.append((texts, [c.nodule for c in cands], section))  # the greedy texts "contradict" the finding
        return (1, 0, 0, 0) if " ".join(texts) in greedy else (0, 0, 0, 1)

    kw["checked"] = CheckedDecoding(candidates=8)
    found, impression = write_findings_report(model, vis, vt, layout, findings, verify=verify, **kw)
    assert found[0].text not in greedy and found[0].decoding.startswith("sampled ") and found[0].nodule == 1
    assert calls[0] == ([found0[0].text], [1], "findings") and calls[9][2] == "impression"
    # the IMPRESSION is checked grounded as the final fact check grounds it: by its attention box
    assert calls[9][:2] == ([s.text for s in impression0], [s.nodule for s in impression0])
    assert len(calls) == 2 * (1 + 8)  # each: the greedy text, then 8 samples
    assert impression and all(s.decoding.startswith("sampled ") for s in impression)
    again, _ = write_findings_report(model, vis, vt, layout, findings, verify=verify, **kw)
    assert again[0].text == found[0].text  # one seeded generator per explanation
    clean, _ = write_findings_report(model, vis, vt, layout, findings, verify=lambda c, s: (0, 0, 0, 1), **kw)
    assert clean[0].text == found0[0].text and clean[0].decoding == "greedy"  # nothing faulted: nothing sampled
    kw["checked"] = CheckedDecoding(candidates=0)
    off, _ = write_findings_report(model, vis, vt, layout, findings, verify=verify, **kw)
    assert off[0].text == found0[0].text


def test_link_by_attention_grounds_to_the_closest_centroid_in_the_box() -> None:
    def sentence(box: list[list[float]] | None, nodule: int | None = None) -> Sentence:
        return Sentence(text="x", tokens=(0, 1), mean_entropy=0.0, confidence=1.0, key=True, low_confidence=False,
                        box_lps=box, nodule=nodule)  # fmt: skip

    a = _finding(1, (20, 4, 4), np.ones((2, 2, 2), bool), 8.0)
    b = _finding(2, (20, 4, 4), np.ones((2, 2, 2), bool), 6.0)
    a.centroid_lps, b.centroid_lps = (10.0, 10.0, 10.0), (30.0, 10.0, 10.0)
    wide, left, away, fixed, none = (
        sentence([[0.0, 0.0, 0.0], [36.0, 20.0, 20.0]]),  # both inside, centre x 18: a (10) is closer than b (30)
        sentence([[0.0, 0.0, 0.0], [15.0, 20.0, 20.0]]),
        sentence([[50.0, 0.0, 0.0], [60.0, 20.0, 20.0]]),
        sentence([[0.0, 0.0, 0.0], [15.0, 20.0, 20.0]], nodule=2),
        sentence(None),
    )
    link_by_attention([wide, left, away, fixed, none], [a, b])
    assert (wide.nodule, left.nodule, away.nodule, fixed.nodule, none.nodule) == (1, 1, None, 2, None)
    shifted = sentence([[6.0, 0.0, 0.0], [40.0, 20.0, 20.0]])  # centre x 23: b (30) is closer than a (10)
    link_by_attention([shifted], [a, b])
    assert shifted.nodule == 2


def test_contradicted_fact_is_decoded_again_from_the_restated_fact() -> None:
    model, vis, vt, layout, findings, kw = _one_finding_study(10)
    restated: list[tuple[list[str], int | None, str]] = []

    def verify(cands: list[Sentence], section: str) -> tuple[int, int, int, int]:
        return (0, 0, 0, 2) if " ".join(c.text for c in cands).startswith("A 8 mm") else (1, 0, 0, 0)

    def restate(cands: list[Sentence], section: str) -> str | None:
        restated.append(([c.text for c in cands], cands[0].nodule if section == "findings" else None, section))
        return "A 8 mm"

    kw["checked"] = CheckedDecoding(candidates=0)
    found, impression = write_findings_report(model, vis, vt, layout, findings, verify=verify, restate=restate, **kw)
    assert found[0].text.startswith("A 8 mm") and found[0].decoding == "fact-constrained" and found[0].nodule == 1
    assert impression[0].text.startswith("A 8 mm") and impression[0].decoding == "fact-constrained"
    assert [r[1:] for r in restated] == [(1, "findings"), (None, "impression")]  # fixed at the first try
    # a restated text that is no better than the others is not preferred: the greedy text stays
    never, _ = write_findings_report(
        model, vis, vt, layout, findings, verify=lambda c, s: (1, 0, 0, 0), restate=restate, **kw
    )
    plain, _ = write_findings_report(model, vis, vt, layout, findings, **kw)
    assert never[0].text == plain[0].text and never[0].decoding == "greedy"
    assert len(restated) == 2 + 2 * 3  # MAX_RESTATED_FACTS tries each, none fixing the contradiction
