"""federation.pki: addresses, certificates, node keys and the infra/make_certs.py wrapper over them."""

from __future__ import annotations

import ipaddress
import runpy
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from client.deploy import generate_site_keys
from client.preflight_checks import check_key_pair, check_root_certificates, load_private_key
from federation import pki
from server.deploy import _public_key_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("superlink.example.org:9093", ("superlink.example.org", 9093)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("[2001:db8::5]:9093", ("2001:db8::5", 9093)),
        ("localhost:9093", ("localhost", 9093)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert pki.parse_address(address) == expected


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("superlink", "must be HOST:PORT"),
        (":9093", "must be HOST:PORT"),
        ("h:0", "1 to 65535"),
        ("h:65536", "1 to 65535"),
        ("h:-1", "1 to 65535"),
        ("2001:db8::5:9093", "brackets"),
        ("under_score.example:9093", "neither a DNS name"),
        ("-bad.example:9093", "neither a DNS name"),
        ("a..b:9093", "neither a DNS name"),
    ],
)
def test_parse_address_invalid(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        pki.parse_address(address, what="[consortium] superlink")
    assert "[consortium] superlink" in str(err.value)


def test_server_certificate_names_the_hosts_and_chains(tmp_path: Path) -> None:
    ca, ca_key = pki.new_ca(org="trial")
    cert, _ = pki.new_server_cert(ca, ca_key, ["link.example.org", "10.1.2.3", "[::2]"], days=30)
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1", "10.1.2.3", "::2"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    path = pki.write_cert(tmp_path / "ca.crt", ca)
    assert len(check_root_certificates(path)) == 1  # what a site's join pre-flight accepts
    with pytest.raises(ValueError, match="days"):
        pki.new_server_cert(ca, ca_key, [], days=0)


def test_private_keys_are_0600_and_never_replaced(tmp_path: Path) -> None:
    _, key = pki.new_ca()
    path = pki.write_private_key(tmp_path / "ca.key", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        pki.write_private_key(path, key)


def test_node_keys_are_what_site_keys_writes_and_the_server_admits(tmp_path: Path) -> None:
    private, public = pki.write_node_key_pair(tmp_path / "pki")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert check_key_pair(private, load_private_key(private)) is None
    _public_key_bytes(public)  # server admit's check of the .pub
    theirs, theirs_pub = generate_site_keys(tmp_path / "cli")  # `lungvl site keys`
    assert private.read_bytes().splitlines()[0] == theirs.read_bytes().splitlines()[0]  # same OpenSSH format
    ours = serialization.load_ssh_public_key(public.read_bytes())
    other = serialization.load_ssh_public_key(theirs_pub.read_bytes())
    assert type(ours) is type(other) and ours.curve.name == other.curve.name == "secp384r1"  # type: ignore[union-attr]
    assert len(pki.public_key_fingerprint(public)) == 16
    with pytest.raises(FileExistsError, match="already exists"):
        pki.write_node_key_pair(tmp_path / "pki")
    again, _ = pki.write_node_key_pair(tmp_path / "pki", overwrite=True)
    assert again.read_bytes() != theirs.read_bytes()


def test_make_tls_material_reuses_the_ca_and_force_replaces_it(tmp_path: Path) -> None:
    first = pki.make_tls_material(tmp_path, ["link.example.org"], ["10.0.0.5"])
    ca = first["ca_cert"].read_bytes()
    again = pki.make_tls_material(tmp_path, [], [])
    assert again["ca_cert"].read_bytes() == ca
    x509.load_pem_x509_certificate(again["server_cert"].read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca)
    )
    pki.make_tls_material(tmp_path, [], [], force=True)
    assert first["ca_cert"].read_bytes() != ca
    with pytest.raises(ValueError, match="'10.0.0.5' is an IP address; give it with --ip"):
        pki.make_tls_material(tmp_path, ["10.0.0.5"], [])


def test_load_ca_refuses_a_foreign_key(tmp_path: Path) -> None:
    ca, _ = pki.new_ca()
    _, other_key = pki.new_ca()
    pki.write_cert(tmp_path / "ca.crt", ca)
    pki.write_private_key(tmp_path / "ca.key", other_key)
    with pytest.raises(ValueError, match="not the private key"):
        pki.load_ca(tmp_path / "ca.crt", tmp_path / "ca.key")


def test_make_certs_script_is_a_wrapper(tmp_path: Path) -> None:
    mod = runpy.run_path(str(ROOT / "infra" / "make_certs.py"))
    paths = mod["make_certs"](tmp_path / "certs", ["link.example.org"], ["10.0.0.9"])
    cert = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.9") in san.get_values_for_type(x509.IPAddress)
    res = subprocess.run(
        [sys.executable, str(ROOT / "infra" / "make_certs.py"), "--out", str(tmp_path / "x"), "--ip", "nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "'nope' is not an IP address" in res.stderr
    assert not (tmp_path / "x" / "ca.key").exists()
