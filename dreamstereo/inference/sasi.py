"""SASI: sparse-token inference of the Wan video DiT, only the tokens inside the dilated hole mask.

Reference: "DreamStereo" (CVPR 2026), SASI; ../shared/docs/mission.md; issue 6; docs/method.md
("SASI sparse inference").

Three steps, each a plain function or a thin module:

1. :func:`token_mask` maps a pixel hole mask ``(B, T, H, W)`` to the DiT's token grid ``(B, F, h, w)``:
   one latent frame per 4 pixel frames (the first pixel frame alone, as the Wan VAE packs time),
   one token per 16x16 pixels (VAE stride 8 times patch 2); a token is kept when any of its pixels is
   a hole, then the kept set is dilated by ``k`` tokens in space (a ``(2k+1)^2`` square, not in time).
2. :func:`plan_tokens` pads the kept count up to a bucket size (:class:`SasiConfig`) with REAL
   neighbouring tokens: the unkept tokens nearest to the kept ones (ring by ring in space, then
   neighbouring frames). Padding never repeats a token. Padded tokens are real tokens that are simply
   also computed: they join the attention context of the kept tokens exactly as a slightly larger
   dilation would, and their own predictions are discarded unless ``keep_padding`` is set.
3. :class:`SparseWanTransformer` wraps a diffusers ``WanTransformer3DModel`` without editing it: it
   calls the model's own modules (rotary embedding, patch embedding, condition embedder, blocks,
   output norm/projection) in the order of ``WanTransformer3DModel.forward`` (diffusers 0.42.1), but on
   the gathered tokens only, then scatters the predictions into a full-size output whose other tokens
   take a caller-given fill.

Why this is exact for the kept tokens: the patch embedding (a Conv3d with kernel = stride = patch) sees
one token's patch only; every per-token operation (norms, modulation, projections, feed-forward, output
head) commutes with a gather; self-attention over the gathered set with the gathered rotary cos/sin is
the attention the dense model would compute if the other tokens did not exist; cross-attention reads
only the text. So a token's output depends on the inputs of the computed set only, and with every
token kept the result equals the dense model's (tests/inference/test_sasi.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

WAN_PATCH = (1, 2, 2)  # (t, h, w) latent cells per token in Wan2.1 (transformer config `patch_size`)
WAN_VAE_STRIDE = (4, 8, 8)  # (t, h, w) pixels per latent cell of the Wan VAE (first frame alone in t)
DEFAULT_DILATION = 3  # k tokens; the paper's setting with 25.6% of tokens kept (mission.md)
DEFAULT_BUCKET = 256  # tokens; counts are padded up to a multiple of this


@dataclasses.dataclass
class SasiConfig:
    """How SASI selects and pads tokens."""

    k: int = DEFAULT_DILATION  # spatial dilation of the token mask, tokens (0 = only tokens touching a hole)
    bucket_multiple: int = DEFAULT_BUCKET  # token counts padded up to a multiple of this (1 = no padding)
    bucket_growth: float | None = None  # if set, buckets form a geometric ladder multiple * growth^i (rounded
    #                                     up to the multiple): fewer distinct sizes for compiled graphs
    keep_padding: bool = False  # keep the predictions of padding tokens (True) or give them the fill (False)

    def __post_init__(self):
        if self.k < 0:
            raise ValueError(f"sasi.k must be >= 0 tokens, got {self.k}")
        if self.bucket_multiple < 1:
            raise ValueError(f"sasi.bucket_multiple must be >= 1 token, got {self.bucket_multiple}")
        if self.bucket_growth is not None and not self.bucket_growth > 1.0:
            raise ValueError(f"sasi.bucket_growth must be > 1 or None, got {self.bucket_growth}")


class TokenMask(NamedTuple):
    """Result of :func:`token_mask`.

    Attributes:
        tokens: ``(B, F, h, w)`` bool, True for tokens that go through the DiT.
        retention: fraction of tokens kept over the whole batch, in [0, 1].
    """

    tokens: torch.Tensor
    retention: float


class TokenPlan(NamedTuple):
    """Which tokens one sparse forward computes (see :func:`plan_tokens`).

    Attributes:
        index: ``(B, n)`` int64 flat token indices in (frame, row, column) order, ascending per row of the
            batch, no repeats; ``n`` is the bucket size shared by the batch (0 when nothing is kept).
        kept: ``(B, n)`` bool, True where ``index`` is a token of the mask, False for a padding token.
    """

    index: torch.Tensor
    kept: torch.Tensor


def _triple(value, name: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in value)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"`{name}` must be three positive ints (t, h, w), got {value!r}")
    return values  # type: ignore[return-value]


def token_grid(
    num_frames: int,
    height: int,
    width: int,
    patch: tuple[int, int, int] = WAN_PATCH,
    vae_stride: tuple[int, int, int] = WAN_VAE_STRIDE,
) -> tuple[int, int, int]:
    """Token grid ``(F, h, w)`` of a clip of ``num_frames`` x ``height`` x ``width`` pixels.

    The Wan VAE encodes ``1 + 4n`` frames into ``1 + n`` latent frames and needs the pixel size to be a
    multiple of ``vae_stride * patch`` (16) for the patch embedding; a caller pads frames at the bottom
    and right to ``16 * ceil(H / 16)`` x ``16 * ceil(W / 16)``. The grid is counted on that padded size
    (``h = ceil(H / 16)``), and the padding is never a hole.

    Raises:
        ValueError: ``num_frames`` is not ``1 + vae_stride[0] * n``, the latent frame count is not a
            multiple of ``patch[0]``, or a size is not positive.
    """
    p_t, p_h, p_w = _triple(patch, "patch")
    s_t, s_h, s_w = _triple(vae_stride, "vae_stride")
    if height < 1 or width < 1:
        raise ValueError(f"pixel size must be positive, got height={height}, width={width}")
    if num_frames < 1 or (num_frames - 1) % s_t:
        raise ValueError(
            f"`pixel_mask` has {num_frames} frames; the VAE needs 1 + {s_t}n frames (1, {1 + s_t}, {1 + 2 * s_t}, ...)"
        )
    latent_frames = 1 + (num_frames - 1) // s_t
    if latent_frames % p_t:
        raise ValueError(f"{latent_frames} latent frames are not a multiple of the temporal patch {p_t}")
    return latent_frames // p_t, math.ceil(height / (s_h * p_h)), math.ceil(width / (s_w * p_w))


def _dilate(tokens: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """Binary dilation of ``(B, F, h, w)`` bool by a box ``kernel`` (odd sizes), clipped at the borders."""
    padding = tuple(s // 2 for s in kernel)
    grown = F.max_pool3d(tokens[:, None].float(), kernel, stride=1, padding=padding)  # (B, 1, F, h, w)
    return grown[:, 0] > 0.5


def token_mask(
    pixel_mask: torch.Tensor,
    k: int = DEFAULT_DILATION,
    patch: tuple[int, int, int] = WAN_PATCH,
    vae_stride: tuple[int, int, int] = WAN_VAE_STRIDE,
) -> TokenMask:
    """Mark the DiT tokens that touch the hole mask, dilated by ``k`` tokens in space.

    Latent frame 0 is pixel frame 0 alone; latent frame ``f > 0`` covers pixel frames ``4f-3 .. 4f``
    (Wan VAE causal packing). A token covers ``vae_stride * patch`` pixels (16x16 for Wan2.1) of those
    frames and is kept when any of them is True. ``H`` and ``W`` need not be multiples of 16: the grid
    is computed on the padded size of :func:`token_grid` (``ceil``), the padding counting as no hole.
    Dilation is a ``(2k+1) x (2k+1)`` square per latent frame, clipped at the frame border; it does not
    reach other frames.

    Args:
        pixel_mask: ``(B, T, H, W)`` bool, True = hole (pixels the inpainter must fill), ``T = 1 + 4n``.
        k: dilation in tokens, >= 0.
        patch: the transformer's ``patch_size`` ``(t, h, w)`` in latent cells.
        vae_stride: the VAE's compression ``(t, h, w)``.

    Returns:
        :class:`TokenMask` with ``tokens (B, F, h, w)`` bool and the kept fraction ``retention``.

    Raises:
        ValueError: wrong rank, dtype, frame count, or a negative ``k``.
    """
    if not isinstance(pixel_mask, torch.Tensor):
        raise ValueError(f"`pixel_mask` must be a torch.Tensor, got {type(pixel_mask).__name__}")
    if pixel_mask.ndim != 4:
        raise ValueError(f"`pixel_mask` must have shape (B, T, H, W), got {tuple(pixel_mask.shape)}")
    if pixel_mask.dtype != torch.bool:
        raise ValueError(f"`pixel_mask` must be bool (True = hole), got dtype {pixel_mask.dtype}")
    if int(k) != k or k < 0:
        raise ValueError(f"`k` must be an int >= 0 (tokens), got {k!r}")
    b, t, h, w = pixel_mask.shape
    if b < 1:
        raise ValueError(f"`pixel_mask` has an empty batch: shape {tuple(pixel_mask.shape)}")
    grid_f, grid_h, grid_w = token_grid(t, h, w, patch, vae_stride)
    p_t, p_h, p_w = _triple(patch, "patch")
    s_t, s_h, s_w = _triple(vae_stride, "vae_stride")

    # 1. Time: latent frame 0 <- pixel frame 0; latent frame f > 0 <- pixel frames 4f-3 .. 4f.
    rest = pixel_mask[:, 1:].reshape(b, (t - 1) // s_t, s_t, h, w).any(dim=2)  # (B, n, H, W)
    latent = torch.cat([pixel_mask[:, :1], rest], dim=1)  # (B, 1 + n, H, W)
    latent = latent.reshape(b, grid_f, p_t, h, w).any(dim=2)  # (B, F, H, W)

    # 2. Space: pad to whole tokens with "no hole", then any() over each cell_h x cell_w block.
    cell_h, cell_w = s_h * p_h, s_w * p_w
    latent = F.pad(latent, (0, grid_w * cell_w - w, 0, grid_h * cell_h - h), value=False)
    tokens = latent.reshape(b, grid_f, grid_h, cell_h, grid_w, cell_w).any(dim=5).any(dim=3)  # (B, F, h, w)

    # 3. Dilation by k tokens in space only.
    if k > 0:
        tokens = _dilate(tokens, (1, 2 * k + 1, 2 * k + 1))
    return TokenMask(tokens, float(tokens.float().mean()))


def bucket_size(count: int, total: int, multiple: int = DEFAULT_BUCKET, growth: float | None = None) -> int:
    """Padded token count for ``count`` kept tokens out of ``total``.

    ``count`` rounded up to a multiple of ``multiple``, or, with ``growth``, to the first rung of the ladder
    ``multiple, ceil_multiple(multiple * growth), ...`` that holds it; never more than ``total`` (then the
    sparse forward is the dense one) and 0 for 0.
    """
    if count < 0 or count > total:
        raise ValueError(f"token count {count} must be in [0, {total}]")
    if count == 0:
        return 0
    if growth is None:
        size = math.ceil(count / multiple) * multiple
    else:
        size = multiple
        while size < count:
            size = max(size + multiple, math.ceil(size * growth / multiple) * multiple)
    return min(size, total)


def plan_tokens(tokens: torch.Tensor, config: SasiConfig | None = None) -> TokenPlan:
    """Choose the tokens a sparse forward computes: the kept ones, padded with real neighbours.

    Every batch row is padded to the same bucket size, ``bucket_size(max kept count in the batch)``.
    Padding tokens are the unkept tokens nearest to the kept ones: ring after ring of the spatial
    8-neighbourhood (Chebyshev distance) within each frame; once no frame can grow in space, the ring
    also reaches the neighbouring frames. Within the last ring partly taken, earlier (frame, row,
    column) positions come first. A row with no kept token is padded with its first tokens in raster
    order (computed and discarded).

    Args:
        tokens: ``(B, F, h, w)`` bool, the kept tokens (from :func:`token_mask`).
        config: bucket settings; default :class:`SasiConfig`.

    Returns:
        :class:`TokenPlan`.
    """
    config = config or SasiConfig()
    if tokens.ndim != 4 or tokens.dtype != torch.bool:
        raise ValueError(f"`tokens` must be a (B, F, h, w) bool tensor, got {tokens.dtype} {tuple(tokens.shape)}")
    b = tokens.shape[0]
    total = tokens[0].numel()
    flat = tokens.reshape(b, total)  # (B, N)
    target = bucket_size(int(flat.sum(dim=1).max()), total, config.bucket_multiple, config.bucket_growth)
    if target == 0:
        empty = torch.zeros(b, 0, dtype=torch.long, device=tokens.device)
        return TokenPlan(empty, empty.bool())

    # Ring index: 0 for kept tokens, r for tokens first reached by the r-th dilation, `total + 1` if never.
    far = total + 1
    ring = torch.where(tokens, 0, far)  # (B, F, h, w) int64
    reached = tokens
    growable = flat.any(dim=1)  # (B,) a row with no kept token has no neighbours: raster order below
    r = 0
    while bool(((reached.flatten(1).sum(dim=1) < target) & growable).any()):
        grown = _dilate(reached, (1, 3, 3))
        stalled = (grown == reached).flatten(1).all(dim=1)  # (B,) rows whose kept frames are full
        if bool(stalled.any()):
            grown = torch.where(stalled[:, None, None, None], _dilate(reached, (3, 3, 3)), grown)
        r += 1
        ring = torch.where(grown & ~reached, r, ring)
        reached = grown

    # Sort by (ring, flat position) and take the first `target` per row; then restore raster order.
    position = torch.arange(total, device=tokens.device)
    key = ring.reshape(b, total) * total + position  # (B, N), unique per row
    index = key.argsort(dim=1)[:, :target].sort(dim=1).values  # (B, n)
    return TokenPlan(index, flat.gather(1, index))


def patchify(latent: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """``(B, C, F, H, W)`` -> ``(B, N, p_t * p_h * p_w * C)`` in the layout of the model's ``proj_out``.

    The inverse of the unpatchify at the end of ``WanTransformer3DModel.forward``.
    """
    b, c, f, h, w = latent.shape
    p_t, p_h, p_w = patch
    x = latent.reshape(b, c, f // p_t, p_t, h // p_h, p_h, w // p_w, p_w)  # (B, C, F', pt, H', ph, W', pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, F', H', W', pt, ph, pw, C)
    return x.reshape(b, (f // p_t) * (h // p_h) * (w // p_w), p_t * p_h * p_w * c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """``(B, N, p_t * p_h * p_w * C)`` -> ``(B, C, F, H, W)``, as the end of ``WanTransformer3DModel.forward``."""
    b = tokens.shape[0]
    f, h, w = grid
    p_t, p_h, p_w = patch
    x = tokens.reshape(b, f, h, w, p_t, p_h, p_w, -1)  # (B, F', H', W', pt, ph, pw, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F', pt, H', ph, W', pw)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (B, N, ...)`` at ``index (B, n)`` -> ``(B, n, ...)``."""
    shaped = index.reshape(*index.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, shaped)


