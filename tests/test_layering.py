"""DESIGN.md section 1: lungvl_model <- privacy <- federation <- client/server <- simulations <- lungvl (CLI)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "lungvl_model": set(),
    "privacy": {"lungvl_model"},
    "federation": {"lungvl_model", "privacy"},
    "client": {"lungvl_model", "privacy", "federation"},
    "server": {"lungvl_model", "privacy", "federation"},
    "simulations": {"lungvl_model", "privacy", "federation", "client", "server"},
    "lungvl": {"lungvl_model", "privacy", "federation", "client", "server", "simulations"},
}
FORBIDDEN_THIRD_PARTY = {"lungvl_model": {"flwr", "opacus", "typer"}, "privacy": {"flwr", "typer"}}


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def violations(root: Path) -> list[str]:
    bad = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((root / pkg).rglob("*.py")):
            for lineno, name in imports_of(path):
                top = name.split(".")[0]
                if top in ALLOWED and top != pkg and top not in allowed:
                    bad.append(f"{path.relative_to(root)}:{lineno}: {pkg} imports {name}")
                if top in FORBIDDEN_THIRD_PARTY.get(pkg, ()):
                    bad.append(f"{path.relative_to(root)}:{lineno}: {pkg} imports {name} (third party kept out)")
    return bad


def test_one_way_layering() -> None:
    assert violations(ROOT) == []


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    (tmp_path / "lungvl_model").mkdir()
    (tmp_path / "lungvl_model" / "x.py").write_text("import server.app\nfrom flwr.app import Message\n")
    assert len(violations(tmp_path)) == 2


def test_nothing_imports_the_cli() -> None:
    for pkg in ALLOWED:
        if pkg == "lungvl":
            continue
        for path in (ROOT / pkg).rglob("*.py"):
            assert not any(n.split(".")[0] == "lungvl" for _, n in imports_of(path)), path


def test_shared_layer_checker_agrees() -> None:
    script = ROOT.parent / "shared" / "tools" / "check_layers.py"
    if not script.exists():
        pytest.skip("../shared/tools/check_layers.py not present")
    res = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
