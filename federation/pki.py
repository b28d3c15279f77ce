"""The consortium's keys and certificates: a CA, the SuperLink's server certificate, the sites' node keys.

Both sides of a deployment use what this writes: the coordinator's SuperLink serves ``server.crt`` /
``server.key`` (signed by the consortium CA), every site verifies it with ``ca.crt`` and authenticates
with its node key pair (ECDSA P-384, OpenSSH format, the form Flower 1.42's ``--auth-supernode-private-key``
and ``flwr supernode register`` take). ``lungvl consortium init`` builds whole startup kits from these
functions; ``infra/make_certs.py`` is a thin command-line wrapper over :func:`make_tls_material`.

- CA: ECDSA P-384, self-signed, ``BasicConstraints(ca=True, path_length=0)``, 10 years.
- Server certificate: ECDSA P-384, signed by the CA, ``serverAuth``, subjectAltNames ``localhost``,
  ``127.0.0.1``, ``::1`` and every host given (a DNS name or an IP address: the name the sites dial
  must be among them).
- Private keys are written with mode 0600 (created so, never chmod-ed afterwards).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "NODE_PRIVATE_KEY",
    "NODE_PUBLIC_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "is_ip",
    "load_ca",
    "make_tls_material",
    "new_ca",
    "new_server_cert",
    "parse_address",
    "public_key_fingerprint",
    "write_cert",
    "write_node_key_pair",
    "write_private_key",
]

CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
SERVER_CERT: Final = "server.crt"
SERVER_KEY: Final = "server.key"
NODE_PRIVATE_KEY: Final = "site_key"
NODE_PUBLIC_KEY: Final = "site_key.pub"
#: subjectAltNames every server certificate carries (the coordinator's own tools dial loopback).
LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1")
CA_DAYS: Final = 3650
SERVER_DAYS: Final = 825
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (brackets allowed: ``[::1]``)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _check_host(host: str, what: str) -> str:
    """``host`` (a DNS name or an IP address, brackets removed), or ``ValueError`` naming it."""
    bare = host.strip()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    if is_ip(bare):
        return bare
    labels = bare.rstrip(".").split(".")
    if not bare or len(bare) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"{what} {host!r} is neither a DNS name (letters, digits, '-', '.') nor an IP address")
    return bare


def parse_address(address: str, *, what: str = "--superlink") -> tuple[str, int]:
    """Split and check ``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address).

    Args:
        address: the address.
        what: its name in the error message (an option or a TOML key).

    Returns:
        ``(host, port)``, the host without brackets.

    Raises:
        ValueError: no port, a port outside 1-65535, an unbracketed IPv6 address or a bad host name; the
            message names ``what`` and the value.
    """
    host, sep, port = str(address).strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what} must be HOST:PORT, got {address!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {address!r}: port must be a number from 1 to 65535, got {port!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{what} {address!r}: write an IPv6 address in brackets, e.g. [::1]:9093")
    return _check_host(host, f"{what} host"), int(port)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, *, openssh: bool = False) -> Path:
    """Write ``key`` unencrypted (PKCS#8 PEM, or OpenSSH for a node key), created with mode 0600.

    Raises:
        FileExistsError: ``path`` exists (a private key is never silently replaced).
    """
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def write_cert(path: Path, cert: x509.Certificate) -> Path:
    """Write a certificate as PEM."""
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _name(common_name: str, org: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
        decipher_only=False,
    )  # fmt: skip


def _check_days(days: int, what: str) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"{what} must be a whole number of days >= 1, got {days!r}")


def new_ca(*, org: str = "lungvl", days: int = CA_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh self-signed consortium CA (ECDSA P-384).

    Args:
        org: organisation name in the subject.
        days: validity.

    Returns:
        ``(certificate, private_key)``.
    """
    _check_days(days, "CA validity")
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
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The server certificate's SANs: :data:`LOOPBACK_NAMES` then ``hosts`` (each a DNS name or an IP).

    Raises:
        ValueError: a host that is neither, naming it.
    """
    sans: list[x509.GeneralName] = []
    for host in (*LOOPBACK_NAMES, *hosts):
        bare = _check_host(host, "server certificate host")
        name: x509.GeneralName = (
            x509.IPAddress(ipaddress.ip_address(bare)) if is_ip(bare) else x509.DNSName(bare.rstrip("."))
        )
        if name not in sans:
            sans.append(name)
    return sans


def new_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    *,
    org: str = "lungvl",
    days: int = SERVER_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The SuperLink's certificate, signed by the consortium CA.

    Args:
        ca_cert: the CA certificate.
        ca_key: the CA's private key.
        hosts: DNS names and IP addresses the sites dial (the first one is the subject's CN); the loopback
            names are always added.
        org: organisation name in the subject.
        days: validity.

    Returns:
        ``(certificate, private_key)``.

    Raises:
        ValueError: a host that is neither a DNS name nor an IP address, or ``days`` < 1.
    """
    _check_days(days, "server certificate validity")
    sans = subject_alt_names(hosts)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0].strip("[]") if hosts else "localhost", org))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read an existing CA (to sign a renewed server certificate that the sites still trust).

    Raises:
        ValueError: the key is not an unencrypted EC private key, or is not the certificate's pair.
    """
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an EC private key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ValueError(f"{key_path}: not the private key of {cert_path}")
    return cert, key


def write_node_key_pair(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """A site's node-authentication key pair (ECDSA SECP384R1, OpenSSH), as ``lungvl site keys`` writes it.

    Args:
        out_dir: folder for ``site_key`` (private, mode 0600) and ``site_key.pub`` (admitted by the
            coordinator).
        overwrite: replace an existing pair.

    Returns:
        ``(private_key_path, public_key_path)``.

    Raises:
        FileExistsError: a key already exists there and ``overwrite`` is False.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = out_dir / NODE_PRIVATE_KEY, out_dir / NODE_PUBLIC_KEY
    if private.exists():
        if not overwrite:
            raise FileExistsError(f"{private} already exists (a site keeps its key; pass --overwrite to replace it)")
        private.unlink()
    key = ec.generate_private_key(ec.SECP384R1())
    write_private_key(private, key, openssh=True)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return private, public


