"""Randomly initialised models of the real architectures, saved like checkpoints, and ``toy`` by name.

Used by the tests (toy sizes, seconds on a CPU), the benchmarks (toy or published sizes, to time compute without
downloading weights) and every command: ``model.base=toy`` (training, export), ``--checkpoint toy`` (convert,
evaluate) and ``depth.weights=toy`` (Depth Anything V2, DepthCrafter) resolve to a toy model built on first use
(:func:`toy_folder`). Their outputs mean nothing; their code paths are the real ones, and every output that
touches one says so (:data:`SMOKE_TEST`).

This module sits on the lowest floor so that every part of the package can resolve ``toy``; it imports none of
ours, and each builder imports its library (torch, transformers, diffusers) itself: those take seconds to import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from dreamstereo.types import UserError, write_error_reason

logger = logging.getLogger(__name__)

TOY = "toy"
SMOKE_TEST = ("random toy weights (the built-in `toy` models): this output is a smoke test of the code path, "
              "not a result")
TOY_INFO_FILE = "dreamstereo_model.json"  # models.wan_inpaint.MODEL_INFO_FILE: the folder's own description
TOY_KINDS = ("wan", "depth-anything-v2", "depthcrafter")


def is_toy(spec) -> bool:
    """Whether a model setting (``model.base``, ``depth.weights``, ``--checkpoint``) names the toy models."""
    return isinstance(spec, str) and spec.strip().lower() == TOY


def _cache_root() -> Path:
    """``$DREAMSTEREO_TOY_CACHE``, else ``<temp>/dreamstereo-toy-<uid>``: this user's own folder (mode 700),
    refused if someone else owns it or can write to it (weights are loaded from it)."""
    root = Path(os.environ.get("DREAMSTEREO_TOY_CACHE") or Path(tempfile.gettempdir()) / f"dreamstereo-toy-{os.getuid()}")
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"toy model cache {str(root)!r} cannot be made ({exc.strerror or exc}): set "
                        "DREAMSTEREO_TOY_CACHE to a folder of yours") from exc
    info = root.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise UserError(f"toy model cache {str(root)!r} is not this user's own folder (owner uid {info.st_uid}, "
                        f"mode {oct(info.st_mode & 0o777)}): set DREAMSTEREO_TOY_CACHE to a folder of yours")
    return root


def _revision() -> str:
    """Changes whenever the builders here change, so an old toy is never loaded as the current one."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def toy_folder(kind: str) -> Path:
    """The toy model ``kind`` (:data:`TOY_KINDS`), built on first use (seconds) and shared by this user's
    processes (Ray workers, the demo's commands, reruns).

    Built under a temporary name beside its place and renamed into it, so a reader sees a whole folder or none;
    two processes building at once both succeed and one copy stays (the builders are seeded: both are the same).
    DepthCrafter's folder holds ``unet/`` and ``svd/`` (the base: ``vae/``, ``image_encoder/``, ``scheduler/``).
    """
    if kind not in TOY_KINDS:
        raise ValueError(f"no toy model {kind!r}; there are {', '.join(TOY_KINDS)}")
    root = _cache_root()
    final = root / f"{kind}-{_revision()}"
    if final.is_dir():
        return final
    for stale in root.glob(f".{kind}-*"):  # a build killed half-way (kill -9, a full disk) an hour or more ago
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    logger.info("building the toy %s model (random weights, a smoke test) in %s", kind, final)
    from safetensors import SafetensorError

    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
        if kind == "wan":
            save_toy_wan(tmp)
        elif kind == "depth-anything-v2":
            save_depth_anything_v2(tmp)
        else:
            save_depthcrafter(tmp)
        (tmp / TOY_INFO_FILE).write_text(json.dumps({"toy": kind, "smoke_test": SMOKE_TEST}, indent=2))
        os.rename(tmp, final)
    except (OSError, SafetensorError) as exc:  # (safetensors reports a full disk as its own error type)
        if final.is_dir():  # another process's copy won the race
            return final
        raise UserError(f"cannot build the toy {kind} model in {str(root)!r}: {write_error_reason(exc)} (it needs a few MB: free "
                        "some, or set DREAMSTEREO_TOY_CACHE to a folder with room)") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def toy_note(folder) -> str | None:
    """:data:`SMOKE_TEST` when a model folder is a toy or was made from one (its ``dreamstereo_model.json`` says
    so), else None."""
    try:
        info = json.loads((Path(folder) / TOY_INFO_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return None
    return SMOKE_TEST if isinstance(info, dict) and info.get("smoke_test") else None


def save_depth_anything_v2(path: str | Path, *, published_small: bool = False, seed: int = 0) -> str:
    """Depth Anything V2 (transformers), toy size or the published Small layout; returns the folder."""
    import torch
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
    import torch
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


def wan_transformer_config(*, published_size: bool = False) -> dict:
    """``WanTransformer3DModel`` arguments: toy or the published Wan2.1-T2V-1.3B layout (30 layers, 12 heads of
    128, ffn 8960, umT5-XXL text dim 4096).

    The toy has 2 layers of 2 heads of 48 (diffusers' own tests use heads of 12): its width must be at least
    the 64 values one output patch holds (16 channels x 2 x 2), or the frozen random output projection cannot
    express the target and LoRA training stalls (measured: the 60-step loss ratio stays at 0.68-0.77 with
    heads of 12, 0.34 with heads of 48).
    """
    if published_size:
        return dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=48, in_channels=16, out_channels=16,
                text_dim=16, freq_dim=16, ffn_dim=128, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)  # 1280 px = 80 positions


def wan_vae_config(*, published_size: bool = False) -> dict:
    """``AutoencoderKLWan`` arguments: toy (base_dim 8) or Wan2.1's (base_dim 96, 2 res blocks)."""
    base = dict(z_dim=16, dim_mult=[1, 2, 4, 4], attn_scales=[], temperal_downsample=[False, True, True])
    return {**base, "base_dim": 96, "num_res_blocks": 2} if published_size else {**base, "base_dim": 8,
                                                                                   "num_res_blocks": 1}


def save_toy_wan(path: str | Path, *, text_encoder: bool = True, seed: int = 0) -> str:
    """A Wan2.1-T2V folder in diffusers layout at toy size, random weights: ``transformer/`` (16 input
    channels, as the published T2V model), ``vae/`` and, with ``text_encoder``, a tiny umT5
    (``text_encoder/``) and a word-level tokenizer (``tokenizer/``: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2,
    an end-of-sequence token appended as T5's does), built offline. Returns the folder."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    path = Path(path)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**wan_transformer_config())
    transformer.save_pretrained(path / "transformer")
    AutoencoderKLWan(**wan_vae_config()).save_pretrained(path / "vae")
    if text_encoder:
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate("a the of stereo video".split())}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                unk_token="<unk>").save_pretrained(path / "tokenizer")
        config = UMT5Config(vocab_size=len(vocab), d_model=transformer.config.text_dim, d_kv=8, d_ff=32,
                            num_layers=1, num_heads=2, relative_attention_num_buckets=8)
        UMT5EncoderModel(config).save_pretrained(path / "text_encoder")
    return str(path)
