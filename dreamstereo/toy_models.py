"""Randomly initialised models of the real architectures, saved like checkpoints.

Used by the tests (toy sizes, seconds on a CPU) and the benchmarks (toy or published sizes, to time
compute without downloading weights). Their outputs mean nothing; their code paths are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_depth_anything_v2(path: str | Path, *, published_small: bool = False, seed: int = 0) -> str:
    """Depth Anything V2 (transformers), toy size or the published Small layout; returns the folder."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    if published_small:
        backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                                patch_size=14, image_size=518, out_features=["stage3", "stage6", "stage9", "stage12"],
                                reshape_hidden_states=False)
        config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384, fusion_hidden_size=64,
                                     neck_hidden_sizes=[48, 96, 192, 384], head_hidden_size=32, patch_size=14,
                                     depth_estimation_type="relative")
    else:
        backbone = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                patch_size=14, image_size=98, out_features=["stage1", "stage2"],
                                reshape_hidden_states=False)
        config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, fusion_hidden_size=16,
                                     neck_hidden_sizes=[16, 32], head_hidden_size=8, patch_size=14,
                                     depth_estimation_type="relative")
    torch.manual_seed(seed)
    DepthAnythingForDepthEstimation(config).save_pretrained(path)
    return str(path)


def save_depthcrafter(root: str | Path, *, published_size: bool = False, seed: int = 0) -> tuple[str, str]:
    """DepthCrafter's components (SVD UNet, temporal VAE, CLIP ViT image encoder, Euler scheduler), toy
    size or the published SVD-XT sizes; returns ``(UNet folder, base folder)`` with the base holding
    ``vae/``, ``image_encoder/`` and ``scheduler/`` as the SVD repository does."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = Path(root)
    torch.manual_seed(seed)
    if published_size:
        unet = UNetSpatioTemporalConditionModel()  # the defaults are SVD's UNet
        vae = AutoencoderKLTemporalDecoder(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                           down_block_types=("DownEncoderBlock2D",) * 4)
        clip = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                image_size=224, patch_size=14, projection_dim=1024)
    else:
        unet = UNetSpatioTemporalConditionModel(
            sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            cross_attention_dim=32, num_attention_heads=(2, 4), addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24)
        vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                           down_block_types=("DownEncoderBlock2D",) * 4)
        clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=224, patch_size=32, projection_dim=32)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "svd" / "vae")
    CLIPVisionModelWithProjection(clip).save_pretrained(root / "svd" / "image_encoder")
    # SVD-XT's scheduler configuration (v-prediction, Karras sigmas up to 700).
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
                           timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
                           interpolation_type="linear").save_pretrained(root / "svd" / "scheduler")
    return str(root / "unet"), str(root / "svd")
