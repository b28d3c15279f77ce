"""Regex and lexicon tables of the rule-based chest CT report labeler (:mod:`lungvl_model.text.labeler`).

Every pattern is compiled once at import time. Patterns are applied to single sentences (after section
and sentence splitting), case-insensitively unless stated otherwise.
"""

from __future__ import annotations

import re

_I = re.IGNORECASE

# --------------------------------------------------------------------------------------------------
# Text normalisation, sections and sentences
# --------------------------------------------------------------------------------------------------

#: Character replacements applied before anything else.
CHAR_MAP: dict[str, str] = {
    "\u00d7": "x",  # multiplication sign
    "\u2013": "-",
    "\u2014": "-",
    "\u2010": "-",
    "\u2011": "-",
    "\u00a0": " ",
    "\u2122": "",  # trade mark
    "\u00ae": "",
    "\u2019": "'",
    "\u2022": "-",  # bullet
    "\t": " ",
}

#: Section header name (regex) -> canonical section.
SECTION_NAMES: dict[str, str] = {
    r"findings|report|results?|description|observations?": "findings",
    r"impressions?|conclusions?|summary|opinion|assessment|diagnosis|interpretation|comments?": "impression",
    r"(?:clinical\s+)?(?:history|indications?)|clinical\s+(?:information|details|notes?|question)"
    r"|reason\s+for\s+(?:the\s+)?(?:exam(?:ination)?|study|referral|request)": "history",
    r"technique|protocol|procedure|exam(?:ination)?|study|(?:radiation\s+)?dose": "technique",
    r"comparisons?|priors?|prior\s+stud(?:y|ies)|previous\s+stud(?:y|ies)": "comparison",
    r"recommendations?|follow[\s-]?up|plan|management": "recommendation",
}
_HEADER_ALT = "|".join(f"(?:{k})" for k in SECTION_NAMES)
#: A header at the start of a line ("FINDINGS:", "Impression", "## Findings").
HEADER_LINE_RE = re.compile(rf"^[ ]*(?:[#*-]+[ ]*)?(?P<name>{_HEADER_ALT})[ ]*(?::[ ]*|$)", _I | re.M)
#: A header inline after a sentence end ("... no effusion. IMPRESSION: ...").
HEADER_INLINE_RE = re.compile(rf"(?<=[.!?])[ ]+(?P<name>{_HEADER_ALT})[ ]*:[ ]*", _I)
SECTION_KEY_RES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"^(?:{k})$", _I), v) for k, v in SECTION_NAMES.items()
]
#: Sections never mined for findings (only what the study shows now counts).
SKIP_SECTIONS: frozenset[str] = frozenset({"history", "technique", "comparison"})

#: Sentence-internal sub-header, e.g. "Thyroid: ..." or "- Lungs: ...".
SUBHEADER_RE = re.compile(r"^\s*(?P<name>[A-Za-z][A-Za-z ,/&-]{0,40}?)\s*:\s*")
#: Sub-headers whose content is outside the lungs.
EXTRAPULMONARY_SUBHEADER_RE = re.compile(
    r"(?:(?:right|left|bilateral|both)\s+)?(?:"
    r"(?:(?:lower|base\s+of(?:\s+the)?)\s+)?neck|thyroid(?:\s+gland)?|hepatic(?:\s+dome)?|renal|peritoneum"
    r"|(?:visuali[sz]ed\s+|limited\s+|upper\s+)?abdomen"
    r"|liver|hepatobiliary|adrenals?(?:\s+glands?)?|kidneys?|spleen|pancreas|bones?|osseous(?:\s+structures)?"
    r"|skeleton|skeletal|musculoskeletal|msk|soft\s+tissues?|chest\s+wall|breasts?|axillae?|mediastinum"
    r"|(?:mediastinal\s+)?lymph\s+nodes?|nodes|heart|heart\s+and\s+(?:great\s+)?vessels|cardiovascular|vessels"
    r"|vasculature|esophagus|oesophagus|thoracic\s+inlet)",
    _I,
)

