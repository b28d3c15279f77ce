"""override_keyword_defaults: changes what later calls get, refuses names the function does not have."""

from __future__ import annotations

import pytest

from federation.patching import override_keyword_defaults


def _fetch(key: str, *, tries: int = 3, backoff: float = 1.0) -> tuple[str, int, float]:
    return key, tries, backoff


def test_later_calls_get_the_new_defaults_and_the_old_ones_come_back() -> None:
    old = override_keyword_defaults(_fetch, backoff=0.1)
    try:
        assert old == {"backoff": 1.0}
        assert _fetch("a") == ("a", 3, 0.1)
        assert _fetch("a", backoff=5.0) == ("a", 3, 5.0)  # an explicit value still wins
    finally:
        override_keyword_defaults(_fetch, **old)
    assert _fetch("a") == ("a", 3, 1.0)


@pytest.mark.parametrize("name", ["key", "backof", "nope"])
def test_names_that_are_not_keyword_only_defaults_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=rf"_fetch has no keyword-only parameter\(s\) \['{name}'\]"):
        override_keyword_defaults(_fetch, **{name: 1})
    assert _fetch("a") == ("a", 3, 1.0)
