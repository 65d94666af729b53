"""Flow-matching sampler: exact on a known velocity field, dense or sparse models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dreamstereo.inference.sampler import dense_velocity, flow_sigmas, sample, sparse_velocity, velocity_fill
from dreamstereo.inference.sasi import SasiConfig, SparseWanTransformer
from tests.inference.conftest import text


class TrueVelocity(nn.Module):
    """The exact flow-matching velocity of one clip whose clean latent is in the condition.

    Reads ``x0`` from the masked-latent slot of the 36-channel input (``[x_t 16 | mask 4 | x0 16]``) and
    returns ``(x_t - x0) / sigma``, which on the path ``x_t = (1 - sigma) x0 + sigma e`` is ``e - x0``.
    Records the timesteps it is called with.
    """

    def __init__(self):
        super().__init__()
        self.timesteps: list[list[float]] = []

    def forward(self, model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.timesteps.append(timestep.tolist())
        x_t, x0 = model_input[:, :16], model_input[:, 20:36]
        return (x_t - x0) / (timestep / 1000.0).reshape(-1, 1, 1, 1, 1)


def _clip(seed: int = 0, shape=(2, 16, 3, 10, 6)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    noise = torch.randn(*shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(shape[0], 4, *shape[2:], generator=g) > 0.5).to(torch.float64)
    return x0, noise, torch.cat([mask, x0], dim=1)  # condition (B, 20, F, H, W)


def test_one_step_recovers_x0_from_the_true_velocity():
    x0, noise, condition = _clip()
    model = TrueVelocity()
    out = sample(model, noise, condition)  # one step from sigma = 1: x0 = x_1 - v
    assert model.timesteps == [[1000.0, 1000.0]]
    assert (out - x0).abs().max() <= 1e-12


@pytest.mark.parametrize(("steps", "shift"), [(2, 1.0), (4, 3.0), (8, 5.0)])
def test_few_steps_agree_with_one_step(steps, shift):
    x0, noise, condition = _clip(seed=steps)
    model = TrueVelocity()
    one = sample(model, noise, condition)
    few = sample(model, noise, condition, flow_sigmas(steps, shift))
    assert len(model.timesteps) == 1 + steps
    # The timestep reaches the model in float32 (as Wan takes it), so sigma is exact to ~1e-8 only.
    assert (few - one).abs().max() <= 1e-6 and (few - x0).abs().max() <= 1e-6


def test_starting_below_sigma_one_follows_the_path():
    x0, noise, condition = _clip(seed=5)
    x_half = 0.5 * x0 + 0.5 * noise
    model = TrueVelocity()
    out = sample(model, x_half, condition, (0.5, 0.2, 0.0))
    assert model.timesteps == [[500.0, 500.0], [200.0, 200.0]]
    assert (out - x0).abs().max() <= 1e-6  # float32 timestep: 200 / 1000 is not exactly 0.2


def test_euler_steps_of_a_constant_field_sum_to_the_field():
    latents = torch.randn(1, 16, 1, 4, 4)
    constant = torch.randn(1, 16, 1, 4, 4)
    for sigmas in [(1.0, 0.0), flow_sigmas(3), flow_sigmas(5, shift=3.0)]:
        out = sample(lambda model_input, timestep: constant, latents, None, sigmas)
        assert (out - (latents - constant)).abs().max() <= 1e-6


def test_flow_sigmas():
    assert flow_sigmas(1).tolist() == [1.0, 0.0]
    assert flow_sigmas(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert flow_sigmas(4, shift=3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def test_sampler_rejects_bad_input():
    x0, noise, condition = _clip()
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(TrueVelocity(), noise, condition, (1.0, 0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="end at 0"):
        sample(TrueVelocity(), noise, condition, (1.0, 0.5))
    with pytest.raises(ValueError, match="`condition`"):
        sample(TrueVelocity(), noise, condition[:, :, :2])
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0)
    with pytest.raises(ValueError, match="`sigma`"):
        velocity_fill(noise, x0, torch.zeros(2))


@pytest.mark.parametrize("sigmas", [(1.0, 0.0), (1.0, 0.6, 0.3, 0.0)])
def test_sparse_sampling_keeps_the_known_latent_at_unselected_tokens(wan, sigmas):
    g = torch.Generator().manual_seed(0)
    known = torch.randn(2, 16, 3, 10, 6, generator=g)
    noise = torch.randn(2, 16, 3, 10, 6, generator=g)
    condition = torch.cat([torch.zeros(2, 4, 3, 10, 6), known], dim=1)
    tokens = torch.zeros(2, 3, 5, 3, dtype=torch.bool)
    tokens[0, 1, 1:3, 1] = True
    tokens[1, 2, 0, :] = True
    cells = tokens.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[:, None].expand(-1, 16, -1, -1, -1)
    enc = text(2)
    sparse = SparseWanTransformer(wan, SasiConfig(bucket_multiple=4))
    with torch.no_grad():
        out = sample(sparse_velocity(sparse, enc, tokens, known), noise, condition, sigmas)
        dense = sample(dense_velocity(wan, enc), noise, condition, sigmas)
    assert (out[~cells] - known[~cells]).abs().max() <= 1e-5  # unselected tokens: the masked-video latent
    assert (out[cells] - known[cells]).abs().max() > 1e-2  # selected tokens: the DiT's prediction
    assert torch.isfinite(out).all() and not torch.allclose(dense, known)


def test_sparse_sampling_with_every_token_equals_dense(wan):
    g = torch.Generator().manual_seed(1)
    known, noise = torch.randn(1, 16, 3, 10, 6, generator=g), torch.randn(1, 16, 3, 10, 6, generator=g)
    condition = torch.cat([torch.ones(1, 4, 3, 10, 6), known], dim=1)
    enc = text(1)
    sparse = SparseWanTransformer(wan)
    with torch.no_grad():
        out = sample(sparse_velocity(sparse, enc, torch.ones(1, 3, 5, 3, dtype=torch.bool), known), noise, condition,
                     flow_sigmas(2))
        dense = sample(dense_velocity(wan, enc), noise, condition, flow_sigmas(2))
    assert (out - dense).abs().max() <= 1e-5


def test_empty_mask_returns_the_known_latent_without_running_the_dit(wan):
    calls = []
    hook = wan.patch_embedding.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        g = torch.Generator().manual_seed(2)
        known, noise = torch.randn(1, 16, 3, 10, 6, generator=g), torch.randn(1, 16, 3, 10, 6, generator=g)
        condition = torch.cat([torch.zeros(1, 4, 3, 10, 6), known], dim=1)
        velocity = sparse_velocity(SparseWanTransformer(wan), text(1), torch.zeros(1, 3, 5, 3, dtype=torch.bool), known)
        out = sample(velocity, noise, condition)
    finally:
        hook.remove()
    assert calls == []
    assert (out - known).abs().max() <= 1e-6
