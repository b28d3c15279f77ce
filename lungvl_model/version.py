"""The installed lungvl version (from the package metadata), for outputs that must say what wrote them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["software_version"]


def software_version() -> str:
    """``lungvl``'s installed version, or ``"unknown"`` when the package metadata is absent (a bare checkout)."""
    try:
        return version("lungvl")
    except PackageNotFoundError:
        return "unknown"
