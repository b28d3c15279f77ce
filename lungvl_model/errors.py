"""Exception classes shared by every layer, so the CLI can give each kind of failure its own exit code.

Domain modules raise these (or subclasses) with a message that names the file, row or key and the
value; ``lungvl.errors`` maps them to exit codes (README "Exit codes").
"""

from __future__ import annotations


class CorruptStateError(ValueError):
    """A state file lungvl wrote (registry, audit ledger, accountant state, checkpoint) is damaged.

    Unreadable, truncated or belonging to something else; the message names the file and what was wrong.
    """


class PeerUnreachable(ConnectionError):
    """A network peer (the SuperLink) could not be resolved, connected to, or failed the TLS handshake."""
