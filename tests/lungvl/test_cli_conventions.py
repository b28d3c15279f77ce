"""CLI conventions (issue 15 item 5): choices, one-line usage errors, literal help, exit codes, option names, stdin."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from lungvl import errors, params
from lungvl.cli import app, run
from lungvl.help_text import LiteralHelpGroup, reflow
from tests.conftest import write_mini_site

runner = CliRunner()
WIDE = {"COLUMNS": "250"}  # rich wraps help at the terminal width


def _help(*args: str) -> str:
    res = runner.invoke(app, [*args, "--help"], env=WIDE)
    assert res.exit_code == 0, res.output
    return res.output


def _walk(command: click.Command, path: str = "lungvl"):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _walk(sub, f"{path} {name}")


def _tree() -> list[tuple[str, click.Command]]:
    return list(_walk(typer.main.get_command(app)))


# ----------------------------------------------------------------------------- choices


def test_choice_lists_match_their_owners():
    from lungvl_model.benchmarks import train_bench
    from lungvl_model.data.synth.cohorts import PROFILES
    from lungvl_model.models.config import PRESETS
    from lungvl_model.training.config import STAGE_NAMES

    assert params.TRAIN_STAGES == (*STAGE_NAMES, "risk", "candidates", "detector")
    assert params.PRESETS == tuple(PRESETS)
    assert params.SYNTH_COHORTS == tuple(PROFILES)
    assert params.BENCH_STAGES == tuple(train_bench._STAGES)


@pytest.mark.parametrize(
    "argv, option, value",
    [
        (["train", "{tmp}", "--stage", "nope", "--out", "{tmp}/o"], "--stage", "nope"),
        (["train", "{tmp}", "--stage", "vl", "--preset", "huge", "--out", "{tmp}/o"], "--preset", "huge"),
        (["train", "{tmp}", "--stage", "vl", "--device", "gpu", "--out", "{tmp}/o"], "--device", "gpu"),
        (["train", "{tmp}", "--stage", "vl", "--device", "cuda:x", "--out", "{tmp}/o"], "--device", "cuda:x"),
        (["train", "{tmp}", "--stage", "seg", "--peer", "unet", "--out", "{tmp}/o"], "--peer", "unet"),
        (["data", "synth", "--cohort", "[screening]", "--out", "{tmp}/s"], "--cohort", "[screening]"),
        (["bench", "train", "--stage", "ssl"], "--stage", "ssl"),
        (["bench", "train", "--device", "tpu"], "--device", "tpu"),
    ],
)
def test_a_wrong_choice_is_a_one_line_usage_error(tmp_path, capsys, argv, option, value):
    code = run([a.replace("{tmp}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert option in lines[0] and repr(value) in lines[0] and "--help" in lines[0]  # value shown as given
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_device_accepts_an_index(tmp_path, capsys):
    # cuda:1 passes the option check; the stage then refuses the empty site (a later, different error)
    code = run(["train", str(tmp_path), "--stage", "vl", "--device", "cuda:1", "--peer", "dynunet", "--out", "o"])
    assert code == 2 and "--peer dynunet trains a segmentation anchor" in capsys.readouterr().err


def test_help_lists_the_choices():
    text = _help("train")
    assert "[text|ssl|seg|vl|findings|risk|candidates|detector]" in text
    assert "[tiny|base]" in text and "[auto|cpu|cuda|cuda:N]" in text and "[dynunet]" in text
    assert "[screening|referral|low_resource]" in _help("data", "synth")
    assert "[seg|vl|fine]" in _help("bench", "train")


def test_an_unknown_option_is_one_line_with_a_suggestion(capsys):
    assert run(["site", "check", "x", "--jsn", "r.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--jsn" in err[0] and "--json" in err[0]


def test_run_keeps_help_version_and_bare_groups(capsys):
    from lungvl_model.version import software_version

    assert run(["--version"]) == 0 and capsys.readouterr().out.strip() == f"lungvl {software_version()}"
    assert run(["--help"]) == 0 and "Exit codes:" in capsys.readouterr().out
    assert run(["site"]) == 2 and "Usage: lungvl site" in capsys.readouterr().out  # a bare group: its help
    assert run(["sitee"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lungvl: No such command 'sitee'.") and "'site'" in err[0]


# ----------------------------------------------------------------------------- help text


def test_bracketed_words_in_help_are_shown_as_written():
    join = " ".join(_help("site", "join").split())
    assert "with a [federation] table" in join  # option help
    assert "named on the terminal with its [federation] key" in join  # docstring, reflowed
    assert "\\[" not in join and "``" not in join and "(and that site_key.pub beside it is its pair)" in join
    agg = " ".join(_help("bench", "aggregate").split())
    assert "--sites N [N ...] and --params P [P ...]" in agg


def test_literal_help_group_keeps_markup_like_text():
    demo = typer.Typer(cls=LiteralHelpGroup, epilog="[bold]not bold[/bold]")

    @demo.command("go")
    def go(
        mode: str = typer.Option("a", "--mode", help="one of [run] or [dry]; [red]x[/red]"),
    ) -> None:
        """Do [run] once.

        A second paragraph
        wrapped in the source, with [link=x]y[/link].
        """

    @demo.command("other")
    def other() -> None:
        """Other."""

    root = " ".join(runner.invoke(demo, ["--help"], env=WIDE).output.split())
    assert "[bold]not bold[/bold]" in root and "Do [run] once." in root
    text = runner.invoke(demo, ["go", "--help"], env=WIDE).output
    assert "one of [run] or [dry]; [red]x[/red]" in text
    assert "A second paragraph wrapped in the source, with [link=x]y[/link]." in text  # one line


def test_reflow_keeps_paragraphs_lists_and_verbatim_blocks():
    text = "First line\ncontinues.\n\nSecond\nparagraph:\n- item one\n- item two\n\n\b\nkept\nas is"
    assert reflow(text) == "First line continues.\n\nSecond paragraph:\n- item one\n- item two\n\n\b\nkept\nas is"


# ----------------------------------------------------------------------------- exit codes


def test_root_help_documents_every_exit_code():
    text = " ".join(_help().split())
    assert "Exit codes:" in text
    for code, meaning in errors.EXIT_CODES:
        assert f"{code} {' '.join(meaning.split())}" in text
    assert [c for c, _ in errors.EXIT_CODES] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 70, 130]


@pytest.mark.parametrize(
    "command",
    [("site", "check"), ("site", "join"), ("site", "audit"), ("rules", "brock"), ("rules", "lung-rads"),
     ("report", "label"), ("simulate",), ("data", "import-lidc"), ("bench", "train")],
)  # fmt: skip
def test_commands_with_their_own_exit_codes_document_them(command):
    assert "Exit codes:" in _help(*command)


# ----------------------------------------------------------------------------- option names


#: a parameter's Python name -> the one option spelling it has in every command
ONE_NAME = {
    "out_dir": "--out",
    "model_dir": "--model",
    "init": "--init",
    "config": "--config",
    "db": "--db",
    "seed": "--seed",
    "device": "--device",
    "preset": "--preset",
    "stage": "--stage",
    "cohort": "--cohort",
    "site": "--site",
}
#: spellings another command could drift to for a meaning that already has a name
FORBIDDEN = {"--output", "-o", "--out-dir", "--output-dir", "--checkpoint", "--ckpt", "--model-dir", "--site-dir",
             "--cfg", "--database", "--registry", "--gpu"}  # fmt: skip


def test_one_option_name_per_meaning_across_commands():
    seen = 0
    for path, command in _tree():
        for p in command.params:
            if not isinstance(p, click.Option):
                continue
            opts = set(p.opts) | set(p.secondary_opts)
            assert not (opts & FORBIDDEN), f"{path}: {sorted(opts & FORBIDDEN)}"
            expected = ONE_NAME.get(p.name or "")
            if expected is not None and (p.name != "stage" or "train" in path):
                seen += 1
                assert expected in p.opts, f"{path}: {p.name} is {p.opts}, expected {expected}"
            if p.name in ("stage", "preset", "cohort"):
                assert isinstance(p.type, click.Choice), f"{path} {p.opts}: free text, not a choice"
            if p.name == "device":
                assert isinstance(p.type, params.DeviceType), f"{path} {p.opts}"
    assert seen >= 10


# ----------------------------------------------------------------------------- "-" for standard input


LUNG_RADS_CSV = (
    "type,mean_diameter_mm,solid_component_mm,context,juxtapleural,benign_pattern,suspicious_features\n"
    "solid,7,,baseline,0,0,0\n"
    "solid,abc,,baseline,0,0,0\n"
)


def test_rules_read_standard_input():
    res = runner.invoke(app, ["rules", "lung-rads", "--csv", "-", "--out", "-"], input=LUNG_RADS_CSV)
    assert res.exit_code == 1
    assert res.stdout.strip().splitlines()[1].endswith(",3")
    assert "error standard input: row 2, column 'mean_diameter_mm'" in res.stderr


@pytest.mark.parametrize("data, message", [(b"", "standard input: empty file"), (b"\xff\xfe,x\n", "not UTF-8")])
def test_unusable_standard_input_is_named(data, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert run(["rules", "brock", "--csv", "-"]) == 2
    err = capsys.readouterr().err
    assert message in err and "lungvl-stdin" not in err and len(err.strip().splitlines()) == 1


def test_report_label_reads_standard_input():
    lines = '{"id": "a", "text": "No pulmonary nodules."}\nnot json\n'
    res = runner.invoke(app, ["report", "label", "--jsonl", "-"], input=lines)
    assert res.exit_code == 1
    assert json.loads(res.stdout.strip())["id"] == "a"
    assert "error standard input: line 2" in res.stderr


# ----------------------------------------------------------------------------- machine-readable output


def test_site_audit_json(tmp_path: Path):
    from client.ledger import AuditLedger

    site = tmp_path / "site"
    write_mini_site(site, 1)
    res = runner.invoke(app, ["site", "audit", "--config", str(site / "site.toml"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["count"] == 0 and doc["messages"] == [] and "sent nothing" in res.stderr
    (site / ".lungvl_state").mkdir()
    ledger = AuditLedger(site / ".lungvl_state")
    ledger.record(round=1, kind="train_reply", payload=b"abc", metrics={"num_examples": 3}, dp={},
                  epsilon=0.5, delta=1e-5)  # fmt: skip
    ledger.record(round=2, kind="[evaluate]", payload=b"abcd", metrics={}, dp={}, epsilon=None, delta=None)
    ledger.close()
    res = runner.invoke(app, ["site", "audit", "--config", str(site), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["count"] == 2 and doc["total_bytes"] == 7
    first, second = doc["messages"]
    assert (
        first["round"] == 1 and first["sha256"].startswith("ba7816bf8f01cfea") and first["metrics"]["num_examples"] == 3
    )
    assert first["epsilon"] == 0.5 and first["time"].endswith("+00:00") and second["kind"] == "[evaluate]"
    table = runner.invoke(app, ["site", "audit", "--config", str(site)], env=WIDE)
    assert table.exit_code == 0 and "[evaluate]" in table.stdout  # markup-like kinds shown as written


def test_strict_json_has_no_nan():
    from datetime import UTC, datetime

    from lungvl.console import strict_json

    doc = strict_json(
        {"a": float("nan"), "b": [float("inf"), 1.5], "t": datetime(2026, 1, 2, tzinfo=UTC), "p": Path("x")}
    )
    assert doc == {"a": None, "b": [None, 1.5], "t": "2026-01-02T00:00:00+00:00", "p": "x"}


def test_site_check_json_to_standard_output(tmp_path: Path):
    site = tmp_path / "site"
    write_mini_site(site, 2)
    res = runner.invoke(app, ["site", "check", str(site), "--json", "-"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["summary"]["usable"] == 2  # stdout is the JSON alone
    assert "2 usable" in res.stderr  # the tables went to stderr


def test_progress_prints_lines_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from lungvl.console import progress_callback

    with progress_callback("job") as cb:
        for i in range(1, 101):
            cb(i, 100, f"loss {i}")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("job ") and "━" not in ln]
    # one line at each tenth of the way (the first step included), the bar itself at the end
    assert [ln.split()[1] for ln in lines] == ["1/100", *(f"{k}/100" for k in range(10, 100, 10))]
    assert lines[-1].endswith("loss 90")
