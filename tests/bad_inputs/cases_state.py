"""Damaged state: registries, audit ledgers, checkpoints, admitted-site lists; and keys given to the wrong command."""

from __future__ import annotations

import functools
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.bad_inputs.framework import Case
from tests.conftest import make_volume, micro_checkpoint


@functools.cache
def _micro_checkpoint() -> Path:
    """A micro LungVL checkpoint written once per test process (copied into each case)."""
    return micro_checkpoint(Path(tempfile.mkdtemp(prefix="lungvl-corpus-")) / "model", spacing_mm=8.0, stage="vl")


def _series(tmp: Path) -> Path:
    from lungvl_model.data.dicom_io import write_ct_series

    d = tmp / "series"
    write_ct_series(make_volume((8, 24, 24)), d)
    return d


def checkpoint(damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """``lungvl explain`` with a copy of the micro checkpoint damaged by ``damage(ckpt_dir)``."""

    def setup(tmp: Path) -> list[str]:
        ck = tmp / "model"
        shutil.copytree(_micro_checkpoint(), ck)
        damage(ck)
        return ["explain", "--model", str(ck), "--out", str(tmp / "out"), "--dicom", str(_series(tmp))]

    return setup


def _flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _unhash(ck: Path, damage: Callable[[Path], None]) -> None:
    """Damage model.pt and drop its sha256 from meta.json (an old or hand-made checkpoint)."""
    import json

    meta = json.loads((ck / "meta.json").read_text())
    meta.pop("model_sha256")
    (ck / "meta.json").write_text(json.dumps(meta))
    damage(ck / "model.pt")


def _registry(tmp: Path) -> Path:
    from server.registry import Registry

    db = tmp / "registry.db"
    with Registry(db) as reg:
        run = reg.start_run("r", {"rounds": 2}, seed=0)
        reg.start_round(run, 1, sampled=2)
    return db


def status(make: Callable[[Path], Path], *extra: str) -> Callable[[Path], list[str]]:
    """``lungvl server status --db`` on the database ``make(tmp)`` returns."""

    def setup(tmp: Path) -> list[str]:
        return ["server", "status", "--db", str(make(tmp)), *extra]

    return setup


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


def _foreign_sqlite(tmp: Path) -> Path:
    db = tmp / "other.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE patients (id INTEGER, name TEXT)")
    con.commit()
    con.close()
    return db


def _old_registry(tmp: Path) -> Path:
    db = _registry(tmp)
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE privacy_ledger RENAME COLUMN client_noise_multiplier TO noise_multiplier")
    con.commit()
    con.close()
    return db


def _truncated_registry(tmp: Path) -> Path:
    db = _registry(tmp)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    _truncate(db, 0.3)
    return db


def _site_toml(tmp: Path) -> Path:
    site = tmp / "site"
    (site / "dicom").mkdir(parents=True)
    (site / "site.toml").write_text('[site]\nname = "a"\n')
    (site / ".lungvl_state").mkdir()
    return site / "site.toml"


