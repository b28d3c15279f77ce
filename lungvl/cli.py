"""The ``lungvl`` command: one front door for hospital IT, the consortium coordinator and researchers."""

from __future__ import annotations

import os

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
)

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

app = typer.Typer(
    help="lungvl: federated, differentially private, explainable lung-cancer risk from chest CT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
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


if __name__ == "__main__":
    app()
