"""A full disk, a read-only or forbidden folder, a run directory held by another process, Ctrl-C."""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.bad_inputs.cases_config import TINY
from tests.bad_inputs.cases_files import BROCK_HEADER, BROCK_ROW
from tests.bad_inputs.framework import Case, child_env, lungvl_cmd

SHIM = Path(__file__).with_name("enospc_shim.py")


@functools.cache
def can_mount() -> bool:
    """Whether a private mount namespace (``unshare -rm``) can mount a tmpfs here."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp",
        ],
        capture_output=True,
        timeout=20,
    )
    return probe.returncode == 0


def small_disk(folder: Path, size_kb: int, args: list[str]) -> list[str]:
    """A command running ``lungvl args`` with ``folder`` a ``size_kb`` file system (tmpfs; else the ENOSPC shim)."""
    folder.mkdir(parents=True, exist_ok=True)
    if can_mount():
        inner = f"mount -t tmpfs -o size={size_kb}k tmpfs {shlex.quote(str(folder))} && exec " + shlex.join(
            [*lungvl_cmd(), *args]
        )
        return ["unshare", "-rm", "sh", "-c", inner]
    return [sys.executable, str(SHIM), str(folder), str(size_kb * 1024), "ENOSPC", *args]


def read_only(folder: Path, args: list[str]) -> list[str]:
    """A command running ``lungvl args`` with ``folder`` bind-mounted read-only (else EROFS from the shim)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not can_mount():
        return [sys.executable, str(SHIM), str(folder), "0", "EROFS", *args]
    q = shlex.quote(str(folder))
    inner = f"mount --bind {q} {q} && mount -o remount,ro,bind {q} && exec " + shlex.join([*lungvl_cmd(), *args])
    return ["unshare", "-rm", "sh", "-c", inner]


def _scenario(tmp: Path) -> Path:
    (tmp / "scenario.toml").write_text(TINY, encoding="utf-8")
    return tmp / "scenario.toml"


