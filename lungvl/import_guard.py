"""Refuse to run when another package shadows one of lungvl's top-level packages.

lungvl installs the top-level packages ``lungvl_model``, ``privacy``, ``federation``, ``client``,
``server`` and ``simulations`` beside ``lungvl`` (Flower loads the apps as ``server.app:app`` and
``client.app:app``; DESIGN.md section 1). Names as common as ``server`` and ``client`` can be taken by
a ``server.py`` in the working directory, a folder on ``PYTHONPATH`` or another distribution; Python
then imports that one and lungvl fails later with a confusing ``ImportError`` deep in a command.

:func:`find_shadowed` checks, without importing any of them, that each resolves to the folder lungvl
itself was installed into. Standard library only: it runs first, from ``lungvl/__init__.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

#: lungvl's own top-level packages besides ``lungvl`` (pyproject.toml [tool.setuptools.packages.find])
TOP_LEVEL_PACKAGES: tuple[str, ...] = ("lungvl_model", "privacy", "federation", "client", "server", "simulations")

#: the exit code of a shadowed package (lungvl.errors.MISSING_DEPENDENCY: the install is not usable)
SHADOWED_EXIT_CODE = 8


class PackageShadowed(ImportError):
    """A module of lungvl's resolves to a file outside lungvl's installation."""


def _origin(name: str) -> Path | None:
    """Where ``name`` is (or would be) imported from: its ``__init__.py``/module file, or None when absent."""
    module = sys.modules.get(name)
    if module is not None:
        file = getattr(module, "__file__", None)
        if file:
            return Path(file)
        locations = list(getattr(module, "__path__", []) or [])
        return Path(locations[0]) if locations else None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        return Path(spec.origin)
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def _package_root(origin: Path) -> Path:
    """The folder holding the package (``.../site-packages`` for ``.../site-packages/server/__init__.py``)."""
    return origin.parent.parent if origin.name == "__init__.py" else origin.parent


def find_shadowed(home: Path | None = None, names: tuple[str, ...] = TOP_LEVEL_PACKAGES) -> list[str]:
    """One message per package of ``names`` that does not come from ``home``.

    Args:
        home: the folder lungvl is installed in (default: the parent of this ``lungvl`` package).
        names: the top-level packages to check.

    Returns:
        Messages naming the module, the file it would be imported from and the fix; empty when all
        resolve inside ``home`` (or are not importable at all: a missing package is reported by the
        import that needs it).
    """
    root = (home if home is not None else Path(__file__).resolve().parent.parent).resolve()
    problems: list[str] = []
    for name in names:
        origin = _origin(name)
        if origin is None:
            continue
        where = _package_root(origin.resolve())
        if where != root:
            problems.append(
                f"module {name!r} is imported from {origin}, not from lungvl's installation in {root}: another "
                f"package or file named {name!r} shadows lungvl's; remove or rename it (check PYTHONPATH and the "
                f"current directory), or install lungvl in its own virtual environment"
            )
    return problems


def check(home: Path | None = None) -> None:
    """Raise :class:`PackageShadowed` when a package of lungvl's is shadowed (see :func:`find_shadowed`).

    Raises:
        PackageShadowed: the first shadowed package (one line), with a count of any others.
    """
    problems = find_shadowed(home)
    if problems:
        more = f" (and {len(problems) - 1} more shadowed package(s))" if len(problems) > 1 else ""
        raise PackageShadowed(problems[0] + more)


def exit_if_shadowed() -> None:
    """At CLI start: print the one-line error and exit with :data:`SHADOWED_EXIT_CODE` when shadowed."""
    try:
        check()
    except PackageShadowed as e:
        sys.stderr.write(f"lungvl: {e}\n")
        sys.stderr.flush()
        raise SystemExit(SHADOWED_EXIT_CODE) from None
