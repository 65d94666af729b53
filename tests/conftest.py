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


@pytest.fixture(scope="session")
def tiny_depthcrafter(tmp_path_factory) -> tuple[str, str]:
    """DepthCrafter's components at toy size (real diffusers/transformers classes, random weights):
    returns (UNet folder, SVD base folder with vae/, image_encoder/, scheduler/)."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("depthcrafter")
    UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=(2, 4), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
    ).save_pretrained(root / "unet")
    AutoencoderKLTemporalDecoder(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                 down_block_types=("DownEncoderBlock2D",) * 4).save_pretrained(root / "svd" / "vae")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=224, patch_size=32,
                                                   projection_dim=32)).save_pretrained(root / "svd" / "image_encoder")
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
                           timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
                           interpolation_type="linear").save_pretrained(root / "svd" / "scheduler")
    return str(root / "unet"), str(root / "svd")