def _hold_lock(run_dir: Path) -> subprocess.Popen[bytes]:
    """A child process that holds ``run_dir``'s lock until killed."""
    code = (
        "import sys, time\nfrom server.run_lock import RunDirLock\n"
        f"lock = RunDirLock({str(run_dir)!r}, what='lungvl simulate (corpus holder)')\n"
        "lock.acquire()\nprint('held', flush=True)\ntime.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=child_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    _HOLDERS.append(proc)
    return proc


_HOLDERS: list[subprocess.Popen[bytes]] = []


def release_holders() -> None:
    """Kill the lock-holding children started by the concurrency cases."""
    while _HOLDERS:
        p = _HOLDERS.pop()
        p.kill()
        p.wait()


def _disk_cases() -> list[Case]:
    brock = (BROCK_HEADER + BROCK_ROW * 5000).encode()

    def synth_full(tmp: Path) -> list[str]:
        return small_disk(
            tmp / "small",
            256,
            [
                "data",
                "synth",
                "--cohort",
                "screening",
                "--studies",
                "2",
                "--matrix",
                "64",
                "--out",
                str(tmp / "small" / "site"),
            ],
        )

    def rules_full(tmp: Path) -> list[str]:
        (tmp / "in.csv").write_bytes(brock)
        return small_disk(
            tmp / "small",
            16,
            ["rules", "brock", "--csv", str(tmp / "in.csv"), "--out", str(tmp / "small" / "answers.csv")],
        )

    def synth_tiny_fs(tmp: Path) -> list[str]:
        args = ["data", "synth", "--cohort", "referral", "--studies", "1", "--matrix", "32"]
        return small_disk(tmp / "small", 4, [*args, "--out", str(tmp / "small" / "s")])

    def simulate_full(tmp: Path) -> list[str]:
        return small_disk(tmp / "small", 512, ["simulate", str(_scenario(tmp)), "--out", str(tmp / "small" / "run")])

    def dev_full(tmp: Path) -> list[str]:
        (tmp / "in.csv").write_bytes(brock)
        return ["rules", "brock", "--csv", str(tmp / "in.csv"), "--out", "/dev/full"]

    def stdout_full(tmp: Path) -> list[str]:
        (tmp / "r.jsonl").write_bytes(b'{"id": "a", "text": "A 6 mm solid nodule."}\n' * 2000)
        inner = shlex.join([*lungvl_cmd(), "report", "label", "--jsonl", str(tmp / "r.jsonl")]) + " > /dev/full"
        return ["sh", "-c", inner]

    def synth_read_only(tmp: Path) -> list[str]:
        return read_only(
            tmp / "ro",
            [
                "data",
                "synth",
                "--cohort",
                "screening",
                "--studies",
                "1",
                "--matrix",
                "32",
                "--out",
                str(tmp / "ro" / "site"),
            ],
        )

    def rules_read_only(tmp: Path) -> list[str]:
        (tmp / "in.csv").write_bytes(brock)
        return read_only(
            tmp / "ro", ["rules", "brock", "--csv", str(tmp / "in.csv"), "--out", str(tmp / "ro" / "a.csv")]
        )

    def simulate_read_only(tmp: Path) -> list[str]:
        return read_only(tmp / "ro", ["simulate", str(_scenario(tmp)), "--out", str(tmp / "ro" / "run")])

    def sys_out(tmp: Path) -> list[str]:
        return ["data", "synth", "--cohort", "screening", "--studies", "1", "--out", "/sys/lungvl-corpus-site"]

    def sys_csv(tmp: Path) -> list[str]:
        (tmp / "in.csv").write_bytes(brock)
        return ["rules", "brock", "--csv", str(tmp / "in.csv"), "--out", "/sys/lungvl-corpus.csv"]

    return [
        Case("disk-synth-full", "disk", synth_full, 4, ("disk full",), subprocess=True, timeout=120),
        Case("disk-rules-out-full", "disk", rules_full, 4, ("disk full", "answers.csv"), subprocess=True),
        Case("disk-synth-tiny-fs", "disk", synth_tiny_fs, 4, ("disk full",), subprocess=True, timeout=120),
        Case("disk-simulate-full", "disk", simulate_full, 4, ("disk full",), subprocess=True, timeout=240),
        Case("disk-dev-full", "disk", dev_full, 4, ("disk full", "/dev/full")),
        Case("disk-stdout-full", "disk", stdout_full, 4, ("disk full",), subprocess=True),
        Case("disk-synth-read-only", "disk", synth_read_only, 5, ("read-only file system",), subprocess=True),
        Case("disk-rules-read-only", "disk", rules_read_only, 5, ("read-only file system", "a.csv"), subprocess=True),
        Case(
            "disk-simulate-read-only",
            "disk",
            simulate_read_only,
            5,
            ("read-only file system",),
            subprocess=True,
            timeout=120,
        ),
        Case("disk-synth-forbidden", "disk", sys_out, 5, ("lungvl-corpus-site",)),
        Case("disk-rules-forbidden", "disk", sys_csv, 5, ("lungvl-corpus.csv",)),
    ]


def _concurrency_cases() -> list[Case]:
    def simulate_busy(tmp: Path) -> list[str]:
        _hold_lock(tmp / "run")
        return ["simulate", str(_scenario(tmp)), "--out", str(tmp / "run")]

    def study_busy(tmp: Path) -> list[str]:
        root = Path(__file__).resolve().parents[2]
        study = root / "simulations" / "studies"
        toml = sorted(study.glob("*.toml"))[0]
        _hold_lock(tmp / "study")
        return ["study", "run", str(toml), "--out", str(tmp / "study")]

    def resume_nothing(tmp: Path) -> list[str]:
        return ["simulate", str(_scenario(tmp)), "--out", str(tmp / "run"), "--resume"]

    def synth_interrupted(tmp: Path) -> list[str]:
        return [*lungvl_cmd(), "data", "synth", "--cohort", "screening", "--studies", "30", "--out", str(tmp / "site")]

    return [
        Case(
            "concurrency-ctrl-c-synth",
            "concurrency",
            synth_interrupted,
            130,
            ("interrupted",),
            subprocess=True,
            interrupt_after=6.0,
            may_change=("site",),
        ),
        Case("concurrency-simulate-busy", "concurrency", simulate_busy, 3, ("run", "PID")),
        Case("concurrency-study-busy", "concurrency", study_busy, 3, ("study", "PID")),
        Case("concurrency-resume-nothing", "concurrency", resume_nothing, 2, ("run",)),
    ]


CASES: list[Case] = _disk_cases() + _concurrency_cases()
