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
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            patch_size=14, image_size=98, out_features=["stage1", "stage2"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, fusion_hidden_size=16,
                                 neck_hidden_sizes=[16, 32], head_hidden_size=8, patch_size=14,
                                 depth_estimation_type="relative")
    path = tmp_path_factory.mktemp("weights") / "tiny-depth-anything-v2"
    DepthAnythingForDepthEstimation(config).save_pretrained(path)
    return str(path)
