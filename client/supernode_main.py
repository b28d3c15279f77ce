"""``flower-supernode`` with a shorter object-pull backoff: ``python -m client.supernode_main ARGS``.

Takes exactly ``flower-supernode``'s arguments; the waits are :mod:`federation.transport`'s, everything
else is Flower's SuperNode.
"""

from __future__ import annotations

import sys

from flwr.supernode.cli import flower_supernode

from federation.transport import shorten_object_pull_backoff

__all__ = ["main"]


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
