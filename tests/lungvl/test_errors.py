"""lungvl.errors: each kind of failure gets its exit code and a line naming the file; bugs go to a crash file."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from lungvl import errors
from lungvl_model.errors import CorruptStateError, PeerUnreachable
from server.round_types import RunAborted


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:  # noqa: BLE001
        return e


@pytest.mark.parametrize(
    ("exc", "code", "words"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/out.csv"),
            errors.DISK_FULL,
            ("disk full", "/data/out.csv"),
        ),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/q"), errors.DISK_FULL, ("disk full", "/q")),
        (
            OSError(errno.EROFS, "Read-only file system", "/ro/x"),
            errors.NO_PERMISSION,
            ("read-only file system", "/ro/x"),
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/etc/x"),
            errors.NO_PERMISSION,
            ("permission denied", "/etc/x"),
        ),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope"), errors.BAD_INPUT, ("/nope",)),
        (FileNotFoundError("site config /a/site.toml does not exist"), errors.BAD_INPUT, ("/a/site.toml",)),
        (OSError(errno.EIO, "Input/output error", "/dev/sdz"), errors.BAD_INPUT, ("/dev/sdz", "Input/output")),
        (ValueError("[run] rounds must be an integer, got 2.5"), errors.BAD_INPUT, ("[run] rounds", "2.5")),
        (KeyError("unknown key 'x' in [dp]"), errors.BAD_INPUT, ("unknown key 'x' in [dp]",)),
        (CorruptStateError("registry r.db: holds no tables"), errors.CORRUPT_STATE, ("r.db",)),
        (PeerUnreachable("superlink h:9093: connection refused"), errors.UNREACHABLE, ("h:9093",)),
        (ModuleNotFoundError("No module named 'psycopg'", name="psycopg"), errors.MISSING_DEPENDENCY, ("psycopg",)),
        (RunAborted("3 failed rounds in a row (rounds 4-6)"), errors.FAILED, ("run failed", "3 failed rounds")),
        (
            ModuleNotFoundError("PostgreSQL registry needs the driver: pip install 'lungvl[postgres]'", name="psycopg"),
            errors.MISSING_DEPENDENCY,
            ("lungvl[postgres]",),
        ),
        (KeyboardInterrupt(), errors.INTERRUPTED, ("interrupted",)),
        (sqlite3.DatabaseError("file is not a database"), errors.CORRUPT_STATE, ("not a database",)),
        (sqlite3.OperationalError("database or disk is full"), errors.DISK_FULL, ("disk full",)),
    ],
)
def test_classify(exc: BaseException, code: int, words: tuple[str, ...]) -> None:
    verdict = errors.classify(exc)
    assert verdict is not None and verdict.code == code
    for w in words:
        assert w in verdict.message


def test_disk_full_deep_in_the_chain_wins() -> None:
    """A library that wraps ENOSPC in its own error still reads as a full disk."""
    exc = _chained(RuntimeError("unexpected pos 123"), OSError(errno.ENOSPC, "No space left on device", "/r/model.pt"))
    verdict = errors.classify(exc)
    assert verdict is not None and verdict.code == errors.DISK_FULL and "/r/model.pt" in verdict.message


def test_a_bug_is_not_an_expected_failure() -> None:
    assert errors.classify(ZeroDivisionError("division by zero")) is None
    assert errors.classify(AttributeError("'NoneType' object has no attribute 'x'")) is None


def test_naming_gives_a_nameless_os_error_its_file() -> None:
    with pytest.raises(OSError) as info, errors.naming("/out/answers.csv"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == "/out/answers.csv" and info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info, errors.naming("/elsewhere"):
        raise OSError(errno.ENOSPC, "No space left on device", "/kept")
    assert info.value.filename == "/kept"


def test_run_guarded_writes_a_crash_file_for_a_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGVL_CRASH_DIR", str(tmp_path))
    printed: list[str] = []

    def bug() -> None:
        raise ZeroDivisionError("division by zero")

    code = errors.run_guarded(bug, ["demo"], printed.append)
    assert code == errors.INTERNAL
    assert len(printed) == 1 and "internal error" in printed[0] and "Traceback" not in printed[0]
    crash = next(tmp_path.glob("lungvl-crash-*.txt"))
    assert str(crash) in printed[0]
    assert "Traceback (most recent call last)" in crash.read_text() and "ZeroDivisionError" in crash.read_text()


def test_run_guarded_passes_exit_codes_and_maps_expected_failures() -> None:
    printed: list[str] = []

    def exits() -> None:
        raise SystemExit(3)

    def bad() -> None:
        raise ValueError("labels.csv:7: column 'age' = '200' must be <= 120")

    assert errors.run_guarded(exits, [], printed.append) == 3
    assert errors.run_guarded(bad, [], printed.append) == errors.BAD_INPUT
    assert printed == ["labels.csv:7: column 'age' = '200' must be <= 120"]
    assert errors.run_guarded(lambda: None, [], printed.append) == errors.OK


def test_print_row_errors_summarises(capsys: pytest.CaptureFixture[str]) -> None:
    from lungvl.console import print_row_errors

    n = print_row_errors((f"row {i}: missing column 'type'" for i in range(1, 100_001)), limit=20)
    err = capsys.readouterr().err
    assert n == 100_000
    assert len(err.strip().splitlines()) == 21
    assert "row 20:" in err and "row 21:" not in err and "99,980 more" in err


def test_markup_in_messages_is_printed_literally(capsys: pytest.CaptureFixture[str]) -> None:
    from lungvl.console import print_error

    print_error("unknown [run] key 'roundz'; [federation] superlink [bold]x[/bold]")
    assert "unknown [run] key 'roundz'; [federation] superlink [bold]x[/bold]" in capsys.readouterr().err
