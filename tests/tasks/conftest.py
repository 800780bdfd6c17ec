"""Task-test fixtures: the content facts sidecar and writable broken copies of a layout."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from avkv.tasks import fixtures

# ``fixture_root`` (the built .cache/fixtures) comes from tests/conftest.py


@pytest.fixture(scope="session")
def facts(fixture_root: Path) -> dict:
    return fixtures.load_facts(fixture_root)


@pytest.fixture
def broken_copy(fixture_root: Path, tmp_path: Path):
    """``broken_copy('avqa')`` → a writable copy of one family's layout to damage."""
    def make(family: str) -> Path:
        dst = tmp_path / family
        shutil.copytree(fixture_root / family, dst)
        return dst
    return make
