"""Scenario and server TOML files a hurried coordinator or researcher writes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.bad_inputs.framework import Case

ROOT = Path(__file__).resolve().parents[2]
TINY = (ROOT / "simulations" / "scenarios" / "tiny.toml").read_text(encoding="utf-8")
SERVER = (ROOT / "infra" / "server.toml").read_text(encoding="utf-8")


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, f"corpus fixture out of date: {old!r} not in the template"
    return text.replace(old, new, 1)


def scenario(old: str | None = None, new: str = "", raw: bytes | None = None) -> Callable[[Path], list[str]]:
    """A setup writing tiny.toml with ``old`` replaced by ``new`` (or ``raw`` bytes) and simulating it."""

    def setup(tmp: Path) -> list[str]:
        path = tmp / "scenario.toml"
        if raw is not None:
            path.write_bytes(raw)
        else:
            path.write_text(TINY if old is None else _edit(TINY, old, new), encoding="utf-8")
        return ["simulate", str(path), "--out", str(tmp / "run")]

    return setup


def server(
    old: str | None = None, new: str = "", raw: bytes | None = None, cmd: str = "start"
) -> Callable[[Path], list[str]]:
    """A setup writing infra/server.toml edited, with files it names present, and running ``server CMD``."""

    def setup(tmp: Path) -> list[str]:
        (tmp / "conf").mkdir()
        for rel in ("certs/ca.crt", "certs/server.crt", "certs/server.key"):
            (tmp / rel).parent.mkdir(exist_ok=True)
            (tmp / rel).write_text("-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n")
        (tmp / "models" / "initial_model").mkdir(parents=True)
        path = tmp / "conf" / "server.toml"
        if raw is not None:
            path.write_bytes(raw)
        else:
            path.write_text(SERVER if old is None else _edit(SERVER, old, new), encoding="utf-8")
        if cmd == "status":
            return ["server", "status", "--config", str(path)]
        return ["server", "start", "--config", str(path)]

    return setup


def _no_sites(tmp: Path) -> list[str]:
    path = tmp / "scenario.toml"
    path.write_text(TINY[: TINY.index("[[sites]]")], encoding="utf-8")
    return ["simulate", str(path), "--out", str(tmp / "run")]


def _scenario_cases() -> list[Case]:
    S = "scenario.toml"
    spec: list[tuple[str, Callable[[Path], list[str]], tuple[str, ...]]] = [
        ("rounds-float", scenario("rounds = 2\n", "rounds = 2.5\n"), ("rounds", "2.5")),
        ("rounds-string", scenario("rounds = 2\n", 'rounds = "2"\n'), ("rounds", "'2'")),
        ("rounds-zero", scenario("rounds = 2\n", "rounds = 0\n"), ("rounds", "0")),
        ("rounds-negative", scenario("rounds = 2\n", "rounds = -3\n"), ("rounds", "-3")),
        ("rounds-bool", scenario("rounds = 2\n", "rounds = true\n"), ("rounds", "True")),
        ("seed-float", scenario("seed = 0\n", "seed = 0.5\n"), ("seed", "0.5")),
        ("num-cpus-zero", scenario("num_cpus = 2\n", "num_cpus = 0\n"), ("num_cpus", "0")),
        ("matrix-string", scenario("matrix = 64\n", 'matrix = "big"\n'), ("matrix", "big")),
        ("matrix-tiny", scenario("matrix = 64\n", "matrix = 4\n"), ("matrix", "4")),
        ("unknown-run-key", scenario("seed = 0\n", "seed = 0\nroundz = 3\n"), ("[run]", "roundz")),
        ("unknown-table", scenario("[training]\n", "[trainning]\nx = 1\n\n[training]\n"), ("[trainning]",)),
        ("syntax-error", scenario("rounds = 2\n", "rounds = = 2\n"), (S, "line")),
        ("empty-file", scenario(raw=b""), (S,)),
        ("non-utf8", scenario(raw=b'[run]\nname = "caf\xe9"\n'), (S, "UTF-8")),
        ("binary-garbage", scenario(raw=bytes(range(256))), (S,)),
        (
            "unknown-table-array",
            scenario('[[sites]]\nname = "screening-a"', '[[other]]\nname = "screening-a"'),
            ("[[other]]",),
        ),
        ("no-sites", _no_sites, ("[[sites]]",)),
        ("site-studies-zero", scenario("studies = 3\nseed = 1", "studies = 0\nseed = 1"), ("studies", "0")),
        ("site-studies-float", scenario("studies = 3\nseed = 1", "studies = 2.5\nseed = 1"), ("studies", "2.5")),
        ("site-cohort-unknown", scenario('cohort = "screening"', 'cohort = "screenin"'), ("cohort", "screenin")),
        ("site-name-dup", scenario('name = "referral-a"', 'name = "screening-a"'), ("screening-a",)),
        ("site-unknown-key", scenario("studies = 3\nseed = 1", "studies = 3\nseed = 1\nstudys = 4"), ("studys",)),
        ("strategy-unknown", scenario('strategy = "fedavgm"', 'strategy = "fedprox"'), ("strategy", "fedprox")),
        (
            "momentum-out-of-range",
            scenario("server_momentum = 0.9", "server_momentum = 1.5"),
            ("server_momentum", "1.5"),
        ),
        ("fraction-train-zero", scenario("fraction_train = 1.0", "fraction_train = 0.0"), ("fraction_train", "0.0")),
        ("min-sites-float", scenario("min_sites = 2", "min_sites = 1.5"), ("min_sites", "1.5")),
        ("clip-norm-negative", scenario("clip_norm = 0.05", "clip_norm = -1.0"), ("clip_norm", "-1.0")),
        (
            "noise-nan",
            scenario("client_noise_multiplier = 0.5", "client_noise_multiplier = nan"),
            ("client_noise_multiplier", "nan"),
        ),
        ("delta-one", scenario("delta = 1e-5", "delta = 1.0"), ("delta", "1.0")),
        (
            "old-noise-name",
            scenario("client_noise_multiplier = 0.5", "noise_multiplier = 0.5"),
            ("noise_multiplier", "client_noise_multiplier"),
        ),
        (
            "clip-in-strategy",
            scenario("server_lr = 1.0", "server_lr = 1.0\nclip_norm = 0.1"),
            ("[strategy]", "clip_norm", "[dp]"),
        ),
        ("stage-unknown", scenario('stage = "vl"', 'stage = "vision"'), ("stage", "vision")),
        ("local-steps-float", scenario("local_steps = 2", "local_steps = 2.5"), ("local_steps", "2.5")),
        ("local-steps-zero", scenario("local_steps = 2", "local_steps = 0"), ("local_steps", "0")),
        ("lr-string", scenario("lr = 3e-4", 'lr = "fast"'), ("lr", "fast")),
        ("batch-size-zero", scenario("batch_size = 2", "batch_size = 0"), ("batch_size", "0")),
        ("model-unknown-key", scenario("heads.hidden = 16", "heads.hiden = 16"), ("hiden",)),
        (
            "model-bad-channels",
            scenario("vision.channels = [4, 8, 8, 16, 16]", "vision.channels = [4, 8]"),
            ("channels",),
        ),
        ("preset-unknown", scenario('preset = "tiny"', 'preset = "huge"'), ("preset", "huge")),
        (
            "round-timeout-negative",
            scenario("round_timeout_s = 600.0", "round_timeout_s = -1.0"),
            ("round_timeout_s", "-1.0"),
        ),
    ]
    return [Case(f"scenario-{cid}", "scenario_toml", setup, 2, names) for cid, setup, names in spec] + [
        Case(
            "scenario-missing-file",
            "scenario_toml",
            lambda t: ["simulate", str(t / "nope.toml"), "--out", str(t / "r")],
            2,
            ("nope.toml",),
        ),
        Case(
            "scenario-is-dir", "scenario_toml", lambda t: ["simulate", str(t), "--out", str(t / "r")], 2, ("directory",)
        ),
    ]


def _server_cases() -> list[Case]:
    spec: list[tuple[str, Callable[[Path], list[str]], tuple[str, ...]]] = [
        ("rounds-float", server("rounds = 20", "rounds = 2.5"), ("rounds", "2.5")),
        ("port-string", server("port = 9093", 'port = "https"'), ("port", "https")),
        ("port-out-of-range", server("port = 9093", "port = 70000"), ("port", "70000")),
        ("unknown-deployment-key", server("run_name =", "run_nam ="), ("[deployment]", "run_nam")),
        ("missing-ca", server('ca_cert = "../certs/ca.crt"', 'ca_cert = ""'), ("ca_cert",)),
        ("ca-not-found", server('ca_cert = "../certs/ca.crt"', 'ca_cert = "../certs/nope.crt"'), ("nope.crt",)),
        ("accountant-unknown", server('accountant = "rdp"', 'accountant = "moments"'), ("accountant", "moments")),
        (
            "target-epsilon-negative",
            server("target_epsilon = 8.0", "target_epsilon = -8.0"),
            ("target_epsilon", "-8.0"),
        ),
        ("dp-sgd-string", server("dp_sgd = false", 'dp_sgd = "no"'), ("dp_sgd", "no")),
        ("syntax-error", server(raw=b"[strategy\nrounds = 2\n"), ("server.toml",)),
        ("non-utf8", server(raw=b"[strategy]\nrounds = 2 # \xff\xfe\n"), ("server.toml", "UTF-8")),
        ("empty", server(raw=b""), ("server.toml",)),
        ("status-rounds-float", server("rounds = 20", "rounds = 2.5", cmd="status"), ("rounds", "2.5")),
        ("deployment-not-table", server(raw=b'deployment = "here"\n'), ("deployment",)),
        ("admit-not-list", server("admit = []", 'admit = "../keys/a.pub"'), ("admit",)),
    ]
    return [Case(f"server-{cid}", "server_toml", setup, 2, names) for cid, setup, names in spec] + [
        Case(
            "server-missing-config",
            "server_toml",
            lambda t: ["server", "start", "--config", str(t / "none.toml")],
            2,
            ("none.toml",),
        ),
    ]


CASES: list[Case] = _scenario_cases() + _server_cases()