#: Tokens whose trailing period does not end a sentence.
ABBREVIATIONS: frozenset[str] = frozenset(
    {
        "approx", "appr", "e.g", "i.e", "eg", "ie", "vs", "cf", "dr", "mr", "mrs", "ms", "fig", "ser", "img",
        "im", "incl", "prev", "est", "resp", "st", "pt", "hx", "sx", "nb", "a.k.a", "etc.,",
    }
)  # fmt: skip
SENT_BOUNDARY_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
LIST_MARKER_RE = re.compile(r"^\s*(?:[-*]+|\d{1,2}[.)](?!\d))\s*")
#: A line that continues the previous one when the previous one ends with one of these words.
CONTINUATION_END_RE = re.compile(
    r"(?:\b(?:the|a|an|in|of|and|or|with|without|to|at|measuring|measures|by|x|from|is|are|for|on|within|"
    r"no|not|up|approximately|approx\.?|lobe|left|right)|\d|,)\s*$",
    _I,
)

# --------------------------------------------------------------------------------------------------
# Nodule anchors and context
# --------------------------------------------------------------------------------------------------

#: Head nouns of a nodule mention. ``opacity``/``density`` and ``GGO`` need a nodule qualifier or a focal size
#: (:func:`lungvl_model.text.labeler_context.opacity_is_nodule`); ``GGN`` is a ground-glass nodule. Translated
#: reports name a nodule a "nodular image"/"nodular formation"/"image of nodular aspect" (Spanish/Portuguese
#: "imagen/formación nodular", "imagen de aspecto nodular") or a "round focus" (German "Rundherd").
ANCHOR_RE = re.compile(
    r"\b(?P<nod>(?:micro)?nodules?)\b"
    r"|\b(?P<nodop>nodular\s+(?:ground[\s-]*glass\s+)?(?:opacit(?:y|ies)|densit(?:y|ies)|foc(?:us|i)|lesions?|areas?"
    r"|images?|formations?)|round(?:ed)?\s+foc(?:us|i)|images?\s+of\s+nodular\s+(?:aspect|appearance|morphology))\b"
    r"|\b(?P<mass>mass(?:es)?)\b(?![\s-]+(?:effect|index|like))"
    r"|\b(?P<lesion>lesions?)\b"
    r"|\b(?P<tumor>tumou?rs?)\b"
    r"|\b(?P<ggx>ggns?)\b"
    r"|\b(?P<ggo>ggos?)\b"
    r"|\b(?P<gran>granulomas?|granulomata)\b"
    r"|\b(?P<opac>opacit(?:y|ies)|densit(?:y|ies))\b",
    _I,
)
#: An opacity anchor that says what the nodule before it looks like ("nodule of ground glass density", "nodular
#: image in LSD of 5 mm, of soft tissue density"): the text before it ends with "of" and a few words...
ATTRIBUTE_OF_END_RE = re.compile(r"\bof\s+(?:[\w-]+\s+){0,3}$", _I)
#: ...and the text between the two anchors (at most :data:`ATTRIBUTE_OF_MAX_CHARS`) has no clause break.
ATTRIBUTE_OF_BLOCK_RE = re.compile(r"[;:.]\s|\b(?:and|n?or|while|whereas|plus|also|another|other|with)\b", _I)
ATTRIBUTE_OF_MAX_CHARS = 80
#: Generic guideline text ("Fleischner guidelines for incidental nodules").
GENERIC_CONTEXT_RE = re.compile(r"fleischner|guideline|society|criteria|management\s+of|recommendations?\s+for", _I)
#: Anchors that were removed/resected, or only in the history.
HISTORICAL_PRE_RE = re.compile(
    r"\b(?:status\s+post|s/p|history\s+of|h/o|hx\s+of|resected|excised|removed|post[\s-]*(?:resection|operative|"
    r"surgical)|(?:prior|previous)\s+(?:resection|excision|wedge|lobectomy))\b(?:\s+[\w.-]+){0,6}\s*$",
    _I,
)
HISTORICAL_POST_RE = re.compile(
    r"^\s*(?:[\w-]+\s+){0,3}?(?:was|were|has\s+been|have\s+been)\s+(?:resected|excised|removed)\b", _I
)
DEFINITE_RE = re.compile(r"^(?:the|this|that|these|those|said|aforementioned|index|dominant|known)$", _I)
INDEFINITE_RE = re.compile(r"^(?:a|an|one|two|three|several|multiple|few|numerous|some|scattered)$", _I)
ANOTHER_RE = re.compile(r"\b(?:another|additional|second|separate|other|further|third|smaller)\b", _I)
DETERMINER_SCAN_RE = re.compile(r"[A-Za-z]+|[,;:()]")
#: An interpretation of a finding already described ("..., likely a granuloma").
INTERPRETIVE_PRE_RE = re.compile(
    r"\b(?:represent\w*|consistent\s+with|compatible\s+with|suggestive\s+of|in\s+keeping\s+with|likely|probabl[ey]"
    r"|favou?r\w*|reflect\w*|suspicious\s+for|concerning\s+for|may\s+be|could\s+be|due\s+to|such\s+as)\s+"
    r"(?:an?\s+|the\s+)?(?:[\w-]+\s+){0,2}$",
    _I,
)
#: Sentence says the lungs are clear (implies no nodule when nothing else is said).
CLEAR_LUNGS_RE = re.compile(
    r"\b(?:lungs?|lung\s+(?:parenchyma|fields)|pulmonary\s+parenchyma)\s*(?:are|is|:|appear|remain)?\s*"
    r"(?:otherwise\s+)?(?:clear|unremarkable|normal)\b|\b(?:clear|normal)\s+lungs\b",
    _I,
)
CLEAR_EXCEPTION_RE = re.compile(
    r"\b(?:except|apart\s+from|aside\s+from|other\s+than|but|save\s+for|otherwise|elsewhere)\b", _I
)

