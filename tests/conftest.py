"""Shared test fixtures: the real CT/MRI data beside the repository (../shared/data)."""

from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[1]
# Beside the repository on workstations; inside it where a checkout carries shared/.
_SHARED_DATA_CANDIDATES = (_REPO_ROOT.parent / "shared" / "data", _REPO_ROOT / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the shared data folder (README.md, splits.json, one folder per set); skips if absent."""
    for folder in _SHARED_DATA_CANDIDATES:
        if (folder / "splits.json").is_file():
            return folder
    pytest.skip("shared data not found at ../shared/data (see /work/shared/data/README.md)")
