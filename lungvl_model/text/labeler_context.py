"""Context that makes a nodule-like mention something other than a pulmonary nodule.

The report labeler (:mod:`lungvl_model.text.labeler`) finds nodule-like head words ("nodule", "lesion",
"opacity", "nodular image"...) and asks this module whether the words around one say it is not a
pulmonary nodule:

* **another organ** -- a nodule of the thyroid, adrenal, liver, kidney, breast, skin, peritoneum, pleura, or a
  lymph node ("subcarinal nodular density, representing an enlarged lymph node"). The organ can precede the
  head word ("adrenal nodule", "Left adrenal gland with a 14 mm nodule", "In the liver, a 9 mm nodule"),
  follow it ("nodule arising from the upper pole of the left kidney") or be what it is read as ("..., likely a
  lymph node"). A pleural-*based*, subpleural or juxtapleural nodule is in the lung; a "pleural nodule" is not.
* **an opacity that is no nodule** -- an opacity/density/GGO is a nodule only when a qualifier says so
  ("nodular", "round", "solid", "spiculated"...) or it is focal and sized up to :data:`FOCAL_OPACITY_MAX_MM`
  ("0.8 x 0.6 cm ground-glass opacity": Fleischner's ground-glass nodule); one that is patchy, multifocal,
  an "area", larger, or read as infection, atelectasis or scarring is not. Consolidation and infiltrates
  never are (they are no head word at all).
* **a pattern** -- "nodular opacities in a tree-in-bud pattern", "centrilobular nodular opacities", "nodular
  areas of consolidation". ("Nodular thickening", "nodular pattern", "nodularity" are no head word either.)
  Tiny nodules are nodules: "millimetric nodules" and "micronodules" count, without a size.

Every check reads a bounded window around the mention (:data:`LOOKBACK_CHARS`) or the mention's own
segment, so a sentence still costs its length.
"""

from __future__ import annotations

import re

__all__ = [
    "EXTRAPULMONARY_RE",
    "EXTRA_LESION_CUE_RE",
    "FOCAL_OPACITY_MAX_MM",
    "LOOKBACK_CHARS",
    "LUNG_WORD_RE",
    "ORGAN_ATTACH_RE",
    "nodular_pattern",
    "non_lung_reading",
    "opacity_is_nodule",
    "organ_leads",
    "organ_before",
    "pleural_nodule",
    "tree_in_bud_before",
]

_I = re.IGNORECASE

#: Largest focal opacity read as a nodule (mm): Lung-RADS and Fleischner nodules are up to 30 mm; a larger
#: ground-glass opacity is an area of disease, not a ground-glass nodule.
FOCAL_OPACITY_MAX_MM = 30.0
#: How far before a mention (characters) the organ heading its clause is looked for.
LOOKBACK_CHARS = 160

