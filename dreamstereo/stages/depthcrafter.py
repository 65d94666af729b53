"""DepthCrafter video depth (Hu et al. 2024): Stable Video Diffusion components from diffusers.

The model is SVD's spatio-temporal UNet fine-tuned to denoise depth latents conditioned on the video's
VAE latents (concatenated on channels, 4 + 4 = 8) and on a CLIP image embedding per frame. Long clips run
in windows (``window`` frames, ``overlap`` shared), the overlapping latents blended linearly; the VAE
decodes depth, whose channel mean, min-max normalised over the clip, is relative disparity (larger =
nearer, as StereoCrafter consumes it).

Built from diffusers' classes (``UNetSpatioTemporalConditionModel``, ``AutoencoderKLTemporalDecoder``,
``EulerDiscreteScheduler``) and transformers' ``CLIPVisionModelWithProjection``; nothing is forked. The one
place DepthCrafter departs from SVD (a CLIP embedding per frame instead of one per clip) is an attention
processor installed on the UNet's spatial cross-attention layers at load time; temporal layers see the
first frame's embedding, as in DepthCrafter.

Weights: the UNet from ``depth.weights`` (default ``tencent/DepthCrafter``), the VAE, image encoder and
scheduler from ``depth.base_weights`` (default ``stabilityai/stable-video-diffusion-img2vid-xt``,
sub-folders ``vae``, ``image_encoder``, ``scheduler``); local folders or hub ids.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPVisionModelWithProjection

from dreamstereo.stages.weights import load_pretrained
from dreamstereo.types import ErrorCode, SampleError

logger = logging.getLogger(__name__)

STAGE = "depth"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ADDED_TIME_IDS = (7.0, 127.0)  # fps id and motion bucket DepthCrafter conditions on (noise aug appended)


class PerFrameContext:
    """Attention processor that gives every frame its own cross-attention context.

    diffusers' SVD UNet repeats one ``(B, 1, C)`` context over the frames; DepthCrafter feeds one CLIP
    embedding per frame. Set :attr:`context` (``(B * F, 1, C)``) before each UNet call.
    """

    def __init__(self):
        self.inner = AttnProcessor2_0()
        self.context: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        context = encoder_hidden_states if self.context is None else self.context
        return self.inner(attn, hidden_states, encoder_hidden_states=context, attention_mask=attention_mask,
                          temb=temb)


def install_per_frame_context(unet) -> PerFrameContext:
    """Put one :class:`PerFrameContext` on every spatial cross-attention layer of ``unet``; return it."""
    processor = PerFrameContext()
    processors = {}
    for name, current in unet.attn_processors.items():
        spatial_cross = ".transformer_blocks." in name and name.endswith("attn2.processor")
        processors[name] = processor if spatial_cross else current
    unet.set_attn_processor(processors)
    return processor


class DepthCrafter:
    """DepthCrafter inference; ``backend(frames (T, H, W, 3) uint8) -> (T, H, W) float32`` in [0, 1]."""

    def __init__(self, weights: str, base_weights: str, *, device: str | torch.device = "cpu",
                 steps: int = 5, window: int = 110, overlap: int = 25, max_resolution: int = 1024,
                 noise_aug_strength: float = 0.02, seed: int = 42, chunk: int = 8, fp16: bool = False):
        if not 0 <= overlap < window:
            raise ValueError(f"depthcrafter: need 0 <= overlap < window, got overlap={overlap}, window={window}")
        self.unet = load_pretrained(UNetSpatioTemporalConditionModel, weights, "depthcrafter UNet")
        components = {}
        for name, loader in (("vae", AutoencoderKLTemporalDecoder), ("image_encoder", CLIPVisionModelWithProjection),
                             ("scheduler", EulerDiscreteScheduler)):
            components[name] = load_pretrained(loader, base_weights, "depthcrafter (SVD base)", subfolder=name,
                                                option="depth.base_weights")
        self.vae, self.image_encoder, self.scheduler = (components[k] for k in ("vae", "image_encoder", "scheduler"))
        self.device = torch.device(device)
        for module in (self.unet, self.vae, self.image_encoder):
            module.to(self.device).eval()
        if fp16:  # as DepthCrafter's runner does on GPUs (about half the memory)
            self.unet.half()
            self.image_encoder.half()
        self.context = install_per_frame_context(self.unet)
        self.weights, self.base_weights = weights, base_weights
        self.steps, self.window, self.overlap = steps, window, overlap
        self.max_resolution, self.noise_aug_strength, self.seed, self.chunk = max_resolution, noise_aug_strength, seed, chunk
        self._clip_mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self._clip_std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    def _network_size(self, h: int, w: int) -> tuple[int, int]:
        """At most ``max_resolution`` on the long side, both sides multiples of 64 (DepthCrafter's run.py)."""
        scale = min(1.0, self.max_resolution / max(h, w))
        return max(64, round(h * scale / 64) * 64), max(64, round(w * scale / 64) * 64)

    def _embed(self, video: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding per frame: ``(T, 3, h, w)`` in [-1, 1] -> ``(T, C)``."""
        out = []
        for start in range(0, video.shape[0], self.chunk):
            x = (video[start:start + self.chunk] + 1.0) / 2.0
            x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True,
                                                align_corners=False)
            out.append(self.image_encoder(pixel_values=(x - self._clip_mean) / self._clip_std).image_embeds)
        return torch.cat(out)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        """VAE latents (the distribution's mode, unscaled, as SVD conditions): ``(T, 4, h/8, w/8)``."""
        return torch.cat([self.vae.encode(video[s:s + self.chunk]).latent_dist.mode()
                          for s in range(0, video.shape[0], self.chunk)])

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Depth frames in [-1, 1] from ``(T, 4, h/8, w/8)`` latents: ``(T, 3, h, w)``."""
        latents = latents / self.vae.config.scaling_factor
        return torch.cat([self.vae.decode(latents[s:s + self.chunk], num_frames=len(latents[s:s + self.chunk])).sample
                          for s in range(0, latents.shape[0], self.chunk)])

    def _denoise(self, latents, condition, embeddings, added_time_ids, previous=None):
        """One window: ``steps`` Euler steps on ``(1, F, 4, h, w)`` latents."""
        self.scheduler.set_timesteps(self.steps, device=self.device)
        overlap = 0 if previous is None else previous.shape[1]
        for i, t in enumerate(self.scheduler.timesteps):
            if overlap and i == 0:  # start the shared frames from the previous window's result
                latents[:, :overlap] = (previous + latents[:, :overlap] / self.scheduler.init_noise_sigma
                                        * self.scheduler.sigmas[0])
            model_input = torch.cat([self.scheduler.scale_model_input(latents, t), condition], dim=2)
            self.context.context = embeddings.reshape(-1, 1, embeddings.shape[-1])  # (F, 1, C)
            try:
                noise = self.unet(model_input, t, encoder_hidden_states=embeddings[:, :1],
                                  added_time_ids=added_time_ids, return_dict=False)[0]
            finally:
                self.context.context = None
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return latents

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """``(T, H, W, 3) uint8`` -> relative disparity ``(T, H, W) float32`` in [0, 1] (per clip)."""
        t, h, w, _ = frames.shape
        size = self._network_size(h, w)
        video = torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        video = torch.nn.functional.interpolate(video, size=size, mode="bilinear", align_corners=False,
                                                antialias=True)  # (T, 3, h, w) in [-1, 1]
        dtype = next(self.unet.parameters()).dtype
        generator = torch.Generator(self.device).manual_seed(self.seed)
        embeddings = self._embed(video.to(self.image_encoder.dtype)).to(dtype)[None]  # (1, T, C)
        noisy = video + self.noise_aug_strength * torch.randn(video.shape, generator=generator, device=self.device)
        condition = self._encode(noisy).to(dtype)[None]  # (1, T, 4, h/8, w/8)
        added = torch.tensor([[*ADDED_TIME_IDS, self.noise_aug_strength]], device=self.device, dtype=dtype)

        self.scheduler.set_timesteps(self.steps, device=self.device)  # init_noise_sigma depends on it
        window = min(self.window, t)
        overlap = self.overlap if t > window else 0
        stride = window - overlap
        init = torch.randn((1, window, *condition.shape[2:]), generator=generator, device=self.device,
                           dtype=dtype) * self.scheduler.init_noise_sigma
        result, start = None, 0
        while start < t - overlap:  # windows [start, start + window), each sharing `overlap` frames
            end = min(start + window, t)
            latents = init[:, : end - start].clone()
            init = torch.cat([init[:, -overlap:], init[:, :stride]], dim=1) if overlap else init
            previous = None if result is None or not overlap else result[:, -overlap:]
            latents = self._denoise(latents, condition[:, start:end], embeddings[:, start:end], added, previous)
            if result is None:
                result = latents
            elif not overlap:  # windows side by side
                result = torch.cat([result, latents], dim=1)
            else:  # blend the shared frames linearly from the previous window into this one
                ramp = torch.linspace(0, 1, overlap, device=self.device, dtype=dtype).view(1, overlap, 1, 1, 1)
                result[:, -overlap:] = latents[:, :overlap] * ramp + result[:, -overlap:] * (1 - ramp)
                result = torch.cat([result, latents[:, overlap:]], dim=1)
            start += stride

        depth = self._decode(result[0].float()).clamp(-1, 1).add(1).div(2).mean(dim=1, keepdim=True)  # (T, 1, h, w)
        depth = torch.nn.functional.interpolate(depth, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        depth = depth.cpu().numpy().astype(np.float32)
        if not np.isfinite(depth).all():
            raise SampleError(ErrorCode.DEPTH_FAILED, STAGE, "depthcrafter returned NaN/inf")
        lo, hi = float(depth.min()), float(depth.max())
        return (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
