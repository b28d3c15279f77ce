"""``flower-supernode`` with a shorter object-pull backoff: ``python -m client.supernode_main ARGS``.

Takes exactly ``flower-supernode``'s arguments. The SuperNode downloads each message's objects from
the SuperLink; an object that is not uploaded yet is asked for again after 1, 2, 4, 8, 10 s (Flower
1.42's fixed defaults), so one early ask cost a loopback round up to 15 s. Here the waits are
:data:`PULL_BACKOFF_S` doubling to :data:`PULL_BACKOFF_CAP_S`; everything else is Flower's SuperNode.
"""

from __future__ import annotations

import sys

from flwr.supercore.inflatable import inflatable_utils
from flwr.supernode.cli import flower_supernode

from lungvl_model.patching import override_keyword_defaults

__all__ = ["PULL_BACKOFF_CAP_S", "PULL_BACKOFF_S", "main", "shorten_object_pull_backoff"]

#: first wait (s) before asking the SuperLink again for an object not uploaded yet
PULL_BACKOFF_S = 0.2
#: longest wait (s) between two asks (each ask is one HTTPS request to the SuperLink)
PULL_BACKOFF_CAP_S = 2.0


def shorten_object_pull_backoff(initial_s: float = PULL_BACKOFF_S, cap_s: float = PULL_BACKOFF_CAP_S) -> None:
    """Use ``initial_s`` doubling to ``cap_s`` for Flower's object pulls in this process."""
    for func in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        override_keyword_defaults(func, initial_backoff=initial_s, backoff_cap=cap_s)


def main(argv: list[str] | None = None) -> None:
    """Run Flower's SuperNode with ``argv`` (default: this process's arguments)."""
    shorten_object_pull_backoff()
    if argv is not None:
        sys.argv = ["flower-supernode", *argv]
    else:
        sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
