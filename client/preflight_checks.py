"""The file and network checks of ``lungvl site join``, before any process starts.

Each check names the ``[federation]`` key of site.toml, the file and what is wrong with it, so hospital
IT sees one line on the terminal instead of a SuperNode that waits (Flower 1.42's SuperNode hangs on a
CA file that is not a certificate, and retries an unreachable SuperLink for ever):

- :func:`check_root_certificates`: the CA file is PEM X.509 (a bundle is fine), every certificate in it
  is a CA (BasicConstraints ``ca=True``) and valid now;
- :func:`load_private_key` / :func:`check_key_pair`: the node key is an OpenSSH ECDSA key and the
  ``<private_key>.pub`` beside it (what ``lungvl site keys`` wrote and the coordinator admitted) is its
  public half; :func:`key_permission_warning` flags a key readable by others;
- :func:`check_superlink`: the SuperLink's host resolves, its port accepts TCP within
  :data:`CONNECT_TIMEOUT_S` and completes a TLS handshake verified by the CA file for that host name.

File problems raise :class:`SiteNotReady` (the CLI's exit 2); network and TLS problems raise
:class:`~lungvl_model.errors.PeerUnreachable` (exit 7).
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
import stat
import time
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lungvl_model.errors import PeerUnreachable

__all__ = [
    "CONNECT_TIMEOUT_S",
    "SiteNotReady",
    "check_key_pair",
    "check_root_certificates",
    "check_superlink",
    "key_permission_warning",
    "load_private_key",
    "load_public_key",
    "split_address",
]

#: Seconds :func:`check_superlink` waits for the TCP connection, and again for the TLS handshake.
CONNECT_TIMEOUT_S: Final = 5.0
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_CERT_LABELS: Final = {b"CERTIFICATE", b"TRUSTED CERTIFICATE", b"X509 CERTIFICATE"}


class SiteNotReady(RuntimeError):
    """The site must not join: no usable study, budget spent, a missing file, an accountant behind its ledger."""


# ---------------------------------------------------------------------------------------------- keys
def _check_ec(key: Any, path: Path, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        raise ValueError(f"{what} {path}: expected an ECDSA key (SECP384R1), got {type(key).__name__}")
    if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1):
        raise ValueError(f"{what} {path}: curve {key.curve.name} is not a NIST curve Flower accepts")


def load_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """Read a site's public key (OpenSSH ``ecdsa-sha2-nistp384 ...`` line) and check its format.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an OpenSSH ECDSA public key on a NIST curve.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"public key file {p} does not exist")
    try:
        key = serialization.load_ssh_public_key(p.read_bytes())
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"public key {p}: not an OpenSSH public key ({err}); create keys with `lungvl site keys`"
        ) from None
    _check_ec(key, p, "public key")
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Read a site's private key (OpenSSH format, unencrypted) and check its format.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an unencrypted OpenSSH ECDSA private key on a NIST curve.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"private key file {p} does not exist")
    try:
        key = serialization.load_ssh_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"private key {p}: not an unencrypted OpenSSH private key ({err})") from None
    _check_ec(key, p, "private key")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def check_key_pair(private_path: Path, private_key: ec.EllipticCurvePrivateKey) -> str | None:
    """Check that ``<private_key>.pub`` (when it exists) is the public half of ``private_key``.

    The coordinator admits the site by that ``.pub`` file; a private key from another pair would be
    refused by the SuperLink only after the SuperNode has started.

    Args:
        private_path: the ``[federation] private_key`` file.
        private_key: its key (:func:`load_private_key`).

    Returns:
        A warning when the ``.pub`` file exists but cannot be read as a public key; else None.

    Raises:
        SiteNotReady: the ``.pub`` file holds a different key.
    """
    public_path = private_path.with_name(private_path.name + ".pub")
    if not public_path.is_file():
        return None
    try:
        public = load_public_key(public_path)
    except ValueError as err:
        return f"[federation] private_key: cannot compare with {public_path}: {err}"
    if public.public_numbers() != private_key.public_key().public_numbers():
        raise SiteNotReady(
            f"[federation] private_key: {public_path.name} does not belong to {private_path.name} "
            f"({public_path} is the public key of another key pair than {private_path}; the coordinator "
            "admits the site by its .pub file: use the matching pair or create one with `lungvl site keys`)"
        )
    return None


