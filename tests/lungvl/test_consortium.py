"""``lungvl consortium init``: the kits, their TOML read back by the real readers, refusals and rebuilds."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509

from client.deploy import SiteDeployConfig
from client.preflight_checks import check_key_pair, check_root_certificates, load_private_key
from lungvl.cli import run
from lungvl.consortium import ConsortiumConfig, SiteSpec, resolve_config
from lungvl.consortium_kits import build_kits
from server.deploy import ServerDeployConfig

SITES = ["hospital-a", "hospital-b", "c_3"]


def init(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(["consortium", "init", *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def model_package(tmp: Path) -> Path:
    model = tmp / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    (model / "config.json").write_text("{}")
    return model


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_server_site_and_ca_kits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kits = tmp_path / "kits"
    model = model_package(tmp_path)
    code, out, err = init(
        capsys, "--sites", *SITES, "--superlink", "superlink.example.org:9443", "--out", str(kits),
        "--init-model", str(model), "--hostname", "10.0.0.7",
    )  # fmt: skip
    assert code == 0, err
    assert "lungvl server start --config" in out
    assert sorted(p.name for p in kits.iterdir()) == ["README.md", "ca", "consortium.toml", "server", "sites"]
    # the CA's private key is only in ca/, mode 0600; every private key is 0600
    assert [p.relative_to(kits).as_posix() for p in kits.rglob("ca.key")] == ["ca/ca.key"]
    private = [kits / "ca/ca.key", kits / "server/server.key"] + [kits / f"sites/{s}/keys/site_key" for s in SITES]
    assert all(mode(p) == 0o600 for p in private), {p.name: oct(mode(p)) for p in private}
    assert "keep offline" in (kits / "ca/README.md").read_text().lower()
    # the server certificate chains to the CA and names the SuperLink host (and the extra IP)
    ca = x509.load_pem_x509_certificate((kits / "ca/ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((kits / "server/server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.example.org" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("10.0.0.7") in san.get_values_for_type(x509.IPAddress)
    # server.toml as `server start` reads it: every site's public key admitted, the files there
    server = ServerDeployConfig.from_toml(kits / "server/server.toml")
    server.check_files()
    assert server.port == 9443 and server.host == "0.0.0.0" and server.run_dir == (kits / "server/run").resolve()
    assert [p.parent.name for p in server.admit] == SITES
    for s, pub in zip(SITES, server.admit, strict=True):
        assert pub.read_bytes() == (kits / f"sites/{s}/keys/site_key.pub").read_bytes()
    assert (kits / "server/initial_model/model.pt").read_bytes() == b"weights"
    assert "lungvl server start --config server.toml" in (kits / "server/README.md").read_text()
    # each site.toml as `site join` reads it: the SuperLink, this CA, a matching key pair, the model
    for s in SITES:
        site = SiteDeployConfig.from_toml(kits / f"sites/{s}/site.toml")
        assert site.client.name == s and site.superlink == "superlink.example.org:9443"
        assert site.root_certificates.read_bytes() == (kits / "ca/ca.crt").read_bytes()
        check_root_certificates(site.root_certificates)
        assert check_key_pair(site.private_key, load_private_key(site.private_key)) is None
        assert site.client.model_dir is not None and (site.client.model_dir / "model.pt").is_file()
        assert "lungvl site join --config" in (kits / f"sites/{s}/README.md").read_text()
    # the keys differ between sites
    assert len({(kits / f"sites/{s}/keys/site_key.pub").read_bytes() for s in SITES}) == len(SITES)


def test_rebuild_from_its_config_gives_the_same_layout_and_toml_with_new_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "kits", tmp_path / "kits2"
    code, _, err = init(
        capsys, "--sites", "a", "b", "--superlink", "[::1]:9093", "--out", str(first), "--runtime-port", "b=9095",
        "--bind", "::1", "--name", "trial",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = init(capsys, "--config", str(first / "consortium.toml"), "--out", str(second))
    assert code == 0, err

    def layout(root: Path) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))

    assert layout(first) == layout(second)
    tomls = [p.relative_to(first) for p in first.rglob("*.toml")]
    assert len(tomls) == 4  # consortium.toml, server.toml, two site.toml
    for rel in tomls:
        assert (first / rel).read_text() == (second / rel).read_text(), rel
    for rel in ("ca/ca.key", "server/server.key", "sites/a/keys/site_key", "sites/b/keys/site_key"):
        assert (first / rel).read_bytes() != (second / rel).read_bytes(), rel
    site_b = SiteDeployConfig.from_toml(second / "sites/b/site.toml")
    assert site_b.runtime_port == 9095 and site_b.superlink == "[::1]:9093"
    cert = x509.load_pem_x509_certificate((second / "server/server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("::1") in san.get_values_for_type(x509.IPAddress)
    assert ServerDeployConfig.from_toml(second / "server/server.toml").run_name == "trial"


def test_config_file_settings_and_command_line_overrides(tmp_path: Path) -> None:
    cfg_file = tmp_path / "consortium.toml"
    cfg_file.write_text(
        '[consortium]\nsuperlink = "link.example:9093"\n\n[sites.a]\ncohort = "referral"\n\n[sites.b]\n\n'
        "[strategy]\nrounds = 3\nmin_sites = 2\n\n[training]\nlocal_steps = 2\n"
    )
    cfg = resolve_config(cfg_file)
    assert [s.name for s in cfg.sites] == ["a", "b"] and cfg.sites[0].cohort == "referral"
    assert cfg.server.rounds == 3 and cfg.server.local_steps == 2
    over = resolve_config(cfg_file, superlink="127.0.0.1:7000", site_names=["b", "a", "x"], runtime_ports={"x": 9100})
    assert over.superlink == "127.0.0.1:7000"
    assert [(s.name, s.cohort, s.runtime_port) for s in over.sites] == [
        ("b", "screening", 9094),
        ("a", "referral", 9094),
        ("x", "screening", 9100),
    ]
    assert ConsortiumConfig.from_mapping(over.to_toml_dict()) == over


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sites", "a", "a/b", "--superlink", "h:1"], "'a/b'"),
        (["--sites", "..", "--superlink", "h:1"], "'..'"),
        (["--sites", "a", "b", "a", "--superlink", "h:1"], "'a' is given twice"),
        (["--sites", "A", "a", "--superlink", "h:1"], "given twice"),
        (["--superlink", "h:1"], "at least one site"),
        (["--sites", "a", "--superlink", "superlink.example.org"], "'superlink.example.org'"),
        (["--sites", "a", "--superlink", "h:0"], "'h:0'"),
        (["--sites", "a", "--superlink", "h:65536"], "'65536'"),
        (["--sites", "a", "--superlink", "h:port"], "'port'"),
        (["--sites", "a", "--superlink", "::1:9093"], "brackets"),
        (["--sites", "a", "--superlink", "bad_host!:9093"], "'bad_host!'"),
        (["--sites", "a"], "superlink"),
        (["--sites", "a", "--superlink", "h:1", "--runtime-port", "b=9000"], "'b'"),
        (["--sites", "a", "--superlink", "h:1", "--runtime-port", "a=99999"], "'a=99999'"),
        (["--sites", "a", "--superlink", "h:1", "--runtime-port", "a"], "NAME=PORT"),
        (["--sites", "a", "--superlink", "h:1", "--bind", "example.org"], "'example.org'"),
        (["--sites", "a", "--superlink", "h:1", "--hostname", "no good"], "'no good'"),
    ],
)
def test_invalid_args(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code, out, err = init(capsys, *args, "--out", str(tmp_path / "kits"))
    assert code == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.iterdir()) == []  # nothing written, no partial folder left


def test_missing_init_model_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope")
    code, _, err = init(
        capsys, "--sites", "a", "--superlink", "h:1", "--init-model", missing, "--out", str(tmp_path / "k")
    )
    assert code == 2 and "nope" in err and "model.pt" in err


def test_config_file_errors_name_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "consortium.toml"
    cfg_file.write_text('[consortium]\nsuperlink = "h:1"\nbnid = "0.0.0.0"\n\n[sites.a]\n')
    code, _, err = init(capsys, "--config", str(cfg_file), "--out", str(tmp_path / "k"))
    assert code == 2 and str(cfg_file) in err and "'bnid'" in err and "did you mean 'bind'" in err
    cfg_file.write_text('[consortium]\nsuperlink = "h:1"\n\n[sites.a]\ncohrt = "referral"\n')
    code, _, err = init(capsys, "--config", str(cfg_file), "--out", str(tmp_path / "k"))
    assert code == 2 and "[sites.a]" in err and "did you mean 'cohort'" in err
    cfg_file.write_text('[consortium]\nsuperlink = "h:1"\n\n[sites.a]\n\n[strategy]\nrounds = -1\n')
    code, _, err = init(capsys, "--config", str(cfg_file), "--out", str(tmp_path / "k"))
    assert code == 2 and "rounds" in err
    assert not (tmp_path / "k").exists()


def test_refuses_a_non_empty_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kits = tmp_path / "kits"
    kits.mkdir()
    (kits / "keep.txt").write_text("mine")
    code, _, err = init(capsys, "--sites", "a", "--superlink", "h:1", "--out", str(kits))
    assert code == 2 and str(kits) in err and "not empty" in err
    assert [p.name for p in kits.iterdir()] == ["keep.txt"]
    code, _, err = init(capsys, "--sites", "a", "--superlink", "h:1", "--out", str(kits / "keep.txt"))
    assert code == 2 and "keep.txt" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = init(capsys, "--sites", "a", "--superlink", "h:1", "--out", str(empty))
    assert code == 0, err
    assert (empty / "sites/a/site.toml").is_file()


def test_a_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from federation import pki

    calls = []

    def failing(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
        calls.append(out_dir)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(out_dir, overwrite=overwrite)

    real = pki.write_node_key_pair
    monkeypatch.setattr(pki, "write_node_key_pair", failing)
    cfg = ConsortiumConfig(superlink="h:1", sites=(SiteSpec("a"), SiteSpec("b")))
    with pytest.raises(OSError, match="No space"):
        build_kits(cfg, tmp_path / "kits")
    assert list(tmp_path.iterdir()) == []


def test_sites_are_accepted_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = init(capsys, "--sites", "a", "--sites", "b", "--superlink", "h:1", "--out", str(tmp_path / "k"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "k/sites").iterdir()) == ["a", "b"]