# --------------------------------------------------------------------------------------------------
# Negation (NegEx-style)
# --------------------------------------------------------------------------------------------------

_SEEN = (
    r"(?:seen|visuali[sz]ed|identified|appreciated|demonstrated|evident|apparent|present|detected|visible|noted"
    r"|found|observed|evidenced|depicted|shown|individuali[sz]ed|recogni[sz]ed)"
)
_PRIOR = r"(?:prior|previous|preceding|earlier|last|comparison|baseline|old|\d{4}|\d{1,2}/\d{1,2}/\d{2,4})"

#: "no new or enlarging nodules": negates only new/growing ones, so nodule presence stays unknown.
PARTIAL_NEG_RE = re.compile(
    r"\b(?:no|without)\s+(?:(?:definite|significant|suspicious|discrete|pulmonary|focal|worrisome|concerning)\s+)*"
    r"(?:new|newly|enlarging|enlarged|growing|increasing|additional|other|further|more|non[\s-]?calcified"
    r"|interval(?:\s+development\s+of)?)\b"
    r"(?:\s*(?:,|or|and/or|and|/)\s*(?:new|enlarging|enlarged|growing|increasing|suspicious|additional"
    r"|worrisome|concerning|non[\s-]?calcified)\b)*",
    _I,
)
#: Phrases that contain a negation word but do not negate the finding (masked before triggers run).
PSEUDO_NEG_RES: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, _I)
    for p in (
        r"\bno\s+(?:significant\s+|appreciable\s+|definite\s+|interval\s+|substantial\s+|measurable\s+|real\s+)*"
        r"(?:change|growth|increase|enlargement|progression|difference)\b",
        r"\bnot\s+(?:significantly\s+|appreciably\s+|substantially\s+|markedly\s+|meaningfully\s+)?"
        r"(?:changed|increased|enlarged|enlarging|grown|growing|progressed|different)\b",
        rf"\bnot\s+(?:\w+\s+)?{_SEEN}\s+(?:on|in|at)\s+(?:the\s+)?{_PRIOR}\b",
        r"\bnot\s+previously\s+(?:\w+\s+)?(?:seen|visible|visuali[sz]ed|identified|present|evident|demonstrated"
        r"|described|noted|reported)\b",
        rf"\bnot\s+(?:\w+\s+)?{_SEEN}\s+previously\b",
        r"\bnot\s+only\b",
        r"\bno\s+doubt\b",
        r"\b(?:without|no|not|non)[\s-]+(?:(?:\w+)[\s-]+){0,2}?(?:calcifi\w*|spicul\w*|cavit\w*|fat\b|lobulat\w*"
        r"|solid\s+(?:component|portion|part|element)|enhancement)",
    )
)
#: Uncertainty ("a tiny nodule cannot be excluded").
UNCERTAIN_PRE_RE = re.compile(
    r"\b(?:possible|possibly|questionable|question\s+of|equivocal|\?)\s*(?:[\w-]+\s+){0,3}$", _I
)
UNCERTAIN_POST_RE = re.compile(
    r"\bcan\s*not\s+be\s+(?:excluded|ruled\s+out)\b|\bnot\s+(?:be\s+)?(?:excluded|ruled\s+out)\b|\bis\s+questioned\b",
    _I,
)
#: Negation triggers before the finding.
PRE_NEG_RE = re.compile(
    r"\bno\b(?!\s*\.\s*\d)|\bnot\b|\bwithout\b|\bnegative\s+for\b|\bfree\s+of\b|\babsence\s+of\b|\babsent\b"
    r"|\bneither\b|\bnor\b|\bnever\b|\bresolution\s+of\b|\bdisappearance\s+of\b|\bclear\s+of\b",
    _I,
)
#: Negation triggers after the finding.
POST_NEG_RE = re.compile(
    rf"\bnot\s+(?:\w+\s+)?{_SEEN}\b|\bno\s+longer\s+(?:\w+\s+)?{_SEEN}\b|\bno\s+longer\b"
    r"|\b(?:has|have)\s+(?:\w+\s+)?(?:resolved|disappeared|cleared)\b|\bresolved\b"
    r"|\b(?:is|are|was|were)\s+(?:now\s+)?(?:absent|gone)\b"
    rf"|\bcan\s*not\s+be\s+(?:\w+\s+)?{_SEEN}\b|\bruled\s+out\b",
    _I,
)
#: Listed-as-absent form: "Nodules: none.", "Emphysema: absent.", "Nodules - none." (possessive ``\s*+``: one
#: way to match a run of spaces, so a long run costs its length, not its cube)
NONE_LIST_RE = re.compile(
    r"(?::|\s-)\s*+(?:none|nil|negative|absent|no|0|zero|not\s++(?:seen|present|identified))\s*+"
    r"(?:(?:seen|identified)\s*+)?(?:[.;]\s*+)?$",
    _I,
)
#: Hard scope terminators.
HARD_TERM_RE = re.compile(
    r"[;:]|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bexcept\b|\baside\s+from\b|\bapart\s+from\b"
    r"|\bother\s+than\b|\bwith\s+the\s+exception\s+of\b|\bwhereas\b|\bwhile\b|\byet\b|\bbesides\b"
    r"|\bthere\s+(?:is|are|has\s+been|have\s+been)\b",
    _I,
)
#: Soft scope terminators: a comma/"and" followed by an affirmative-looking phrase.
SOFT_BREAK_RE = re.compile(
    r"(?:,|\band\b|\bas\s+well\s+as\b|\bplus\b)\s+(?=(?:a|an|one|two|three|four|several|multiple|few|numerous|some"
    r"|scattered|mild|moderate|severe|minimal|small|tiny|large|trace|extensive|stable|new|unchanged|again"
    r"|redemonstrat\w*|the|this|these|there|\d)\b)",
    _I,
)
#: Boundaries between two nodule mentions of one sentence.
SEGMENT_BREAK_RE = re.compile(
    r"[;:]|(?<!\d),|,(?!\d)|\band\b|\bor\b|\bas\s+well\s+as\b|\bwhile\b|\bwhereas\b|\bplus\b|\balso\b", _I
)
#: Text between two anchors that makes them one mention ("nodules or masses", "nodule/mass").
ANCHOR_JOIN_RE = re.compile(
    r"^[\s-]*$|^\s*(?:/|or|and/or|and)\s*(?:(?:pulmonary|suspicious|solid|focal|lung)\s+)?$", _I
)

# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------

#: A number; "1,2" is a decimal comma (European reports and their translations), never a list: a list has a
#: space after its comma, and a thousands separator has three digits after it.
NUM = r"(?:\d+(?:\.\d+|,\d{1,2}(?!\d))?|\.\d+)"
UNIT = r"(?:mm|millimet(?:er|re)s?|cm|centimet(?:er|re)s?)"
# Whitespace runs are matched possessively (``\s*+``): what follows them never starts with a space, so the
# matches are the same, but a long run of spaces after a number costs its length instead of its square.
_DASH = r"\s*+-?\s*+"
_SEP = r"\s*+(?:x|\*|by)\s*+"
_UNIT_END = r"(?![a-z0-9\u00b2\u00b3^])"
#: "12 x 8 mm", "1.2 x 0.8 cm", "6 x 4 x 5 mm", "12 mm x 8 mm", "6mm", "6-mm", "4 millimeter".
SIZE_RE = re.compile(
    rf"(?<![\w.])(?P<body>{NUM}(?:{_DASH}{UNIT})?(?:{_SEP}{NUM}(?:{_DASH}{UNIT})?){{0,2}}){_DASH}(?P<unit>{UNIT}){_UNIT_END}",
    _I,
)
#: "3-4 mm", "3 to 4 mm", and "from 4 to 7 mm" (growth).
RANGE_RE = re.compile(
    rf"(?<![\w.])(?P<a>{NUM})\s*+(?:{UNIT}\s*+)?(?:-|to)\s*+(?P<b>{NUM}){_DASH}(?P<unit>{UNIT}){_UNIT_END}", _I
)
NUM_UNIT_RE = re.compile(rf"(?P<num>{NUM})(?:{_DASH}(?P<unit>{UNIT}))?", _I)
SUBCENTIMETER_RE = re.compile(r"\bsub[\s-]?(?:centimet(?:er|re)|cm)\b", _I)
PRIOR_BEFORE_RE = re.compile(
    r"(?:\bfrom|\bpreviously|\bprior(?:ly)?|\bwas|\bwere|\bformerly|\boriginally|\bcompared\s+(?:to|with)|\bversus"
    r"|\bvs\.?|\bbaseline(?:\s+of)?|\bprevious\s+(?:measurement|size)(?:\s+of)?)\s*(?:measur(?:ing|ed)\s+)?"
    r"(?:at\s+|of\s+)?(?:approximately\s+|approx\.?\s+|about\s+)?\(?\s*$",
    _I,
)
PRIOR_AFTER_RE = re.compile(rf"^\s*\)?\s*(?:(?:on|in|at)\s+(?:the\s+)?{_PRIOR}|previously|before)\b", _I)
COMPONENT_AFTER_RE = re.compile(
    r"^\s*(?:[\w-]+\s+){0,2}?(?:solid|soft[\s-]*tissue|ground[\s-]*glass|cystic)\s+(?:component|portion|part|element"
    r"|focus|core|centre|center)s?\b|^\s*(?:component|portion|cavity|wall)",
    _I,
)
COMPONENT_BEFORE_RE = re.compile(
    r"(?:component|portion|part|core|element|cavity)\s*(?:measuring|of|which\s+measures|that\s+measures|measures"
    r"|is|now\s+measures)?\s*(?:approximately\s+|up\s+to\s+|about\s+)?$",
    _I,
)
NON_SIZE_AFTER_RE = re.compile(
    r"^\s*(?:slices?|sections?|images?|collimation|thick\b|thickness|intervals?|recon\w*|increments?|kernel|axial"
    r"|coronal|sagittal|mip|from\b|away\b|deep\s+to|(?:anterior|posterior|superior|inferior|lateral|medial|cephalad"
    r"|caudal|distal|proximal)\s+(?:to|from)\b|beneath|below|above"
    r"|of\s+the\b(?!\s+(?:right|left|upper|lower|middle|superior|inferior|lingula\w*|apical|apex)\b))",
    _I,
)
NON_SIZE_BEFORE_RE = re.compile(
    r"(?:thickness|collimation|interval|increment|slices?|sections?|reconstructions?|within|mgy|dlp|ctdi\w*)"
    r"\s*(?:of|:|=|at)?\s*$",
    _I,
)

