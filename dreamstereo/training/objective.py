"""The training objective: rectified flow matching on normalised Wan latents.

x_t = (1 - sigma) x0 + sigma noise, the model predicts v = noise - x0 (so x0 = x_t - sigma v, the one-step
sampler of SASI inference), loss = mean squared error, optionally weighted up on latent cells that hold
pixels to inpaint.
"""

from __future__ import annotations

import torch

from dreamstereo.training.config import FlowConfig, TimestepSampling


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / Wan time shift: ``shift s / (1 + (shift - 1) s)`` (shift > 1 moves mass to high noise)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(batch: int, cfg: FlowConfig, generator: torch.Generator) -> torch.Tensor:
    """``(batch,)`` float32 noise levels in (0, 1), drawn on the CPU from ``generator``."""
    if cfg.sampling is TimestepSampling.LOGIT_NORMAL:
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch, generator=generator))
    else:
        u = torch.rand(batch, generator=generator)
    return shift_sigmas(u, cfg.shift).clamp(1e-4, 1.0)


def flow_matching_loss(velocity: torch.Tensor, target: torch.Tensor, hole_cells: torch.Tensor | None = None,
                       mask_weight: float = 0.0) -> torch.Tensor:
    """Mean squared error, with weight ``1 + mask_weight`` on latent cells to inpaint.

    Args:
        velocity, target: ``(B, 16, F, h, w)``.
        hole_cells: ``(B, 1 or 4, F, h, w)`` in [0, 1], 1 where the cell holds pixels to inpaint (the packed
            hole mask); its channel maximum is used. Ignored when ``mask_weight`` is 0.
    """
    error = (velocity.float() - target.float()).pow(2)
    if mask_weight == 0 or hole_cells is None:
        return error.mean()
    weight = 1.0 + mask_weight * hole_cells.amax(dim=1, keepdim=True).float()  # (B, 1, F, h, w)
    return (error * weight).sum() / (weight.expand_as(error).sum())
