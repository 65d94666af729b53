"""The inpainting model module: mask packing, the widened patch embedding, loading, prompt embedding, LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dreamstereo.models import wan_inpaint as wan


def test_pack_mask_matches_a_hand_computed_case():
    # 5 frames (1 + 4k, k = 1) of 16x8 pixels -> 2 latent frames of 2x1 cells, 4 channels.
    mask = torch.zeros(1, 1, 5, 16, 8, dtype=torch.bool)
    mask[0, 0, 0, 0, 0] = True  # frame 0, top cell: one pixel
    mask[0, 0, 2, 9, 7] = True  # frame 2, bottom cell
    mask[0, 0, 4, :8, :] = True  # frame 4, whole top cell
    packed = wan.pack_mask(mask)
    assert packed.shape == (1, 4, 2, 2, 1) and packed.dtype == torch.float32
    expected = torch.zeros(1, 4, 2, 2, 1)
    expected[0, :, 0, 0, 0] = 1  # latent frame 0 = pixel frame 0, repeated in all 4 channels
    expected[0, 1, 1, 1, 0] = 1  # latent frame 1, channel c = pixel frame 1 + c: frame 2 -> channel 1
    expected[0, 3, 1, 0, 0] = 1  # frame 4 -> channel 3
    assert torch.equal(packed, expected)
    assert torch.equal(wan.known_mask_channels(mask), 1 - expected)


def test_pack_mask_rejects_frames_that_are_not_1_plus_4k():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        wan.pack_mask(torch.zeros(1, 1, 4, 16, 16))


def test_widening_keeps_the_output_of_a_16_channel_input(toy_wan):
    from diffusers import WanTransformer3DModel

    base = WanTransformer3DModel.from_pretrained(f"{toy_wan}/transformer").eval()
    widened = wan.load_inpaint_model(toy_wan).eval()
    assert widened.config.in_channels == 36 and widened.patch_embedding.in_channels == 36
    latents = torch.randn(1, 16, 2, 8, 8)
    text = torch.randn(1, 7, base.config.text_dim)
    t = torch.tensor([500.0])
    with torch.no_grad():
        expected = base(latents, t, text, return_dict=False)[0]
        extra = torch.randn(1, 20, 2, 8, 8)  # whatever the mask and masked-video channels hold
        got = widened(torch.cat([latents, extra], 1), t, text, return_dict=False)[0]
    assert torch.equal(got, expected)


def test_missing_base_model_says_what_to_provide(tmp_path):
    with pytest.raises(wan.WeightsError, match="Wan2.1-T2V-1.3B.*huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers"):
        wan.load_inpaint_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(wan.WeightsError, match="no transformer/config.json"):
        wan.load_inpaint_model(tmp_path / "empty")


def test_prompt_embedding_is_umt5_of_the_empty_prompt_zero_padded(toy_wan, tmp_path):
    embedding, source = wan.resolve_prompt_embedding(toy_wan, text_dim=16)
    assert embedding.shape == (1, wan.TEXT_MAX_LEN, 16) and "umT5" in source
    assert embedding[0, 0].abs().sum() > 0  # the end-of-sequence token of the empty prompt
    assert torch.all(embedding[0, 1:] == 0)  # zero padding, as Wan's pipeline pads
    wan.save_prompt_embedding(tmp_path / wan.PROMPT_EMBEDDING_FILE, embedding, source=source)
    loaded, loaded_source = wan.resolve_prompt_embedding(tmp_path, text_dim=16)  # stored: no umT5 needed
    assert torch.equal(loaded, embedding) and loaded_source == source
    zeros, zero_source = wan.resolve_prompt_embedding(tmp_path / "no-encoder", text_dim=16)
    assert torch.equal(zeros, torch.zeros(1, wan.TEXT_MAX_LEN, 16)) and "zeros" in zero_source


def test_lora_trains_only_adapters_and_patch_embedding_and_starts_as_the_base(toy_wan):
    model = wan.load_inpaint_model(toy_wan).eval()
    x = torch.randn(1, 36, 2, 8, 8)
    text = torch.randn(1, 4, 16)
    with torch.no_grad():
        before = wan.predict_velocity(model, x, torch.tensor([0.5]), text)
    wan.add_lora(model, rank=4, alpha=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("patch_embedding.") for n in trainable)
    for target in wan.LORA_TARGETS:  # every target of every block got an adapter
        assert any(f"blocks.1.{target}.lora_A" in n for n in trainable), target
    with torch.no_grad():
        after = wan.predict_velocity(model, x, torch.tensor([0.5]), text)
    assert torch.equal(before, after)  # B is zero-initialised
    state = wan.trainable_state_dict(model)
    assert set(state) == {n.replace(".default", "") for n in trainable}


def test_build_model_input_orders_channels_and_checks_shapes():
    noisy, known, masked = torch.full((1, 16, 2, 4, 4), 1.0), torch.full((1, 4, 2, 4, 4), 2.0), torch.full((1, 16, 2, 4, 4), 3.0)
    x = wan.build_model_input(noisy, known, masked)
    assert x.shape == (1, 36, 2, 4, 4)
    assert torch.all(x[:, :16] == 1) and torch.all(x[:, 16:20] == 2) and torch.all(x[:, 20:] == 3)
    with pytest.raises(ValueError, match="does not fit"):
        wan.build_model_input(noisy, known[:, :, :1], masked)


def test_vae_round_trip_shapes(toy_wan):
    vae = wan.load_vae(toy_wan)
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    latents = wan.encode_video(vae, video)
    assert latents.shape == (1, 16, 3, 4, 6) and torch.isfinite(latents).all()
    assert wan.decode_latents(vae, latents).shape == video.shape


@pytest.mark.parametrize("part", ["transformer", "vae"])
def test_a_model_folder_with_only_pickled_weights_is_refused_unread(toy_wan, tmp_path, part):
    """Model folders (downloads, `dreamstereo export` outputs given to convert/evaluate) load safetensors only:
    a pickled .bin next to the config is never unpickled, even where diffusers would fall back to it."""
    import os
    import pickle
    import shutil

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "payload-ran"),)

    model = Path(shutil.copytree(toy_wan, tmp_path / "model"))
    for weights in (model / part).glob("*.safetensors"):
        weights.unlink()
    (model / part / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"weight": Payload()}))
    load = wan.load_inpaint_model if part == "transformer" else wan.load_vae
    with pytest.raises(wan.WeightsError, match=rf"{part if part == 'transformer' else 'VAE'} '.*/model/{part}' "
                                               r"has no .safetensors weights \(pickled .bin/.pt weights are never"):
        load(model)
    assert not (tmp_path / "payload-ran").exists()
