"""SASI token selection and the sparse DiT against the real diffusers Wan transformer at toy size."""

from __future__ import annotations

import pytest
import torch

from dreamstereo.inference.sasi import (
    SasiConfig,
    SparseWanTransformer,
    bucket_size,
    patchify,
    plan_tokens,
    token_grid,
    token_mask,
    unpatchify,
)
from dreamstereo.scenes import demo_scene
from dreamstereo.stages.warp import double_project, training_direction
from tests.inference.conftest import text, toy_wan


def _pixel_mask(t: int, h: int, w: int, *points: tuple[int, int, int]) -> torch.Tensor:
    mask = torch.zeros(1, t, h, w, dtype=torch.bool)
    for frame, y, x in points:
        mask[0, frame, y, x] = True
    return mask


def _latent_cells(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, F, h, w)`` token mask -> ``(B, 1, F, 2h, 2w)`` mask of their latent cells (patch 1x2x2)."""
    return tokens.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[:, None]


def _inputs(b: int, f: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 36, f, h, w, generator=g)
    timestep = torch.tensor([1000.0, 400.0, 700.0][:b])
    fill = torch.randn(b, 16, f, h, w, generator=g)
    return x, timestep, fill


def _dense(model, x, timestep, enc):
    with torch.no_grad():
        return model(x, timestep, enc, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------- token_mask


def test_single_pixel_marks_exactly_one_token_at_k0():
    tm = token_mask(_pixel_mask(9, 64, 96, (0, 20, 40)), k=0)
    assert tm.tokens.shape == (1, 3, 4, 6)
    assert tm.tokens.sum() == 1 and tm.tokens[0, 0, 1, 2]  # row 20 // 16 = 1, column 40 // 16 = 2
    assert tm.retention == pytest.approx(1 / 72)


@pytest.mark.parametrize("k", [1, 2])
def test_dilation_is_a_square_of_side_2k_plus_1(k):
    tm = token_mask(_pixel_mask(5, 128, 128, (0, 60, 70)), k=k)  # token (3, 4) of an 8x8 grid
    expected = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    expected[0, 0, 3 - k: 3 + k + 1, 4 - k: 4 + k + 1] = True
    assert torch.equal(tm.tokens, expected)
    assert tm.tokens.sum() == (2 * k + 1) ** 2


def test_dilation_is_clipped_at_the_frame_border():
    tm = token_mask(_pixel_mask(1, 64, 64, (0, 5, 62)), k=2)  # token (0, 3): top right corner of 4x4
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    expected[0, 0, 0:3, 1:4] = True
    assert torch.equal(tm.tokens, expected)


@pytest.mark.parametrize(("frame", "latent_frame"), [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2)])
def test_pixel_frames_group_into_latent_frames(frame, latent_frame):
    tm = token_mask(_pixel_mask(9, 32, 32, (frame, 17, 3)), k=1)
    assert tm.tokens.shape == (1, 3, 2, 2)
    assert tm.tokens[0].flatten(1).any(dim=1).tolist() == [f == latent_frame for f in range(3)]  # no temporal dilation


@pytest.mark.parametrize(("h", "w", "grid"), [(72, 40, (3, 5, 3)), (40, 88, (3, 3, 6)), (17, 15, (3, 2, 1))])
def test_odd_and_portrait_sizes_use_the_ceil_grid(h, w, grid):
    assert token_grid(9, h, w) == grid
    tm = token_mask(_pixel_mask(9, h, w, (8, h - 1, w - 1)), k=0)  # the last pixel: the last, partial token
    assert tm.tokens.shape == (1, *grid)
    assert tm.tokens.sum() == 1 and tm.tokens[0, -1, -1, -1]


def test_retention_grows_monotonically_with_k_on_a_pbdp_mask():
    scene = demo_scene(width=192, height=128, num_frames=9, seed=0)
    frames, disparity = scene.tensors()
    mask1 = double_project(frames, disparity, training_direction()).mask1  # (T, H, W) bool
    assert mask1.any()
    results = [token_mask(mask1[None], k=k) for k in range(6)]
    retentions = [r.retention for r in results]
    assert 0.0 < retentions[0] < retentions[1]
    assert all(a <= b for a, b in zip(retentions, retentions[1:])), retentions
    for smaller, larger in zip(results, results[1:]):  # each dilation contains the previous one
        assert not (smaller.tokens & ~larger.tokens).any()


def test_token_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="1 \\+ 4n"):
        token_mask(torch.zeros(1, 8, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, T, H, W\)"):
        token_mask(torch.zeros(9, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        token_mask(torch.zeros(1, 9, 32, 32))
    with pytest.raises(ValueError, match="`k`"):
        token_mask(torch.zeros(1, 9, 32, 32, dtype=torch.bool), k=-1)


# --------------------------------------------------------------------------------------------- bucketing


def test_bucket_sizes():
    assert [bucket_size(n, 1000, 256) for n in (0, 1, 256, 257, 900)] == [0, 256, 256, 512, 1000]
    assert [bucket_size(n, 10_000, 256, growth=2.0) for n in (1, 300, 513, 1025)] == [256, 512, 1024, 2048]
    assert bucket_size(5, 10, 1) == 5


def test_padding_takes_the_nearest_real_tokens_without_repeats():
    tokens = torch.zeros(1, 2, 5, 5, dtype=torch.bool)
    tokens[0, 1, 2, 2] = True
    plan = plan_tokens(tokens, SasiConfig(bucket_multiple=9))
    ring = torch.zeros(1, 2, 5, 5, dtype=torch.bool)
    ring[0, 1, 1:4, 1:4] = True  # the 8 neighbours of the kept token, same frame
    assert plan.index.tolist() == [torch.nonzero(ring.flatten()).flatten().tolist()]
    assert plan.kept.sum() == 1 and plan.kept[0, 4]
    # A frame full of kept tokens spills into the next frame, no token twice.
    tokens = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    tokens[0, 1] = True
    plan = plan_tokens(tokens, SasiConfig(bucket_multiple=20))
    assert plan.index.unique().numel() == 20
    assert set(plan.index[0].tolist()) == set(range(16, 32)) | {0, 1, 2, 3}


def test_batch_rows_pad_to_the_largest_count():
    tokens = torch.zeros(3, 1, 6, 6, dtype=torch.bool)
    tokens[0, 0, :3, :4] = True  # 12 tokens
    tokens[1, 0, 5, 5] = True  # 1 token
    plan = plan_tokens(tokens, SasiConfig(bucket_multiple=8))  # 12 -> 16 for every row; row 2 is empty
    assert plan.index.shape == (3, 16)
    assert plan.kept.sum(dim=1).tolist() == [12, 1, 0]
    for row in plan.index:
        assert row.unique().numel() == 16 and torch.equal(row, row.sort().values)


# ------------------------------------------------------------------------------------------- sparse DiT


@pytest.mark.parametrize("per_token_timestep", [False, True])
def test_every_token_kept_equals_the_dense_model(wan, per_token_timestep):
    x, timestep, fill = _inputs(2, 3, 10, 6)
    if per_token_timestep:  # Wan2.2 ti2v style: one timestep per token
        timestep = torch.rand(2, 45, generator=torch.Generator().manual_seed(3)) * 1000
    enc = text(2)
    dense = _dense(wan, x, timestep, enc)
    sparse = SparseWanTransformer(wan)
    with torch.no_grad():
        out = sparse(x, timestep, enc, torch.ones(2, 3, 5, 3, dtype=torch.bool), fill)
    assert out.shape == dense.shape == (2, 16, 3, 10, 6)
    assert (out - dense).abs().max() <= 1e-5


def test_kept_outputs_ignore_inputs_of_tokens_not_computed(wan):
    x, timestep, fill = _inputs(1, 3, 10, 6)
    enc = text(1)
    tokens = torch.zeros(1, 3, 5, 3, dtype=torch.bool)
    tokens[0, 1, 1:3, 0:2] = True
    tokens[0, 2, 4, 2] = True
    changed = x + 3.0 * torch.randn_like(x) * _latent_cells(~tokens)  # new inputs at every unkept token
    kept = _latent_cells(tokens).expand(-1, 16, -1, -1, -1)
    sparse = SparseWanTransformer(wan, SasiConfig(bucket_multiple=1))  # no padding: only kept tokens computed
    with torch.no_grad():
        before, after = sparse(x, timestep, enc, tokens, fill), sparse(changed, timestep, enc, tokens, fill)
    assert torch.equal(before[kept], after[kept])
    assert torch.equal(before[~kept], fill[~kept]) and torch.equal(after[~kept], fill[~kept])
    # The dense model sees the change at those tokens (so the sparse invariance is not vacuous).
    dense_change = (_dense(wan, x, timestep, enc) - _dense(wan, changed, timestep, enc))[kept].abs().max()
    assert dense_change > 1e-3


def test_padding_tokens_are_real_context(wan):
    x, timestep, fill = _inputs(1, 3, 10, 6)
    enc = text(1)
    tokens = torch.zeros(1, 3, 5, 3, dtype=torch.bool)
    tokens[0, 1, 2, 1] = True
    sparse = SparseWanTransformer(wan, SasiConfig(bucket_multiple=9))
    plan = sparse.plan(tokens)
    computed = torch.zeros(45, dtype=torch.bool)
    computed[plan.index[0]] = True
    computed = computed.reshape(1, 3, 5, 3)
    kept = _latent_cells(tokens).expand(-1, 16, -1, -1, -1)
    outside = x + 3.0 * torch.randn_like(x) * _latent_cells(~computed)
    padding = x + 3.0 * torch.randn_like(x) * _latent_cells(computed & ~tokens)
    with torch.no_grad():
        base = sparse(x, timestep, enc, tokens, fill)
        assert torch.equal(base[kept], sparse(outside, timestep, enc, tokens, fill)[kept])  # not computed: no effect
        assert (base[kept] - sparse(padding, timestep, enc, tokens, fill)[kept]).abs().max() > 1e-3  # attended to
        assert torch.equal(base[~kept], fill[~kept])  # padding predictions are discarded by default
        sparse.config.keep_padding = True
        kept_padding = sparse(x, timestep, enc, tokens, fill)
    pad_cells = _latent_cells(computed & ~tokens).expand(-1, 16, -1, -1, -1)
    assert torch.equal(kept_padding[kept], base[kept])
    assert not torch.equal(kept_padding[pad_cells], fill[pad_cells])


def test_batch_rows_with_different_counts_match_their_single_runs(wan):
    x, timestep, fill = _inputs(2, 3, 10, 6)
    enc = text(2)
    tokens = torch.zeros(2, 3, 5, 3, dtype=torch.bool)
    tokens[0, 0, :2, :] = True  # 6 tokens
    tokens[1] = tokens[0]
    tokens[1, 2, 4, 2] = True  # 7 tokens: both rows pad to 8 with multiple 4 ...
    sparse = SparseWanTransformer(wan, SasiConfig(bucket_multiple=4))
    with torch.no_grad():
        both = sparse(x, timestep, enc, tokens, fill)
        # ... as each row alone does, so the computed sets and the results agree.
        alone = [sparse(x[i: i + 1], timestep[i: i + 1], enc[i: i + 1], tokens[i: i + 1], fill[i: i + 1])
                 for i in (0, 1)]
    assert (both - torch.cat(alone)).abs().max() <= 1e-6


def test_empty_mask_returns_the_fill_without_running_the_dit(wan):
    calls = []
    hooks = [module.register_forward_pre_hook(lambda *_: calls.append(1))
             for module in (wan, wan.patch_embedding, wan.condition_embedder, wan.blocks[0], wan.proj_out)]
    try:
        x, timestep, fill = _inputs(2, 3, 10, 6)
        sparse = SparseWanTransformer(wan)
        empty = torch.zeros(2, 3, 5, 3, dtype=torch.bool)
        with torch.no_grad():
            out = sparse(x, timestep, text(2), empty, fill)
        assert torch.equal(out, fill) and out.data_ptr() != fill.data_ptr()
        assert calls == []
        one = empty.clone()
        one[1, 0, 0, 0] = True
        with torch.no_grad():
            out = sparse(x, timestep, text(2), one, fill)
        assert len(calls) > 0  # the same hooks fire when a token is kept
        assert torch.equal(out[0], fill[0])  # the row with no kept token is all fill
        assert not torch.equal(out[1, :, 0, :2, :2], fill[1, :, 0, :2, :2])
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(("h", "w"), [(72, 40), (40, 88)])
def test_odd_sized_and_portrait_clips_run_end_to_end(wan, h, w):
    pixel = _pixel_mask(9, h, w, (0, h // 2, w // 3), (7, h - 1, w - 1))
    tm = token_mask(pixel, k=1)
    f, gh, gw = token_grid(9, h, w)
    x, timestep, fill = _inputs(1, f, 2 * gh, 2 * gw)  # latents of the frames padded to 16 * ceil(size / 16)
    enc = text(1)
    sparse = SparseWanTransformer(wan, SasiConfig(bucket_multiple=4))
    with torch.no_grad():
        out = sparse(x, timestep, enc, tm.tokens, fill)
        full = sparse(x, timestep, enc, torch.ones_like(tm.tokens), fill)
    kept = _latent_cells(tm.tokens).expand(-1, 16, -1, -1, -1)
    assert torch.isfinite(out).all()
    assert torch.equal(out[~kept], fill[~kept]) and not torch.equal(out[kept], fill[kept])
    assert (full - _dense(wan, x, timestep, enc)).abs().max() <= 1e-5


def test_patchify_inverts_the_models_unpatchify():
    latent = torch.randn(2, 16, 3, 10, 6)
    tokens = patchify(latent, (1, 2, 2))
    assert tokens.shape == (2, 45, 64)
    assert torch.equal(unpatchify(tokens, (3, 5, 3), (1, 2, 2)), latent)


def test_sparse_forward_rejects_bad_input(wan):
    x, timestep, fill = _inputs(1, 3, 10, 6)
    sparse = SparseWanTransformer(wan)
    ones = torch.ones(1, 3, 5, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="`token_mask`"):
        sparse(x, timestep, text(1), ones[:, :2], fill)
    with pytest.raises(ValueError, match="`token_mask`"):
        sparse(x, timestep, text(1), ones.float(), fill)
    with pytest.raises(ValueError, match="`fill`"):
        sparse(x, timestep, text(1), ones, fill[:, :4])
    with pytest.raises(ValueError, match="multiple of the patch"):
        sparse(x[..., :5], timestep, text(1), ones, fill[..., :5])
    with pytest.raises(ValueError, match="channels"):
        sparse(x[:, :16], timestep, text(1), ones, fill)
    with pytest.raises(ValueError, match="`timestep`"):
        sparse(x, torch.zeros(1, 44), text(1), ones, fill)
    with pytest.raises(ValueError, match="`timestep`"):
        sparse(x, torch.zeros(2), text(1), ones, fill)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sasi.k"):
        SasiConfig(k=-1)
    with pytest.raises(ValueError, match="bucket_multiple"):
        SasiConfig(bucket_multiple=0)
    with pytest.raises(ValueError, match="bucket_growth"):
        SasiConfig(bucket_growth=1.0)


def test_a_second_toy_model_gives_other_outputs():
    """Guards the equality tests against a degenerate toy (e.g. a zero output head)."""
    x, timestep, _ = _inputs(1, 3, 10, 6)
    a = _dense(toy_wan(seed=0), x, timestep, text(1))
    b = _dense(toy_wan(seed=1), x, timestep, text(1))
    assert a.abs().mean() > 1e-2 and (a - b).abs().max() > 1e-2
