#!/usr/bin/env python3
"""Create or renew the consortium's TLS material: a CA and the SuperLink's server certificate.

A thin command-line wrapper over :func:`federation.pki.make_tls_material` (the certificate tooling lives
in the installed package; ``lungvl consortium init`` builds whole startup kits with it). Use this script to
renew the SuperLink's certificate with the consortium's existing CA::

    python infra/make_certs.py --out certs --hostname superlink.consortium.example

writes into ``certs/``:

- ``ca.crt`` / ``ca.key``: the consortium CA (ECDSA P-384, 10 years). ``ca.crt`` goes to every
  hospital (``[federation] root_certificates`` of site.toml); ``ca.key`` stays offline with the coordinator.
- ``server.crt`` / ``server.key``: the SuperLink's certificate (ECDSA P-384, ``--days`` valid), signed by
  the CA, with subjectAltNames ``localhost``, ``127.0.0.1``, ``::1`` and every ``--hostname`` /
  ``--ip`` given (the name the sites dial must be among them).

An existing CA in ``--out`` is reused (so a renewed server certificate stays trusted by the sites);
``--force`` replaces everything. Private keys are written with mode 0600.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from federation.pki import make_tls_material


def make_certs(
    out: Path, hostnames: list[str], ips: list[str], *, org: str = "lungvl", days: int = 825, force: bool = False
) -> dict[str, Path]:
    """Write (or reuse) the CA and write a fresh server certificate; returns name -> path.

    Raises:
        ValueError: an ``ips`` entry that is not an IP address, or an empty hostname.
    """
    return make_tls_material(Path(out), hostnames, ips, org=org, days=days, force=force)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("certs"), help="output directory (default: certs)")
    parser.add_argument("--hostname", action="append", default=[], help="DNS name of the SuperLink (repeatable)")
    parser.add_argument("--ip", action="append", default=[], help="extra IP address of the SuperLink (repeatable)")
    parser.add_argument("--org", default="lungvl", help="organisation name in the certificates")
    parser.add_argument("--days", type=int, default=825, help="server certificate validity in days")
    parser.add_argument("--force", action="store_true", help="replace an existing CA too")
    args = parser.parse_args(argv)
    try:
        paths = make_certs(args.out, args.hostname, args.ip, org=args.org, days=args.days, force=args.force)
    except ValueError as err:
        print(f"make_certs: {err}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