# --------------------------------------------------------------------------------------------------
# Lobes
# --------------------------------------------------------------------------------------------------

_POS = r"(?:upper|middle|mid|lower|superior|inferior)"
LOBE_SIDE_RE = re.compile(
    rf"\b(?P<side>right|rt|r|left|lt|l)\.?[\s-]+(?P<pos>{_POS}(?:\s*(?:,|and|or|/|&)\s*{_POS})*)[\s-]+lob(?:e|es|ar)\b",
    _I,
)
#: "upper right lobe", "left inferior lobe" word orders of translated reports ("lóbulo superior derecho").
LOBE_POS_SIDE_RE = re.compile(rf"\b(?P<pos>{_POS})[\s-]+(?P<side>right|left)[\s-]+lob(?:e|es)\b", _I)
LOBE_OF_LUNG_RE = re.compile(rf"\b(?P<pos>{_POS})\s+lobe\s+of\s+the\s+(?P<side>right|left)\s+lung\b", _I)
LOBE_BOTH_RE = re.compile(r"\b(?:bilateral|both)\s+(?P<pos>upper|lower)\s+lobes?\b", _I)
LOBE_ABBR_RE = re.compile(r"\b(?P<abbr>RUL|RML|RLL|LUL|LLL)\b", _I)
#: Spanish/Portuguese/Italian/French lobe abbreviations kept by translations ("LSD" lóbulo superior derecho,
#: "LSE" lobo superior esquerdo, "LSG" lobe supérieur gauche...). Upper case only: "lid"/"lie" are words.
#: "LM" (middle lobe) is left out: in English it is the left main coronary artery.
ROMANCE_LOBE_RE = re.compile(r"\b(?P<abbr>LSD|LID|LSI|LII|LSE|LIE|LSG|LIG|LSS|LIS)\b")
ROMANCE_LOBE_CODE: dict[str, str] = {
    "LSD": "RUL", "LID": "RLL", "LSI": "LUL", "LSE": "LUL", "LSG": "LUL", "LSS": "LUL",
    "LII": "LLL", "LIE": "LLL", "LIG": "LLL", "LIS": "LLL",
}  # fmt: skip
LOBE_MIDDLE_RE = re.compile(r"\bmiddle[\s-]+lobe\b", _I)
LINGULA_RE = re.compile(r"\blingula(?:r)?\b", _I)
#: Lobe codes spelled out, as reports write them (and as rewritten sizes, lobes and types restate them).
LOBE_NAMES: dict[str, str] = {
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "LLL": "left lower lobe",
}
#: Lung-RADS v2022 category descriptors (``../shared/clinical``), as reports write them after the category
#: ("Lung-RADS 3: probably benign"; and as a restated category restates its descriptor).
LUNG_RADS_WORDS: dict[str, str] = {
    "1": "negative",
    "2": "benign appearance or behavior",
    "3": "probably benign",
    "4A": "suspicious",
    "4B": "very suspicious",
    "4X": "very suspicious, with additional features of malignancy",
}
LOBE_CODE: dict[tuple[str, str], str] = {
    ("R", "upper"): "RUL",
    ("R", "middle"): "RML",
    ("R", "mid"): "RML",
    ("R", "lower"): "RLL",
    ("L", "upper"): "LUL",
    ("L", "lower"): "LLL",
    ("R", "superior"): "RUL",
    ("R", "inferior"): "RLL",
    ("L", "superior"): "LUL",
    ("L", "inferior"): "LLL",
}
POS_SPLIT_RE = re.compile(_POS, _I)

