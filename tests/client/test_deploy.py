"""Site deployment: node keys, the [federation] table, and the refusal paths of `lungvl site join`."""

from __future__ import annotations

import os
import runpy
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from typer.testing import CliRunner

from client.deploy import (
    SiteDeployConfig,
    SiteNotReady,
    generate_site_keys,
    load_private_key,
    load_public_key,
    node_config,
    preflight,
    supernode_command,
    worker_command,
)
from lungvl_model.data.dicom_io import write_ct_series
from lungvl_model.data.site_layout import toml_dumps
from privacy.budget import SiteBudget
from tests.conftest import make_volume

ROOT = Path(__file__).resolve().parents[2]


def make_certs(out: Path) -> dict[str, Path]:
    """infra/make_certs.py's CA + server certificate (a standalone script: loaded by path)."""
    return runpy.run_path(str(ROOT / "infra" / "make_certs.py"))["make_certs"](out, [], [])  # type: ignore[no-any-return]


def write_site(tmp: Path, *, studies: int = 1, federation: dict | None = None, budget: float = 8.0) -> Path:
    site = tmp / "site"
    (site / "dicom").mkdir(parents=True, exist_ok=True)
    for i in range(studies):
        vol = make_volume(study_uid=f"1.2.826.0.1.3680043.10.9.{i}", series_uid=f"1.2.826.0.1.3680043.10.9.{i}.1")
        write_ct_series(vol, site / "dicom" / f"s{i}")
    keys = generate_site_keys(tmp / "keys", overwrite=True)
    certs = make_certs(tmp / "certs")
    (tmp / "model").mkdir(exist_ok=True)
    (tmp / "model" / "model.pt").write_bytes(b"x")
    fed = {
        "superlink": "127.0.0.1:9093",
        "root_certificates": str(certs["ca_cert"]),
        "private_key": str(keys[0]),
        "runtime_port": 19094,
        "model_dir": str(tmp / "model"),
        "state_dir": str(tmp / "state"),
    }
    if federation is not None:
        fed.update(federation)
        fed = {k: v for k, v in fed.items() if v is not None}
    doc = {
        "site": {"name": "hospital-a", "cohort": "screening"},
        "privacy": {"epsilon_budget": budget, "delta": 1e-5},
        "federation": fed,
    }
    (site / "site.toml").write_text(toml_dumps(doc))
    return site / "site.toml"


def test_keys_round_trip_and_permissions(tmp_path: Path) -> None:
    private, public = generate_site_keys(tmp_path)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert isinstance(load_private_key(private).curve, ec.SECP384R1)
    assert load_public_key(public).public_numbers() == load_private_key(private).public_key().public_numbers()
    with pytest.raises(FileExistsError):
        generate_site_keys(tmp_path)


def test_wrong_key_formats_name_the_file(tmp_path: Path) -> None:
    pem = tmp_path / "pem.key"
    key = ec.generate_private_key(ec.SECP384R1())
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(ValueError, match="pem.key"):
        load_private_key(pem)
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=1024)
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ValueError, match="rsa.pub.*ECDSA"):
        load_public_key(rsa_pub)
    with pytest.raises(FileNotFoundError, match="nope.pub"):
        load_public_key(tmp_path / "nope.pub")


def test_config_reads_federation_table(tmp_path: Path) -> None:
    cfg = SiteDeployConfig.from_toml(write_site(tmp_path))
    assert cfg.superlink == "127.0.0.1:9093" and cfg.runtime_port == 19094
    assert cfg.state_dir == tmp_path / "state"
    cmd = supernode_command(cfg)
    for flag in ("--root-certificates", "--auth-supernode-private-key", "--isolation", "--node-config"):
        assert flag in cmd
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert "--insecure" not in cmd
    assert 'site-dir="' in node_config(cfg) and "model-dir=" in node_config(cfg)
    assert worker_command(cfg, 42)[-2:] == ["--parent-pid", "42"]


