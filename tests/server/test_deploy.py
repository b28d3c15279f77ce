"""Server deployment: consortium certificates, the [deployment] table, SuperLink flags, key admission."""

from __future__ import annotations

import ipaddress
import runpy
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from lungvl_model.data.site_layout import toml_dumps
from server.deploy import ServerDeployConfig, _public_key_bytes, superlink_command, write_app

ROOT = Path(__file__).resolve().parents[2]


def make_certs(out: Path, *args: str) -> dict[str, Path]:
    mod = runpy.run_path(str(ROOT / "infra" / "make_certs.py"))
    return mod["make_certs"](out, *args)  # type: ignore[no-any-return]


def test_certificates_chain_and_sans(tmp_path: Path) -> None:
    paths = make_certs(tmp_path, ["superlink.example.org"], ["10.0.0.5"])
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.5")} <= ips
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert paths["server_key"].stat().st_mode & 0o077 == 0
    # a renewed server certificate keeps the CA, so the sites' ca.crt stays valid
    again = make_certs(tmp_path, [], [])
    x509.load_pem_x509_certificate(again["server_cert"].read_bytes()).verify_directly_issued_by(ca)


def test_certificates_reject_a_bad_ip(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'not-an-ip' is not an IP address"):
        make_certs(tmp_path, [], ["not-an-ip"])


def write_server_toml(tmp: Path, deployment: dict | None = None, **server: object) -> Path:
    make_certs(tmp / "certs", [], [])
    (tmp / "model").mkdir(exist_ok=True)
    (tmp / "model" / "model.pt").write_bytes(b"x")
    dep = {
        "run_dir": "run",
        "port": 19093,
        "ca_cert": "certs/ca.crt",
        "server_cert": "certs/server.crt",
        "server_key": "certs/server.key",
        "init_model": "model",
    }
    dep.update(deployment or {})
    doc = {"strategy": {"rounds": 3, "min_sites": 2, **server}, "deployment": {k: v for k, v in dep.items() if v}}
    path = tmp / "server.toml"
    path.write_text(toml_dumps(doc))
    return path


def test_config_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = ServerDeployConfig.from_toml(write_server_toml(tmp_path))
    assert cfg.server.rounds == 3 and cfg.run_dir == (tmp_path / "run").resolve()
    assert cfg.registry_url == str(cfg.run_dir / "registry.db")
    cfg.check_files()
    cmd = superlink_command(cfg)
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-ca-certfile"):
        assert flag in cmd
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--database") + 1] == str(cfg.run_dir / "superlink.db")
    app = write_app(cfg, resume=True)
    text = (app / "pyproject.toml").read_text()
    assert 'serverapp = "server.app:app"' in text and "resume = true" in text


@pytest.mark.parametrize(
    ("deployment", "server", "error", "match"),
    [
        ({"prot": 1}, {}, KeyError, "did you mean 'port'"),
        ({"ca_cert": None}, {}, KeyError, "lacks \\['ca_cert'\\]"),
        ({"port": "9093"}, {}, ValueError, "port must be a port number, got '9093'"),
        ({"admit": "a.pub"}, {}, ValueError, "admit must be a list"),
        ({}, {"roundz": 2}, KeyError, "did you mean 'rounds'"),
    ],
)
def test_invalid_args(tmp_path: Path, deployment: dict, server: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ServerDeployConfig.from_toml(write_server_toml(tmp_path, deployment, **server))


def test_missing_certificate_is_named(tmp_path: Path) -> None:
    cfg = ServerDeployConfig.from_toml(write_server_toml(tmp_path, {"server_cert": "certs/missing.crt"}))
    with pytest.raises(FileNotFoundError, match="server_cert: .*missing.crt does not exist"):
        cfg.check_files()


def test_admission_rejects_bad_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-rsa nonsense")
    with pytest.raises(ValueError, match="bad.pub: not an OpenSSH public key"):
        _public_key_bytes(bad)
    with pytest.raises(FileNotFoundError, match="none.pub"):
        _public_key_bytes(tmp_path / "none.pub")
