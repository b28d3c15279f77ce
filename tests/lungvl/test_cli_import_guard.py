"""The import-collision guard: another ``server``/``client`` first on sys.path is one line and exit 8."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lungvl
from lungvl import errors
from lungvl.import_guard import (
    SHADOWED_EXIT_CODE,
    TOP_LEVEL_PACKAGES,
    PackageShadowed,
    check,
    find_shadowed,
)

REPO = Path(lungvl.__file__).resolve().parents[1]


def test_this_install_is_not_shadowed():
    assert find_shadowed() == []
    check()


def test_the_list_is_the_distribution_s_packages():
    import tomllib

    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in found) == sorted([*TOP_LEVEL_PACKAGES, "lungvl"])


def test_exit_code_is_missing_dependency_and_classified():
    assert SHADOWED_EXIT_CODE == errors.MISSING_DEPENDENCY
    verdict = errors.classify(PackageShadowed("module 'server' is imported from /x"))
    assert verdict is not None and verdict.code == errors.MISSING_DEPENDENCY and "/x" in verdict.message


def test_a_foreign_home_names_module_path_and_fix(tmp_path):
    problems = find_shadowed(home=tmp_path, names=("server",))
    assert len(problems) == 1
    assert "'server'" in problems[0] and str(REPO / "server" / "__init__.py") in problems[0]
    assert "virtual environment" in problems[0] and "\n" not in problems[0]
    assert find_shadowed(home=tmp_path, names=("no_such_package_xyz",)) == []  # absent: not this check's job
    with pytest.raises(PackageShadowed, match=r"lungvl_model.*\(and 5 more shadowed package\(s\)\)"):
        check(home=tmp_path)


@pytest.mark.parametrize("shape", ["package", "module"])
def test_a_shadowing_server_first_on_sys_path_stops_the_cli(tmp_path, shape):
    fake = tmp_path / "elsewhere"
    if shape == "package":
        (fake / "server").mkdir(parents=True)
        (fake / "server" / "__init__.py").write_text("NAME = 'not lungvl'\n")
        origin = fake / "server" / "__init__.py"
    else:  # a server.py in the working directory
        fake.mkdir()
        origin = fake / "server.py"
        origin.write_text("NAME = 'not lungvl'\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0"}
    # cwd = the fake's folder: sys.path[0] (the working directory with -m) comes before lungvl's own
    proc = subprocess.run(
        [sys.executable, "-m", "lungvl.cli", "--version"], cwd=fake, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == SHADOWED_EXIT_CODE, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "module 'server'" in lines[0] and str(origin) in lines[0] and str(REPO) in lines[0]
    assert "Traceback" not in proc.stderr
