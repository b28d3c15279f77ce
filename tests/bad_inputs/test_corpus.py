"""Run the bad-input corpus (see framework.py): every case, its exit code, no traceback, names, no file changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bad_inputs import cases_config, cases_disk, cases_files, cases_site, cases_state
from tests.bad_inputs.framework import CLASSES, Case, check

ALL: list[Case] = [*cases_config.CASES, *cases_files.CASES, *cases_state.CASES, *cases_disk.CASES, *cases_site.CASES]


def test_corpus_is_well_formed() -> None:
    ids = [c.id for c in ALL]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert {c.klass for c in ALL} <= set(CLASSES)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    try:
        check(case, tmp_path)
    finally:
        cases_disk.release_holders()