# --------------------------------------------------------------------------------------------------
# Nodule attributes
# --------------------------------------------------------------------------------------------------

TYPE_PART_SOLID_RE = re.compile(
    r"\bpart(?:ly|ially)?[\s-]*solid\b|\bsemi[\s-]*solid\b|\bmixed[\s-]+(?:attenuation|density|solid\w*)\b"
    r"|\b(?:sub[\s-]*solid|ground[\s-]*glass|non[\s-]*solid|gg[on])\b[^.;]{0,40}?\bwith\s+(?:an?\s+)?"
    r"(?:(?:small|central|eccentric|internal|\d+(?:\.\d+)?\s*-?\s*mm)\s+)*solid\s+(?:component|portion|part|core"
    r"|element|focus|center|centre)"
    r"|\bsolid\s+and\s+ground[\s-]*glass\s+components?\b|\bground[\s-]*glass\s+and\s+solid\s+components?\b",
    _I,
)
TYPE_NON_SOLID_RE = re.compile(r"\b(?:pure\s+)?ground[\s-]*glass\b|\bgg[on]s?\b|\bnon[\s-]?solid\b", _I)
TYPE_SOLID_RE = re.compile(
    r"\bsolid\b|\bsoft[\s-]+tissue\s+(?:attenuation|density)\b|\bsoft[\s-]+tissue(?=\s+(?:nodule|mass|lesion))",
    _I,
)
MARGIN_SPICULATED_RE = re.compile(r"\bspicul\w*", _I)
MARGIN_LOBULATED_RE = re.compile(r"\blobulat\w*|\blobular\s+(?:contour|margin)s?\b", _I)
MARGIN_SMOOTH_RE = re.compile(
    r"\bsmooth(?:ly)?\b|\bwell[\s-]*(?:circumscribed|defined|marginated|demarcated|delineated)\b|\bcircumscribed\b"
    r"|\bsharply\s+(?:marginated|defined|demarcated|circumscribed|delineated)\b|\bsharp\s+margins?\b",
    _I,
)
#: Local negation right before an attribute word ("without spiculation", "non-spiculated").
ATTR_NEG_BEFORE_RE = re.compile(
    r"\b(?:no|not|without|non|absence\s+of|lack(?:s|ing)?(?:\s+of)?)\b[\s-]*(?:\w+\s+){0,2}$", _I
)
NO_SOLID_COMPONENT_RE = re.compile(
    r"\b(?:no|without|lacks?|lacking)\s+(?:(?:\w+)\s+){0,2}?solid\s+(?:component|portion|part|element)s?\b",
    _I,
)
CALC_NEG_RE = re.compile(
    r"\bnon[\s-]*calcified\b|\buncalcified\b|\b(?:without|no|not)\s+(?:\w+\s+){0,2}?(?:calcified|calcifications?)\b"
    r"|\babsence\s+of\s+(?:\w+\s+)?calcification",
    _I,
)
CALC_POS_RE = re.compile(r"\bcalcif(?:ied|ication|ications|ic)\b|\bpopcorn\b", _I)
CALC_OTHER_BEFORE_RE = re.compile(
    r"(?:coronary|vascular|aortic|valv\w*|arterial|atherosclerotic|mitral|pleural|nodal|costal|cartilage|lad|plaque)"
    r"[\s-]+(?:\w+\s+)?(?:artery\s+)?$",
    _I,
)
#: Applied with ``.match(text, pos)`` right after the calcification word (no ``^``: the match starts at pos).
CALC_OTHER_AFTER_RE = re.compile(r"\s*(?:\w+\s+)?(?:lymph|nodes?\b|nodal|plaques?|atheroscl|aort|coronar|pleura)", _I)