def public_key_fingerprint(public_key_file: Path) -> str:
    """The first 16 hex digits of the sha256 of an OpenSSH public key file (as ``server admit`` shows it)."""
    return hashlib.sha256(public_key_file.read_bytes().strip()).hexdigest()[:16]


def make_tls_material(
    out: Path,
    hostnames: Sequence[str] = (),
    ips: Sequence[str] = (),
    *,
    org: str = "lungvl",
    days: int = SERVER_DAYS,
    force: bool = False,
) -> dict[str, Path]:
    """Write (or reuse) the CA in ``out`` and a fresh server certificate signed by it.

    An existing ``ca.crt`` + ``ca.key`` pair in ``out`` is reused, so a renewed server certificate stays
    trusted by the sites; ``force`` replaces everything.

    Args:
        out: output folder (created).
        hostnames: DNS names of the SuperLink.
        ips: IP addresses of the SuperLink.
        org: organisation name in the certificates.
        days: server certificate validity.
        force: replace an existing CA too.

    Returns:
        ``{"ca_cert", "ca_key", "server_cert", "server_key"}`` -> path.

    Raises:
        ValueError: an ``ips`` entry that is not an IP address, or an empty or malformed hostname.
    """
    for host in hostnames:
        if not host.strip():
            raise ValueError(f"--hostname must not be empty, got {host!r}")
        if is_ip(host):
            raise ValueError(f"--hostname {host!r} is an IP address; give it with --ip")
    for ip in ips:
        if not is_ip(ip):
            raise ValueError(f"--ip {ip!r} is not an IP address")
    hosts = [*hostnames, *ips]
    subject_alt_names(hosts)  # every host checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    paths = {"ca_cert": out / CA_CERT, "ca_key": out / CA_KEY, "server_cert": out / SERVER_CERT}
    paths["server_key"] = out / SERVER_KEY
    if force:
        for path in paths.values():
            path.unlink(missing_ok=True)
    if paths["ca_cert"].exists() and paths["ca_key"].exists():
        ca_cert, ca_key = load_ca(paths["ca_cert"], paths["ca_key"])
    else:
        ca_cert, ca_key = new_ca(org=org)
        write_cert(paths["ca_cert"], ca_cert)
        paths["ca_key"].unlink(missing_ok=True)
        write_private_key(paths["ca_key"], ca_key)
    cert, key = new_server_cert(ca_cert, ca_key, hosts, org=org, days=days)
    write_cert(paths["server_cert"], cert)
    paths["server_key"].unlink(missing_ok=True)
    write_private_key(paths["server_key"], key)
    return paths
