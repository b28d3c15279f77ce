"""The ``lungvl`` command: one front door for hospital IT, the consortium coordinator and researchers."""

from __future__ import annotations

import os
import sys

import typer

from lungvl import (
    cmd_bench,
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

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

app = typer.Typer(
    help="lungvl: federated, differentially private, explainable lung-cancer risk from chest CT.",
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
    return errors.run_guarded(lambda: app(args=args, prog_name="lungvl"), args, print_error)


def main() -> None:
    """The ``lungvl`` console script."""
    errors.exit_with(run())


if __name__ == "__main__":
    main()
