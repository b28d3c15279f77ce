"""Transport constants of lungvl's Flower processes, one set for the server, the SuperNodes and the site worker.

Flower 1.42 asks the SuperLink again for an object that is not uploaded yet after 1, 2, 4, 8, 10 s
(fixed function defaults, no setting); one early ask cost a loopback round up to 15 s. lungvl's
processes wait :data:`PULL_BACKOFF_S` doubling to :data:`PULL_BACKOFF_CAP_S` instead (each ask is one
HTTPS request, so a short cap costs a few requests, not seconds).
"""

from __future__ import annotations

from typing import Final

from flwr.supercore.inflatable import inflatable_utils

from federation.patching import override_keyword_defaults

__all__ = ["PULL_BACKOFF_CAP_S", "PULL_BACKOFF_S", "shorten_object_pull_backoff"]

#: first wait (s) before asking again for an object not uploaded yet
PULL_BACKOFF_S: Final = 0.2
#: longest wait (s) between two asks
PULL_BACKOFF_CAP_S: Final = 1.0


def shorten_object_pull_backoff(initial_s: float = PULL_BACKOFF_S, cap_s: float = PULL_BACKOFF_CAP_S) -> None:
    """Use ``initial_s`` doubling to ``cap_s`` for Flower's object pulls in this process."""
    for func in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        override_keyword_defaults(func, initial_backoff=initial_s, backoff_cap=cap_s)
