"""GAPW and PBDP as one compiled CPU kernel (numba): the rule of ``gapw.py``, fused, one pass per row.

Reference: issue 12, item 1; the rule and its proof are in the docstring of ``gapw.py``, whose PyTorch
code stays the reference (and the path for accelerators). ``stages/warp.py`` picks this kernel for CPU
tensors (``warp.kernel: auto``).

Per row, the PyTorch reference makes about 20 elementwise passes over the frame (landing map, suffix
minimum, histogram, gathers, lerps). Here one right-to-left sweep does it all: a pointer walks the
sources from the right keeping the suffix minimum ``g`` on the fly, and for each target ``j`` (also
right to left) it stops at the last source ``i`` with ``g(i) <= j``, which is exactly the segment the
reference reads off its cumulative histogram (for integer ``j``, ``ceil(g) <= j`` iff ``g <= j``). Both
pointers only move left, so a row costs ``O(W)``. The segment, its fraction and the two mask parts go
into a few row-sized scratch arrays (in L1), then colours and disparity are sampled from them; the
double projection does the return warp of the same row at once, while view 2's row is still in cache.

Same answers as the reference, bit for bit on this machine: every float operation is done in the
frames' dtype in the reference's order (landing ``j - d``, length ``f_b - f_a``, ``into / length``), and
the interpolation is ``torch.lerp``'s formula, a fused multiply-add (ATen ``Lerp.h``:
``fma(w, b - a, a)`` for ``|w| < 0.5``, else ``fma(w - 1, b - a, b)``), so view 2's disparity, which
the return warp thresholds, is identical and the masks are identical (tests/stages/test_gapw_numba.py).
On a CPU where torch's lerp is not fused the values differ by an ulp at most (the tests allow 1e-5).

Threads: rows run in parallel (``prange``) on as many threads as ``torch.get_num_threads()`` says at the
call (Ray actors and the benchmarks set torch's count). Compilation happens once per process and
signature (float32, float64, the uint8 pair), cached on disk next to this file when the folder is
writable, else in numba's user-wide cache (``NUMBA_CACHE_DIR``); with no writable place it compiles
without a disk cache rather than failing.
"""

from __future__ import annotations

import logging

import numba
import numpy as np
import torch
from numba import prange
from numba.extending import intrinsic

from dreamstereo.stages.gapw import check_hole_rule
from dreamstereo.stages.warp_args import as_direction, check_warp_inputs
from dreamstereo.types import Direction

logger = logging.getLogger(__name__)


