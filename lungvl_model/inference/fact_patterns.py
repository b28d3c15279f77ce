"""Patterns for the report facts the labeler does not read: patient, technique, prior, counts.

:mod:`lungvl_model.text` reads nodules, sizes, lobes, types, calcification, negation and Lung-RADS. The fact
check (:mod:`lungvl_model.inference.fact_check`) also needs what a generated report says about the patient
("62-year-old woman", "30 pack-years", "former smoker"), the technique ("1.25 mm slices", "soft tissue
kernel", "without IV contrast", "low-dose", "CTDIvol 2.1 mGy", "120 kVp", "MIP reconstructions"), a comparison
with a prior ("compared with the prior CT of 2023-04-01", "no new nodules", "no prior for comparison") and
nodule counts ("three pulmonary nodules"). Each ``*_facts`` function returns :class:`Stated` facts of one
sentence.

Linear time: every repetition is over one character class or bounded (``{0,3}``), never an unbounded
quantifier inside another one, and each search starts at a literal word, so a sentence costs its length
(reports up to the labeler's ``MAX_REPORT_CHARS``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_I = re.IGNORECASE

__all__ = [
    "Stated",
    "StatedDate",
    "apex_lobe",
    "count_facts",
    "date_facts",
    "is_future",
    "kernel_family",
    "lung_rads_descriptor_facts",
    "negation_qualifier",
    "ordinal_reference",
    "otherwise_clear",
    "patient_facts",
    "prior_facts",
    "stated_subsolid",
    "technique_facts",
]


@dataclass(frozen=True)
class Stated:
    """A fact a sentence states: its kind, the value as read, and where.

    Attributes:
        fact: ``age`` | ``sex`` | ``pack_years`` | ``smoking`` | ``slice_thickness`` | ``collimation`` |
            ``kernel`` | ``contrast`` | ``low_dose`` | ``ctdi`` | ``dose`` | ``kvp`` | ``reconstruction`` |
            ``prior`` | ``nodule_count``.
        value: the value (int years, ``"F"``/``"M"``, float mm/mGy/kV, bool, a kernel name, ``"thin"``, a
            smoking status ``never``/``former``/``current``/``ever``, a count ``(n, exact)``...).
        span: ``(start, end)`` of the evidence in the sentence.
    """

    fact: str
    value: Any
    span: tuple[int, int]


_NUM = r"\d{1,3}(?:[.,]\d{1,3})?"


def _num(text: str) -> float:
    return float(text.replace(",", "."))


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    chars = list(text)
    for a, b in spans:
        chars[a:b] = " " * (b - a)
    return "".join(chars)


# ------------------------------------------------------------------------------------------------
# Patient
# ------------------------------------------------------------------------------------------------

AGE_RES: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?<![\w.])(?P<n>\d{1,3})[\s-]{0,3}(?:years?|yrs?|y)[\s-]{0,3}(?:old|of[\s-]age)\b", _I),
    re.compile(r"(?<![\w.])(?P<n>\d{1,3})[\s-]{0,2}(?:yo|y/o|y\.o\.?|yoa)(?![\w/])", _I),
    re.compile(r"\b(?:aged?|age\s{0,2}[:=])\s{0,3}(?P<n>\d{1,3})\b(?![\s-]{0,3}(?:mm|cm|months?|days?|weeks?|%))", _I),
)
SEX_RE = re.compile(
    r"\b(?:(?P<m>male|man|gentleman|boy|mr)|(?P<f>female|woman|lady|girl|mrs))\b"
    r"|\b(?:(?P<mp>he|him|his)|(?P<fp>she|hers?))\b",
    _I,
)
#: Telegraphic sex letters after an age: "72 yo F", "62-year-old M", "58M" (upper case only).
SEX_LETTER_RE = re.compile(
    r"(?<![\w.])\d{1,3}(?:[\s-]{0,2}(?i:yo|y/o|y\.o\.?|years?[\s-]old)[\s-]{0,2}|(?=[MF]))(?P<s>[MF])\b"
)
PACK_YEARS_RE = re.compile(
    rf"(?<![\w.])(?P<n>{_NUM})\+?[\s-]{{0,3}}(?:pack[\s-]{{0,2}}(?:years?|yrs?|yr)|py|pk[\s-]?yrs?)\b", _I
)
_SMOKE = r"smok(?:er|ers|ing|ed|es|e)?"
NEVER_SMOKER_RE = re.compile(
    rf"\b(?:never|non|lifelong\s+non)[\s-]{{0,2}}{_SMOKE}\b|\bnever\s+smoked\b|\bno\s+(?:history\s+of\s+)?(?:smoking|"
    r"tobacco)\b|\bdenies\s+(?:smoking|tobacco)\b",
    _I,
)
FORMER_SMOKER_RE = re.compile(
    rf"\b(?:former|ex|previous|past|reformed)[\s-]{{0,2}}{_SMOKE}\b|\b(?:quit|stopped|ceased)\s+smoking\b", _I
)
CURRENT_SMOKER_RE = re.compile(
    rf"\b(?:current|active|ongoing)[\s-]{{0,2}}{_SMOKE}\b|\bcurrently\s+smok\w{{0,3}}|\bsmokes\b", _I
)
EITHER_SMOKER_RE = re.compile(rf"\b(?:current\s+or\s+former|former\s+or\s+current)\s+{_SMOKE}\b", _I)
EVER_SMOKER_RE = re.compile(
    r"\bsmoking\s+history\b|\bhistory\s+of\s+(?:tobacco\s+use|smoking)\b|\bsmokers?\b|\btobacco\s+use\b"
    r"|\bpack[\s-]{0,2}years?\b",
    _I,
)


def patient_facts(s: str) -> list[Stated]:
    """Age (years), sex (``F``/``M``), pack-years and smoking status stated in sentence ``s``."""
    out: list[Stated] = []
    for rx in AGE_RES:
        out += [Stated("age", int(m.group("n")), m.span()) for m in rx.finditer(s)]
    for m in SEX_RE.finditer(s):
        out.append(Stated("sex", "M" if (m.group("m") or m.group("mp")) else "F", m.span()))
    out += [Stated("sex", m.group("s"), m.span("s")) for m in SEX_LETTER_RE.finditer(s)]
    out += [Stated("pack_years", _num(m.group("n")), m.span()) for m in PACK_YEARS_RE.finditer(s)]
    never = [m.span() for m in NEVER_SMOKER_RE.finditer(s)]
    either = [m.span() for m in EITHER_SMOKER_RE.finditer(s)]
    rest = _mask(s, never + either)
    former = [m.span() for m in FORMER_SMOKER_RE.finditer(rest)]
    current = [m.span() for m in CURRENT_SMOKER_RE.finditer(rest)]
    ever = [m.span() for m in EVER_SMOKER_RE.finditer(_mask(rest, former + current))]
    if never:
        out.append(Stated("smoking", "never", never[0]))
    elif either or (former and current):
        out.append(Stated("smoking", "ever", (either or former)[0]))  # "current or former smoker"
    elif former or current:
        out.append(Stated("smoking", "former" if former else "current", (former or current)[0]))
    elif ever:
        out.append(Stated("smoking", "ever", ever[0]))
    return _dedupe(out)


def _dedupe(facts: list[Stated]) -> list[Stated]:
    seen: set[tuple[str, Any]] = set()
    out = []
    for f in sorted(facts, key=lambda f: f.span):
        if (f.fact, f.value) not in seen:
            seen.add((f.fact, f.value))
            out.append(f)
    return out


# ------------------------------------------------------------------------------------------------
# Technique
# ------------------------------------------------------------------------------------------------

_THICK_NUM = r"(?P<n>\d{1,2}(?:[.,]\d{1,3})?)"
#: Words that may stand between a slice thickness and its noun ("1.25 mm soft-kernel axial reconstructions").
_TECH_WORD = (
    r"(?:soft|sharp|lung|bone|standard|smooth|thin|axial|coronal|sagittal|contiguous|overlapping|tissue"
    r"|high|resolution|kernel|algorithm|window|volumetric|helical)"
)
THICKNESS_RES: tuple[re.Pattern[str], ...] = (
    re.compile(
        rf"(?<![\w.]){_THICK_NUM}[\s-]{{0,2}}mm[\s-]{{0,2}}(?:thick[\s-]{{0,2}})?(?:{_TECH_WORD}[\s-]{{1,2}}){{0,3}}"
        r"(?:slices?|sections?|images|cuts?|reconstructions?|reformat\w{0,6}|thickness|intervals?|increments?)\b",
        _I,
    ),
    re.compile(
        r"\b(?:slice|section|image)[\s-]{0,2}(?:thickness|width)\s{0,3}(?:of|:|=|was|is)?\s{0,3}"
        rf"{_THICK_NUM}[\s-]{{0,2}}mm\b",
        _I,
    ),
    re.compile(
        rf"\b(?:reconstructed|reformatted|reconstructions?)\s{{1,3}}(?:at|to|of|with)\s{{1,3}}{_THICK_NUM}[\s-]{{0,2}}mm\b",
        _I,
    ),
)
THIN_RE = re.compile(r"\bthin[\s-]{0,2}(?:sections?|slices?|cuts?)\b|\bhigh[\s-]resolution\s+ct\b|\bhrct\b", _I)
COLLIMATION_RE = re.compile(
    rf"(?<![\w.]){_THICK_NUM}[\s-]{{0,2}}mm\s{{0,2}}(?:detector\s{{1,2}})?collimation\b"
    r"|\bcollimation\s{0,3}(?:of|:|=)?\s{0,3}(?:\d{1,3}\s{0,2}x\s{0,2})?\d{1,2}(?:\.\d{1,3})?\s{0,2}mm\b",
    _I,
)
KERNEL_BEFORE_RE = re.compile(
    r"\b(?P<name>(?:(?:soft|high|ultra|very)[\s-]{1,2})?[A-Za-z][\w]{0,15})[\s-]{1,2}(?:reconstruction[\s-]{1,2}"
    r"|recon[\s-]{1,2})?(?:kernel|algorithm|filter)\b",
    _I,
)
KERNEL_AFTER_RE = re.compile(
    r"\b(?i:kernel|filter)\s{0,3}(?:[:=]|of)?\s{0,3}(?P<name>[A-Z][A-Za-z]{0,3}\d{1,3}[a-z]?)\b"
)
_NOT_KERNEL = frozenset(
    {
        "a", "an", "the", "reconstruction", "recon", "same", "different", "convolution", "this", "that", "with",
        "iterative", "dedicated", "using", "and", "or", "of", "by", "at", "kernel",
    }
)  # fmt: skip
NONCONTRAST_RE = re.compile(
    r"\b(?:without|w/o|no)\s{1,3}(?:the\s{1,2})?(?:(?:use|administration)\s{1,2}of\s{1,2})?"
    r"(?:(?:intravenous|iv|i\.v\.|iodinated|oral)\s{1,3}){0,2}contrast\b|\bnon[\s-]{0,2}contrast(?:ed)?\b"
    r"|\b(?:un|non[\s-]?)enhanced\b",
    _I,
)
CONTRAST_RE = re.compile(
    r"\b(?:with|w/|following|after)\s{1,3}(?:the\s{1,2})?(?:(?:use|administration)\s{1,2}of\s{1,2})?"
    r"(?:(?:intravenous|iv|i\.v\.|iodinated)\s{1,3}){0,2}contrast\b|\bcontrast[\s-]{0,2}enhanced\b"
    r"|\bpost[\s-]{0,2}contrast\b|\b(?:intravenous|iv)\s+contrast\s+(?:was|were)\s+(?:given|administered|injected)\b",
    _I,
)
WITH_AND_WITHOUT_RE = re.compile(
    r"\bwith\s{1,3}and\s{1,3}without\s{1,3}(?:(?:intravenous|iv|i\.v\.|iodinated)\s{1,3}){0,2}contrast\b", _I
)
LOW_DOSE_RE = re.compile(r"\b(?:ultra[\s-]{0,2})?low[\s-]{0,2}(?:radiation[\s-]{0,2})?dose\b|\bu?ldct\b", _I)
STANDARD_DOSE_RE = re.compile(
    r"\b(?:standard|full|routine|diagnostic|normal)[\s-]{0,2}(?:radiation[\s-]{0,2})?dose\b", _I
)
CTDI_RE = re.compile(
    r"\bctdi\s{0,2}[_(]?\s{0,2}vol\)?\s{0,3}(?:[:=]|of|was|is)?\s{0,3}(?P<n>\d{1,3}(?:[.,]\d{1,3})?)\s{0,2}mgy\b", _I
)
DOSE_OTHER_RE = re.compile(
    r"\bdlp\s{0,3}(?:[:=]|of|was|is)?\s{0,3}\d{1,5}(?:[.,]\d{1,3})?|\b\d{1,5}(?:[.,]\d{1,3})?\s{0,2}(?:mgy[\s·*.-]{0,2}cm"
    r"|msv|mas|ma)\b",
    _I,
)
KVP_RE = re.compile(r"(?<![\w.])(?P<n>\d{2,3})\s{0,2}kvp?\b", _I)
RECON_RE = re.compile(
    r"\b(?:multi[\s-]?planar|coronal\s+and\s+sagittal|sagittal\s+and\s+coronal|coronal|sagittal)\s{1,2}"
    r"(?:reformat\w{0,6}|reconstruct\w{0,6})|\bmpr\b|\bmips?\b|\bmaximum[\s-]intensity[\s-]projections?\b"
    r"|\biterative(?:ly)?\s+reconstruct\w{0,4}|\biterative\s+algorithm\b|\b(?:asir(?:-v)?|admire|safire|idose\d?"
    r"|aidr(?:\s?3d)?|veo)\b|\bdeep[\s-]learning\s+(?:image\s+)?reconstruction\b",
    _I,
)

#: ConvolutionKernel names whose family is known (lower case, without spaces, dashes or underscores).
KERNEL_WORDS: dict[str, str] = {
    "soft": "soft", "softtissue": "soft", "standard": "soft", "std": "soft", "smooth": "soft", "body": "soft",
    "mediastinal": "soft", "mediastinum": "soft", "abdomen": "soft",
    "lung": "sharp", "sharp": "sharp", "bone": "sharp", "boneplus": "sharp", "edge": "sharp", "highresolution":
    "sharp", "highfrequency": "sharp", "ultrasharp": "sharp", "veryshar": "sharp", "hr": "sharp",
    "a": "soft", "b": "soft", "c": "soft", "d": "sharp", "e": "sharp", "l": "sharp", "ya": "sharp", "yb": "sharp",
    "yc": "sharp", "yd": "sharp",
}  # fmt: skip
_SIEMENS_RE = re.compile(r"^(?:b|br|bl|bf|bv|i|hr|qr|ir|h)(?P<n>\d{2})[a-z]?\d?$")
_CANON_RE = re.compile(r"^fc(?P<n>\d{1,2})$")


def kernel_family(name: str) -> str | None:
    """``soft``/``sharp`` family of a kernel name (DICOM value or report wording), None when unknown.

    Siemens ``B30f``/``Br36``/``Hr60``: two digits < 50 soft, >= 50 sharp. Canon/Toshiba ``FC13``: < 30 soft
    (body), >= 30 sharp (bone, lung). Philips ``A``-``C`` soft, ``D``/``E``/``L``/``YA``-``YD`` sharp. GE words
    ``STANDARD``/``SOFT`` soft, ``LUNG``/``BONE``/``EDGE`` sharp; names containing lung/bone/sharp or soft/smooth.
    """
    key = re.sub(r"[\s_-]", "", name.lower())
    if key in KERNEL_WORDS:
        return KERNEL_WORDS[key]
    m = _SIEMENS_RE.match(key)
    if m:
        return "sharp" if int(m.group("n")) >= 50 else "soft"
    m = _CANON_RE.match(key)
    if m:
        return "sharp" if int(m.group("n")) >= 30 else "soft"
    if any(w in key for w in ("lung", "bone", "sharp", "edge")):
        return "sharp"
    if any(w in key for w in ("soft", "smooth", "standard")):
        return "soft"
    return None


def technique_facts(s: str) -> list[Stated]:
    """Slice thickness, collimation, kernel, contrast, dose, kVp and reconstruction facts of sentence ``s``."""
    out: list[Stated] = []
    coll = [m.span() for m in COLLIMATION_RE.finditer(s)]
    out += [Stated("collimation", m.group(), m.span()) for m in COLLIMATION_RE.finditer(s)]
    rest = _mask(s, coll)
    for rx in THICKNESS_RES:
        out += [Stated("slice_thickness", _num(m.group("n")), m.span()) for m in rx.finditer(rest)]
    out += [Stated("slice_thickness", "thin", m.span()) for m in THIN_RE.finditer(rest)]
    for rx in (KERNEL_BEFORE_RE, KERNEL_AFTER_RE):
        for m in rx.finditer(s):
            name = m.group("name").strip()
            if name.lower() in _NOT_KERNEL:
                continue
            if name.lower().startswith("iterative"):
                continue  # "iterative algorithm" is the reconstruction method (RECON_RE)
            out.append(Stated("kernel", name, m.span()))
    both = [m.span() for m in WITH_AND_WITHOUT_RE.finditer(s)]
    out += [Stated("contrast", True, sp) for sp in both]
    non = [m.span() for m in NONCONTRAST_RE.finditer(_mask(s, both))]
    out += [Stated("contrast", False, sp) for sp in non]
    out += [Stated("contrast", True, m.span()) for m in CONTRAST_RE.finditer(_mask(s, both + non))]
    out += [Stated("low_dose", True, m.span()) for m in LOW_DOSE_RE.finditer(s)]
    out += [Stated("low_dose", False, m.span()) for m in STANDARD_DOSE_RE.finditer(s)]
    ctdi = [m.span() for m in CTDI_RE.finditer(s)]
    out += [Stated("ctdi", _num(m.group("n")), m.span()) for m in CTDI_RE.finditer(s)]
    out += [Stated("dose", m.group(), m.span()) for m in DOSE_OTHER_RE.finditer(_mask(s, ctdi))]
    out += [Stated("kvp", float(m.group("n")), m.span()) for m in KVP_RE.finditer(s)]
    out += [Stated("reconstruction", m.group(), m.span()) for m in RECON_RE.finditer(s)]
    return _dedupe(out)


# ------------------------------------------------------------------------------------------------
# Prior comparison and dates
# ------------------------------------------------------------------------------------------------

NO_PRIOR_RE = re.compile(
    r"\bno\s{1,3}(?:prior|previous|old|outside|comparison)\b(?:[\s-]{1,3}(?:chest|ct|cts|imaging|studies|study|exams?"
    r"|examinations?|scans?|images|available|for|comparison)\b){0,4}|\bcomparison\s{0,2}:\s{0,2}(?:none|n/?a|nil)\b"
    r"|\bnone\s+available\b|\bbaseline\s+(?:screening\s+)?(?:study|exam|examination|ct|ldct|scan)\b"
    r"|\bfirst\s+(?:screening\s+)?(?:study|exam|examination|ct|scan)\b",
    _I,
)
PRIOR_REF_RE = re.compile(
    r"\b(?:prior|previous|preceding|earlier|last|most\s+recent|old|outside|comparison)\s{1,3}(?:chest\s{1,3}|ct\s{1,3}"
    r"|screening\s{1,3}|low[\s-]dose\s{1,3})?(?:ct|cts|study|studies|exam|exams|examination|examinations|scans?|imaging"
    r"|ldct|images)\b|\bcompared\s{1,3}(?:to|with)\b|\bin\s+comparison\s+(?:to|with)\b|\bsince\s{1,3}(?:the\s{1,3})?"
    r"(?:prior|previous|last|baseline)\b|\binterval\s{1,3}(?:change|growth|increase|development|appearance|decrease"
    r"|resolution|enlargement)\b|\bno\s{1,3}(?:new|enlarging|growing|interval)\b|\bpreviously\b|\bredemonstrat\w{0,6}"
    r"|\bagain\s+(?:seen|noted|demonstrated|identified|visualized)\b|\bon\s+the\s+prior\b",
    _I,
)
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MON = (
    r"(?P<mon>jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sept?(?:ember)?"
    r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_YEAR = r"(?P<y>(?:19|20)\d{2})"
DATE_RES: tuple[re.Pattern[str], ...] = (
    re.compile(rf"\b{_YEAR}-(?P<m>\d{{1,2}})-(?P<d>\d{{1,2}})\b"),
    re.compile(r"\b(?P<a>\d{1,2})[/.](?P<b>\d{1,2})[/.](?P<y>(?:19|20)\d{2}|\d{2})\b"),
    re.compile(rf"\b{_MON}\.?\s{{1,2}}(?P<d>\d{{1,2}})(?:st|nd|rd|th)?,?\s{{1,2}}{_YEAR}\b", _I),
    re.compile(rf"\b(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\s{{1,2}}{_MON}\.?,?\s{{1,2}}{_YEAR}\b", _I),
    re.compile(rf"\b{_MON}\.?,?\s{{1,2}}{_YEAR}\b", _I),
    re.compile(rf"\b(?:since|from|in|of|dated|on)\s{{1,2}}{_YEAR}\b(?![-/.]\d)", _I),
)


@dataclass(frozen=True)
class StatedDate:
    """A date as written: year, and month/day when given; ``alternatives`` for day/month-ambiguous forms."""

    alternatives: tuple[tuple[int, int | None, int | None], ...]
    span: tuple[int, int]

    def matches(self, y: int, m: int, d: int) -> bool:
        """Whether a full date ``(y, m, d)`` agrees with every part written of some alternative."""
        return any(ay == y and (am is None or am == m) and (ad is None or ad == d) for ay, am, ad in self.alternatives)


def date_facts(s: str) -> list[StatedDate]:
    """Dates written in sentence ``s`` (ISO, ``m/d/y`` or ``d/m/y``, month names, ``since 2019``)."""
    out: list[StatedDate] = []
    used: list[tuple[int, int]] = []
    for k, rx in enumerate(DATE_RES):
        for m in rx.finditer(_mask(s, used)):
            g = m.groupdict()
            y = int(g["y"]) if len(g["y"]) == 4 else 2000 + int(g["y"])
            mon = _MONTHS.index(g["mon"][:3].lower()) + 1 if g.get("mon") else None
            alts: list[tuple[int, int | None, int | None]]
            if k == 0:
                alts = [(y, int(g["m"]), int(g["d"]))]
            elif k == 1:
                a, b = int(g["a"]), int(g["b"])
                alts = [(y, a, b), (y, b, a)]
            else:
                alts = [(y, mon, int(g["d"]) if g.get("d") else None)]
            alts = [t for t in alts if (t[1] is None or 1 <= t[1] <= 12) and (t[2] is None or 1 <= t[2] <= 31)]
            if alts:
                out.append(StatedDate(tuple(alts), m.span()))
                used.append(m.span())
    return sorted(out, key=lambda d: d.span)


def prior_facts(s: str, section: str = "findings") -> list[Stated]:
    """Statements about a prior study: ``prior`` True (a comparison is made) or False (no prior exists).

    Args:
        s: the sentence.
        section: its report section; in a ``comparison`` section any content but "none" names a prior.
    """
    if section == "comparison":
        if re.match(r"^\s*(?:none|n/?a|nil|no\b|not\s+available)", s, _I):
            return [Stated("prior", False, (0, len(s)))]
    no = [m.span() for m in NO_PRIOR_RE.finditer(s)]
    out = [Stated("prior", False, sp) for sp in no]
    out += [Stated("prior", True, m.span()) for m in PRIOR_REF_RE.finditer(_mask(s, no))]
    if section == "comparison" and not out and s.strip(" .:"):
        out.append(Stated("prior", True, (0, len(s))))
    return _dedupe(out)


# ------------------------------------------------------------------------------------------------
# Nodule counts, references, lobes and types the labeler does not read
# ------------------------------------------------------------------------------------------------

_COUNT_WORDS: dict[str, int] = {
    "one": 1, "single": 1, "solitary": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
}  # fmt: skip
_MANY = ("several", "multiple", "numerous", "few", "innumerable", "countless", "many")
COUNT_RE = re.compile(
    r"\b(?P<n>\d{1,2}|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|single|solitary|several|multiple"
    r"|numerous|few|innumerable|countless|many)\b(?![\s-]{0,2}(?:[.,]\d|mm\b|cm\b|millim|centim|x\b|-?years?|%|of\b))"
    r"(?P<mid>(?:[\s-]{1,2}[\w.]{1,20}){0,3}?)[\s-]{1,2}(?:pulmonary\s{1,2}|lung\s{1,2})?(?P<noun>nodules?)\b",
    _I,
)
_COUNT_STOP = re.compile(r"\b(?:of|the|in|and|or|with|from|to|these|those|no|not|than|nodules?)\b", _I)
_SUBSET_RE = re.compile(r"\b(?:additional|other|further|more|smaller|larger|new|another)\b", _I)


#: Lung-RADS v2022 category descriptors (``../shared/clinical``), longest first, and the categories each names.
LUNG_RADS_DESCRIPTORS: tuple[tuple[str, frozenset[str]], ...] = (
    ("very suspicious", frozenset({"4B", "4X"})),
    ("probably benign", frozenset({"3"})),
    ("benign appearance or behavior", frozenset({"2"})),
    ("benign appearance or behaviour", frozenset({"2"})),
    ("benign", frozenset({"2"})),
    ("suspicious", frozenset({"4A"})),
    ("negative", frozenset({"1"})),
    ("incomplete", frozenset({"0"})),
)
LUNG_RADS_DESCRIPTOR_RE = re.compile(
    r"\blung[\s-]?rads\s{0,2}(?:v?\d{4}\s{0,2})?(?:category\s{0,2}|cat\.?\s{0,2})?(?P<cat>[0-4][abx]?)(?:\s{0,2}s)?\b"
    r"\s{0,2}[:,\u2013\u2014-]?\s{0,2}\(?(?P<desc>very\s+suspicious|probably\s+benign|benign\s+appearance"
    r"\s+or\s+behaviou?r|benign|suspicious|negative|incomplete)\b",
    _I,
)


def lung_rads_descriptor_facts(s: str) -> list[Stated]:
    """A Lung-RADS category stated with its descriptor: value ``(category, descriptor, categories it names)``.

    "Lung-RADS category 4A: suspicious" is consistent; "Lung-RADS 4A: negative" names category 1 in its own
    words. Only the descriptor right after the category is read ("Lung-RADS 2, benign appearance or behavior").
    """
    out: list[Stated] = []
    for m in LUNG_RADS_DESCRIPTOR_RE.finditer(s):
        desc = " ".join(m.group("desc").lower().split())
        names = next(c for d, c in LUNG_RADS_DESCRIPTORS if desc.startswith(d))
        out.append(Stated("lung_rads_descriptor", (m.group("cat").upper(), desc, names), m.span()))
    return out


def count_facts(s: str) -> list[Stated]:
    """Nodule counts: value ``(n, kind)`` with kind ``exact``, ``at_least`` (several/multiple) or ``subset``.

    "three pulmonary nodules", "2 solid nodules", "a solitary nodule", "multiple nodules" (at least 2), "two
    additional nodules" (a subset: fewer than the total).
    """
    out: list[Stated] = []
    for m in COUNT_RE.finditer(s):
        word, mid, plural = m.group("n").lower(), m.group("mid"), m.group("noun").lower().endswith("s")
        if _COUNT_STOP.search(mid):
            continue
        if word in _MANY:
            if plural:
                out.append(Stated("nodule_count", (2, "at_least"), m.span()))
            continue
        n = int(word) if word.isdigit() else _COUNT_WORDS[word]
        if (n == 1) == plural or n == 0:
            continue
        out.append(Stated("nodule_count", (n, "subset" if _SUBSET_RE.search(mid) else "exact"), m.span()))
    return out


ORDINAL_RE = re.compile(
    r"\bnodule\s{0,2}(?:#|no\.?|number|n°)?\s{0,2}(?P<k>\d{1,2})\b(?![\s-]{0,2}(?:[.,]\d|mm\b|cm\b|x\b|millim|centim))",
    _I,
)


def ordinal_reference(s: str) -> int | None:
    """The finding rank a sentence names ("nodule 2", "nodule #2"), None when it names none or several."""
    ks = {int(m.group("k")) for m in ORDINAL_RE.finditer(s)}
    return ks.pop() if len(ks) == 1 else None


APEX_RE = re.compile(
    r"\b(?P<side>right|left)\s{1,2}(?:lung\s{1,2})?(?:apex|apical|apices)\b"
    r"|\b(?:apex|apical\s+segment)\s{1,3}of\s{1,3}the\s{1,3}(?P<side2>right|left)\b",
    _I,
)


def apex_lobe(s: str) -> str | None:
    """``RUL``/``LUL`` for "right apex"/"left apical": the apex of each lung belongs to its upper lobe."""
    m = APEX_RE.search(s)
    if m is None:
        return None
    side = (m.group("side") or m.group("side2")).lower()
    return "RUL" if side == "right" else "LUL"


SUBSOLID_RE = re.compile(r"\bsub[\s-]?solid\b", _I)


def stated_subsolid(s: str) -> bool:
    """Whether the sentence calls a nodule subsolid (part-solid or non-solid, not which)."""
    return SUBSOLID_RE.search(s) is not None


NEG_QUALIFIER_RE = re.compile(
    r"\b(?:no|without|negative\s+for|free\s+of)\s{1,3}(?:(?:pulmonary|lung|discrete|definite|focal)\s{1,3}){0,2}"
    r"(?P<q>suspicious|worrisome|concerning|significant|dominant|large|aggressive|malignant)\b",
    _I,
)
OTHERWISE_CLEAR_RE = re.compile(r"\botherwise\s{1,3}(?:clear|unremarkable|normal)\b", _I)


def negation_qualifier(s: str) -> str | None:
    """The qualifier of a negated nodule statement ("no *suspicious* nodules"), None when unqualified."""
    m = NEG_QUALIFIER_RE.search(s)
    return m.group("q").lower() if m else None


def otherwise_clear(s: str) -> bool:
    """Whether the lungs are called "otherwise clear" (clear apart from what is described elsewhere)."""
    return OTHERWISE_CLEAR_RE.search(s) is not None


FUTURE_RE = re.compile(
    r"\b(?:recommend\w{0,6}|suggest\w{0,4}|follow[\s-]{0,2}up|continue\s+annual|consider\w{0,4}|advised?|should"
    r"|referral|in\s+\d{1,2}(?:\s{0,2}-\s{0,2}\d{1,2})?\s+months?)\b",
    _I,
)


def is_future(s: str) -> bool:
    """Whether the sentence speaks of a future exam (a recommendation), whose technique is not this exam's."""
    return FUTURE_RE.search(s) is not None
