"""``dreamstereo process``: the clip chain (``clip.py``) on one local video, without Ray.

Every clip ends as one line and one manifest entry: kept (members written as ``DIR/<key>.<ext>``),
rejected with a reason and its scores, or failed with an error code. A video that cannot be read at all
ends the command with one line instead (exit status 2) and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from dreamstereo import __version__
from dreamstereo.config import config_hash, to_yaml
from dreamstereo.io import media
from dreamstereo.io.sample import write_sample_files
from dreamstereo.pipeline.clip import ClipConfig, ClipResult, model_relative, oracle_relatives, pair_clip, read_input
from dreamstereo.stages.depth import DepthBackendName, load_backend
from dreamstereo.types import ErrorCode, SampleError, SampleStatus

logger = logging.getLogger(__name__)

# The input cannot be read or is not a video (a decoder crash included): exit 2 with one line, not a record.
UNREADABLE = frozenset({ErrorCode.READ_FAILED, ErrorCode.NOT_A_FILE, ErrorCode.TOO_LARGE, ErrorCode.INVALID_URI,
                        ErrorCode.DECODE_FAILED, ErrorCode.DECODE_CRASHED, ErrorCode.NO_VIDEO_STREAM})


@dataclasses.dataclass
class ProcessConfig(ClipConfig):
    """``dreamstereo process``: the clip chain on one video, without Ray."""

    device: str = "cpu"  # where depth models run: cpu, cuda, cuda:1, ...


def run_process(video: str | Path, out_dir: str | Path, cfg: ProcessConfig, *, echo=print) -> dict:
    """Run the chain on one video; write kept samples, ``preview.png``, ``manifest.json``, ``config.yaml``.

    Raises:
        media.MediaError: the video cannot be read (nothing is written then).
        media.WriteError: the output cannot be written (full, read-only); what ``out_dir`` held is kept.
    """
    start = time.perf_counter()
    video, out_dir = Path(video), Path(out_dir)
    source = str(video.resolve())  # keys and seeds follow the file, not how its path was spelled
    results: list[ClipResult] = []
    probe, clips, depth_weights = None, [], None
    try:  # refuses FIFOs, devices and folders before reading, and files over decode.max_input_mb
        probe, clips = read_input(str(video), None, cfg.decode)
    except SampleError as exc:
        if exc.code in UNREADABLE:
            where = "" if exc.stage == "read" else f"{source!r}: "
            raise media.MediaError(f"{where}{exc.code.value}: {exc.message}") from None
        results.append(ClipResult.from_error(source, 0, exc))
    if clips:
        if cfg.depth.backend is DepthBackendName.ORACLE:
            relatives = oracle_relatives(str(video), None, probe, clips, cfg.depth)
        else:
            backend = load_backend(cfg.depth, cfg.device)
            depth_weights = cfg.depth.weights if cfg.depth.smoke_test else backend.weights  # "toy", not a temp path
            relatives = [model_relative(backend, clip.frames) for clip in clips]
        for index, (clip, relative) in enumerate(zip(clips, relatives)):
            first_ok = not any(r.status is SampleStatus.OK for r in results)
            results.append(pair_clip(clip, index, source, probe, relative, cfg, depth_weights, make_preview=first_ok))
    manifest = {
        "command": "process", "version": __version__, "source": source,
        "probe": dataclasses.asdict(probe) if probe else None, "depth_backend": cfg.depth.backend.value,
        "depth_weights": depth_weights, "config_hash": config_hash(cfg),
        "clips": [{"key": r.key, "clip_index": r.clip_index, "status": r.status.label, "reason": r.reason,
                   "scores": r.scores} for r in results],
        "kept": sum(r.status is SampleStatus.OK for r in results), "seconds": round(time.perf_counter() - start, 3),
        **({"smoke_test": cfg.depth.smoke_test} if cfg.depth.smoke_test else {}),
    }
    _write_output(out_dir, results, echo, manifest=manifest, config=to_yaml(cfg, note=cfg.depth.smoke_test))
    return manifest


def _write_output(out_dir: Path, results: list[ClipResult], echo, *, manifest: dict, config: str) -> None:
    """Members, preview, config and manifest appear together (manifest last) or not at all: a full disk
    leaves the output folder as it was."""
    with media.staged_folder(out_dir) as stage:
        sheet = None
        for result in results:
            if result.members is not None:
                write_sample_files(stage, result.key, result.members)
                sheet = sheet if sheet is not None else result.preview
            detail = f" ({result.reason})" if result.reason else f" (mask {100 * result.scores['mask_ratio']:.1f}%)"
            echo(f"{result.key}: {result.status.label}{detail}")
        if sheet is not None:
            media.write_image(stage / "preview.png", sheet)
        media.write_text(stage / "config.yaml", config)
        media.write_text(stage / "manifest.json", json.dumps(manifest, indent=2))
