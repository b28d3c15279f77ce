"""Changing a third-party function's keyword-only defaults, checked by name.

Flower 1.42 fixes the retry backoff of its object pulls (1 s doubling to 10 s) in function defaults
and offers no setting for it; :func:`override_keyword_defaults` is how lungvl's processes shorten it
(see ``server/app.py`` and ``client/supernode_main.py``). Pure Python: no third-party import here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["override_keyword_defaults"]


def override_keyword_defaults(func: Callable[..., Any], **values: Any) -> dict[str, Any]:
    """Set keyword-only defaults of ``func`` for every later call that does not pass them.

    Args:
        func: a plain Python function (callers that imported it by name see the change too).
        **values: new defaults by parameter name.

    Returns:
        The previous defaults of the parameters changed (to restore them).

    Raises:
        ValueError: a name that is not a keyword-only parameter with a default of ``func`` (e.g. the
            library changed: better loud than silently doing nothing).
    """
    current = dict(getattr(func, "__kwdefaults__", None) or {})
    unknown = sorted(set(values) - set(current))
    if unknown:
        name = getattr(func, "__qualname__", repr(func))
        raise ValueError(f"{name} has no keyword-only parameter(s) {unknown} with a default; it has {sorted(current)}")
    previous = {k: current[k] for k in values}
    current.update(values)
    func.__kwdefaults__ = current  # type: ignore[attr-defined]
    return previous