class SparseWanTransformer(nn.Module):
    """Run a diffusers ``WanTransformer3DModel`` on a subset of its tokens (SASI).

    The wrapped model is used as is: no diffusers file is edited and no module replaced, so LoRA
    adapters injected into its layers apply as they would in the dense forward (``attention_kwargs``
    LoRA scaling of the dense ``forward`` is not offered; set the adapter scale on the model instead).
    Mirrors ``WanTransformer3DModel.forward`` of diffusers 0.42.1 step by step (numbered below).

    Args:
        model: a ``WanTransformer3DModel`` (any size; Wan2.1-1.3B: 30 layers, 12 heads of 128).
        config: bucket settings (``k`` is used by callers of :func:`token_mask`, not here).
    """

    def __init__(self, model: nn.Module, config: SasiConfig | None = None):
        super().__init__()
        self.model = model
        self.config = config or SasiConfig()
        self.patch = _triple(model.config.patch_size, "model.config.patch_size")

    def plan(self, tokens: torch.Tensor) -> TokenPlan:
        """The tokens :meth:`forward` would compute for the token mask ``tokens``; see :func:`plan_tokens`."""
        return plan_tokens(tokens, self.config)

    def _check(self, hidden_states, timestep, token_mask, fill) -> tuple[int, int, int]:
        if hidden_states.ndim != 5:
            raise ValueError(f"`hidden_states` must have shape (B, C, F, H, W), got {tuple(hidden_states.shape)}")
        b, c, f, h, w = hidden_states.shape
        in_channels = self.model.config.in_channels
        if c != in_channels:
            raise ValueError(f"`hidden_states` has {c} channels, the model takes {in_channels}")
        if f % self.patch[0] or h % self.patch[1] or w % self.patch[2]:
            raise ValueError(
                f"`hidden_states` latent size (F, H, W) = {(f, h, w)} must be a multiple of the patch {self.patch}; "
                f"pad the pixel frames to multiples of 16 (token_grid) before encoding"
            )
        grid = (f // self.patch[0], h // self.patch[1], w // self.patch[2])
        if token_mask.dtype != torch.bool or tuple(token_mask.shape) != (b, *grid):
            raise ValueError(
                f"`token_mask` must be a bool tensor of shape (B, F, h, w) = {(b, *grid)} for these latents, "
                f"got {token_mask.dtype} {tuple(token_mask.shape)}"
            )
        if token_mask.device != hidden_states.device:
            raise ValueError(f"`token_mask` is on {token_mask.device} but `hidden_states` on {hidden_states.device}")
        n = grid[0] * grid[1] * grid[2]
        if tuple(timestep.shape) not in ((b,), (b, n)):
            raise ValueError(
                f"`timestep` must have shape (B,) = {(b,)} or, per token, (B, N) = {(b, n)}, "
                f"got {tuple(timestep.shape)}"
            )
        out_channels = self.model.config.out_channels or in_channels
        if tuple(fill.shape) != (b, out_channels, f, h, w):
            raise ValueError(
                f"`fill` must have the output shape (B, C_out, F, H, W) = {(b, out_channels, f, h, w)}, "
                f"got {tuple(fill.shape)}"
            )
        return grid

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        token_mask: torch.Tensor,
        fill: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict at the planned tokens; every other token of the output is ``fill``.

        Args:
            hidden_states: ``(B, C_in, F, H, W)`` model input, as for the dense model (for the stereo
                inpainter: 36 channels, see :mod:`dreamstereo.inference.sampler`).
            timestep: ``(B,)`` (Wan2.1: one flow-matching time ``1000 * sigma`` per sample) or ``(B, N)``
                per token (Wan2.2 ti2v style; ``N = F * H * W / prod(patch)``, gathered like the tokens).
            encoder_hidden_states: ``(B, L, text_dim)`` text embeddings.
            token_mask: ``(B, F / p_t, H / p_h, W / p_w)`` bool, the tokens to predict (:func:`token_mask`).
            fill: ``(B, C_out, F, H, W)``, the output at tokens not predicted. In the sampler it is the
                velocity that makes the step land on the known (masked-video) latent there
                (:func:`dreamstereo.inference.sampler.sparse_velocity`); pass the model input's latent or
                zeros for other uses.
            encoder_hidden_states_image: optional image embeddings (Wan I2V models), as the dense model.

        Returns:
            ``(B, C_out, F, H, W)`` in the model's output dtype: predictions at the kept tokens (and at the
            padding tokens when ``config.keep_padding``), ``fill`` elsewhere. With no kept token anywhere
            in the batch this is ``fill`` (a copy) and no module of the model runs.
        """
        model = self.model
        grid = self._check(hidden_states, timestep, token_mask, fill)
        plan = self.plan(token_mask)
        if plan.index.shape[1] == 0:
            return fill.clone()
        index = plan.index  # (B, n)
        batch = hidden_states.shape[0]

        # 1. Rotary embedding of every token, gathered: (1, N, 1, D) -> (B, n, 1, D).
        freqs_cos, freqs_sin = model.rope(hidden_states)
        rotary_emb = (
            _gather_tokens(freqs_cos.expand(batch, -1, -1, -1), index),
            _gather_tokens(freqs_sin.expand(batch, -1, -1, -1), index),
        )

        # 2. Patch embedding of every token (one patch each), gathered: (B, dim, F', H', W') -> (B, n, dim).
        x = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2)  # (B, N, dim)
        x = _gather_tokens(x, index).contiguous()  # (B, n, dim)

        # 3. Condition embedder. Per-token timesteps are gathered like the tokens.
        if timestep.ndim == 2:  # (B, N)
            ts_seq_len = index.shape[1]
            timestep = timestep.gather(1, index).flatten()  # (B * n,)
        else:
            ts_seq_len = None
        temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = model.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=ts_seq_len
        )
        if ts_seq_len is not None:
            timestep_proj = timestep_proj.unflatten(2, (6, -1))  # (B, n, 6, dim)
        else:
            timestep_proj = timestep_proj.unflatten(1, (6, -1))  # (B, 6, dim)
        if encoder_hidden_states_image is not None:
            encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

        # 4. Transformer blocks on the gathered tokens.
        for block in model.blocks:
            x = block(x, encoder_hidden_states, timestep_proj, rotary_emb)  # (B, n, dim)

        # 5. Output norm and projection.
        if temb.ndim == 3:  # (B, n, dim): per-token time
            shift, scale = (model.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)  # (B, n, dim)
        else:  # (B, dim)
            shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)  # (B, 1, dim)
        shift, scale = shift.to(x.device), scale.to(x.device)
        x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        pred = model.proj_out(x)  # (B, n, p_t * p_h * p_w * C_out)

        # 6. Scatter into the fill and unpatchify.
        out = patchify(fill, self.patch).to(pred.dtype, copy=True)  # (B, N, P), never aliasing `fill`
        if not self.config.keep_padding:
            pred = torch.where(plan.kept[..., None], pred, _gather_tokens(out, index))
        out.scatter_(1, index[..., None].expand(-1, -1, pred.shape[-1]), pred)
        return unpatchify(out, grid, self.patch)
