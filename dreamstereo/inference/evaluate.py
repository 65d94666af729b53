"""``dreamstereo evaluate``: measure an inpainting checkpoint on held-out PBDP pairs.

For each pair (V1' and M1 in, V1 the answer) the model fills the holes densely and with SASI; the
OpenCV fallback is scored alongside as the floor. Scores against V1: PSNR and SSIM over the full frame
and inside the mask, for the raw model output and blended into V1' with the mask (what ``convert``
shows); LPIPS when local backbone weights are configured (``lpips_weights``), otherwise reported as not
computed. Latency per frame (DiT, VAE, total) and token retention come from the same runs. Output: a
markdown table on stdout and in ``<json stem>.md``, the JSON report, and a contact sheet PNG.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from dreamstereo import __version__
from dreamstereo.config import to_plain
from dreamstereo.inference.inpaint import InpaintConfig, StereoInpainter
from dreamstereo.inference.lpips import Lpips
from dreamstereo.io import media
from dreamstereo.io.preview import contact_sheet, overlay_mask
from dreamstereo.io.sample import read_sample
from dreamstereo.io.shards import iter_raw_samples, resolve_shards, sample_members
from dreamstereo.io.storage import S3Config
from dreamstereo.models.wan_inpaint import VAE_TEMPORAL
from dreamstereo.stages.metrics import psnr, ssim
from dreamstereo.stages.stereo import blend, inpaint_opencv
from dreamstereo.types import UserError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EvaluateConfig:
    """``dreamstereo evaluate``."""

    max_samples: int = 16  # pairs read from the shards, in order
    frames: int = 17  # frames per pair used (cut to 1 + 4k)
    model: InpaintConfig = dataclasses.field(default_factory=InpaintConfig)
    device: str = "cpu"
    lpips_weights: str | None = None  # local LPIPS (AlexNet) weights file; None: LPIPS not computed
    preview_samples: int = 3  # rows of the contact sheet
    s3: S3Config = dataclasses.field(default_factory=S3Config)

    def __post_init__(self):
        if self.max_samples < 1 or self.frames < 1:
            raise EvaluateInputError(f"need max_samples >= 1 and frames >= 1, got {self.max_samples}, {self.frames}")


METHODS = ("sparse", "dense", "opencv")


class EvaluateInputError(UserError, ValueError):
    """Shards that cannot be evaluated (not PBDP pairs, no samples); says what to give instead."""


def _pairs(shards: str, cfg: EvaluateConfig):
    """Up to ``max_samples`` decoded PBDP pairs from a generate output / brace pattern / tar."""
    found = 0
    for url in resolve_shards(shards, cfg.s3):
        for raw in iter_raw_samples(url, cfg.s3):
            members = sample_members(raw)
            if "mask.npz" not in members or "warped.mp4" not in members:
                raise EvaluateInputError(f"{url}: sample {raw['__key__']!r} is not a PBDP pair (no warped.mp4 / mask.npz); "
                                 f"evaluate needs `generate mode=pairs` shards")
            sample = read_sample(members, raw["__key__"])
            t = min(len(sample.mask), cfg.frames)
            t = 1 + VAE_TEMPORAL * ((t - 1) // VAE_TEMPORAL)  # what the VAE packs without padding
            yield sample.key, sample.clean[:t], sample.warped[:t], sample.mask[:t]
            found += 1
            if found >= cfg.max_samples:
                return


def _scores(output: np.ndarray, target: np.ndarray, mask: np.ndarray, lpips) -> dict:
    out, ref = output.astype(np.float64) / 255.0, target.astype(np.float64) / 255.0
    scores = {"psnr": psnr(out, ref), "psnr_mask": psnr(out, ref, mask), "ssim": ssim(out, ref),
              "ssim_mask": ssim(out, ref, mask)}
    if lpips is not None:
        scores["lpips"] = lpips(output, target)
    return scores


def evaluate(checkpoint: str, shards: str, cfg: EvaluateConfig, *, json_out: str | Path | None = None,
             echo=print) -> dict:
    """Score ``checkpoint`` on the pairs in ``shards``; return the report (also written when ``json_out``)."""
    inpainter = StereoInpainter(checkpoint, cfg.model, cfg.device)
    lpips = None
    if cfg.lpips_weights:
        lpips = Lpips(cfg.lpips_weights, device=cfg.device)
    else:
        echo("evaluate: LPIPS not computed (no local backbone weights: set lpips_weights=PATH)")
    sums: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    timing = {m: collections.Counter() for m in METHODS}
    frames_total, rows, tiles = 0, [], []
    for key, clean, warped, mask in _pairs(shards, cfg):
        frames_total += len(mask)
        outputs = {}
        for method in METHODS:
            before = dict(inpainter.stats)
            start = time.perf_counter()
            if method == "opencv":
                out = inpaint_opencv(warped, mask)
            else:
                out = inpainter.inpaint(warped, mask, sparse=method == "sparse")
            timing[method]["total_s"] += time.perf_counter() - start
            for k in ("dit_s", "vae_s", "tokens", "tokens_kept"):
                timing[method][k] += inpainter.stats[k] - before[k]
            blended = blend(warped, out, mask)
            outputs[method] = blended
            for variant, image in (("raw", out), ("blended", blended)):
                scores = _scores(image, clean, mask, lpips)
                sums[(method, variant)].update(scores)
                rows.append({"key": key, "method": method, "variant": variant, **scores})
        if len(tiles) < cfg.preview_samples:
            tiles.append((key, clean, warped, mask, outputs))
    if frames_total == 0:
        raise EvaluateInputError(f"{shards}: no samples")
    samples = len({r["key"] for r in rows})
    table = []
    for (method, variant), total in sums.items():
        entry = {"method": method, "variant": variant, **{k: v / samples for k, v in total.items()}}
        t = timing[method]
        entry.update({"ms_per_frame": 1000 * t["total_s"] / frames_total,
                      "dit_ms_per_frame": 1000 * t["dit_s"] / frames_total if method != "opencv" else None,
                      "vae_ms_per_frame": 1000 * t["vae_s"] / frames_total if method != "opencv" else None,
                      "retention": t["tokens_kept"] / t["tokens"] if t["tokens"] else None})
        table.append(entry)
    report = {"version": __version__, "checkpoint": str(checkpoint), "shards": shards, "samples": samples,
              "frames": frames_total, "lpips": "computed" if lpips else "not computed (no lpips_weights)",
              "prompt_embedding": inpainter.prompt_source, "table": table, "per_sample": rows,
              "config": to_plain(cfg), **({"smoke_test": inpainter.smoke_test} if inpainter.smoke_test else {})}
    markdown = format_table(table, lpips is not None)
    if inpainter.smoke_test:
        markdown = f"SMOKE TEST: {inpainter.smoke_test}\n\n{markdown}"
    echo(markdown)
    if json_out:
        json_out = Path(json_out)
        media.write_text(json_out, json.dumps(report, indent=2, default=float))
        media.write_text(json_out.with_suffix(".md"), markdown + "\n")
        media.write_image(json_out.with_suffix(".png"), _contact_sheet(tiles))
        echo(f"wrote {json_out}, {json_out.with_suffix('.md')}, {json_out.with_suffix('.png')}")
    return report


def format_table(table: list[dict], with_lpips: bool) -> str:
    head = "| method | output | PSNR | PSNR mask | SSIM | SSIM mask |" + (" LPIPS |" if with_lpips else "") + \
        " ms/frame | DiT ms/frame | VAE ms/frame | retention |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def num(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    for e in table:
        cells = [e["method"], e["variant"], num(e["psnr"], 2), num(e["psnr_mask"], 2), num(e["ssim"]),
                 num(e["ssim_mask"])] + ([num(e.get("lpips"))] if with_lpips else []) + \
                [num(e["ms_per_frame"], 1), num(e["dit_ms_per_frame"], 1), num(e["vae_ms_per_frame"], 1),
                 num(e["retention"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _contact_sheet(tiles) -> np.ndarray:
    cells = []
    for key, clean, warped, mask, outputs in tiles:
        k = len(mask) // 2
        cells += [(f"{key[:24]} V1 (answer)", clean[k]), ("V1' + holes", overlay_mask(warped[k], mask[k]))]
        cells += [(f"{method} (blended)", outputs[method][k]) for method in METHODS]
    return contact_sheet(cells, columns=2 + len(METHODS))