#: Organs outside the lungs and lymph-node stations: a nodule/lesion there is not a pulmonary nodule.
EXTRAPULMONARY_RE = re.compile(
    r"\b(?:thyroid\w*|adrenals?|liver|hepatic|kidneys?|renal|spleen|splenic|pancrea(?:s|tic)|breasts?|mammary"
    r"|axill(?:a|ae|ary)|skin|cutaneous|subcutaneous|dermal|chest[\s-]+wall|osseous|bones?|bony|vertebra[el]?"
    r"|vertebral|ribs?|sternal|sternum|spine|spinal|scapular?|clavic\w*|supraclavicular|humer\w*|sclerotic"
    r"|lytic|blastic|mediastin(?:um|al)|o?esophag\w*|paraesophageal|gastric|stomach|bowel|colonic|colon"
    r"|gallbladder|biliary|lymph|nodal|thym(?:us|ic)|parotid|neck|cervical|pericardi\w*|cardiac|heart"
    r"|myocardi\w*|muscles?|intramuscular|paraspinal|pectoral\w*|body|hiatal|uterine|ovarian|prostat\w*"
    r"|abdom(?:en|inal)|(?:retro)?peritone(?:um|al)|omentum|omental|mesenter(?:y|ic)|prevascular|paratracheal"
    r"|(?:sub|pre)carinal|aortopulmonary|retrocrural|cardiophrenic|periportal)\b",
    _I,
)
#: Organs that head a clause describing them ("Left adrenal gland with a 14 mm nodule", "In the liver, a
#: 9 mm nodule", "Thyroid gland enlarged with several nodules"): the organs where nodules are described.
ORGAN_LEAD_RE = re.compile(
    r"\b(?:thyroid\w*|adrenals?|liver|hepatic|kidneys?|renal|spleen|splenic|pancrea(?:s|tic)|breasts?"
    r"|axill(?:a|ae|ary)|skin|cutaneous|subcutaneous|chest[\s-]+wall|abdominal[\s-]+wall|(?:retro)?peritone(?:um|al)"
    r"|omentum|omental|mesenter(?:y|ic)|gallbladder|lymph|nodal|mediastin(?:um|al)|prevascular|paratracheal"
    r"|(?:sub|pre)carinal|aortopulmonary|thym(?:us|ic)|o?esophag\w*|gastric|stomach|parotid)\b",
    _I,
)
#: Where a new clause starts inside a sentence ("...; 5 mm nodule", "hernia and a 4 mm nodule").
CLAUSE_BREAK_RE = re.compile(
    r"[;:]|\b(?:and|plus|also|as\s+well\s+as)\s+(?=(?:a|an|one|two|three|several|multiple|few|some|the|\d)\b)", _I
)
#: Extra cues that a lesion/mass is extrapulmonary (liver/kidney style descriptions).
EXTRA_LESION_CUE_RE = re.compile(
    r"hypodens|hypoattenuat|low[\s-]+(?:attenuation|density)|hyperdens|too\s+small\s+to\s+characteri[sz]e"
    r"|sclerotic|lytic|blastic|cortical|enhancing",
    _I,
)
#: A preposition that attaches a mention to the organ following it ("nodule in the left adrenal", "nodule
#: arising from the upper pole of the left kidney"). Applied to at most 80 characters after the mention.
ORGAN_ATTACH_RE = re.compile(
    r"^\W*(?:[\w.-]+\s+){0,6}?(?:in|within|of|from|involving|arising\s+(?:in|from))\s+(?:[\w-]+\s+){0,5}?"
    + EXTRAPULMONARY_RE.pattern,
    _I,
)
#: Words that place a mention in the lung (and stop the organ-attachment look-ahead).
LUNG_WORD_RE = re.compile(
    r"\b(?:lungs?|pulmonary|intrapulmonary|lingula\w*|fissur\w*|perifissural|apex|apices|bases?|parenchym\w*"
    r"|subpleural|juxtapleural|pleural[\s-]+based|intraparenchymal)\b",
    _I,
)
#: "pleural nodules", "pleural soft tissue nodule": the pleura's own nodules (not "pleural-based").
_PLEURAL_PRE_RE = re.compile(r"\bpleural(?![\s-]*based)\s+(?:[\w-]+\s+)?$", _I)
#: What a mention is read as, when that is not a lung nodule ("..., likely a lymph node", "probably a cyst").
_NON_LUNG_READING_RE = re.compile(
    r"\b(?:lymph\s+nodes?|(?:peritoneal\s+)?implants?|adenomas?|h(?:a)?emangiomas?|cysts?|goit(?:er|re)"
    r"|lipomas?|injection\s+granulomas?)\b",
    _I,
)
#: "intrapulmonary lymph node", "perifissural ... node": a lung nodule after all.
_LUNG_NODE_BEFORE_RE = re.compile(r"(?:intrapulmonary|intraparenchymal|perifissural|subpleural)\s+$", _I)

# --------------------------------------------------------------------------------------------------
# Opacities and patterns
# --------------------------------------------------------------------------------------------------

#: Qualifiers that make an opacity/density a nodule whatever its size ("round 9 mm opacity").
_OPACITY_STRONG_RE = re.compile(
    r"nodular|\bround(?:ed)?\b|spicul|part[\s-]*solid|sub[\s-]*solid|semi[\s-]*solid"
    r"|(?<!non)(?<!non-)(?<!non )\bsolid\b|mass[\s-]*like|soft[\s-]+tissue",
    _I,
)
#: Words before an opacity that make it a diffuse or non-nodular finding.
_OPACITY_NOT_FOCAL_RE = re.compile(
    r"diffuse|widespread|mosaic|patchy|linear|band[\s-]*like|reticul|streaky|atelecta|scar|fibro|consolidat"
    r"|pneumon|infect|inflammat|airspace|air[\s-]+space|tree[\s-]*in[\s-]*bud|dependent|edema|oedema"
    r"|h(?:a)?emorrhag|crazy|bibasilar|bibasal|subsegmental|plate[\s-]*like|geographic|scattered|multifocal"
    r"|multiple|bilateral|extensive|peribronch\w*|perihilar|\bareas?\b|centrilobular",
    _I,
)
#: What an opacity is read as, anywhere in its segment, when that is no nodule ("..., likely atelectasis").
_OPACITY_CAUSE_RE = re.compile(
    r"atelecta|scar|fibro|consolidat|infect|inflam|pneumon|covid|viral|aspirat|hypoventil|crazy|mucus|mucoid"
    r"|edema|oedema|h(?:a)?emorrhag|tree[\s-]*in[\s-]*bud|bronchiolit",
    _I,
)
#: A nodular opacity that is part of a pattern ("nodular opacities in a tree-in-bud pattern").
_PATTERN_SEG_RE = re.compile(
    r"tree[\s-]*in[\s-]*bud|consolidat|infiltrat|\bpattern\b|interstiti|septal|bronchiolit", _I
)
_PATTERN_PRE_RE = re.compile(r"centrilobular|perilymphatic|tree[\s-]*in[\s-]*bud|reticul", _I)
_COORDINATION_RE = re.compile(r"\b(?:n?or|and)\b|,", _I)
_TREE_IN_BUD_END_RE = re.compile(r"tree[\s-]*in[\s-]*bud\s*$", _I)


