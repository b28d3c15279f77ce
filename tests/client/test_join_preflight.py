"""`lungvl site join` fails fast and loud: CA file, key pair and SuperLink checks; log failures on the terminal."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import socket
import ssl
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

import client.deploy as deploy
from client.deploy import SiteDeployConfig, SiteNotReady, generate_site_keys, preflight, run_site
from client.log_follow import LogFollower, classify, exit_report, flower_exit_code, line_level, strip_ansi
from client.preflight_checks import check_root_certificates, check_superlink
from lungvl_model.errors import PeerUnreachable
from tests.client.test_deploy import make_certs, write_site

pytestmark = pytest.mark.timeout(30)
NOW = dt.datetime.now(dt.UTC)


# ------------------------------------------------------------------------------------------ helpers
def make_cert(
    path: Path,
    *,
    ca: bool = True,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    days: tuple[int, int] = (-1, 365),
    name: str = "test CA",
    sans: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate (self-signed unless ``issuer``; a leaf names ``sans``) as PEM at ``path``, its key beside it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + dt.timedelta(days=days[0]))
        .not_valid_after(NOW + dt.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in sans
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


@contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 (a thread completing handshakes); yields its port."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    with listener() as (sock, port):
        stop = threading.Event()

        def serve() -> None:
            sock.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                conn.settimeout(2)
                try:
                    with ctx.wrap_socket(conn, server_side=True):
                        pass
                except OSError:  # the client rejected our certificate
                    conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield port
        finally:
            stop.set()
            thread.join(2)


@contextmanager
def listener(backlog: int = 8) -> Iterator[tuple[socket.socket, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


@contextmanager
def plain_server(reply: bytes) -> Iterator[int]:
    """A TCP server that answers every connection with ``reply`` (b"": says nothing) and does not speak TLS."""
    with listener() as (sock, port):
        stop, held = threading.Event(), []

        def serve() -> None:
            sock.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                if reply:
                    conn.sendall(reply)
                held.append(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield port
        finally:
            stop.set()
            thread.join(2)
            for c in held:
                c.close()


def closed_port() -> int:
    with listener() as (_, port):
        pass
    return port


@pytest.fixture
def ca(tmp_path: Path) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert, key = make_cert(tmp_path / "ca.crt")
    return tmp_path / "ca.crt", cert, key


# --------------------------------------------------------------------------------- CA certificate file
def _write(tmp: Path, kind: str) -> Path:
    p = tmp / "root.crt"
    key = ec.generate_private_key(ec.SECP256R1())
    if kind == "private key":
        p.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    elif kind == "public key":
        p.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    elif kind == "ssh public key":
        generate_site_keys(tmp / "k")
        shutil.copy(tmp / "k" / "site_key.pub", p)
    elif kind == "random text":
        p.write_text("this is not a certificate\nat all\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "binary":
        p.write_bytes(bytes(range(1, 256)))
    elif kind == "der":
        cert, _ = make_cert(tmp / "der_source.crt")
        p.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    elif kind == "broken block":
        p.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    elif kind == "leaf":
        issuer = make_cert(tmp / "issuer.crt")
        make_cert(p, ca=False, issuer=issuer, name="superlink")
    elif kind == "expired":
        make_cert(p, days=(-400, -30), name="old CA")
    elif kind == "not yet valid":
        make_cert(p, days=(30, 400), name="future CA")
    return p


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("private key", r"is a private key \(PEM 'PRIVATE KEY' block\), not a certificate"),
        ("public key", r"is a public key \(PEM 'PUBLIC KEY' block\), not a certificate"),
        ("ssh public key", "is an OpenSSH public key, not a certificate"),
        ("random text", r"is text without a '-----BEGIN CERTIFICATE-----' block"),
        ("empty", "is empty"),
        ("binary", "is binary"),
        ("der", "is a DER-encoded certificate; it must be PEM"),
        ("broken block", "a CERTIFICATE block cannot be parsed"),
        ("leaf", "'CN=superlink' is not a CA certificate"),
        ("expired", r"'CN=old CA' expired on \d{4}-\d\d-\d\d .*valid \d{4}-\d\d-\d\d to \d{4}-\d\d-\d\d"),
        ("not yet valid", r"'CN=future CA' is not valid before \d{4}-\d\d-\d\d"),
    ],
)
def test_ca_file_that_is_not_a_ca_certificate(tmp_path: Path, kind: str, match: str) -> None:
    path = _write(tmp_path, kind)
    with pytest.raises(SiteNotReady, match=match) as err:
        check_root_certificates(path)
    assert str(err.value).startswith(f"[federation] root_certificates: {path}")
    assert "\n" not in str(err.value)


def test_ca_bundle_and_missing_file(tmp_path: Path) -> None:
    a, _ = make_cert(tmp_path / "a.crt", name="root A")
    b, _ = make_cert(tmp_path / "b.crt", name="root B")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes((tmp_path / "a.crt").read_bytes() + (tmp_path / "b.crt").read_bytes())
    assert check_root_certificates(bundle) == [a, b]
    with pytest.raises(SiteNotReady, match=r"root_certificates: CA certificate \S+no\.crt does not exist"):
        check_root_certificates(tmp_path / "no.crt")


def test_preflight_checks_the_ca_file_before_anything_else(tmp_path: Path) -> None:
    make_certs(tmp_path / "certs")
    key = tmp_path / "certs" / "ca.key"  # the CA's private key where its certificate belongs
    cfg = SiteDeployConfig.from_toml(write_site(tmp_path, studies=0, federation={"root_certificates": str(key)}))
    with pytest.raises(SiteNotReady, match=f"root_certificates: {key} is a private key"):
        preflight(cfg)  # data (0 studies) and network (nothing at 127.0.0.1:9093) would fail too: files first


# ------------------------------------------------------------------------------------------ node key
def test_mismatched_key_pair_names_both_files(tmp_path: Path) -> None:
    private, public = generate_site_keys(tmp_path / "mine")
    _, other = generate_site_keys(tmp_path / "other")
    shutil.copy(other, public)
    cfg = SiteDeployConfig.from_toml(write_site(tmp_path, federation={"private_key": str(private)}))
    with pytest.raises(SiteNotReady, match="site_key.pub does not belong to site_key") as err:
        preflight(cfg, check_data=False, check_connect=False)
    assert str(public) in str(err.value) and str(private) in str(err.value)
    assert str(err.value).startswith("[federation] private_key: ")


def test_key_readable_by_others_and_unreadable_pub_only_warn(tmp_path: Path) -> None:
    cfg = SiteDeployConfig.from_toml(write_site(tmp_path))
    cfg.private_key.chmod(0o644)
    cfg.private_key.with_name("site_key.pub").write_text("garbage\n")
    info = preflight(cfg, check_data=False, check_connect=False)
    assert any("mode 0644" in w and f"chmod 600 {cfg.private_key}" in w for w in info["warnings"])
    assert any("cannot compare with" in w and "site_key.pub" in w for w in info["warnings"])


# ------------------------------------------------------------------------------------------ SuperLink
def test_unresolvable_host() -> None:
    with pytest.raises(PeerUnreachable, match=r"cannot resolve host 'no-such-host\.invalid' "):
        check_superlink("no-such-host.invalid:9092", Path("unused.crt"))
    with pytest.raises(PeerUnreachable, match=r"\(\[federation\] superlink = 'no-such-host\.invalid:9092'\)"):
        check_superlink("no-such-host.invalid:9092", Path("unused.crt"))


def test_closed_port_is_refused_fast(ca: tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    port = closed_port()
    t0 = time.monotonic()
    with pytest.raises(PeerUnreachable, match=rf"127\.0\.0\.1:{port} .*connection refused after \d+\.\d s"):
        check_superlink(f"127.0.0.1:{port}", ca[0])
    assert time.monotonic() - t0 < 2


def test_silent_address_times_out(ca: tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    # a full accept queue drops further SYNs: the connection attempt gets no answer, like a firewall
    with listener(backlog=0) as (_, port):
        filler = socket.create_connection(("127.0.0.1", port), timeout=1)
        t0 = time.monotonic()
        try:
            with pytest.raises(PeerUnreachable, match=rf"127\.0\.0\.1:{port} .*no answer after 1\.\d s"):
                check_superlink(f"127.0.0.1:{port}", ca[0], timeout=1.0)
        finally:
            filler.close()
    assert time.monotonic() - t0 < 3


def test_tls_server_signed_by_another_ca(
    tmp_path: Path, ca: tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]
) -> None:
    other = make_cert(tmp_path / "other_ca.crt", name="other CA")
    make_cert(tmp_path / "server.crt", ca=False, issuer=other, name="superlink")
    with tls_server(tmp_path / "server.crt", tmp_path / "server.key") as port:
        with pytest.raises(PeerUnreachable, match=r"certificate verify failed.*not signed by the CA in") as err:
            check_superlink(f"127.0.0.1:{port}", ca[0])
    assert f"127.0.0.1:{port}" in str(err.value)


def test_tls_hostname_mismatch(tmp_path: Path, ca: tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    make_cert(tmp_path / "server.crt", ca=False, issuer=(ca[1], ca[2]), name="sl", sans=("localhost",))  # not 127.0.0.1
    with tls_server(tmp_path / "server.crt", tmp_path / "server.key") as port:
        check_superlink(f"localhost:{port}", ca[0])
        with pytest.raises(PeerUnreachable, match=r"IP address mismatch.*must name '127\.0\.0\.1'"):
            check_superlink(f"127.0.0.1:{port}", ca[0])


@pytest.mark.parametrize(
    ("reply", "match"), [(b"HTTP/1.1 400 Bad Request\r\n\r\n", "wrong version number"), (b"", "no answer after 1 s")]
)
def test_plain_tcp_listener_fails_tls_within_the_timeout(
    ca: tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey], reply: bytes, match: str
) -> None:
    with plain_server(reply) as port:
        t0 = time.monotonic()
        with pytest.raises(PeerUnreachable, match=rf"TLS handshake with the SuperLink at 127\.0\.0\.1:{port}.*{match}"):
            check_superlink(f"127.0.0.1:{port}", ca[0], timeout=1.0)
    assert time.monotonic() - t0 < 3


def test_correct_tls_server_passes(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")  # infra/make_certs.py: the consortium CA and the SuperLink's cert
    with tls_server(certs["server_cert"], certs["server_key"]) as port:
        cfg = SiteDeployConfig.from_toml(
            write_site(
                tmp_path, federation={"superlink": f"127.0.0.1:{port}", "root_certificates": str(certs["ca_cert"])}
            )
        )
        info = preflight(cfg, check_data=False)
    assert info["epsilon_spent"] == 0
    cfg = SiteDeployConfig.from_toml(write_site(tmp_path, federation={"superlink": f"127.0.0.1:{closed_port()}"}))
    with pytest.raises(PeerUnreachable):
        preflight(cfg, check_data=False)
    preflight(cfg, check_data=False, check_connect=False)  # what --skip-connect-check does


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("case", ["ca is a key", "refused"])
def test_cli_join_exit_codes_and_literal_brackets(tmp_path: Path, case: str) -> None:
    from lungvl.cli import app

    if case == "ca is a key":
        bad = tmp_path / "certs" / "ca.key"
        toml = write_site(tmp_path, federation={"root_certificates": str(bad)})
        code, needles = 2, ["[federation] root_certificates", str(bad), "is a private key"]
    else:
        address = f"127.0.0.1:{closed_port()}"
        toml = write_site(tmp_path, federation={"superlink": address})
        code, needles = 7, [f"[federation] superlink = '{address}'", "connection refused"]
    res = CliRunner().invoke(app, ["site", "join", "--config", str(toml), "--skip-data-check"])
    assert res.exit_code == code, res.output
    text = " ".join(res.output.split())
    assert "site join refused" in text
    for needle in needles:
        assert needle in text


# ------------------------------------------------------------------------------------------ log follower
FLOWER_305_ACTIVATE = (
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305\n"
    "Failed to initialize the connection to the SuperLink.\n"
    "[code: 2004] Failed to activate SuperNode.\n"
    "The SuperNode could not establish a connection to the SuperLink.\n"
)
FLOWER_305 = (
    "\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.\n"
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305\n"
    "Failed to initialize the connection to the SuperLink.\n"
    "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)\n"
    "The SuperNode could not establish a connection to the SuperLink.\n"
    "\n"
    "For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>\n"
    "INFO:     Shutting down\n"
    "INFO:     Finished server process [9510]\n"
)


@pytest.mark.parametrize(
    ("line", "level", "kind"),
    [
        ("ERROR :     Exit Code: 305", "ERROR", "error"),
        ("ERROR :     SSL/TLS handshake error detected.", "ERROR", "tls"),
        ("WARNING :   Connection attempt failed, retrying in 0.68 seconds", "WARNING", "connection"),
        ("INFO :      Connection successful after 3.10 seconds and 4 tries.", "INFO", "recovered"),
        ("INFO:     Uvicorn running on http://127.0.0.1:19555", "INFO", None),
        ("2026-01-02 10:00:00,123 ERROR lungvl.site.worker: task failed", "ERROR", "error"),
        ("2026-01-02T10:00:00.123Z CRITICAL [uvicorn.error] boom", "CRITICAL", "error"),
        ("Failed to initialize the connection to the SuperLink.", None, None),
    ],
)
def test_classify_lines(line: str, level: str | None, kind: str | None) -> None:
    assert line_level(line) == level
    assert classify(line) == kind


def test_strip_ansi_and_exit_code() -> None:
    assert strip_ansi("\x1b[91mERROR \x1b[0m:     Exit Code: 305  ") == "ERROR :     Exit Code: 305"
    assert flower_exit_code("ERROR :     Exit Code: 305") == 305
    assert flower_exit_code("exit code 305") is None


def test_follower_reads_only_what_is_appended(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    log.write_text("\x1b[91mERROR \x1b[0m:     an old error from the last run\n")
    lines: list[str] = []
    f = LogFollower(log, name="supernode", emit=lines.append)
    assert f.poll() == 0 and lines == []
    with log.open("a") as fh:
        fh.write(FLOWER_305[:20])  # half a line: nothing yet
    assert f.poll() == 0
    with log.open("a") as fh:
        fh.write(FLOWER_305[20:])
    f.poll()
    assert lines == [
        "supernode: ERROR: SSL/TLS handshake error detected.",
        "supernode: ERROR: Exit Code: 305",
        "supernode:   Failed to initialize the connection to the SuperLink.",
        "supernode:   [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)",
        "supernode:   The SuperNode could not establish a connection to the SuperLink.",
        "supernode:   For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>",
    ]
    assert f.flower_exit_code == 305 and f.tls_error
    assert "an old error" not in " ".join(f.tail()) and "Shutting down" not in " ".join(f.tail())
    report = exit_report("supernode", 1, f)
    assert report[0].startswith("supernode exited with code 1 (Flower exit code 305: The SuperNode could not")
    assert report[1] == f"last lines of {log}:" and report[-1].endswith("ref-exit-codes/305.html>")


def test_follower_traceback_throttle_and_truncation(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    lines: list[str] = []
    now = [0.0]
    f = LogFollower(log, name="worker", emit=lines.append, repeat_s=30.0, clock=lambda: now[0])
    assert f.poll() == 0  # no file yet
    traceback = textwrap.dedent(
        """\
        Traceback (most recent call last):
          File "x.py", line 1, in <module>
            load()
        ssl.SSLError: no start line: cadata does not contain a certificate (_ssl.c:4020)
        Exception ignored in: <module 'threading'>
        Traceback (most recent call last):
          File "threading.py", line 1590, in _shutdown
        SystemExit: 0
        """
    )
    log.write_text(traceback + "WARNING :   Connection attempt failed, retrying in 0.5 seconds\n" * 3)
    f.poll()
    now[0] = 31.0
    log.write_text(log.read_text() + "WARNING :   Connection attempt failed, retrying in 8.0 seconds\n")
    f.poll()
    assert lines == [
        "worker: ssl.SSLError: no start line: cadata does not contain a certificate (_ssl.c:4020)",
        "worker: WARNING: Connection attempt failed, retrying in 0.5 seconds",
        "worker: WARNING: Connection attempt failed, retrying in 8.0 seconds (2 more like it since)",
    ]
    assert f.tls_error and f.flower_exit_code is None
    log.write_text("CRITICAL :  the file was replaced\n")  # shorter than before: read from its start
    f.poll()
    assert lines[-1] == "worker: CRITICAL: the file was replaced"
    assert exit_report("worker", -9, None) == ["worker exited with code -9 (killed by SIGKILL)"]


# ------------------------------------------------------------------------------------------ run_site
SUPERNODE_SCRIPT = """
import sys
sys.stdout.write({text!r})
sys.stdout.flush()
sys.exit(1)
"""


@pytest.mark.parametrize(
    ("text", "starts", "retried"),
    [
        (FLOWER_305, 1, False),  # TLS: not something a restart mends
        (FLOWER_305_ACTIVATE, 2, True),  # not activated (yet): restarted
    ],
)
def test_run_site_surfaces_supernode_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, starts: int, retried: bool
) -> None:
    cfg = SiteDeployConfig.from_toml(write_site(tmp_path, studies=0))
    script = SUPERNODE_SCRIPT.format(text=text)
    monkeypatch.setattr(deploy, "supernode_command", lambda _c: [sys.executable, "-c", script])
    monkeypatch.setattr(deploy, "worker_command", lambda *_a: [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(deploy, "RESTART_DELAY_S", 0.0)
    lines: list[str] = []
    assert run_site(cfg, log=lines.append, max_restarts=1) == 1
    text_out = "\n".join(lines)
    assert sum(line.startswith("supernode started") for line in lines) == starts
    assert ("retrying in 0 s (1/1)" in text_out) is retried
    assert "supernode: ERROR: Exit Code: 305" in text_out
    assert "supernode exited with code 1 (Flower exit code 305" in text_out
    assert f"last lines of {cfg.state_dir / 'logs' / 'supernode.log'}:" in text_out
    assert lines[-1] == "site hospital-a stopped"
