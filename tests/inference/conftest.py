"""A toy Wan video DiT: the real diffusers class at toy size with random weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

TEXT_DIM = 32
TEXT_LEN = 7


def toy_wan(seed: int = 0, num_layers: int = 2):
    """``WanTransformer3DModel`` with 36 input channels (noisy 16 | mask 4 | masked latent 16), 16 out."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
                                  out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=num_layers,
                                  rope_max_seq_len=32)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def wan():
    return toy_wan()


def text(batch: int, seed: int = 1) -> torch.Tensor:
    """``(B, L, text_dim)`` random text embeddings."""
    return torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def lpips_folder(tmp_path):
    """LPIPS weights as users would have them: torchvision's AlexNet state dict and the lpips linear layers
    (random values in the real layout)."""
    from dreamstereo.inference.lpips import ALEX_CHANNELS, alexnet_features

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in alexnet_features().state_dict().items()}, tmp_path / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(ALEX_CHANNELS)},
               tmp_path / "alex.pth")
    return tmp_path
