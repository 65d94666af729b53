"""The SASI inpainting model: Wan2.1 (diffusers ``WanTransformer3DModel``) with a 36-channel input, all of it
in this single file, used by training (``dreamstereo/training``) and inference alike.

Input of the transformer, per latent cell: ``[noisy latent 16 | mask 4 | masked-video latent 16]`` = 36
channels, as in Wan image-to-video and Wan-Fun-InP. The mask channels hold 4 pixel frames per latent
frame, the first pixel frame repeated 4 times (Wan's VAE maps 1 + 4k frames to 1 + k latent frames), and
follow Wan image-to-video's convention: **1 = known pixel, 0 = to inpaint** (``known_mask_channels``).

A model folder in diffusers layout holds ``transformer/`` and ``vae/`` (a Wan2.1-T2V-1.3B download also
has ``text_encoder/`` and ``tokenizer/``). ``load_inpaint_model`` accepts:

- a diffusers-format Wan2.1-T2V-1.3B folder (16 input channels): the patch embedding is widened to 36
  input channels, the 20 new ones zero-initialised, so the output for the first 16 is unchanged;
- a folder whose ``transformer/`` already takes 36 channels (an exported DreamStereo model, or another
  36-channel inpainting checkpoint converted to diffusers layout);
- ``toy``: the built-in toy Wan (random weights, the real classes; ``dreamstereo.toy_models``), for smoke tests.

Text conditioning is one fixed embedding of the empty prompt (``prompt_embedding.safetensors`` beside
``transformer/``), computed once with umT5 when a text encoder is available (``compute_prompt_embedding``),
so umT5 is never loaded at train or inference time.

References: diffusers ``transformer_wan.py`` (the transformer, unchanged) and ``pipeline_wan_i2v.py``
(mask packing, latent normalisation); ``pipeline_wan.py::_get_t5_prompt_embeds`` (prompt embedding).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from dreamstereo import toy_models
from dreamstereo.types import UserError

# diffusers, peft and transformers are imported inside the functions that build or adapt models: together they
# take seconds to import, and this module's constants and errors are also read by config loading and the CLI.
logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16  # Wan2.1 VAE latent channels
MASK_CHANNELS = 4  # pixel frames per latent frame (the VAE's temporal stride)
INPAINT_IN_CHANNELS = LATENT_CHANNELS + MASK_CHANNELS + LATENT_CHANNELS  # 36
VAE_TEMPORAL = 4  # pixel frames per latent frame (after the first)
VAE_SPATIAL = 8  # pixels per latent cell along height and width
NUM_TRAIN_TIMESTEPS = 1000  # Wan's flow-matching scheduler: timestep = sigma * 1000
TEXT_MAX_LEN = 512  # Wan2.1's umT5 sequence length (pipeline_wan.py: max_sequence_length=512)
PROMPT_EMBEDDING_FILE = "prompt_embedding.safetensors"
MODEL_INFO_FILE = toy_models.TOY_INFO_FILE  # dreamstereo_model.json
# LoRA targets in every WanTransformerBlock: self-attention, cross-attention, feed-forward.
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ffn.net.0.proj", "ffn.net.2")
DOWNLOAD_HINT = ("a local diffusers-format Wan2.1-T2V-1.3B folder (with transformer/ and vae/), e.g. from "
                 "`huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR`, "
                 "or a model folder written by `dreamstereo export`, or `toy` (random weights: a smoke test)")


class WeightsError(UserError, ValueError):
    """A model folder that is missing or not in the expected layout; the message says what to provide."""


# ----------------------------------------------------------------------------------------------------
# Mask packing and the 36-channel input


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a pixel mask into latent layout, 4 pixel frames per latent frame (Wan image-to-video).

    Spatially, a latent cell takes the maximum over its 8x8 pixels (a cell with any masked pixel counts as
    masked). In time, the first pixel frame is repeated 4 times, so 1 + 4k frames become 4(k + 1), which
    are grouped in fours: latent frame 0 holds pixel frame 0 in all 4 channels, latent frame f >= 1 holds
    pixel frames 4f - 3 .. 4f in channels 0..3.

    Args:
        mask: ``(B, 1, T, H, W)`` bool or float in [0, 1]; T = 1 + 4k, H and W multiples of 8.

    Returns:
        ``(B, 4, 1 + k, H / 8, W / 8)`` float32, the same values (max-pooled over 8x8).
    """
    b, c, t, h, w = mask.shape
    if c != 1 or (t - 1) % VAE_TEMPORAL or h % VAE_SPATIAL or w % VAE_SPATIAL:
        raise ValueError(f"mask must be (B, 1, 1 + 4k, 8m, 8n), got {tuple(mask.shape)}")
    cells = F.max_pool3d(mask.float(), kernel_size=(1, VAE_SPATIAL, VAE_SPATIAL))  # (B, 1, T, h, w)
    first = cells[:, :, :1].repeat_interleave(VAE_TEMPORAL, dim=2)  # (B, 1, 4, h, w)
    frames = torch.cat([first, cells[:, :, 1:]], dim=2)  # (B, 1, 4 + 4k, h, w)
    frames = frames.view(b, (t - 1) // VAE_TEMPORAL + 1, VAE_TEMPORAL, h // VAE_SPATIAL, w // VAE_SPATIAL)
    return frames.transpose(1, 2).contiguous()  # (B, 4, 1 + k, h, w)


def known_mask_channels(hole_mask: torch.Tensor) -> torch.Tensor:
    """The 4 mask channels of the model input: ``1 - pack_mask(hole_mask)`` (1 = known, 0 = to inpaint).

    Args:
        hole_mask: ``(B, 1, T, H, W)`` bool or float, True / 1 = pixel to inpaint.

    Returns:
        ``(B, 4, F, H / 8, W / 8)`` float32 in [0, 1].
    """
    return 1.0 - pack_mask(hole_mask)


def mask_video(video: torch.Tensor, hole_mask: torch.Tensor) -> torch.Tensor:
    """The video the masked-video latent is encoded from: pixels to inpaint set to 0 (mid grey).

    Args:
        video: ``(B, 3, T, H, W)`` float in [-1, 1].
        hole_mask: ``(B, 1, T, H, W)`` bool or float, True / 1 = pixel to inpaint.
    """
    return video * (1.0 - hole_mask.to(video.dtype))


def build_model_input(noisy_latents: torch.Tensor, known_mask: torch.Tensor,
                      masked_latents: torch.Tensor) -> torch.Tensor:
    """``[noisy latent 16 | mask 4 | masked-video latent 16]`` along channels.

    Args:
        noisy_latents: ``(B, 16, F, h, w)``, normalised latents with noise (flow-matching x_t).
        known_mask: ``(B, 4, F, h, w)`` from :func:`known_mask_channels`.
        masked_latents: ``(B, 16, F, h, w)``, normalised latents of :func:`mask_video`.

    Returns:
        ``(B, 36, F, h, w)`` in the dtype of ``noisy_latents``.
    """
    if noisy_latents.shape[1] != LATENT_CHANNELS or masked_latents.shape != noisy_latents.shape:
        raise ValueError(f"latents must be (B, 16, F, h, w) alike, got {tuple(noisy_latents.shape)} and "
                         f"{tuple(masked_latents.shape)}")
    if known_mask.shape[1] != MASK_CHANNELS or known_mask.shape[2:] != noisy_latents.shape[2:]:
        raise ValueError(f"mask {tuple(known_mask.shape)} does not fit latents {tuple(noisy_latents.shape)}")
    dtype = noisy_latents.dtype
    return torch.cat([noisy_latents, known_mask.to(dtype), masked_latents.to(dtype)], dim=1)


def predict_velocity(transformer, model_input: torch.Tensor, sigmas: torch.Tensor,
                     prompt_embedding: torch.Tensor) -> torch.Tensor:
    """The flow-matching velocity ``v = noise - x0`` predicted for a 36-channel input.

    Args:
        model_input: ``(B, 36, F, h, w)`` from :func:`build_model_input`.
        sigmas: ``(B,)`` noise levels in [0, 1] (x_t = (1 - sigma) x0 + sigma noise).
        prompt_embedding: ``(1, L, text_dim)`` or ``(B, L, text_dim)``.

    Returns:
        ``(B, 16, F, h, w)``.
    """
    batch = model_input.shape[0]
    text = prompt_embedding.to(model_input.dtype).expand(batch, -1, -1)
    return transformer(hidden_states=model_input, timestep=sigmas * NUM_TRAIN_TIMESTEPS,
                       encoder_hidden_states=text, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------------
# Loading the transformer


def model_folder(path: str | Path) -> Path:
    """A model setting as a folder: ``toy`` is the built-in toy Wan (random weights, built on first use)."""
    return toy_models.toy_folder("wan") if toy_models.is_toy(path) else Path(path)


def smoke_test(path: str | Path | None) -> str | None:
    """:data:`~dreamstereo.toy_models.SMOKE_TEST` when the model ``path`` is the toy or was made from it."""
    if path is None:
        return None
    return toy_models.SMOKE_TEST if toy_models.is_toy(path) else toy_models.toy_note(path)


def _transformer_folder(path: str | Path) -> Path:
    path = model_folder(path)
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    if (path / "config.json").is_file() and "WanTransformer3DModel" in (path / "config.json").read_text():
        return path
    if not path.exists():
        raise WeightsError(f"model {str(path)!r} does not exist: provide {DOWNLOAD_HINT}")
    raise WeightsError(f"model {str(path)!r} has no transformer/config.json: provide {DOWNLOAD_HINT}")


def _check_safetensors(folder: Path, what: str) -> None:
    """Model folders come from downloads and exports, i.e. from other machines: weights are read from
    safetensors only (``use_safetensors=True``), and a folder with only pickled ``.bin``/``.pt`` weights is
    refused here with a clear line rather than unpickled.

    Raises:
        WeightsError: no ``*.safetensors`` (or sharded ``*.safetensors.index.json``) in ``folder``.
    """
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
        raise WeightsError(f"{what} {str(folder)!r} has no .safetensors weights (pickled .bin/.pt weights are "
                           f"never loaded: unpickling can run code): provide {DOWNLOAD_HINT}")


def transformer_config(path: str | Path) -> dict:
    """The ``config.json`` of a model folder's transformer (no weights are read).

    Raises:
        WeightsError: the folder is missing or has another layout.
    """
    return json.loads((_transformer_folder(path) / "config.json").read_text())


def widen_patch_embedding(transformer, in_channels: int = INPAINT_IN_CHANNELS) -> None:
    """Give the patch embedding ``in_channels`` inputs, the new ones zero-initialised (in place).

    The output for an input whose first channels are the old ones is unchanged whatever the new channels
    hold, so a widened T2V model starts as the T2V model.
    """
    old = transformer.patch_embedding
    if old.in_channels > in_channels:
        raise ValueError(f"patch embedding has {old.in_channels} inputs, more than {in_channels}")
    new = torch.nn.Conv3d(in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                          device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight  # (inner, in, p_t, p_h, p_w)
        new.bias.copy_(old.bias)
    transformer.patch_embedding = new
    transformer.register_to_config(in_channels=in_channels)


def load_inpaint_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The 36-channel inpainting transformer from a model folder (see the module docstring).

    Args:
        path: a diffusers-format Wan2.1-T2V-1.3B folder, a folder with a 36-channel ``transformer/``, or
            the ``transformer/`` folder itself.

    Raises:
        WeightsError: the folder is missing or has another layout; the message says what to provide.
    """
    from diffusers import WanTransformer3DModel

    folder = _transformer_folder(path)
    _check_safetensors(folder, "transformer")
    transformer = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    channels = transformer.config.in_channels
    if channels == LATENT_CHANNELS:
        widen_patch_embedding(transformer)
    elif channels != INPAINT_IN_CHANNELS:
        raise WeightsError(f"{str(folder)!r}: transformer takes {channels} input channels; need 16 (Wan2.1 T2V) "
                           f"or {INPAINT_IN_CHANNELS} (inpainting)")
    if transformer.config.out_channels != LATENT_CHANNELS:
        raise WeightsError(f"{str(folder)!r}: transformer outputs {transformer.config.out_channels} channels, "
                           f"need {LATENT_CHANNELS}")
    return transformer.to(device)


# ----------------------------------------------------------------------------------------------------
# LoRA (peft): adapters on attention and feed-forward, patch embedding in full, everything else frozen


def add_lora(transformer, *, rank: int = 32, alpha: float = 32.0, targets=LORA_TARGETS) -> None:
    """Add a LoRA adapter (B zero-initialised, so the model is unchanged) and set what trains: the adapter
    and the patch embedding; every other weight is frozen."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                       init_lora_weights=True))
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name or name.startswith("patch_embedding."))


def trainable_state_dict(transformer) -> dict[str, torch.Tensor]:
    """Adapter weights in peft layout (``blocks.0.attn1.to_q.lora_A.weight``, ...) and the patch embedding
    (``patch_embedding.weight``, ``patch_embedding.bias``), detached, contiguous, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    state = dict(get_peft_model_state_dict(transformer))
    state["patch_embedding.weight"] = transformer.patch_embedding.weight
    state["patch_embedding.bias"] = transformer.patch_embedding.bias
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_trainable_state_dict(transformer, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`trainable_state_dict` wrote into a transformer with the same adapter.

    Raises:
        ValueError: adapter keys are missing or unexpected (another rank or target list).
    """
    from peft.utils import set_peft_model_state_dict

    lora = {k: v for k, v in state.items() if not k.startswith("patch_embedding.")}
    result = set_peft_model_state_dict(transformer, lora)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"adapter does not fit the model: unexpected {unexpected[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        transformer.patch_embedding.weight.copy_(state["patch_embedding.weight"])
        transformer.patch_embedding.bias.copy_(state["patch_embedding.bias"])


def merge_lora(transformer) -> None:
    """Fold the adapter into the base weights and remove the peft layers (in place), for export."""
    transformer.fuse_lora(lora_scale=1.0)
    transformer.unload_lora()
    transformer.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# VAE


def load_vae(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The frozen ``AutoencoderKLWan`` from ``path/vae`` (or ``path`` itself)."""
    from diffusers import AutoencoderKLWan

    path = model_folder(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise WeightsError(f"model {str(path)!r} has no vae/config.json: provide {DOWNLOAD_HINT}")
    _check_safetensors(folder, "VAE")
    vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True).to(device)
    vae.requires_grad_(False)
    return vae.eval()


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_video(vae, video: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``(mode - latents_mean) / latents_std`` of a video (deterministic: the posterior
    mode, as Wan image-to-video encodes its condition).

    Args:
        video: ``(B, 3, T, H, W)`` float in [-1, 1], T = 1 + 4k, H and W multiples of 8.

    Returns:
        ``(B, 16, 1 + k, H / 8, W / 8)`` float32.
    """
    latents = vae.encode(video.to(vae.dtype)).latent_dist.mode().float()
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_video`: ``(B, 16, F, h, w)`` normalised latents -> ``(B, 3, T, H, W)`` in
    [-1, 1]."""
    mean, std = _latent_stats(vae, latents)
    video = vae.decode((latents * std + mean).to(vae.dtype)).sample
    return video.float().clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------
# The empty-prompt embedding


@torch.no_grad()
def compute_prompt_embedding(folder: str | Path, *, prompt: str = "", max_len: int = TEXT_MAX_LEN,
                             device: str = "cpu") -> torch.Tensor:
    """umT5 embedding of ``prompt`` as Wan's pipeline builds it: the tokens' hidden states, zero-padded to
    ``max_len``. ``folder`` holds ``text_encoder/`` and ``tokenizer/`` (a Wan2.1 diffusers download does).

    Returns:
        ``(1, max_len, text_dim)`` float32 on the CPU.
    """
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = model_folder(folder)
    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
        raise WeightsError(f"{str(folder)!r} needs text_encoder/ and tokenizer/ (as in Wan2.1-T2V-1.3B-Diffusers)")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", use_safetensors=True).to(device).eval()
    tokens = tokenizer([prompt.strip()], padding="max_length", max_length=max_len, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    length = int(tokens.attention_mask.sum())
    hidden = encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
    embedding = torch.zeros(1, max_len, hidden.shape[-1])
    embedding[:, :length] = hidden[:, :length].float().cpu()  # (1, L, text_dim), zeros after the tokens
    return embedding


def save_prompt_embedding(path: str | Path, embedding: torch.Tensor, *, source: str) -> None:
    save_file({"prompt_embedding": embedding.float().contiguous()}, str(path), metadata={"source": source})


def load_prompt_embedding(path: str | Path) -> tuple[torch.Tensor, str]:
    """``(embedding (1, L, text_dim) float32, source)`` from a ``prompt_embedding.safetensors``."""
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor("prompt_embedding"), (fh.metadata() or {}).get("source", "?")


def resolve_prompt_embedding(model_path: str | Path, text_dim: int, *, text_encoder: str | None = None,
                             device: str = "cpu") -> tuple[torch.Tensor, str]:
    """The empty-prompt embedding for a model, and where it came from, in this order:

    1. ``text_encoder`` when given (a folder with ``text_encoder/`` and ``tokenizer/``): computed;
    2. ``model_path/prompt_embedding.safetensors`` (exported models and checkpoints carry it): loaded;
    3. ``model_path/text_encoder`` + ``model_path/tokenizer`` (a Wan2.1 download): computed;
    4. otherwise zeros ``(1, 512, text_dim)``, with a warning: the model then learns without any text
       signal, which is consistent between training and inference as long as both use the stored tensor.
    """
    model_path = model_folder(model_path)
    if text_encoder is not None:
        return compute_prompt_embedding(text_encoder, device=device), f"umT5 at {text_encoder}"
    if (model_path / PROMPT_EMBEDDING_FILE).is_file():
        return load_prompt_embedding(model_path / PROMPT_EMBEDDING_FILE)
    if (model_path / "text_encoder").is_dir() and (model_path / "tokenizer").is_dir():
        return compute_prompt_embedding(model_path, device=device), f"umT5 at {model_path}"
    logger.warning("no text encoder in %s and none given (model.text_encoder): the empty-prompt embedding is "
                   "zeros of shape (1, %d, %d)", model_path, TEXT_MAX_LEN, text_dim)
    return torch.zeros(1, TEXT_MAX_LEN, text_dim), "zeros (no text encoder)"


def write_model_info(folder: str | Path, info: dict) -> None:
    (Path(folder) / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