def _jit(**options):
    """``numba.njit`` with an on-disk cache where one can be written, and without one where not.

    numba picks the cache folder when the function is decorated (``__pycache__`` beside this file,
    else the user-wide cache, ``NUMBA_CACHE_DIR``) and raises RuntimeError when neither is writable,
    e.g. a read-only install with a read-only home: then the kernel compiles in memory, once per process.
    """

    def decorate(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            logger.info("numba cache unavailable for %s (%s); compiling in memory", fn.__name__, exc)
            return numba.njit(cache=False, **options)(fn)

    return decorate


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` with one rounding (LLVM ``llvm.fma``), as ``torch.lerp`` computes it on CPU."""
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@_jit(inline="always")
def _lerp(a, b, w, one):
    """``torch.lerp(a, b, w)`` exactly (ATen ``Lerp.h``: two fused forms, split at ``|w| = 0.5``)."""
    diff = b - a
    if w < 0.5:
        return _fma(w, diff, a)
    return _fma(w - one, diff, b)


@_jit(inline="always")
def _landing(d, valid, has_valid, flip, cols, big, u):
    """``f(u) = u - d(x(u))`` in mirrored columns ``u`` (``x = W-1-u`` when ``flip``); +inf if invalid."""
    w = d.shape[0]
    x = w - 1 - u if flip else u
    if has_valid and not valid[x]:
        return big
    return cols[u] - d[x]


@_jit(inline="always")
def _locate(d, valid, has_valid, flip, cols, delta, hole_margin, tiny, big, src_a, src_b, frac, hole, border):
    """Inverse map of one row, the rule of ``gapw._locate_right`` (``flip`` makes it the left warp).

    Args:
        d: ``(W,)`` disparity of the source row, pixels. valid: ``(W,)`` bool, read when ``has_valid``.
        flip: False for ``x -> x - d`` (right), True for ``x -> x + d`` (left, as the mirrored row).
        cols: ``(W,)`` ``0 .. W-1`` in the dtype of ``d``. delta, hole_margin, tiny (the reference's
            1e-12 length floor), big (+inf): scalars in the dtype of ``d``.
        src_a, src_b, frac, hole, border: ``(W,)`` outputs per target column (unmirrored): target ``j``
            shows ``lerp(src[src_a], src[src_b], frac)``; disocclusion ``hole`` and frame ``border``.
    """
    w = d.shape[0]
    zero = cols[0]
    one = cols[1]
    # The source pointer i walks right to left holding gi = g(i) = min_{y >= i} f(y); nv is the first
    # valid column right of i (w: none), the reference's next_valid at i + 1.
    i = w - 1
    gi = _landing(d, valid, has_valid, flip, cols, big, i)
    nv = w
    for jj in range(w - 1, -1, -1):
        jf = cols[jj]
        # 1. Last source i with g(i) <= j (the reference's count(j) - 1).
        while i >= 0 and gi > jf:
            if has_valid and valid[w - 1 - i if flip else i]:
                nv = i
            i -= 1
            if i >= 0:
                gi = min(gi, _landing(d, valid, has_valid, flip, cols, big, i))
        jo = w - 1 - jj if flip else jj
        if i < 0:
            # 2a. Left of every landing point: border, shows source 0 (reference: count == 0, frac 0).
            x = w - 1 if flip else 0
            src_a[jo] = x
            src_b[jo] = x
            frac[jo] = zero
            hole[jo] = False
            border[jo] = True
        elif i == w - 1:
            # 2b. At or right of the last source's landing point (reference: count == W, frac 1).
            x = 0 if flip else w - 1
            src_a[jo] = x
            src_b[jo] = x
            frac[jo] = one
            hole[jo] = False
            border[jo] = jf > gi  # gi = f(W-1) here
        else:
            # 2c. Inside segment [i, next]: i is visible (gi = f(i)); next is i + 1, or with holes the
            #     next valid source (none: i itself, j is past the last landing point).
            if has_valid:
                nxt = nv if nv < w else i
            else:
                nxt = i + 1
            f_a = gi
            f_b = _landing(d, valid, has_valid, flip, cols, big, nxt)
            length = f_b - f_a
            into = jf - f_a
            t = into / max(length, tiny)
            t = min(max(t, zero), one)
            # 3. Jacobian mask: a step stretched beyond delta keeps hole_margin px at each end.
            if length > delta:
                past_start = into > hole_margin
                hole[jo] = past_start and (f_b - jf) > hole_margin
                t = one if past_start else zero
            else:
                hole[jo] = False
            border[jo] = jf > f_b
            src_a[jo] = w - 1 - i if flip else i
            src_b[jo] = w - 1 - nxt if flip else nxt
            frac[jo] = t


@_jit(parallel=True)
def _warp_kernel(frames, disp, valid, has_valid, flip, cols, delta, hole_margin, tiny, big,
                 view, disp2, hole, border):
    """One warp of ``(T, C, H, W)`` float frames; see :func:`gapw_parts`. Rows in parallel."""
    t_, c_, h_, w_ = frames.shape
    one = cols[1]
    for k in prange(t_ * h_):
        t = k // h_
        r = k % h_
        src_a = np.empty(w_, np.int32)
        src_b = np.empty(w_, np.int32)
        frac = np.empty(w_, disp.dtype)
        _locate(disp[t, r], valid[t, r] if has_valid else valid[0, 0], has_valid, flip, cols, delta,
                hole_margin, tiny, big, src_a, src_b, frac, hole[t, r], border[t, r])
        drow = disp[t, r]
        out = disp2[t, r]
        for j in range(w_):
            out[j] = _lerp(drow[src_a[j]], drow[src_b[j]], frac[j], one)
        for c in range(c_):
            src = frames[t, c, r]
            out = view[t, c, r]
            for j in range(w_):
                out[j] = _lerp(src[src_a[j]], src[src_b[j]], frac[j], one)


@_jit(parallel=True)
def _double_project_kernel(frames, disp, flip, cols, delta, hole_margin, tiny, big,
                           view2, disp2, mask2, view1, mask1):
    """PBDP of ``(T, 3, H, W)`` float frames, both warps of a row in one go; see :func:`double_project`."""
    t_, _, h_, w_ = frames.shape
    one = cols[1]
    for k in prange(t_ * h_):
        t = k // h_
        r = k % h_
        src_a = np.empty(w_, np.int32)
        src_b = np.empty(w_, np.int32)
        frac = np.empty(w_, disp.dtype)
        hole = np.empty(w_, np.bool_)
        border = np.empty(w_, np.bool_)
        valid = np.empty(w_, np.bool_)
        # 1. View 1 -> view 2 (no invalid sources); the three colour planes sampled in one loop.
        drow = disp[t, r]
        _locate(drow, valid, False, flip, cols, delta, hole_margin, tiny, big, src_a, src_b, frac, hole, border)
        d2, m2 = disp2[t, r], mask2[t, r]
        s0, s1, s2 = frames[t, 0, r], frames[t, 1, r], frames[t, 2, r]
        v0, v1, v2 = view2[t, 0, r], view2[t, 1, r], view2[t, 2, r]
        for j in range(w_):
            a, b, f = src_a[j], src_b[j], frac[j]
            d2[j] = _lerp(drow[a], drow[b], f, one)
            m2[j] = hole[j] or border[j]
            valid[j] = not hole[j]  # sources of the return warp: view 2 without its disocclusions
            v0[j] = _lerp(s0[a], s0[b], f, one)
            v1[j] = _lerp(s1[a], s1[b], f, one)
            v2[j] = _lerp(s2[a], s2[b], f, one)
        # 2. View 2 -> view 1 with view 2's disparity, the opposite direction, holes of view 2 invalid.
        _locate(d2, valid, True, not flip, cols, delta, hole_margin, tiny, big, src_a, src_b, frac, hole, border)
        m1 = mask1[t, r]
        o0, o1, o2 = view1[t, 0, r], view1[t, 1, r], view1[t, 2, r]
        for j in range(w_):
            a, b, f = src_a[j], src_b[j], frac[j]
            m1[j] = hole[j] or border[j]
            o0[j] = _lerp(v0[a], v0[b], f, one)
            o1[j] = _lerp(v1[a], v1[b], f, one)
            o2[j] = _lerp(v2[a], v2[b], f, one)


@_jit(inline="always")
def _to_uint8(v, scale):
    """``round(v * scale)`` (half to even, as ``torch.round``) clamped to [0, 255], as uint8."""
    q = np.rint(v * scale)
    return np.uint8(0) if q < 0 else (np.uint8(255) if q > 255 else np.uint8(q))


@_jit(parallel=True)
def _pair_kernel(frames, disp, to_float, scale, flip, cols, delta, hole_margin, tiny, big, warped, mask1):
    """PBDP of a ``(T, H, W, 3)`` uint8 clip straight to the uint8 round trip; see :func:`pair_uint8`.

    ``to_float`` is the 256-entry table ``float32(k) / 255`` (the reference's ``.float().div_(255.0)``);
    view 2 lives only in row scratch, and view 1 is quantized as ``round(v * scale)`` (scale = 255 in
    the dtype of ``disp``) clamped to [0, 255], as ``stages/pairs.py`` does after the float round trip.
    """
    t_, h_, w_, _ = frames.shape
    one = cols[1]
    for k in prange(t_ * h_):
        t = k // h_
        r = k % h_
        src_a = np.empty(w_, np.int32)
        src_b = np.empty(w_, np.int32)
        frac = np.empty(w_, disp.dtype)
        hole = np.empty(w_, np.bool_)
        border = np.empty(w_, np.bool_)
        valid = np.empty(w_, np.bool_)
        d2 = np.empty(w_, disp.dtype)
        v0, v1, v2 = np.empty(w_, disp.dtype), np.empty(w_, disp.dtype), np.empty(w_, disp.dtype)  # view 2 row
        # 1. View 1 -> view 2, reading the interleaved uint8 row through the table.
        drow = disp[t, r]
        _locate(drow, valid, False, flip, cols, delta, hole_margin, tiny, big, src_a, src_b, frac, hole, border)
        src = frames[t, r]  # (W, 3) uint8
        for j in range(w_):
            a, b, f = src_a[j], src_b[j], frac[j]
            d2[j] = _lerp(drow[a], drow[b], f, one)
            valid[j] = not hole[j]
            v0[j] = _lerp(to_float[src[a, 0]], to_float[src[b, 0]], f, one)
            v1[j] = _lerp(to_float[src[a, 1]], to_float[src[b, 1]], f, one)
            v2[j] = _lerp(to_float[src[a, 2]], to_float[src[b, 2]], f, one)
        # 2. View 2 -> view 1 (holes of view 2 invalid), quantized to uint8.
        _locate(d2, valid, True, not flip, cols, delta, hole_margin, tiny, big, src_a, src_b, frac, hole, border)
        out = warped[t, r]  # (W, 3) uint8
        m1 = mask1[t, r]
        for j in range(w_):
            a, b, f = src_a[j], src_b[j], frac[j]
            m1[j] = hole[j] or border[j]
            out[j, 0] = _to_uint8(_lerp(v0[a], v0[b], f, one), scale)
            out[j, 1] = _to_uint8(_lerp(v1[a], v1[b], f, one), scale)
            out[j, 2] = _to_uint8(_lerp(v2[a], v2[b], f, one), scale)


# ---------------------------------------------------------------------------------------------------
# Entry points: same arguments, checks and results as the PyTorch reference (gapw.py / warp.py).


def _run(kernel, *args) -> None:
    """Run ``kernel`` on as many threads as torch uses now (what Ray actors and benchmarks set).

    The rows are split statically into one block per thread (numba's default): every row costs about
    the same. Dynamic chunks (``numba.set_parallel_chunksize``) were tried and measured no better on
    the shared dev-cpu.

    Torch's thread count is put back afterwards: numba's OpenMP layer starts its pool with
    ``omp_set_num_threads(NUMBA_NUM_THREADS)``, which binds to the libgomp that torch loaded globally, so
    the first parallel call in a process would otherwise raise torch's count to every core of the
    machine (an actor set to 1 thread would then run torch on all of them).
    """
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        kernel(*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _constants(dtype: np.dtype, width: int, delta: float, hole_margin: float) -> tuple:
    """Scalars of the rule in the working dtype, as torch compares a float tensor with a Python float."""
    kind = np.dtype(dtype).type
    cols = np.arange(width, dtype=kind)  # (W,) target / source columns as floats; cols[0] = 0, cols[1] = 1
    return cols, kind(delta), kind(hole_margin), kind(1e-12), kind(np.inf)


def _check_cpu(frames: torch.Tensor) -> None:
    """Raise ValueError naming ``frames`` when it is not on the CPU."""
    if frames.device.type != "cpu":
        raise ValueError(f"the numba GAPW kernel runs on CPU tensors; `frames` is on {frames.device} "
                         "(use warp.kernel=torch or auto on accelerators)")


# Outputs are allocated by NumPy and handed to torch without a copy: NumPy asks the kernel for
# transparent huge pages on large arrays, torch's CPU allocator does not, and the first touch of fresh
# 4 KiB pages cost about 10 ms per 768x1280 frame of double projection on dev-cpu (2 views, 1 thread).


def _as_array(x: torch.Tensor) -> np.ndarray:
    """A C-contiguous NumPy view of a CPU tensor (a copy only when it is not contiguous)."""
    return np.ascontiguousarray(x.detach().numpy())


@torch.no_grad()
def gapw_parts(frames, disparity, direction, delta, hole_margin, source_valid):
    """The compiled :func:`dreamstereo.stages.gapw.gapw_parts`: same arguments, checks and results.

    Args:
        frames: ``(T, 3, H, W)`` float32/float64 CPU tensor in [0, 1], view 1.
        disparity: ``(T, H, W)`` float pixels of view 1, larger = nearer, any sign.
        direction: ``"right"`` (``x -> x - d``) or ``"left"`` (``x -> x + d``).
        delta, hole_margin: the hole rule, see :func:`dreamstereo.stages.gapw.gapw_warp`.
        source_valid: optional ``(T, H, W)`` bool; invalid sources neither show nor occlude.

    Returns:
        ``(view, disparity2, disocclusion, border)``: ``(T, 3, H, W)`` in the dtype of ``frames``,
        ``(T, H, W)`` pixels of view 2, and the two ``(T, H, W)`` bool parts of the hole mask.

    Raises:
        ValueError: on bad inputs (as the reference) or tensors that are not on the CPU.
    """
    direction = as_direction(direction)
    check_warp_inputs(frames, disparity, source_valid)
    check_hole_rule(delta, hole_margin)
    _check_cpu(frames)
    w = frames.shape[-1]
    src = _as_array(frames)
    disp = _as_array(disparity.to(frames.dtype))
    has_valid = source_valid is not None
    valid = _as_array(source_valid) if has_valid else np.ones((1, 1, 1), dtype=np.bool_)
    view, disparity2 = np.empty_like(src), np.empty_like(disp)
    disocclusion, border = np.empty(disp.shape, np.bool_), np.empty(disp.shape, np.bool_)
    _run(_warp_kernel, src, disp, valid, has_valid, direction is Direction.LEFT,
         *_constants(src.dtype, w, delta, hole_margin), view, disparity2, disocclusion, border)
    return tuple(torch.from_numpy(x) for x in (view, disparity2, disocclusion, border))


@torch.no_grad()
def double_project(frames, disparity, direction, delta, hole_margin) -> tuple[torch.Tensor, ...]:
    """The compiled GAPW double projection (PBDP), both warps fused per row.

    Same answer as :func:`dreamstereo.stages.warp.double_project` with ``method="gapw"``: the return
    warp goes the opposite way with view 2's disparity and view 2's disocclusions as invalid sources.

    Args:
        frames: ``(T, 3, H, W)`` float32/float64 CPU tensor in [0, 1], view 1.
        disparity: ``(T, H, W)`` float pixels of view 1, larger = nearer.
        direction: where view 2 lies, ``"right"`` or ``"left"``.
        delta, hole_margin: the hole rule, see :func:`dreamstereo.stages.gapw.gapw_warp`.

    Returns:
        ``(view2, disparity2, mask2, view1, mask1)``, the fields of ``DoubleProjection``.
    """
    direction = as_direction(direction)
    check_warp_inputs(frames, disparity)
    check_hole_rule(delta, hole_margin)
    _check_cpu(frames)
    w = frames.shape[-1]
    src = _as_array(frames)
    disp = _as_array(disparity.to(frames.dtype))
    view2, view1, disparity2 = np.empty_like(src), np.empty_like(src), np.empty_like(disp)
    mask2, mask1 = np.empty(disp.shape, np.bool_), np.empty(disp.shape, np.bool_)
    _run(_double_project_kernel, src, disp, direction is Direction.LEFT, *_constants(src.dtype, w, delta, hole_margin),
         view2, disparity2, mask2, view1, mask1)
    return tuple(torch.from_numpy(x) for x in (view2, disparity2, mask2, view1, mask1))


_TO_FLOAT32 = (torch.arange(256, dtype=torch.uint8).float().div_(255.0)).numpy()  # (256,) the reference's u8 -> float


def pair_uint8(frames: np.ndarray, disparity: np.ndarray, direction, delta: float,
               hole_margin: float) -> tuple[np.ndarray, np.ndarray]:
    """GAPW double projection of a uint8 clip straight to the uint8 round trip (the training pair's V1', M1).

    The same answer as converting the clip to float32 in [0, 1] (``/ 255``), running
    :func:`double_project` and quantizing view 1 with ``round(255 v)`` clamped to [0, 255]
    (``stages/pairs.py``), without the float copies of the clip: view 2 lives only in a row buffer.

    Args:
        frames: ``(T, H, W, 3)`` uint8 clip, view 1.
        disparity: ``(T, H, W)`` float32 pixels of view 1, larger = nearer.
        direction: where view 2 lies, ``"right"`` or ``"left"``.
        delta, hole_margin: the hole rule, see :func:`dreamstereo.stages.gapw.gapw_warp`.

    Returns:
        ``(warped, mask1)``: ``(T, H, W, 3)`` uint8 round trip and ``(T, H, W)`` bool holes (True = hole).

    Raises:
        ValueError: naming the argument, on a bad dtype, shape, non-finite disparity or hole rule.
    """
    direction = as_direction(direction)
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"`frames` must be a (T, H, W, 3) uint8 array, got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} {getattr(frames, 'shape', '')}")
    if not isinstance(disparity, np.ndarray) or disparity.dtype != np.float32:
        raise ValueError(f"`disparity` must be a float32 array, got {getattr(disparity, 'dtype', type(disparity))}")
    if disparity.shape != frames.shape[:3]:
        raise ValueError(f"`disparity` shape {disparity.shape} does not match `frames` (T, H, W) = {frames.shape[:3]}")
    t, h, w, _ = frames.shape
    if t == 0 or h == 0 or w < 2:
        raise ValueError(f"`frames` is empty or too narrow: shape {frames.shape} (need T, H >= 1, W >= 2)")
    if not np.isfinite(disparity).all():
        raise ValueError(f"`disparity` has {int((~np.isfinite(disparity)).sum())} NaN/inf values; "
                         "fill or mask them before warping")
    check_hole_rule(delta, hole_margin)
    frames = np.ascontiguousarray(frames)
    disparity = np.ascontiguousarray(disparity)
    warped = np.empty_like(frames)
    mask1 = np.empty((t, h, w), dtype=np.bool_)
    _run(_pair_kernel, frames, disparity, _TO_FLOAT32, np.float32(255.0), direction is Direction.LEFT,
         *_constants(np.float32, w, delta, hole_margin), warped, mask1)
    return warped, mask1
