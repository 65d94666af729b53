"""Flow-matching sampler for the stereo inpainter: one step (NFE=1) or a few Euler steps.

Reference: "DreamStereo" (CVPR 2026), SASI: one step ``x0 = x_t - sigma * v``; ../shared/docs/mission.md.

Flow matching (Wan2.1): ``x_sigma = (1 - sigma) * x0 + sigma * e`` with noise ``e``, sigma in [0, 1], and
the model predicts the velocity ``v = e - x0`` from ``x_sigma`` at timestep ``1000 * sigma``. An Euler
step from ``sigma`` to ``sigma'`` is ``x_sigma' = x_sigma + (sigma' - sigma) * v``; from ``sigma = 1`` to
0 in one step that is ``x0 = x_1 - v``.

Model input. The inpainter takes 36 channels ``[noisy latent 16 | mask 4 | masked-video latent 16]``
(Wan image-to-video / Wan-Fun-InP layout). Packing the mask and encoding the masked video belong to
the training module; here the 20 conditioning channels arrive ready as ``condition (B, 20, F, h, w)``
and are concatenated after the noisy latent at every step, unchanged.

A velocity function is any callable ``(model_input (B, C_in, F, H, W), timestep (B,)) -> v (B, C, F, H,
W)``: :func:`dense_velocity` wraps a ``WanTransformer3DModel``, :func:`sparse_velocity` a
:class:`~dreamstereo.inference.sasi.SparseWanTransformer`, and tests pass small modules of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dreamstereo.inference.sasi import SparseWanTransformer

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000  # Wan's timestep = 1000 * sigma (FlowMatchEulerDiscreteScheduler default)

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_sigmas(num_steps: int = 1, shift: float = 1.0) -> torch.Tensor:
    """Noise levels from 1 to 0 for ``num_steps`` Euler steps: ``(num_steps + 1,)`` float64, decreasing.

    Uniform in sigma, then warped by ``shift * s / (1 + (shift - 1) * s)`` (the shift of diffusers'
    ``FlowMatchEulerDiscreteScheduler``; Wan uses 3 to 5 for many-step sampling; 1 leaves it uniform).
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"`num_steps` must be an int >= 1, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"`shift` must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, int(num_steps) + 1, dtype=torch.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


def _check_sigmas(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    values = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(values) < 2 or values[-1] != 0.0 or not 0.0 < values[0] <= 1.0:
        raise ValueError(f"`sigmas` must start in (0, 1] and end at 0 with at least one step, got {values}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"`sigmas` must be strictly decreasing, got {values}")
    return values


def sample(
    velocity: VelocityFn,
    latents: torch.Tensor,
    condition: torch.Tensor | None = None,
    sigmas: Sequence[float] | torch.Tensor = (1.0, 0.0),
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """Integrate the flow from ``sigmas[0]`` to 0 with Euler steps; the default is one step from pure noise.

    Args:
        velocity: ``(model_input, timestep) -> v``, see the module docstring.
        latents: ``(B, C, F, H, W)`` float, ``x`` at ``sigmas[0]`` (pure noise ``e`` when it is 1).
        condition: ``(B, C_cond, F, H, W)`` float or None; concatenated after the noisy latent on the channel
            axis at every step (for the stereo inpainter ``C_cond = 20``: mask 4 | masked-video latent 16).
        sigmas: noise levels, strictly decreasing from ``(0, 1]`` to 0 (see :func:`flow_sigmas`).
        num_train_timesteps: the model's timestep is ``num_train_timesteps * sigma``.

    Returns:
        ``(B, C, F, H, W)``, the prediction of ``x0``, dtype of ``latents``.
    """
    values = _check_sigmas(sigmas)
    if latents.ndim != 5:
        raise ValueError(f"`latents` must have shape (B, C, F, H, W), got {tuple(latents.shape)}")
    if condition is not None:
        b, _, f, h, w = latents.shape
        if condition.ndim != 5 or (condition.shape[0], *condition.shape[2:]) != (b, f, h, w):
            raise ValueError(
                f"`condition` must have shape (B, C_cond, F, H, W) with (B, F, H, W) = {(b, f, h, w)} of `latents`, "
                f"got {tuple(condition.shape)}"
            )
    x = latents
    batch = latents.shape[0]
    for sigma, sigma_next in zip(values, values[1:]):
        model_input = x if condition is None else torch.cat([x, condition.to(x.dtype)], dim=1)
        timestep = torch.full((batch,), num_train_timesteps * sigma, dtype=torch.float32, device=x.device)
        v = velocity(model_input, timestep)
        x = x + (sigma_next - sigma) * v.to(x.dtype)  # Euler; the last step is x0 = x - sigma * v
    return x


def dense_velocity(model: nn.Module, encoder_hidden_states: torch.Tensor) -> VelocityFn:
    """A velocity function running a ``WanTransformer3DModel`` on every token.

    Args:
        model: a ``WanTransformer3DModel``.
        encoder_hidden_states: ``(B, L, text_dim)`` text embeddings, the same at every step.
    """

    def velocity(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return model(model_input, timestep, encoder_hidden_states, return_dict=False)[0]

    return velocity


def velocity_fill(x_t: torch.Tensor, known: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The velocity whose step lands on ``known``: ``(x_t - known) / sigma``, so ``x_t - sigma * v = known``.

    On the flow path ``x_t = (1 - sigma) * known + sigma * e`` this is ``e - known``, the true velocity of a
    clip whose clean latent is ``known``; Euler steps then stay on that path at every noise level.

    Args:
        x_t: ``(B, C, F, H, W)`` current latent. known: same shape, the latent unselected tokens keep.
        sigma: ``(B,)`` noise level in (0, 1].
    """
    if bool((sigma <= 0).any()):
        raise ValueError(f"`sigma` must be > 0 to define a fill velocity, got {sigma.tolist()}")
    return (x_t - known) / sigma.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)


def sparse_velocity(
    sparse_model: SparseWanTransformer,
    encoder_hidden_states: torch.Tensor,
    token_mask: torch.Tensor,
    known: torch.Tensor,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> VelocityFn:
    """A velocity function running SASI: the DiT on the kept tokens, :func:`velocity_fill` elsewhere.

    With this fill, :func:`sample` returns ``known`` at every token not predicted (up to rounding), one
    step or many: unselected tokens take the masked-video latent (issue 6).

    Args:
        sparse_model: the wrapped DiT.
        encoder_hidden_states: ``(B, L, text_dim)`` text embeddings.
        token_mask: ``(B, F, h, w)`` bool, tokens to predict (:func:`~dreamstereo.inference.sasi.token_mask`).
        known: ``(B, C_out, F, H, W)`` the latent unselected tokens keep: the masked-video latent (outside
            the hole mask it equals the clean video's latent).
        num_train_timesteps: as in :func:`sample`.
    """

    def velocity(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x_t = model_input[:, : known.shape[1]]
        fill = velocity_fill(x_t, known, timestep / num_train_timesteps)
        return sparse_model(model_input, timestep, encoder_hidden_states, token_mask, fill)

    return velocity
