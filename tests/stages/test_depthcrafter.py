"""DepthCrafter built from the real diffusers/transformers classes at toy size: windows, context, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamstereo.stages.depth import DepthBackendName, DepthConfig, DepthWeightsError, load_backend
from dreamstereo.stages.depthcrafter import DepthCrafter, install_per_frame_context
from tests.videos import moving_pattern


def _backend(weights, **kwargs):
    unet, base = weights
    cfg = DepthConfig(backend=DepthBackendName.DEPTHCRAFTER, weights=unet, base_weights=base,
                      max_resolution=64, steps=2, **kwargs)
    return load_backend(cfg)


def test_end_to_end_normalised_per_clip_and_deterministic(tiny_depthcrafter):
    backend = _backend(tiny_depthcrafter, window=6, overlap=2)
    frames = moving_pattern(10, 48, 80)
    depth = backend(frames)
    assert depth.shape == (10, 48, 80) and depth.dtype == np.float32
    assert depth.min() == 0.0 and depth.max() == 1.0  # min-max over the whole clip
    assert np.array_equal(backend(frames), depth)  # seeded noise: reruns are identical
    assert backend._network_size(480, 832) == (64, 64) and DepthCrafter._network_size(backend, 48, 80) == (64, 64)


def test_windows_cover_every_frame_once_with_blending(tiny_depthcrafter):
    # 10 frames, window 6, overlap 2: windows [0, 6) and [4, 10); one window of 10 gives other values.
    windowed = _backend(tiny_depthcrafter, window=6, overlap=2)(moving_pattern(10, 48, 80))
    whole = _backend(tiny_depthcrafter, window=20, overlap=2)(moving_pattern(10, 48, 80))
    assert windowed.shape == whole.shape == (10, 48, 80)
    assert not np.array_equal(windowed, whole)


def test_windows_without_overlap_are_joined(tiny_depthcrafter):
    depth = _backend(tiny_depthcrafter, window=4, overlap=0)(moving_pattern(10, 48, 80))  # 4 + 4 + 2 frames
    assert depth.shape == (10, 48, 80) and np.isfinite(depth).all()


def test_per_frame_context_reaches_only_spatial_cross_attention(tiny_depthcrafter):
    backend = _backend(tiny_depthcrafter)
    names = [n for n, p in backend.unet.attn_processors.items() if p is backend.context]
    assert names and all(".transformer_blocks." in n and n.endswith("attn2.processor") for n in names)
    assert not any("temporal" in n for n in names)
    # With the same embedding for every frame the processor changes nothing (SVD behaviour).
    unet = backend.unet
    sample = torch.randn(1, 3, 8, 8, 8)
    embedding = torch.randn(1, 1, 32)
    added = torch.tensor([[7.0, 127.0, 0.0]])
    plain = unet(sample, 10.0, encoder_hidden_states=embedding, added_time_ids=added, return_dict=False)[0]
    backend.context.context = embedding.repeat(3, 1, 1)
    try:
        same = unet(sample, 10.0, encoder_hidden_states=embedding, added_time_ids=added, return_dict=False)[0]
        backend.context.context = torch.randn(3, 1, 32)
        other = unet(sample, 10.0, encoder_hidden_states=embedding, added_time_ids=added, return_dict=False)[0]
    finally:
        backend.context.context = None
    assert torch.allclose(plain, same, atol=1e-5) and not torch.allclose(plain, other, atol=1e-3)
    assert install_per_frame_context(unet) is not backend.context  # a fresh install replaces it


def test_missing_weights_name_the_option(tiny_depthcrafter, tmp_path):
    unet, _ = tiny_depthcrafter
    with pytest.raises(DepthWeightsError, match="depth.base_weights="):
        load_backend(DepthConfig(backend=DepthBackendName.DEPTHCRAFTER, weights=unet,
                                 base_weights="stabilityai/stable-video-diffusion-img2vid-xt"))
    with pytest.raises(DepthWeightsError, match="depth.weights="):
        load_backend(DepthConfig(backend=DepthBackendName.DEPTHCRAFTER, weights=str(tmp_path / "none")))