# --------------------------------------------------------------------------------------------------
# Comparison, emphysema, Lung-RADS
# --------------------------------------------------------------------------------------------------

COMP_STABLE_RE = re.compile(
    r"\bstable\b|\bstability\b|\bunchanged\b|\bunaltered\b|\bstatic\b"
    r"|\bno\s+(?:significant\s+|appreciable\s+|definite\s+|interval\s+|substantial\s+|measurable\s+|real\s+)*"
    r"(?:change|growth|increase|enlargement|progression)\b"
    r"|\bnot\s+(?:significantly\s+|appreciably\s+|substantially\s+|markedly\s+|meaningfully\s+)?(?:changed|increased"
    r"|enlarged|enlarging|grown|growing|progressed)\b"
    r"|\bsimilar\s+(?:in\s+(?:size|appearance)|size|appearance|to\s+(?:the\s+)?(?:prior|previous))\b"
    r"|\bwithout\s+(?:significant\s+|interval\s+|appreciable\s+)*(?:change|growth|enlargement)\b"
    r"|\b(?:not|without)\s+meeting\s+(?:the\s+)?(?:[\w-]+\s+){0,2}growth\s+criteri(?:a|on)\b"
    r"|\bdoes\s+not\s+meet\s+(?:the\s+)?(?:[\w-]+\s+){0,2}growth\s+criteri(?:a|on)\b",
    _I,
)
COMP_GROWING_RE = re.compile(
    r"\bincreas(?:ed|ing|e|es)\s+in\s+(?:size|diameter|dimension|volume)\b|\benlarg(?:ing|ement)\b|\b(?:has|have)\s+enlarged\b"
    r"|\binterval\s+growth\b|\bgrown\b|\bgrowing\b|\bgrowth\b|\blarger\s+(?:than|compared|when|since|relative)\b"
    r"|\bprogress(?:ed|ion|ing|ively)\b|\bincreas(?:ed|ing)\s+(?:from|to)\b|\binterval\s+increase\b",
    _I,
)
COMP_NEW_RE = re.compile(
    rf"\bnew(?:ly)?\b(?![\s-]+york)|\binterval\s+(?:development|appearance)\b"
    rf"|\bnot\s+(?:\w+\s+)?{_SEEN}\s+(?:on|in|at)\s+(?:the\s+)?{_PRIOR}\b"
    r"|\bnot\s+previously\s+(?:\w+\s+)?(?:seen|visible|visuali[sz]ed|identified|present|evident|demonstrated"
    r"|described|noted|reported)\b"
    rf"|\bnot\s+(?:\w+\s+)?{_SEEN}\s+previously\b|\b(?:has|have)\s+(?:since\s+)?(?:developed|appeared)\b"
    r"|\bdeveloped\s+since\b",
    _I,
)
COMP_DECREASED_RE = re.compile(
    r"\bdecreas(?:ed|ing|e)\b|\bsmaller\b|\bregress(?:ed|ion|ing)\b|\bshr(?:unk|ank|inking)\b|\bresolving\b",
    _I,
)
#: An anchorless comparison sentence counts only when it refers back to something...
COMP_REFERENT_RE = re.compile(
    r"^\s*(?:it|this|these|they|both|all|each)\b|\b(?:appearances?|findings?|exam(?:ination)?|study|lungs?"
    r"|lung\s+parenchyma|pulmonary\s+findings|the\s+remainder)\b",
    _I,
)
#: ...and mentions no other finding.
COMP_OTHER_FINDING_RE = re.compile(
    r"emphysem|effusion|lymph|node|adenopathy|heart|cardi|aort|thyroid|liver|hepat|adrenal|renal|kidney|bone"
    r"|osseous|fractur|consolidat|atelecta|scar|fibros|bronchiect|pneumothorax|hernia|coronary|calcif|spine"
    r"|vertebra|pleura|thicken|airway|bronch|vessel|arter",
    _I,
)
EMPHYSEMA_RE = re.compile(r"\bemphysem(?:a|atous)\b", _I)
LUNG_RADS_RE = re.compile(
    r"\blung[\s-]*rads\b\s*(?:\(tm\)\s*)?[,:]?\s*(?:(?:v|version)?\s*\.?\s*(?:20\d\d|1\.[01])\b\s*)?[,:]?\s*"
    r"(?:assessment\s*[:=-]?\s*)?(?:category|cat\.?|score|class)?\s*[:=#-]?\s*(?P<cat>[0-4])(?P<sub>[abx])?(?P<s>\s*/?\s*s\b)?"
    r"(?!\d|\.\d)",
    _I,
)
CATEGORY_RE = re.compile(r"\bcategory\s*[:=#-]?\s*(?P<cat>[0-4])(?P<sub>[abx])?(?P<s>\s*/?\s*s\b)?(?!\d|\.\d)", _I)
OTHER_RADS_RE = re.compile(r"\b(?:bi|li|ti|pi|o|c|ni)[\s-]*rads\b", _I)
#: Applied with ``.match(text, pos)`` right after a Lung-RADS category ("4A to 4B").
LUNG_RADS_UPGRADE_RE = re.compile(
    r"\s*(?:to|->|>|now)\s*(?:lung[\s-]*rads\s*)?(?:category\s*)?(?P<cat>[0-4])(?P<sub>[abx])?(?P<s>\s*/?\s*s\b)?"
    r"(?!\d|\.\d)",
    _I,
)
LUNG_RADS_PRIOR_RE = re.compile(
    r"(?:\bprior|\bprevious(?:ly)?|\bwas|\bwere|\bfrom|\bhad\s+been|\bbaseline)\s*[:(]?\s*$", _I
)
S_MODIFIER_RE = re.compile(r"\bs[\s-]+modifier\b", _I)
