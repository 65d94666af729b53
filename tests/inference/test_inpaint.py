"""The inference inpainter (model + SASI + one step) and `convert --checkpoint`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dreamstereo.cli import main
from dreamstereo.inference.inpaint import InpaintConfig, StereoInpainter
from dreamstereo.inference.sasi import SasiConfig
from dreamstereo.io.media import read_video
from dreamstereo.scenes import step_scene, write_scene


def _clip(t=5, h=32, w=48, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    mask = np.zeros((t, h, w), bool)
    mask[:, 10:20, 20:26] = True
    return frames, mask


def test_odd_sizes_come_back_at_their_size(toy_wan_model):
    inpainter = StereoInpainter(toy_wan_model, InpaintConfig(sasi=SasiConfig(k=1, bucket_multiple=4)))
    frames, mask = _clip(t=6, h=56, w=72)  # 6 frames (not 1 + 4k), 56 x 72 (not multiples of 16)
    out = inpainter.inpaint(frames, mask)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert 0 < inpainter.retention() < 1 and inpainter.stats["frames"] == 6


def test_sparse_with_every_token_equals_dense(toy_wan_model):
    frames, mask = _clip()
    inpainter = StereoInpainter(toy_wan_model, InpaintConfig(sasi=SasiConfig(k=99, bucket_multiple=1)))
    sparse, dense = inpainter.inpaint(frames, mask, sparse=True), inpainter.inpaint(frames, mask, sparse=False)
    assert np.abs(sparse.astype(int) - dense.astype(int)).max() <= 1  # one uint8 step of rounding at most
    assert inpainter.retention() == 1.0


def test_a_lighter_decoder_decodes_the_same_latents(toy_wan_model, tmp_path):
    from diffusers import AutoencoderKLWan

    from dreamstereo.models.wan_inpaint import WeightsError
    from dreamstereo.toy_models import wan_vae_config

    frames, mask = _clip()
    lighter = {**wan_vae_config(), "base_dim": 4}  # half the width, the same 16 latent channels
    AutoencoderKLWan(**lighter).save_pretrained(tmp_path / "light")
    base = StereoInpainter(toy_wan_model).inpaint(frames, mask)
    light = StereoInpainter(toy_wan_model, InpaintConfig(decoder=str(tmp_path / "light")))
    assert sum(p.numel() for p in light.decoder.parameters()) < sum(p.numel() for p in light.vae.parameters())
    out = light.inpaint(frames, mask)
    assert out.shape == base.shape and not np.array_equal(out, base)  # decoded by the other network
    AutoencoderKLWan(**{**wan_vae_config(), "z_dim": 8}).save_pretrained(tmp_path / "other")
    with pytest.raises(WeightsError, match="same latents"):
        StereoInpainter(toy_wan_model, InpaintConfig(decoder=str(tmp_path / "other")))


def test_convert_windows_overlap_without_losing_or_repeating_frames(toy_wan_model, tmp_path, capsys):
    scene = step_scene(width=32, height=32, d_back=0.0, d_front=6.0, edge=15.5, num_frames=11)
    video, _ = write_scene(scene, tmp_path / "long.mp4", fps=24)
    code = main(["-q", "convert", video, str(tmp_path / "o.mp4"), "--depth", "oracle", "--checkpoint",
                 toy_wan_model, "window=5", "overlap=2", "model.sasi.bucket_multiple=4"])
    assert code == 0, capsys.readouterr().err
    frames, _ = read_video(tmp_path / "o.mp4")
    source, _ = read_video(video)
    assert len(frames) == 11  # windows of 5 new frames (+2 re-inpainted) over 11 frames: each written once
    assert np.abs(frames[..., :32, :].astype(int) - source).mean() < 3  # in order: the left eye is the input


def test_convert_with_a_checkpoint(toy_wan_model, tmp_path, capsys):
    scene = step_scene(width=64, height=32, d_back=0.0, d_front=6.0, edge=31.5, num_frames=5)
    video, _ = write_scene(scene, tmp_path / "step.mp4", fps=24)
    out = tmp_path / "out.mp4"
    code = main(["-q", "convert", video, str(out), "--depth", "oracle", "--checkpoint", toy_wan_model,
                 "model.sasi.bucket_multiple=4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "OpenCV" not in captured.out
    frames, _ = read_video(out)
    assert frames.shape == (5, 32, 128, 3)
    record = json.loads((tmp_path / "out.mp4.json").read_text())
    assert record["inpainting"].startswith("model (SASI k=3, 1 step(s), token retention")

    code = main(["-q", "convert", video, str(tmp_path / "x.mp4"), "--depth", "oracle", "--checkpoint",
                 str(tmp_path / "no-such-model")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist: provide a local diffusers-format Wan2.1-T2V-1.3B folder" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.mp4").exists()


def test_bad_clip_is_refused(toy_wan_model):
    inpainter = StereoInpainter(toy_wan_model)
    frames, mask = _clip()
    with pytest.raises(ValueError, match="must agree"):
        inpainter.inpaint(frames, mask[:, :-1])
