"""Shared fixtures: paths to the real data beside the repository, determinism."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Nothing in the tests may reach a model hub: fail fast on any hub id instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


@pytest.fixture(scope="session")
def tiny_dav2(tmp_path_factory) -> str:
    """A randomly initialised Depth Anything V2 of the real architecture, saved like a checkpoint."""
    from dreamstereo.toy_models import save_depth_anything_v2

    return save_depth_anything_v2(tmp_path_factory.mktemp("weights") / "tiny-depth-anything-v2")


@pytest.fixture(scope="session")
def tiny_depthcrafter(tmp_path_factory) -> tuple[str, str]:
    """DepthCrafter's components at toy size (real diffusers/transformers classes, random weights):
    returns (UNet folder, SVD base folder with vae/, image_encoder/, scheduler/)."""
    from dreamstereo.toy_models import save_depthcrafter

    return save_depthcrafter(tmp_path_factory.mktemp("depthcrafter"))