def key_permission_warning(path: Path) -> str | None:
    """A warning when the private key file can be read or written by group or others (POSIX), else None."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if mode & 0o077 and hasattr(stat, "S_IRWXG"):
        return (
            f"[federation] private_key: {path} is accessible to group/others (mode {mode:04o}); "
            f"restrict it: chmod 600 {path}"
        )
    return None


# ----------------------------------------------------------------------------------------- CA file
def _what_instead(data: bytes) -> str:
    """What a file without a PEM certificate holds, in words (never its content)."""
    if not data.strip():
        return "is empty"
    labels = [m.group(1) for m in _PEM_BLOCK.finditer(data)]
    if labels:
        label = labels[0]
        if b"PRIVATE KEY" in label:
            return f"is a private key (PEM '{label.decode()}' block), not a certificate"
        if b"PUBLIC KEY" in label:
            return f"is a public key (PEM '{label.decode()}' block), not a certificate"
        if label in (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"):
            return "is a certificate signing request, not a certificate"
        return f"holds a PEM '{label.decode()}' block, not a certificate"
    if data.lstrip().startswith((b"ssh-", b"ecdsa-sha2-")):
        return "is an OpenSSH public key, not a certificate"
    if data[:1] == b"\x30":  # an ASN.1 SEQUENCE: DER
        try:
            x509.load_der_x509_certificate(data)
        except ValueError:
            return "is binary (DER?) data, not a PEM certificate"
        return "is a DER-encoded certificate; it must be PEM (openssl x509 -inform der -in FILE -out ca.crt)"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "is binary data, not a PEM certificate"
    return "is text without a '-----BEGIN CERTIFICATE-----' block, not a certificate"


def check_root_certificates(path: Path, *, now: dt.datetime | None = None) -> list[x509.Certificate]:
    """Check the consortium CA file: PEM X.509 certificates, each a CA, each valid at ``now``.

    Args:
        path: the ``[federation] root_certificates`` file.
        now: the time to check validity at (default: now, UTC).

    Returns:
        The certificates in the file (a bundle may hold several).

    Raises:
        SiteNotReady: the file is missing or unreadable, holds something else than PEM certificates
            (a key, a CSR, DER, text, nothing), a certificate that is not a CA, or one that has
            expired or is not valid yet; the message names the key, the file and what was found.
    """
    where = f"[federation] root_certificates: {path}"
    if not path.is_file():
        raise SiteNotReady(f"[federation] root_certificates: CA certificate {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SiteNotReady(f"{where}: cannot read it ({err.strerror})") from None
    labels = {m.group(1) for m in _PEM_BLOCK.finditer(data)}
    if not labels & _CERT_LABELS:
        raise SiteNotReady(f"{where} {_what_instead(data)}")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise SiteNotReady(f"{where}: a CERTIFICATE block cannot be parsed ({err})") from None
    when = now or dt.datetime.now(dt.UTC)
    for cert in certs:
        subject = cert.subject.rfc4514_string() or "(empty subject)"
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise SiteNotReady(
                f"{where}: {subject!r} is not a CA certificate (no BasicConstraints ca=True); use the "
                "consortium CA (ca.crt from infra/make_certs.py), not the SuperLink's server certificate"
            )
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if when > end:
            raise SiteNotReady(
                f"{where}: CA certificate {subject!r} expired on {end:%Y-%m-%d %H:%M} UTC "
                f"(valid {start:%Y-%m-%d} to {end:%Y-%m-%d}; now {when:%Y-%m-%d %H:%M} UTC)"
            )
        if when < start:
            raise SiteNotReady(
                f"{where}: CA certificate {subject!r} is not valid before {start:%Y-%m-%d %H:%M} UTC "
                f"(now {when:%Y-%m-%d %H:%M} UTC: check this machine's clock)"
            )
    return certs


# ----------------------------------------------------------------------------------------- network
def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> ``(host, port)`` (brackets removed).

    Raises:
        ValueError: no numeric port.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"[federation] superlink must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def check_superlink(address: str, cafile: Path, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Resolve the SuperLink's host, connect to its port and complete a verified TLS handshake, then close.

    Args:
        address: ``[federation] superlink`` (``host:port``).
        cafile: the consortium CA file (check it first: :func:`check_root_certificates`).
        timeout: seconds to wait for the TCP connection (all addresses of the host together), and
            again for the TLS handshake.

    Raises:
        PeerUnreachable: the host does not resolve, nothing answers or the connection is refused
            (naming the address and the seconds waited), or the TLS handshake fails (OpenSSL's reason
            as it is: certificate verify failed, hostname mismatch, wrong version number, ...).
    """
    host, port = split_address(address)
    where = f"[federation] superlink = {address!r}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise PeerUnreachable(f"cannot resolve host {host!r} ({where}): {err.strerror}") from None
    t0 = time.monotonic()
    sock: socket.socket | None = None
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            break
        candidate = socket.socket(family, kind, proto)
        candidate.settimeout(left)
        try:
            candidate.connect(sockaddr)
        except OSError as err:
            candidate.close()
            last = err
            continue
        sock = candidate
        break
    waited = time.monotonic() - t0
    if sock is None:
        if isinstance(last, ConnectionRefusedError):
            reason = f"connection refused after {waited:.1f} s (is the SuperLink running, Fleet API on port {port}?)"
        elif last is None or isinstance(last, TimeoutError):
            reason = f"no answer after {waited:.1f} s (a firewall dropping the packets, or a wrong address?)"
        else:
            reason = f"{last.strerror or last} (after {waited:.1f} s)"
        raise PeerUnreachable(f"cannot connect to the SuperLink at {address} ({where}): {reason}")
    try:
        context = ssl.create_default_context(cafile=str(cafile))
        sock.settimeout(timeout)
        with context.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as err:
        hint = ""
        if "hostname" in str(err).lower() or "ip address mismatch" in str(err).lower():
            hint = f"; the SuperLink's certificate must name {host!r} (infra/make_certs.py --hostname/--ip)"
        elif "issuer" in str(err).lower() or "self-signed" in str(err).lower():
            hint = f"; the SuperLink's certificate is not signed by the CA in {cafile}"
        raise PeerUnreachable(f"TLS handshake with the SuperLink at {address} failed: {err}{hint}") from None
    except TimeoutError:
        raise PeerUnreachable(
            f"TLS handshake with the SuperLink at {address}: no answer after {timeout:g} s "
            "(a port that accepts connections but does not speak TLS?)"
        ) from None
    except (ssl.SSLError, OSError) as err:
        raise PeerUnreachable(f"TLS handshake with the SuperLink at {address} failed: {err}") from None
    finally:
        sock.close()
