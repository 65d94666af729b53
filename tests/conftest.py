"""Shared fixtures: paths to the real data beside the repository, determinism."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DREAMSTEREO_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def middlebury_dir() -> Path:
    folder = SHARED_DATA / "middlebury-2005-2006"
    if not folder.is_dir():
        pytest.skip(f"real stereo data not found at {folder} (set DREAMSTEREO_SHARED_DATA)")
    return folder
