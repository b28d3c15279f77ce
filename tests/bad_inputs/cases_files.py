"""CSV rows for the clinical rules, JSONL reports for the labeler, and command-line values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.bad_inputs.framework import Case

LR_HEADER = "type,mean_diameter_mm,solid_component_mm,context,juxtapleural,benign_pattern,suspicious_features\n"
LR_ROW = "solid,7,,baseline,0,0,0\n"
BROCK_HEADER = "age,female,family_history,emphysema,longest_diameter_mm,type,upper_lobe,nodule_count,spiculation\n"
BROCK_ROW = "62,1,0,0,8,solid,1,1,0\n"


def rules(cmd: str, data: bytes, *, out: str | None = None) -> Callable[[Path], list[str]]:
    """``lungvl rules CMD --csv in.csv`` on ``data`` (optionally ``--out``, relative to the case folder)."""

    def setup(tmp: Path) -> list[str]:
        (tmp / "in.csv").write_bytes(data)
        return ["rules", cmd, "--csv", str(tmp / "in.csv"), *(["--out", str(tmp / out)] if out else [])]

    return setup


def label(data: bytes) -> Callable[[Path], list[str]]:
    """``lungvl report label --jsonl reports.jsonl`` on ``data``."""

    def setup(tmp: Path) -> list[str]:
        (tmp / "reports.jsonl").write_bytes(data)
        return ["report", "label", "--jsonl", str(tmp / "reports.jsonl")]

    return setup


def argv(*args: str) -> Callable[[Path], list[str]]:
    """Plain arguments; ``{tmp}`` is replaced by the case folder."""

    def setup(tmp: Path) -> list[str]:
        return [a.replace("{tmp}", str(tmp)) for a in args]

    return setup


def _csv_cases() -> list[Case]:
    lr = LR_HEADER.encode()
    br = BROCK_HEADER.encode()
    row_errors: list[tuple[str, str, bytes, tuple[str, ...]]] = [
        (
            "lr-huge-nodule",
            "lung-rads",
            lr + b"solid,1e6,,baseline,0,0,0\n",
            ("row 1", "mean_diameter_mm", "300"),
        ),
        (
            "lr-negative",
            "lung-rads",
            lr + b"solid,-4,,baseline,0,0,0\n",
            ("row 1", "mean_diameter_mm", "-4"),
        ),
        ("lr-zero", "lung-rads", lr + b"solid,0,,baseline,0,0,0\n", ("row 1", "mean_diameter_mm")),
        (
            "lr-text-size",
            "lung-rads",
            lr + b"solid,seven,,baseline,0,0,0\n",
            ("row 1", "mean_diameter_mm", "seven"),
        ),
        ("lr-nan", "lung-rads", lr + b"solid,nan,,baseline,0,0,0\n", ("row 1", "mean_diameter_mm", "nan")),
        ("lr-inf", "lung-rads", lr + b"solid,inf,,baseline,0,0,0\n", ("row 1", "mean_diameter_mm", "inf")),
        ("lr-type-unknown", "lung-rads", lr + b"solidd,7,,baseline,0,0,0\n", ("row 1", "type", "solidd")),
        ("lr-context-unknown", "lung-rads", lr + b"solid,7,,later,0,0,0\n", ("row 1", "context", "later")),
        ("lr-flag-bad", "lung-rads", lr + b"solid,7,,baseline,maybe,0,0\n", ("row 1", "juxtapleural", "maybe")),
        (
            "lr-part-solid-no-component",
            "lung-rads",
            lr + b"part_solid,9,,baseline,0,0,0\n",
            ("row 1", "solid_component_mm"),
        ),
        ("lr-extra-cells", "lung-rads", lr + b"solid,7,,baseline,0,0,0,oops\n", ("row 1",)),
        (
            "lr-second-row-bad",
            "lung-rads",
            lr + LR_ROW.encode() + b"solid,x,,baseline,0,0,0\n",
            ("row 2", "'x'"),
        ),
        (
            "lr-missing-column",
            "lung-rads",
            b"type,context\nsolid,baseline\n",
            ("row 1", "mean_diameter_mm", "missing column"),
        ),
        ("brock-age-text", "brock", br + b"sixty,1,0,0,8,solid,1,1,0\n", ("row 1", "age", "sixty")),
        ("brock-age-200", "brock", br + b"200,1,0,0,8,solid,1,1,0\n", ("row 1", "age", "200")),
        ("brock-huge-nodule", "brock", br + b"62,1,0,0,1e6,solid,1,1,0\n", ("row 1", "longest_diameter_mm", "300")),
        ("brock-count-zero", "brock", br + b"62,1,0,0,8,solid,1,0,0\n", ("row 1", "nodule_count")),
        ("brock-count-float", "brock", br + b"62,1,0,0,8,solid,1,1.5,0\n", ("row 1", "nodule_count")),
        ("brock-sex-text", "brock", br + b"62,female,0,0,8,solid,1,1,0\n", ("row 1", "female", "female")),
    ]
    cases = [Case(f"csv-{cid}", "csv", rules(cmd, data), 1, names) for cid, cmd, data, names in row_errors]
    file_errors: list[tuple[str, str, bytes, tuple[str, ...]]] = [
        ("empty", "lung-rads", b"", ("in.csv", "empty")),
        ("blank-lines-only", "brock", b"\n\n\n", ("in.csv", "empty")),
        (
            "non-utf8",
            "lung-rads",
            lr + b"solid,7,,baseline,0,0,0 # caf\xe9\n",
            ("in.csv", "UTF-8", "line 2"),
        ),
        ("utf16", "brock", BROCK_HEADER.encode("utf-16"), ("in.csv", "UTF-8")),
        ("nul-bytes", "lung-rads", lr + b"\x00\x00\x00\n", ("in.csv", "NUL")),
        ("binary", "brock", bytes(range(256)) * 4, ("in.csv",)),
        ("huge-field", "lung-rads", lr + b'"' + b"a" * 200_000 + b'",7\n', ("in.csv", "line")),
    ]
    cases += [Case(f"csv-{cid}", "csv", rules(cmd, data), 2, names) for cid, cmd, data, names in file_errors]
    many = lr + b"solid,7\n" * 100_000  # every row lacks the same columns: summarised, not 100k lines
    cases += [
        Case(
            "csv-100k-rows-missing-columns",
            "csv",
            rules("lung-rads", many, out="answers.csv"),
            1,
            ("more error(s)", "in.csv"),
            may_change=("answers.csv",),
        ),
        Case("csv-missing-file", "csv", argv("rules", "brock", "--csv", "{tmp}/none.csv"), 2, ("none.csv",)),
        Case("csv-is-directory", "csv", argv("rules", "brock", "--csv", "{tmp}"), 2, ("directory",)),
        Case(
            "csv-out-is-input",
            "csv",
            lambda t: [*rules("brock", br + BROCK_ROW.encode())(t), "--out", str(t / "in.csv")],
            2,
            ("in.csv", "input"),
        ),
        Case(
            "csv-out-missing-folder",
            "csv",
            rules("brock", br + b"62,1,0,0,8,solid,1,1,0\n62,x,0,0,8,solid,1,1,0\n", out="new/answers.csv"),
            1,
            ("row 2",),
            may_change=("new/",),
        ),
    ]
    return cases


def _report_cases() -> list[Case]:
    ok = b'{"id": "a", "text": "A 6 mm solid nodule in the right upper lobe."}\n'
    row_errors: list[tuple[str, bytes, tuple[str, ...]]] = [
        ("not-json", ok + b"{id: b}\n", ("line 2",)),
        ("array", ok + b'["a", "b"]\n', ("line 2",)),
        ("no-text", ok + b'{"id": "b"}\n', ("line 2", "text")),
        ("empty-text", ok + b'{"id": "b", "text": ""}\n', ("line 2", "empty")),
        ("text-number", ok + b'{"id": "b", "text": 42}\n', ("line 2", "text")),
        ("whitespace-text", ok + b'{"id": "b", "text": "   \\n  "}\n', ("line 2",)),
        ("oversized", ok + b'{"id": "big", "text": "' + b"nodule. " * 150_000 + b'"}\n', ("line 2", "1,000,000")),
        ("truncated-line", ok + b'{"id": "b", "text": "A 6 mm', ("line 2",)),
        ("null-line", ok + b"null\n", ("line 2",)),
    ]
    cases = [Case(f"reports-{cid}", "reports", label(data), 1, names) for cid, data, names in row_errors]
    file_errors: list[tuple[str, bytes, tuple[str, ...]]] = [
        ("empty-file", b"", ("reports.jsonl", "empty")),
        ("only-blank", b"\n \n", ("reports.jsonl", "empty")),
        ("non-utf8", ok + b'{"id": "b", "text": "Nodule \xe0 droite"}\n', ("reports.jsonl", "UTF-8", "line 2")),
        ("utf16", ok.decode().encode("utf-16"), ("reports.jsonl", "UTF-8")),
        ("nul", ok + b"\x00" * 16, ("reports.jsonl", "NUL")),
        ("gzip", b"\x1f\x8b\x08\x00" + bytes(60), ("reports.jsonl",)),
    ]
    cases += [Case(f"reports-{cid}", "reports", label(data), 2, names) for cid, data, names in file_errors]
    many = b'{"id": "x"}\n' * 50_000
    cases += [
        Case("reports-50k-rows-no-text", "reports", label(many), 1, ("more error(s)", "reports.jsonl")),
        Case("reports-missing", "reports", argv("report", "label", "--jsonl", "{tmp}/none.jsonl"), 2, ("none.jsonl",)),
        Case("reports-directory", "reports", argv("report", "label", "--jsonl", "{tmp}"), 2, ("directory",)),
    ]
    return cases


def _cli_cases() -> list[Case]:
    spec: list[tuple[str, Callable[[Path], list[str]], int, tuple[str, ...]]] = [
        (
            "synth-cohort-unknown",
            argv("data", "synth", "--cohort", "screenin", "--out", "{tmp}/s"),
            2,
            ("cohort", "screenin"),
        ),
        (
            "synth-studies-zero",
            argv("data", "synth", "--cohort", "screening", "--studies", "0", "--out", "{tmp}/s"),
            2,
            ("--studies", "0"),
        ),
        (
            "synth-studies-text",
            argv("data", "synth", "--cohort", "screening", "--studies", "ten", "--out", "{tmp}/s"),
            2,
            ("--studies", "ten"),
        ),
        (
            "synth-matrix-small",
            argv("data", "synth", "--cohort", "screening", "--matrix", "8", "--out", "{tmp}/s"),
            2,
            ("--matrix", "8"),
        ),
        (
            "synth-fov-negative",
            argv("data", "synth", "--cohort", "screening", "--fov-mm", "-1", "--out", "{tmp}/s"),
            2,
            ("fov",),
        ),
        (
            "synth-out-is-file",
            lambda t: (t / "f").write_text("x") and ["data", "synth", "--cohort", "screening", "--out", str(t / "f")],
            2,
            ("f",),
        ),
        ("train-missing-site", argv("train", "{tmp}/nosite", "--stage", "vl", "--out", "{tmp}/o"), 2, ("nosite",)),
        (
            "train-stage-unknown",
            argv("train", "{tmp}", "--stage", "vision", "--out", "{tmp}/o"),
            2,
            ("stage", "vision"),
        ),
        (
            "train-steps-zero",
            argv("train", "{tmp}", "--stage", "vl", "--max-steps", "0", "--out", "{tmp}/o"),
            2,
            ("--max-steps",),
        ),
        (
            "train-lr-text",
            argv("train", "{tmp}", "--stage", "vl", "--lr", "fast", "--out", "{tmp}/o"),
            2,
            ("--lr", "fast"),
        ),
        (
            "train-device-unknown",
            argv("train", "{tmp}", "--stage", "vl", "--device", "tpu", "--out", "{tmp}/o"),
            2,
            ("device", "tpu"),
        ),
        (
            "train-preset-unknown",
            argv("train", "{tmp}", "--stage", "vl", "--preset", "huge", "--out", "{tmp}/o"),
            2,
            ("huge",),
        ),
        (
            "train-init-missing",
            argv("train", "{tmp}", "--stage", "vl", "--init", "{tmp}/noinit", "--out", "{tmp}/o"),
            2,
            ("noinit",),
        ),
        (
            "explain-model-missing",
            argv("explain", "--model", "{tmp}/nomodel", "--out", "{tmp}/o", "--dicom", "{tmp}"),
            2,
            ("nomodel",),
        ),
        (
            "evaluate-model-missing",
            argv("evaluate", "{tmp}", "--model", "{tmp}/nomodel", "--out", "{tmp}/o"),
            2,
            ("nomodel",),
        ),
        (
            "evaluate-fp-per-scan-zero",
            argv("evaluate", "{tmp}", "--out", "{tmp}/o", "--finding-fp-per-scan", "0"),
            2,
            ("--finding-fp-per-scan", "0"),
        ),
        ("import-lidc-missing", argv("data", "import-lidc", "{tmp}/nolidc", "--out", "{tmp}/o"), 2, ("nolidc",)),
        ("import-lidc-empty", argv("data", "import-lidc", "{tmp}", "--out", "{tmp}/o"), 2, ("no LIDC-IDRI XML",)),
        ("status-missing-db", argv("server", "status", "--db", "{tmp}/none.db"), 2, ("none.db",)),
        ("status-bad-url", argv("server", "status", "--db", "nosuchdriver://x/y"), 2, ("nosuchdriver",)),
        ("status-missing-driver", argv("server", "status", "--db", "mysql+mysqldb://u@localhost/x"), 8, ("MySQLdb",)),
        ("study-report-missing", argv("study", "report", "{tmp}/nostudy"), 2, ("nostudy",)),
        ("study-report-empty-dir", argv("study", "report", "{tmp}"), 2, ("registry.db",)),
        ("unknown-command", argv("trian"), 2, ("trian",)),
        ("site-audit-missing-config", argv("site", "audit", "--config", "{tmp}/none.toml"), 2, ("none.toml",)),
        ("bench-aggregate-bad", argv("bench", "aggregate", "--sites", "0"), 2, ("--sites",)),
    ]
    return [Case(f"cli-{cid}", "cli", setup, code, names) for cid, setup, code, names in spec]


CASES: list[Case] = _csv_cases() + _report_cases() + _cli_cases()