def test_federation_site_dir_points_at_the_data_from_a_kit_folder(tmp_path: Path) -> None:
    """A startup kit kept in its own folder names the hospital's data with [federation] site_dir."""
    kit = write_site(tmp_path / "kit")
    doc = tomllib.loads(kit.read_text())
    doc["federation"]["site_dir"] = "../data"
    doc["federation"].pop("state_dir", None)
    kit.write_text(toml_dumps(doc))
    cfg = SiteDeployConfig.from_toml(kit)
    assert cfg.client.site_dir == kit.parent / "../data"
    assert cfg.state_dir == kit.parent / "../data" / ".lungvl_state"  # state beside the data, as without a kit
    assert f'site-dir="{kit.parent / "../data"}"' in node_config(cfg)


@pytest.mark.parametrize(
    ("federation", "error", "match"),
    [
        ({"superlnk": "x:1"}, KeyError, "did you mean 'superlink'"),
        ({"superlink": None}, KeyError, "lacks \\['superlink'\\]"),
        ({"superlink": "no-port"}, ValueError, "host:port, got 'no-port'"),
        ({"runtime_port": 70000}, ValueError, "runtime_port must be a port number, got 70000"),
    ],
)
def test_invalid_args(tmp_path: Path, federation: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SiteDeployConfig.from_toml(write_site(tmp_path, federation=federation))


def test_preflight_passes_a_usable_site(tmp_path: Path) -> None:
    info = preflight(SiteDeployConfig.from_toml(write_site(tmp_path)), check_connect=False)
    assert info["usable"] == 1 and info["epsilon_spent"] == 0 and info["warnings"] == []


def test_refuses_missing_ca_and_bad_key(tmp_path: Path) -> None:
    cfg = SiteDeployConfig.from_toml(write_site(tmp_path, federation={"root_certificates": str(tmp_path / "no.crt")}))
    with pytest.raises(SiteNotReady, match="no.crt does not exist"):
        preflight(cfg, check_data=False)
    bad = tmp_path / "bad_key"
    bad.write_text("not a key")
    cfg = SiteDeployConfig.from_toml(write_site(tmp_path, federation={"private_key": str(bad)}))
    with pytest.raises(SiteNotReady, match="private_key.*bad_key"):
        preflight(cfg, check_data=False)


def test_refuses_a_site_without_usable_study(tmp_path: Path) -> None:
    cfg = SiteDeployConfig.from_toml(write_site(tmp_path, studies=0))
    with pytest.raises(SiteNotReady, match="no usable study"):
        preflight(cfg)


def test_refuses_a_spent_budget(tmp_path: Path) -> None:
    cfg = SiteDeployConfig.from_toml(write_site(tmp_path, budget=0.5))
    budget = SiteBudget(cfg.state_dir, epsilon_budget=0.5, delta=1e-5)
    budget.record(noise_multiplier=0.5, sample_rate=1.0, steps=50)
    with pytest.raises(SiteNotReady, match="privacy budget spent"):
        preflight(cfg, check_data=False)


def test_cli_join_refuses_with_exit_2(tmp_path: Path) -> None:
    from lungvl.cli import app

    toml = write_site(tmp_path, studies=0)
    res = CliRunner().invoke(app, ["site", "join", "--config", str(toml)])
    assert res.exit_code == 2
    assert "site join refused" in res.output and "no usable study" in res.output


def test_cli_keys_and_audit(tmp_path: Path) -> None:
    from client.ledger import AuditLedger
    from lungvl.cli import app

    res = CliRunner().invoke(app, ["site", "keys", "--out", str(tmp_path / "k")])
    assert res.exit_code == 0 and (tmp_path / "k" / "site_key.pub").exists()
    toml = write_site(tmp_path)
    (tmp_path / "state").mkdir()
    ledger = AuditLedger(tmp_path / "state")
    ledger.record(
        round=1, kind="train_reply", payload=b"abc", metrics={"num_examples": 3}, dp={}, epsilon=None, delta=None
    )
    ledger.close()
    res = CliRunner().invoke(app, ["site", "audit", "--config", str(toml)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "train_reply" in res.output and "ba7816bf8f01cfea" in res.output