def organ_before(pre_words: str) -> bool:
    """Whether the last words before a mention name another organ ("left adrenal", "renal cortical").

    A lung word after the organ keeps the mention in the lung ("pleural and pulmonary nodules").
    """
    hits = list(EXTRAPULMONARY_RE.finditer(pre_words))
    return bool(hits) and not LUNG_WORD_RE.search(pre_words, hits[-1].end())


def organ_leads(s: str, start: int) -> bool:
    """Whether an organ heads the clause of ``s`` that ends at the mention starting at ``start``.

    Reads at most :data:`LOOKBACK_CHARS` before the mention: the clause starts after the last ";", ":" or
    coordinating "and a/the ..." there. A lung word after the organ keeps the mention in the lung.
    """
    lo = max(0, start - LOOKBACK_CHARS)
    for m in CLAUSE_BREAK_RE.finditer(s, lo, start):
        lo = m.end()
    organ_end = -1
    for m in ORGAN_LEAD_RE.finditer(s, lo, start):
        organ_end = m.end()
    return organ_end >= 0 and not LUNG_WORD_RE.search(s, organ_end, start)


def pleural_nodule(pre: str) -> bool:
    """Whether the words right before a mention make it a nodule of the pleura ("multiple pleural nodules")."""
    return bool(_PLEURAL_PRE_RE.search(pre, max(0, len(pre) - 60)))


def non_lung_reading(post: str) -> bool:
    """Whether the text after a mention reads it as something outside the lung ("likely a lymph node")."""
    for m in _NON_LUNG_READING_RE.finditer(post):
        if not _LUNG_NODE_BEFORE_RE.search(post, max(0, m.start() - 30), m.start()):
            return True
    return False


def opacity_is_nodule(pre_words: str, seg: str, current_mm: list[float]) -> bool:
    """Whether an opacity/density/GGO mention is a nodule.

    Args:
        pre_words: the last words before the mention, in its clause.
        seg: the mention's segment of the sentence.
        current_mm: the largest dimension (mm) of each current size in the segment.

    Returns:
        True for a strongly qualified opacity ("nodular", "round", "solid"...) and for a focal one sized up to
        :data:`FOCAL_OPACITY_MAX_MM`; False when diffuse/multifocal words precede it, its segment reads it
        as infection, atelectasis, scarring..., or it is unsized or larger.
    """
    if _OPACITY_NOT_FOCAL_RE.search(pre_words) or _OPACITY_CAUSE_RE.search(seg):
        return False
    if _OPACITY_STRONG_RE.search(pre_words):
        return True
    return any(0 < v <= FOCAL_OPACITY_MAX_MM for v in current_mm)


def nodular_pattern(pre_words: str, post: str) -> bool:
    """Whether a "nodular opacity/area" mention is part of a pattern, not a nodule.

    Args:
        pre_words: the last words before the mention, in its clause.
        post: the text after the mention in its segment; only its first phrase counts (up to "or", "nor",
            "and" or a comma), so a coordinated "without nodular images nor infiltrates" stays a negation.
    """
    if _PATTERN_PRE_RE.search(pre_words):
        return True
    cut = _COORDINATION_RE.search(post)
    return bool(_PATTERN_SEG_RE.search(post, 0, cut.start() if cut else len(post)))


def tree_in_bud_before(pre: str) -> bool:
    """Whether "tree-in-bud" comes right before a mention ("tree-in-bud nodules": bronchiolitis)."""
    return bool(_TREE_IN_BUD_END_RE.search(pre, max(0, len(pre) - 40)))