def ledger(data: bytes | Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """``lungvl site audit`` on a ledger holding ``data`` (or damaged by a function)."""

    def setup(tmp: Path) -> list[str]:
        toml = _site_toml(tmp)
        path = toml.parent / ".lungvl_state" / "outbound_ledger.db"
        if callable(data):
            data(path)
        else:
            path.write_bytes(data)
        return ["site", "audit", "--config", str(toml)]

    return setup


def _foreign_ledger(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE invoices (id INTEGER)")
    con.commit()
    con.close()


def _truncated_ledger(path: Path) -> None:
    from client.ledger import AuditLedger

    AuditLedger(path).close()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    _truncate(path, 0.25)


def _keys(tmp: Path) -> tuple[Path, Path]:
    from client.deploy import generate_site_keys

    return generate_site_keys(tmp / "keys")


def admit(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    """``lungvl server admit KEY --config server.toml`` (the key is checked before the SuperLink is asked)."""
    from tests.bad_inputs.cases_config import server

    def setup(tmp: Path) -> list[str]:
        toml = server()(tmp)[-1]
        return ["server", "admit", str(make(tmp)), "--config", toml]

    return setup


def _private_key(tmp: Path) -> Path:
    return _keys(tmp)[0]


def _certificate(tmp: Path) -> Path:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [
            sys.executable,
            str(root / "infra" / "make_certs.py"),
            "--out",
            str(tmp / "certs2"),
            "--hostname",
            "localhost",
        ],
        check=True,
        capture_output=True,
    )
    return tmp / "certs2" / "ca.crt"


def _rsa_public(tmp: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    data = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp / "rsa.pub").write_bytes(data)
    return tmp / "rsa.pub"


def _ed25519_public(tmp: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    data = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp / "ed.pub").write_bytes(data)
    return tmp / "ed.pub"


def _admitted_json(data: bytes) -> Callable[[Path], list[str]]:
    from tests.bad_inputs.cases_config import server

    def setup(tmp: Path) -> list[str]:
        argv = server(cmd="status")(tmp)
        run_dir = tmp / "runs" / "consortium"
        run_dir.mkdir(parents=True)
        (run_dir / "admitted_sites.json").write_bytes(data)
        return argv

    return setup


def _state_cases() -> list[Case]:
    ck: list[tuple[str, Callable[[Path], list[str]], tuple[str, ...]]] = [
        ("model-bit-flip", checkpoint(lambda d: _flip_byte(d / "model.pt")), ("model.pt", "sha256")),
        ("model-truncated", checkpoint(lambda d: _truncate(d / "model.pt")), ("model.pt",)),
        ("model-empty", checkpoint(lambda d: (d / "model.pt").write_bytes(b"")), ("model.pt",)),
        ("model-missing", checkpoint(lambda d: (d / "model.pt").unlink()), ("model.pt", "missing")),
        ("unhashed-model-truncated", checkpoint(lambda d: _unhash(d, _truncate)), ("model.pt", "damaged")),
        ("unhashed-model-text", checkpoint(lambda d: _unhash(d, lambda p: p.write_text("weights"))), ("model.pt",)),
        ("meta-not-json", checkpoint(lambda d: (d / "meta.json").write_text("{stage: vl")), ("meta.json",)),
        ("meta-a-list", checkpoint(lambda d: (d / "meta.json").write_text("[1, 2]")), ("meta.json",)),
        ("config-not-json", checkpoint(lambda d: (d / "config.json").write_text("")), ("config.json",)),
        ("config-other-arch", checkpoint(lambda d: (d / "config.json").write_text('{"preset": "tiny"}')), ("fit",)),
        (
            "tokenizer-damaged",
            checkpoint(lambda d: [p.write_text("{") for p in (d / "tokenizer").glob("*.json")]),
            ("tokenizer",),
        ),
        ("calibration-damaged", checkpoint(lambda d: (d / "calibration.json").write_text("{]")), ("calibration.json",)),
    ]
    cases = [Case(f"state-checkpoint-{cid}", "state", setup, 6, names) for cid, setup, names in ck]
    reg: list[tuple[str, Callable[[Path], list[str]], int, tuple[str, ...]]] = [
        ("zero-bytes", status(_write("registry.db", b"")), 6, ("registry.db", "no tables")),
        ("random-bytes", status(_write("registry.db", bytes(range(256)) * 64)), 6, ("registry.db",)),
        ("text-file", status(_write("registry.db", b"runs: 3\n")), 6, ("registry.db",)),
        ("foreign-sqlite", status(_foreign_sqlite), 6, ("other.db", "patients")),
        ("old-columns", status(_old_registry), 6, ("registry.db", "client_noise_multiplier")),
        ("truncated", status(_truncated_registry), 6, ("registry.db",)),
        ("unknown-run", status(_registry, "--run", "99"), 2, ("99",)),
        ("directory", status(lambda t: t), 2, ("registry",)),
        ("admitted-not-json", _admitted_json(b"{oops"), 6, ("admitted_sites.json",)),
        ("admitted-a-list", _admitted_json(b"[1, 2]"), 6, ("admitted_sites.json",)),
    ]
    cases += [Case(f"state-registry-{cid}", "state", setup, code, names) for cid, setup, code, names in reg]
    led: list[tuple[str, Callable[[Path], list[str]], tuple[str, ...]]] = [
        ("zero-bytes", ledger(b""), ("outbound_ledger.db", "no tables")),
        ("random-bytes", ledger(bytes(range(256)) * 64), ("outbound_ledger.db",)),
        ("foreign", ledger(_foreign_ledger), ("outbound_ledger.db", "invoices")),
        ("truncated", ledger(_truncated_ledger), ("outbound_ledger.db",)),
    ]
    cases += [Case(f"state-ledger-{cid}", "state", setup, 6, names) for cid, setup, names in led]
    return cases


def _key_cases() -> list[Case]:
    spec: list[tuple[str, Callable[[Path], list[str]], tuple[str, ...]]] = [
        ("admit-private-key", admit(_private_key), ("site_key", "PRIVATE")),
        ("admit-certificate", admit(_certificate), ("ca.crt", "certificate")),
        ("admit-rsa-key", admit(_rsa_public), ("rsa.pub", "RSA")),
        ("admit-ed25519-key", admit(_ed25519_public), ("ed.pub", "Ed25519")),
        ("admit-empty-file", admit(_write("empty.pub", b"")), ("empty.pub",)),
        ("admit-garbage", admit(_write("g.pub", b"ecdsa-sha2-nistp384 AAAA!!!! site\n")), ("g.pub",)),
        ("admit-missing", admit(lambda t: t / "nope.pub"), ("nope.pub",)),
        ("admit-directory", admit(lambda t: t), ("site public key",)),
    ]
    cases = [Case(f"keys-{cid}", "keys_certs", setup, 2, names) for cid, setup, names in spec]

    def keys_exist(tmp: Path) -> list[str]:
        _keys(tmp)
        return ["site", "keys", "--out", str(tmp / "keys")]

    def keys_out_is_file(tmp: Path) -> list[str]:
        (tmp / "keys").write_text("x")
        return ["site", "keys", "--out", str(tmp / "keys")]

    cases += [
        Case("keys-site-keys-exist", "keys_certs", keys_exist, 2, ("site_key", "overwrite")),
        Case("keys-site-keys-out-is-file", "keys_certs", keys_out_is_file, 2, ("keys",)),
    ]
    return cases


def join(change: Callable[[Path, dict[str, str]], None]) -> Callable[[Path], list[str]]:
    """``lungvl site join --skip-data-check`` on a site whose [federation] files ``change(tmp, fed)`` damages.

    Every case fails in the preflight, before a SuperNode starts (a bad file: exit 2; no SuperLink: exit 7).
    """
    from tests.client.test_deploy import write_site

    def setup(tmp: Path) -> list[str]:
        toml = write_site(tmp, federation={"superlink": "127.0.0.1:9"})  # port 9 (discard): nothing listens
        import tomllib

        fed = tomllib.loads(toml.read_text())["federation"]
        change(tmp, fed)
        return ["site", "join", "--config", str(toml), "--skip-data-check"]

    return setup


def _join_cases() -> list[Case]:
    def ca_is_key(tmp: Path, fed: dict[str, str]) -> None:
        Path(fed["root_certificates"]).write_bytes((tmp / "certs" / "ca.key").read_bytes())

    def ca_empty(tmp: Path, fed: dict[str, str]) -> None:
        Path(fed["root_certificates"]).write_bytes(b"")

    def ca_is_leaf(tmp: Path, fed: dict[str, str]) -> None:
        Path(fed["root_certificates"]).write_bytes((tmp / "certs" / "server.crt").read_bytes())

    def pub_mismatch(tmp: Path, fed: dict[str, str]) -> None:
        from client.deploy import generate_site_keys

        other = generate_site_keys(tmp / "other")[1]
        Path(fed["private_key"] + ".pub").write_bytes(other.read_bytes())

    def key_is_public(tmp: Path, fed: dict[str, str]) -> None:
        Path(fed["private_key"]).write_bytes(Path(fed["private_key"] + ".pub").read_bytes())

    def nothing(tmp: Path, fed: dict[str, str]) -> None:
        return None

    spec: list[tuple[str, Callable[[Path, dict[str, str]], None], int, tuple[str, ...]]] = [
        ("ca-is-a-private-key", ca_is_key, 2, ("[federation] root_certificates", "private key")),
        ("ca-empty", ca_empty, 2, ("[federation] root_certificates", "empty")),
        ("ca-is-a-leaf", ca_is_leaf, 2, ("[federation] root_certificates", "not a CA")),
        ("key-pair-mismatch", pub_mismatch, 2, ("site_key.pub", "does not belong")),
        ("private-key-is-public", key_is_public, 2, ("[federation] private_key",)),
        ("superlink-closed-port", nothing, 7, ("127.0.0.1:9", "refused")),
    ]
    return [Case(f"keys-join-{cid}", "keys_certs", join(ch), code, names, timeout=30) for cid, ch, code, names in spec]


CASES: list[Case] = _state_cases() + _key_cases() + _join_cases()
