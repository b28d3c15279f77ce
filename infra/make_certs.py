#!/usr/bin/env python3
"""Create the consortium's TLS material: a CA and the SuperLink's server certificate.

Standalone script (only needs ``cryptography``); no lungvl package imports it::

    python infra/make_certs.py --out certs --hostname superlink.consortium.example

writes into ``certs/``:

- ``ca.crt`` / ``ca.key``: the consortium CA (ECDSA P-384, 10 years). ``ca.crt`` goes to every
  hospital (``[server] root_certificates`` of site.toml); ``ca.key`` stays offline with the coordinator.
- ``server.crt`` / ``server.key``: the SuperLink's certificate (ECDSA P-384, ``--days`` valid), signed by
  the CA, with subjectAltNames ``localhost``, ``127.0.0.1``, ``::1`` and every ``--hostname`` /
  ``--ip`` given (the name the sites dial must be among them).

An existing CA in ``--out`` is reused (so a renewed server certificate stays trusted by the sites);
``--force`` replaces everything. Private keys are written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _name(common_name: str, org: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _ca(out: Path, org: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if (out / CA_CERT).exists() and (out / CA_KEY).exists():
        cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SystemExit(f"{out / CA_KEY}: not an EC private key")
        return cert, key
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    name = _name(f"{org} consortium CA", org)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )  # fmt: skip
    (out / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / CA_KEY, key)
    return cert, key


def make_certs(
    out: Path, hostnames: list[str], ips: list[str], *, org: str = "lungvl", days: int = 825, force: bool = False
) -> dict[str, Path]:
    """Write (or reuse) the CA and write a fresh server certificate; returns name -> path.

    Raises:
        ValueError: an ``ips`` entry that is not an IP address, or an empty hostname.
    """
    out.mkdir(parents=True, exist_ok=True)
    if force:
        for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY):
            (out / name).unlink(missing_ok=True)
    sans: list[x509.GeneralName] = []
    for host in ["localhost", *hostnames]:
        if not host.strip():
            raise ValueError(f"--hostname must not be empty, got {host!r}")
        if x509.DNSName(host) not in sans:
            sans.append(x509.DNSName(host))
    for ip in ["127.0.0.1", "::1", *ips]:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"--ip {ip!r} is not an IP address") from None
        if x509.IPAddress(addr) not in sans:
            sans.append(x509.IPAddress(addr))
    ca_cert, ca_key = _ca(out, org, 3650)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0] if hostnames else "localhost", org))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    (out / SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / SERVER_KEY, key)
    return {
        "ca_cert": out / CA_CERT,
        "ca_key": out / CA_KEY,
        "server_cert": out / SERVER_CERT,
        "server_key": out / SERVER_KEY,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
