"""The ``lungvl`` command: one front door for hospital IT, the consortium coordinator and researchers."""

from __future__ import annotations

import os
import sys

import click
import typer

from lungvl import (
    cmd_bench,
    cmd_consortium,
    cmd_data,
    cmd_demo,
    cmd_evaluate,
    cmd_explain,
    cmd_report,
    cmd_rules,
    cmd_server,
    cmd_simulate,
    cmd_site,
    cmd_study,
    cmd_train,
    errors,
)
from lungvl.console import print_error
from lungvl.help_text import LiteralHelpGroup

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

app = typer.Typer(
    help="lungvl: federated, differentially private, explainable lung-cancer risk from chest CT.",
    epilog=errors.exit_codes_help(),
    cls=LiteralHelpGroup,  # help shown as written: "[federation]" stays, paragraphs reflow
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from lungvl_model.version import software_version

        print(f"lungvl {software_version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the lungvl version and exit"
    ),
) -> None:
    """lungvl: federated, differentially private, explainable lung-cancer risk from chest CT."""


app.add_typer(cmd_data.app, name="data")
app.add_typer(cmd_rules.app, name="rules")
app.add_typer(cmd_report.app, name="report")
app.add_typer(cmd_site.app, name="site")
app.add_typer(cmd_server.app, name="server")
app.add_typer(cmd_consortium.app, name="consortium")
app.add_typer(cmd_bench.app, name="bench")
app.add_typer(cmd_study.app, name="study")
app.command("demo")(cmd_demo.demo)
app.command("train")(cmd_train.train)
app.command("explain")(cmd_explain.explain)
app.command("evaluate")(cmd_evaluate.evaluate)
app.command("simulate")(cmd_simulate.simulate)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return its exit code (never raises).

    Expected failures print one line and get their exit code (:mod:`lungvl.errors`); a bug prints one
    line naming the crash file that holds its traceback.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    return errors.run_guarded(lambda: _invoke(args), args, print_error)


class _NeverRaised(click.UsageError):
    """Stands in for NoArgsIsHelpError on click < 8.2, where a bare group exits 0 after its help."""


#: click >= 8.2 raises this after printing a bare group's help
_NO_ARGS_IS_HELP: type[click.UsageError] = getattr(click.exceptions, "NoArgsIsHelpError", _NeverRaised)


def _invoke(args: list[str]) -> None:
    """Run the app; a usage error (wrong option, choice or value) is one line and exit 2.

    Raises:
        SystemExit: always, with the command's exit code.
    """
    try:
        result = app(args=args, prog_name="lungvl", standalone_mode=False)
    except _NO_ARGS_IS_HELP as e:  # a bare group: its help is already printed
        raise SystemExit(e.exit_code) from None
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "lungvl"
        print_error(f"{where}: {e.format_message()} (see {where} --help)")
        raise SystemExit(e.exit_code) from None
    except click.ClickException as e:
        print_error(e.format_message())
        raise SystemExit(e.exit_code) from None
    except click.Abort:
        print_error("aborted")
        raise SystemExit(errors.FAILED) from None
    raise SystemExit(result if isinstance(result, int) else errors.OK)


def main() -> None:
    """The ``lungvl`` console script."""
    errors.exit_with(run())


if __name__ == "__main__":
    main()
