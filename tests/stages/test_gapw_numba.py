"""The compiled GAPW kernel (stages/gapw_numba.py) against the PyTorch reference (stages/gapw.py).

Same masks, and views and disparities within 1e-5, on the synthetic scenes, the shared Middlebury pairs
and a seeded fuzz of rows built to hit the rule's corners; the uint8 pair path against the float path;
the kernel choice of ``warp.kernel``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamstereo.config import ConfigError, load_config
from dreamstereo.scenes import Layer, demo_scene, render, step_scene
from dreamstereo.stages import gapw, gapw_numba
from dreamstereo.stages.pairs import PairConfig, make_pair
from dreamstereo.stages.warp import WarpConfig, WarpKernel, double_project, use_numba, warp
from dreamstereo.types import Direction

TOL = 1e-5
FIELDS = ("view2", "disparity2", "mask2", "view1", "mask1")


def _assert_same_parts(got, ref, what):
    """``(view, disparity2, disocclusion, border)`` of both kernels: masks identical, values within TOL."""
    for name, a, b in zip(("view", "disparity2", "disocclusion", "border"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, name)
        if a.dtype == torch.bool:
            assert torch.equal(a, b), (what, name, int((a != b).sum()))
        else:
            assert float((a - b).abs().max()) <= TOL, (what, name, float((a - b).abs().max()))


def _assert_same_projection(got, ref, what):
    for name in FIELDS:
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (what, name)
        if a.dtype == torch.bool:
            assert torch.equal(a, b), (what, name, int((a != b).sum()))
        else:
            assert float((a - b).abs().max()) <= TOL, (what, name, float((a - b).abs().max()))


def _compare(frames, disparity, direction, delta=gapw.DEFAULT_DELTA, hole_margin=gapw.DEFAULT_HOLE_MARGIN,
             source_valid=None, what=""):
    """Both kernels on one input: the single warp (with ``source_valid``) and the double projection."""
    got = gapw_numba.gapw_parts(frames, disparity, direction, delta, hole_margin, source_valid)
    ref = gapw.gapw_parts(frames, disparity, direction, delta, hole_margin, source_valid)
    _assert_same_parts(got, ref, what)
    opts = dict(delta=delta, hole_margin=hole_margin)
    _assert_same_projection(double_project(frames, disparity, direction, kernel="numba", **opts),
                            double_project(frames, disparity, direction, kernel="torch", **opts), what)


def _synthetic_scenes():
    three = [Layer(disparity=2.0, seed=1), Layer(disparity=6.0, x0=20.5, x1=44.5, seed=2),
             Layer(disparity=12.0, x0=30.5, x1=36.5, seed=3)]
    thin = [Layer(disparity=2.0, seed=1), Layer(disparity=22.0, x0=30.5, x1=36.5, seed=2)]
    return {
        "step-front-left": step_scene(front_on_left=True),
        "step-front-right": step_scene(front_on_left=False),
        "three-layers": render(three, width=64, height=3, num_frames=1),
        "thin-bar": render(thin, width=80, height=2, num_frames=1),
        "demo-0": demo_scene(seed=0, width=160, height=48, num_frames=3),
        "demo-1": demo_scene(seed=1, width=160, height=48, num_frames=3),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("direction", list(Direction))
def test_synthetic_scenes_match_the_reference(direction, dtype):
    for name, scene in _synthetic_scenes().items():
        frames, disparity = scene.tensors()
        frames, disparity = frames.to(dtype), disparity.to(dtype)
        _compare(frames, disparity, direction, what=name)
        valid = torch.from_numpy(np.random.default_rng(7).random(tuple(disparity.shape)) > 0.3)
        _compare(frames, disparity, direction, source_valid=valid, what=f"{name} with holes")


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["Cloth3", "Reindeer", "Wood2"])
def test_middlebury_pairs_match_the_reference(middlebury_dir, name):
    from dreamstereo.warp_eval import fill_from_background, load_pair

    pair = load_pair(middlebury_dir / name)
    disparity = torch.from_numpy(fill_from_background(pair.disparity_left, pair.disparity_left > 0))[None]
    frames = torch.from_numpy(pair.left).permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W)
    for direction in Direction:
        _compare(frames, disparity.to(frames.dtype), direction, what=f"{name} {direction.value}")


def _fuzz_rows(rng: np.random.Generator, t: int, h: int, w: int) -> np.ndarray:
    """``(T, H, W)`` float64 disparity rows mixing the cases that stress the rule."""
    out = np.empty((t, h, w))
    for row in out.reshape(-1, w):
        kind = rng.integers(6)
        if kind == 0:  # smooth with noise, any sign
            row[:] = rng.normal(0, 1) * 8 + np.cumsum(rng.normal(0, 0.4, w))
        elif kind == 1:  # flat runs: a few levels, integer or not, negative included
            levels = rng.normal(0, 10, 4).round(int(rng.integers(0, 2)))
            row[:] = levels[np.sort(rng.integers(0, 4, w))]
        elif kind == 2:  # steep steps both ways
            row[:] = np.cumsum(np.where(rng.random(w) < 0.15, rng.normal(0, 12, w), 0.0))
        elif kind == 3:  # integer disparities (landing points exactly on target centres)
            row[:] = rng.integers(-6, 12, w)
        elif kind == 4:  # steps of exactly delta-ish stretch, half-integers
            row[:] = np.cumsum(rng.choice([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0], w))
        else:  # large range, beyond the row width
            row[:] = rng.uniform(-2 * w, 2 * w, w)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_fuzzed_rows_match_the_reference(seed):
    rng = np.random.default_rng(1000 + seed)
    for width in (2, 3, 5, 17, 64):
        t, h = 2, 6
        disparity = _fuzz_rows(rng, t, h, width)
        frames = rng.random((t, 3, h, width))
        holes = rng.random((t, h, width)) < rng.choice([0.0, 0.2, 0.6, 0.95])
        holes[0, 0] = True  # a row with no valid source at all
        holes[0, 1] = True
        holes[0, 1, rng.integers(width)] = False  # a row with one valid source
        for delta, hole_margin in ((2.0, 0.25), (1.0, 0.0), (1.5, 0.5), (3.7, 1.8), (1.25, 0.6)):
            for dtype in (torch.float32, torch.float64):
                for direction in Direction:
                    what = f"seed={seed} W={width} delta={delta} hm={hole_margin} {dtype} {direction.value}"
                    f = torch.from_numpy(frames).to(dtype)
                    d = torch.from_numpy(disparity).to(dtype)
                    _compare(f, d, direction, delta, hole_margin, None, what)
                    _compare(f, d, direction, delta, hole_margin, torch.from_numpy(~holes), what + " holes")


def test_same_result_on_one_and_two_threads():
    scene = demo_scene(seed=2, width=200, height=64, num_frames=3)
    frames, disparity = scene.tensors()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = double_project(frames, disparity * 3, "left", kernel="numba")
        torch.set_num_threads(2)
        two = double_project(frames, disparity * 3, "left", kernel="numba")
    finally:
        torch.set_num_threads(before)
    for name in FIELDS:
        assert torch.equal(getattr(one, name), getattr(two, name)), name


@pytest.mark.parametrize("eye", list(Direction))
@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_uint8_pair_matches_the_float_path(eye, flip):
    scene = demo_scene(seed=3, width=192, height=56, num_frames=3)
    rgb, disparity = scene.tensors()
    frames = (rgb.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()  # (T, H, W, 3)
    disparity = (disparity * 2.5).numpy()
    pairs = {}
    for kernel in ("numba", "torch"):
        cfg = PairConfig(synthesized_eye=eye, flip_probability=flip, warp=WarpConfig(kernel=kernel))
        pairs[kernel] = make_pair(frames, disparity, "clip-0001", cfg)
    got, ref = pairs["numba"], pairs["torch"]
    assert got.warped.dtype == np.uint8 and got.warped.shape == frames.shape
    assert np.array_equal(got.mask, ref.mask)
    assert np.array_equal(got.warped, ref.warped)
    assert np.array_equal(got.clean, ref.clean) and np.array_equal(got.disparity, ref.disparity)
    assert (got.direction, got.flipped) == (ref.direction, ref.flipped) == (Direction(eye).opposite, flip == 1.0)
    assert got.mask.any() and not got.mask.all()


def test_uint8_pair_rejects_bad_input_naming_it():
    frames = np.zeros((1, 4, 8, 3), np.uint8)
    disparity = np.zeros((1, 4, 8), np.float32)
    with pytest.raises(ValueError, match="`frames`"):
        gapw_numba.pair_uint8(frames.astype(np.float32), disparity, "right", 2.0, 0.25)
    with pytest.raises(ValueError, match="`disparity` must be a float32"):
        gapw_numba.pair_uint8(frames, disparity.astype(np.float64), "right", 2.0, 0.25)
    with pytest.raises(ValueError, match="`disparity` shape"):
        gapw_numba.pair_uint8(frames, disparity[:, :3], "right", 2.0, 0.25)
    bad = disparity.copy()
    bad[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN/inf"):
        gapw_numba.pair_uint8(frames, bad, "right", 2.0, 0.25)
    with pytest.raises(ValueError, match="`hole_margin`"):
        gapw_numba.pair_uint8(frames, disparity, "right", 2.0, 1.0)
    with pytest.raises(ValueError, match="`direction='up'`"):
        gapw_numba.pair_uint8(frames, disparity, "up", 2.0, 0.25)


def test_kernel_choice():
    assert use_numba("auto", "cpu") and use_numba(WarpKernel.NUMBA, torch.device("cpu"))
    assert not use_numba("torch", "cpu")
    assert not use_numba("auto", "cuda")  # accelerators keep the PyTorch path
    with pytest.raises(ValueError, match="warp.kernel=numba runs on CPU tensors"):
        use_numba("numba", "cuda")
    with pytest.raises(ValueError, match="`kernel='fast'` must be one of"):
        warp(torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 4), kernel="fast")
    # The same check the reference makes, for the same bad input.
    with pytest.raises(ValueError, match="`frames` must have shape"):
        warp(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 4), kernel="numba")


def test_config_key_selects_the_kernel():
    cfg = load_config(PairConfig, overrides=["warp.kernel=torch"])
    assert cfg.warp.kernel is WarpKernel.TORCH and cfg.warp.options()["kernel"] is WarpKernel.TORCH
    assert load_config(PairConfig).warp.kernel is WarpKernel.AUTO
    with pytest.raises(ConfigError, match="warp.kernel"):
        load_config(PairConfig, overrides=["warp.kernel=fast"])
    # warp.kernel=torch gives the reference's answer through the public entry point.
    frames, disparity = demo_scene(seed=4, width=96, height=24, num_frames=2).tensors()
    got = warp(frames, disparity, "right", **cfg.warp.options())
    ref = gapw.gapw_warp(frames, disparity, "right")
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_runs_where_no_cache_folder_is_writable(tmp_path):
    # A read-only install with no writable cache anywhere: numba cannot place its cache beside the
    # module (here __pycache__ is a file) nor in the user-wide folder (XDG_CACHE_HOME is a file), so the
    # kernel must compile in memory instead of failing at import. (Permissions cannot stand in for this:
    # the tests may run as root.)
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import dreamstereo

    package = tmp_path / "site" / "dreamstereo"
    shutil.copytree(Path(dreamstereo.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "stages" / "__pycache__").write_text("not a folder")
    (tmp_path / "cache-is-a-file").write_text("")
    env = {k: v for k, v in __import__("os").environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(tmp_path / "site"), XDG_CACHE_HOME=str(tmp_path / "cache-is-a-file"))
    script = (
        "import torch\n"
        "from dreamstereo.stages import gapw_numba\n"
        "assert gapw_numba.__file__.startswith({package!r})\n"
        "frames, disparity = torch.rand(1, 3, 2, 6), torch.tensor([[[0., 0, 3, 3, 0, 0]] * 2])\n"
        "view, disp2, hole, border = gapw_numba.gapw_parts(frames, disparity, 'right', 2.0, 0.25, None)\n"
        "print(hole[0, 0].int().tolist(), border[0, 0].int().tolist())\n"
    ).format(package=str(package))
    done = subprocess.run([sys.executable, "-c", script], check=False, env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # Sources 2, 3 (d = 3) land on -1, 0; the step 3 -> 4 stretches over targets 1..3; beyond f(5) = 5 nothing.
    ref = gapw.gapw_parts(torch.rand(1, 3, 2, 6), torch.tensor([[[0., 0, 3, 3, 0, 0]] * 2]), "right", 2.0, 0.25, None)
    assert done.stdout.split("\n")[-2] == f"{ref[2][0, 0].int().tolist()} {ref[3][0, 0].int().tolist()}"
    assert not any((tmp_path / "site").rglob("*.nbi"))  # nothing was cached


def test_keeps_torchs_thread_count_in_a_fresh_process(tmp_path):
    # numba's OpenMP pool starts with omp_set_num_threads(all cores) on the libgomp torch loaded, at the
    # first parallel call of a process: the kernel must leave torch's count (an actor's setting) as it was
    # and use that many threads itself.
    import subprocess
    import sys
    from pathlib import Path

    import dreamstereo

    script = (
        "import numba, torch\n"
        "torch.set_num_threads(1)\n"
        "from dreamstereo.stages import gapw_numba\n"
        "frames, disparity = torch.rand(1, 3, 4, 16), torch.rand(1, 4, 16) * 3\n"
        "gapw_numba.double_project(frames, disparity, 'right', 2.0, 0.25)\n"
        "print(torch.get_num_threads(), numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS)\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(dreamstereo.__file__).parent.parent),
           "NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], check=False, env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "1", "2"]
