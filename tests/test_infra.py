"""infra/: the container files, the compose trial and the systemd unit agree with the code they run.

No container runtime runs here, so these are static checks that catch what breaks such files in
practice: a COPY of a folder that moved, a package left out of an image, a CLI option that was renamed,
a compose service pointing at a missing Dockerfile, a unit file systemd refuses.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILES = sorted(INFRA.glob("Dockerfile.*"))


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec form (JSON array), got {args!r}"
    return list(json.loads(args))


def _cli_help(*words: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "lungvl.cli", *words, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def _check_cli_call(argv: list[str]) -> None:
    """``argv`` (after ``lungvl``) names a real subcommand and only options it has."""
    words = [a for a in argv if not a.startswith("-")]
    group, command = words[0], words[1]
    help_text = _cli_help(group, command)
    for opt in (a for a in argv if a.startswith("--")):
        assert opt in help_text, f"`lungvl {group} {command}` has no option {opt}"


def test_there_is_a_server_and_a_site_image() -> None:
    assert [d.name for d in DOCKERFILES] == ["Dockerfile.server", "Dockerfile.site"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_copy_every_package_that_exists(dockerfile: Path) -> None:
    copied: set[str] = set()
    for word, args in _instructions(dockerfile):
        if word == "COPY":
            *sources, _dest = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
                copied.add(src)
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pat.rstrip("*") for pat in includes["include"]}
    assert packages <= copied, f"{dockerfile.name} leaves out {sorted(packages - copied)} (pip install . needs them)"
    assert "pyproject.toml" in copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_a_real_cli_command_as_a_user(dockerfile: Path) -> None:
    ins = _instructions(dockerfile)
    entry = _exec_form(next(a for w, a in ins if w == "ENTRYPOINT"))
    cmd = _exec_form(next(a for w, a in ins if w == "CMD"))
    assert entry[0] == "lungvl"
    _check_cli_call(entry[1:] + cmd)
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert any(w == "ENV" and "FLWR_TELEMETRY_ENABLED=0" in a for w, a in ins)


def test_compose_services_build_existing_images_and_run_real_commands() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = doc["services"]
    assert {"superlink", "site-a", "site-b"} <= set(services)
    for name, svc in services.items():
        context = (INFRA / svc["build"]["context"]).resolve()
        assert (context / svc["build"]["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            host = vol.split(":")[0]
            named = host in (doc.get("volumes") or {})
            assert named or host.startswith(".."), f"{name}: volume {vol!r} is neither named nor repo-relative"
        for net in svc.get("networks", []):
            assert net in doc["networks"], f"{name}: unknown network {net}"
    server_entry = _exec_form(next(a for w, a in _instructions(INFRA / "Dockerfile.server") if w == "ENTRYPOINT"))
    _check_cli_call(server_entry[1:] + services["superlink"]["command"])
    for site in ("site-a", "site-b"):
        assert "superlink" in services[site]["depends_on"]


def test_systemd_unit_runs_real_cli_commands() -> None:
    unit = (INFRA / "systemd" / "lungvl-site.service").read_text()
    for key in ("ExecStartPre", "ExecStart"):
        line = re.search(rf"^{key}=(.+)$", unit, re.M)
        assert line, key
        argv = shlex.split(line.group(1))
        assert argv[0].endswith("/lungvl"), argv
        _check_cli_call(argv[1:])
    assert re.search(r"^User=(?!root)\w+", unit, re.M)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "lungvl-site.service"
    unit.write_text((INFRA / "systemd" / "lungvl-site.service").read_text())
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    complaints = [
        line
        for line in (res.stdout + res.stderr).splitlines()
        # the install path does not exist on a test machine; anything else is a real complaint
        if line.strip() and "/opt/lungvl/.venv/bin/lungvl is not executable" not in line
    ]
    assert complaints == [], complaints


def _readme_commands() -> list[list[str]]:
    """Every ``lungvl ...`` line of infra/README.md's code blocks, as argv after ``lungvl``."""
    text = (INFRA / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("lungvl ")]


def test_readme_quick_start_runs_real_cli_commands() -> None:
    commands = _readme_commands()
    assert any(argv[:2] == ["consortium", "init"] for argv in commands), "the quick start builds the startup kits"
    for argv in commands:
        _check_cli_call(argv)


def test_readme_does_not_hand_write_certificates_or_keys() -> None:
    """The deployment starts from `lungvl consortium init` kits, not from make_certs + hand-edited TOML."""
    quick = (INFRA / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make_certs.py --out certs" not in quick and "lungvl site keys --out keys/hospital" not in quick
    assert "kits/server/server.toml" in quick
