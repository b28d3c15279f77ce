"""Option types shared by the commands: enumerated choices, the torch device, and ``-`` for standard input.

Choices are click types, so ``--help`` lists them and a wrong value is a usage error (exit 2) before
any work starts. The lists are written out here rather than imported, because the modules that own
them import torch or the synthetic generator (seconds at every CLI start);
``tests/lungvl/test_cli_conventions.py`` checks each against its owner.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from click.shell_completion import CompletionItem

#: ``lungvl train --stage``: the training stages (lungvl_model.training.config.STAGE_NAMES), the two heads and
#: the native-resolution detector
TRAIN_STAGES: tuple[str, ...] = ("text", "ssl", "seg", "vl", "findings", "risk", "candidates", "detector")
#: ``lungvl bench train --stage`` (lungvl_model.benchmarks.train_bench)
BENCH_STAGES: tuple[str, ...] = ("seg", "vl", "fine")
#: model presets (lungvl_model.models.config.PRESETS)
PRESETS: tuple[str, ...] = ("tiny", "base")
#: synthetic cohort profiles (lungvl_model.data.synth.cohorts.PROFILES)
SYNTH_COHORTS: tuple[str, ...] = ("screening", "referral", "low_resource")
#: ``lungvl train --peer``: segmentation anchors
PEERS: tuple[str, ...] = ("dynunet",)

#: what ``-`` means where a file is read or written
#: Help of ``--checked-candidates`` (explain, evaluate): lungvl_model.inference.narrative.CheckedDecoding.
CHECKED_HELP = (
    "finding sentences sampled when the greedy one states a fact the fact check contradicts or cannot support; "
    "the one with the fewest faults is kept (0: no sampling; a contradicted size, lobe, type, comparison with the "
    "prior or Lung-RADS category is still re-decoded as measured)"
)

STDIN = "-"
STDIN_NAME = "standard input"

_CUDA_INDEX = re.compile(r"cuda:\d+")


def choice(values: tuple[str, ...]) -> click.Choice:
    """A case-sensitive click choice of ``values`` (``--help`` shows them as ``[a|b|c]``)."""
    return click.Choice(list(values), case_sensitive=True)


class DeviceType(click.ParamType):
    """A torch device name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (checked, not looked up: no torch import)."""

    name = "device"
    choices: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N")

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        """``[auto|cpu|cuda|cuda:N]`` in ``--help``."""
        return "[" + "|".join(self.choices) + "]"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """The device name as given; a usage error naming the value otherwise."""
        text = str(value).strip()
        if text in self.choices[:3] or _CUDA_INDEX.fullmatch(text):
            return text
        self.fail(f"{text!r} is not one of auto, cpu, cuda, cuda:N (N a GPU index, e.g. cuda:1)", param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        """Complete the fixed names."""
        return [CompletionItem(c) for c in self.choices[:3] if c.startswith(incomplete)]


DEVICE = DeviceType()


def is_stdin(path: Path | str | None) -> bool:
    """Whether a path option was given as ``-`` (standard input or output)."""
    return path is not None and str(path) == STDIN


@contextmanager
def input_file(path: Path) -> Iterator[Path]:
    """``path`` itself, or for ``-`` a private temporary file holding all of standard input.

    The readers of CSV/JSONL files take a path and check the file (empty, not UTF-8, NUL bytes) with
    messages naming it; with ``-`` those messages name "standard input" instead of the temporary file.

    Args:
        path: the option's value.

    Yields:
        A path to read.

    Raises:
        ValueError: the reader's own errors, with the temporary path replaced by "standard input".
    """
    if not is_stdin(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lungvl-stdin-") as folder:
        spool = Path(folder) / "stdin"
        spool.write_bytes(sys.stdin.buffer.read())
        try:
            yield spool
        except ValueError as e:
            raise ValueError(str(e).replace(str(spool), STDIN_NAME)) from None
