"""The stereo inpainter at inference: a trained (or exported) Wan inpainting model run by SASI in one step.

``StereoInpainter(model_dir)`` loads the 36-channel transformer (``models/wan_inpaint.py``), the frozen
VAE and the stored empty-prompt embedding once; ``inpaint(frames, mask)`` fills the holes of a clip:

1. pad the clip to ``1 + 4k`` frames (last frame repeated) and to multiples of 16 pixels (edge pixels,
   never holes), as the VAE and the 2x2 patches need;
2. encode the masked video (holes set to 0) -> the 16 masked-video latent channels; pack the mask into
   the 4 mask channels (1 = known);
3. SASI (``sparse=True``): the tokens touching the dilated hole mask go through the DiT, every other token
   keeps the masked-video latent; or the dense DiT on every token;
4. one flow-matching step from pure noise (NFE = 1; ``steps`` > 1 for a few Euler steps);
5. VAE decode (or a lighter decoder given as ``decoder``); crop the padding. Callers blend the result
   into the warped view with the GAPW mask (``dreamstereo convert`` also cross-fades overlapping windows).

Timings (DiT, VAE) and token retention are accumulated in ``stats``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from dreamstereo.inference.sampler import dense_velocity, flow_sigmas, sample, sparse_velocity
from dreamstereo.inference.sasi import SasiConfig, SparseWanTransformer, token_mask
from dreamstereo.models import wan_inpaint as wan

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class InpaintConfig:
    """How the model fills holes at inference."""

    sparse: bool = True  # SASI; False runs the DiT on every token
    sasi: SasiConfig = dataclasses.field(default_factory=SasiConfig)
    steps: int = 1  # flow-matching Euler steps (1 = one step, NFE = 1)
    shift: float = 1.0  # sigma schedule shift for steps > 1
    seed: int = 0  # noise seed (the same clip gives the same output)
    dtype: str = "float32"  # bfloat16 on a GPU
    decoder: str | None = None  # a lighter AutoencoderKLWan folder (same latent space) for decoding; None: the VAE

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"inpaint.steps must be >= 1, got {self.steps}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"inpaint.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StereoInpainter:
    """A model folder (``dreamstereo export`` output, or any Wan2.1 diffusers folder: see
    :func:`~dreamstereo.models.wan_inpaint.load_inpaint_model`) ready to fill holes."""

    def __init__(self, model_dir: str | Path, cfg: InpaintConfig | None = None, device: str = "cpu"):
        self.cfg = cfg or InpaintConfig()
        self.device = torch.device(device)
        self.smoke_test = wan.smoke_test(model_dir)  # a toy model (random weights), or one trained from it
        if self.smoke_test:
            logger.warning("inpainting model %s: %s", model_dir, self.smoke_test)
        dtype = getattr(torch, self.cfg.dtype)
        self.transformer = wan.load_inpaint_model(model_dir, dtype=dtype, device=device).eval()
        self.vae = wan.load_vae(model_dir, dtype=dtype, device=device)
        self.decoder = wan.load_vae(self.cfg.decoder, dtype=dtype, device=device) if self.cfg.decoder else self.vae
        if self.decoder.config.z_dim != self.vae.config.z_dim:
            raise wan.WeightsError(f"decoder {self.cfg.decoder!r} has {self.decoder.config.z_dim} latent channels, "
                                   f"the model's VAE {self.vae.config.z_dim}: it must decode the same latents")
        prompt, self.prompt_source = wan.resolve_prompt_embedding(model_dir, self.transformer.config.text_dim,
                                                                  device=device)
        self.prompt = prompt.to(self.device, dtype)
        self.sparse_model = SparseWanTransformer(self.transformer, self.cfg.sasi)
        self.stats = {"frames": 0, "dit_s": 0.0, "vae_s": 0.0, "tokens": 0, "tokens_kept": 0}

    @torch.no_grad()
    def inpaint(self, frames: np.ndarray, mask: np.ndarray, *, sparse: bool | None = None) -> np.ndarray:
        """Fill the holes of one clip.

        Args:
            frames: ``(T, H, W, 3)`` uint8, the warped view (its holes hold anything).
            mask: ``(T, H, W)`` bool, True = hole to fill.
            sparse: override ``cfg.sparse``.

        Returns:
            ``(T, H, W, 3)`` uint8, the model's output for every pixel (blend it with the mask).
        """
        if frames.ndim != 4 or frames.shape[-1] != 3 or mask.shape != frames.shape[:3]:
            raise ValueError(f"frames (T, H, W, 3) and mask (T, H, W) must agree, got {frames.shape} and {mask.shape}")
        sparse = self.cfg.sparse if sparse is None else sparse
        t, h, w = mask.shape
        pad_t = (-(t - 1)) % wan.VAE_TEMPORAL
        pad_h, pad_w = (-h) % 16, (-w) % 16
        frames = np.pad(frames, ((0, pad_t), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        mask = np.pad(mask, ((0, pad_t), (0, pad_h), (0, pad_w)), mode="constant")
        if pad_t:
            mask[t:] = mask[t - 1]
        dtype = self.prompt.dtype
        video = torch.from_numpy(frames).to(self.device).permute(3, 0, 1, 2)[None].to(dtype) / 127.5 - 1.0
        hole = torch.from_numpy(mask).to(self.device)[None, None]
        _sync(self.device)
        t0 = time.perf_counter()
        known = wan.encode_video(self.vae, wan.mask_video(video, hole)).to(dtype)
        condition = torch.cat([wan.known_mask_channels(hole).to(dtype), known], dim=1)
        generator = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        noise = torch.randn(known.shape, generator=generator).to(self.device, dtype)
        _sync(self.device)
        t1 = time.perf_counter()
        if sparse:
            tokens = token_mask(hole[:, 0], k=self.cfg.sasi.k).tokens
            velocity = sparse_velocity(self.sparse_model, self.prompt, tokens, known)
            kept = int(tokens.sum())
        else:
            velocity = dense_velocity(self.transformer, self.prompt)
            kept = None
        latents = sample(velocity, noise, condition, flow_sigmas(self.cfg.steps, self.cfg.shift))
        _sync(self.device)
        t2 = time.perf_counter()
        out = wan.decode_latents(self.decoder, latents)
        _sync(self.device)
        t3 = time.perf_counter()
        grid = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)
        self.stats["frames"] += t
        self.stats["dit_s"] += t2 - t1
        self.stats["vae_s"] += (t1 - t0) + (t3 - t2)
        self.stats["tokens"] += grid
        self.stats["tokens_kept"] += grid if kept is None else kept
        pixels = ((out[0].permute(1, 2, 3, 0).float() + 1.0) * 127.5).round().clamp(0, 255).byte().cpu().numpy()
        return pixels[:t, :h, :w]

    def __call__(self, frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.inpaint(frames, mask)

    def retention(self) -> float:
        return self.stats["tokens_kept"] / max(self.stats["tokens"], 1)
