"""Run lungvl with writes under one folder failing with ENOSPC after a byte budget.

For machines where no small file system can be mounted.

Usage: python enospc_shim.py FOLDER BUDGET_BYTES ERRNO_NAME lungvl-args...  (ERRNO_NAME: ENOSPC or EROFS)

Only the fallback of the disk-full cases: where ``unshare -rm`` can mount a small tmpfs, the corpus uses
the real thing.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import sys
from typing import Any

FOLDER = os.path.realpath(sys.argv[1])
BUDGET = [int(sys.argv[2])]
ERRNO = getattr(errno, sys.argv[3])
_open = io.open


class _Limited:
    def __init__(self, fh: Any, path: str) -> None:
        self._fh, self._path = fh, path

    def write(self, data: Any) -> int:
        n = len(data.encode() if isinstance(data, str) else data)
        if n > BUDGET[0]:
            raise OSError(ERRNO, os.strerror(ERRNO), self._path)
        BUDGET[0] -= n
        return int(self._fh.write(data))

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _limited_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    fh = _open(file, mode, *args, **kwargs)
    if isinstance(file, str | os.PathLike) and any(m in mode for m in "wax+"):
        path = os.path.realpath(os.fspath(file))
        if path.startswith(FOLDER + os.sep):
            if ERRNO != errno.ENOSPC:  # a read-only file system refuses the open itself
                fh.close()
                os.unlink(path)
                raise OSError(ERRNO, os.strerror(ERRNO), path)
            return _Limited(fh, path)
    return fh


builtins.open = _limited_open
io.open = _limited_open

from lungvl.cli import run  # noqa: E402 - after the patch

sys.exit(run(sys.argv[4:]))
