"""Where a Flower App's relative paths resolve: the app directory, shared by the ServerApp and the ClientApp."""

from __future__ import annotations

from pathlib import Path

__all__ = ["app_dir", "under"]


def app_dir() -> Path:
    """The Flower App directory this code was loaded from; the current directory when there is none.

    Flower loads ``server.app:app`` / ``client.app:app`` with the app directory first on ``sys.path``
    (for ``flwr run`` the FAB installed under ``$FLWR_HOME/apps/``), so the folder holding these packages
    is the app when it has a ``pyproject.toml`` with a ``[tool.flwr.app]`` table (an installed wheel has
    none).
    """
    here = Path(__file__).resolve().parents[1]
    project = here / "pyproject.toml"
    if project.is_file() and "[tool.flwr.app" in project.read_text(encoding="utf-8", errors="replace"):
        return here
    return Path.cwd()


def under(base: Path | None, value: str) -> Path:
    """``value`` (``~`` expanded) as an absolute path, or relative to ``base`` (as given when ``base`` is None)."""
    path = Path(value).expanduser()
    return path if base is None or path.is_absolute() else base / path
