"""The ``dreamstereo`` command line: ``dreamstereo <command> [options] [key=value ...]``.

Every command takes ``--config FILE.yaml`` (repeatable) and ``key=value`` overrides of its schema
(:data:`SCHEMAS`). Bad input ends with exit status 2 and one line on stderr: every error that is the user's
to fix is a :class:`~dreamstereo.types.UserError` (or an OSError), mapped in one place (:func:`main`);
anything else is a bug and keeps its traceback.

Each command imports its module when it runs, not at the top of this file: they import torch, Ray and
diffusers (seconds), and ``--help``, ``--version`` and usage errors should answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from dreamstereo import __version__
from dreamstereo.types import USER_ERRORS, DepthBackendName, Direction

logger = logging.getLogger("dreamstereo")

# Command -> "module:Class" of the schema its config files and overrides fill (``configs/<command>/*.yaml``).
SCHEMAS = {
    "pbdp": "dreamstereo.pbdp:PbdpConfig",
    "process": "dreamstereo.pipeline.process:ProcessConfig",
    "generate": "dreamstereo.pipeline.job:GenerateConfig",
    "warp-eval": "dreamstereo.warp_eval:WarpEvalConfig",
    "convert": "dreamstereo.inference.convert:ConvertConfig",
    "train": "dreamstereo.training.config:TrainConfig",
    "evaluate": "dreamstereo.inference.evaluate:EvaluateConfig",
    "demo": "dreamstereo.demo:DemoConfig",
    "report": "dreamstereo.report:ReportConfig",
}
DEPTH_CHOICES = [name.value for name in DepthBackendName]


def schema(command: str) -> type:
    """The schema class of ``command`` (imported on first use)."""
    module, _, name = SCHEMAS[command].partition(":")
    return getattr(importlib.import_module(module), name)


def _load(command: str, args, overrides: list[str] = (), files: list[str] = ()):
    """The command's resolved config: schema defaults <- ``files`` <- ``--config`` files <- overrides."""
    from dreamstereo.config import load_config

    return load_config(schema(command), [*files, *args.config], [*args.overrides, *overrides])


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML file overriding the defaults (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. warp.delta=2")


class _Parser(argparse.ArgumentParser):
    """Usage errors end like every other bad input: one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dreamstereo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dreamstereo {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("pbdp", help="double projection of an image or video with a given disparity")
    p.add_argument("input", help="image (.png/.jpg/...) or video file")
    p.add_argument("--disparity", required=True, help=".npy/.npz/.pfm, or a PNG with --disparity-scale")
    p.add_argument("--direction", choices=[d.value for d in Direction], help="where view 2 lies (default: config)")
    p.add_argument("--disparity-scale", type=float, help="pixels per stored unit (e.g. 0.5 for Middlebury)")
    p.add_argument("--out", required=True, help="output folder")
    _add_config_args(p)

    p = sub.add_parser("process", help="the clip chain on one video: samples, verdicts, preview")
    p.add_argument("video", help="a video file")
    p.add_argument("--out", required=True, help="output folder for <key>.<ext> members and preview.png")
    p.add_argument("--depth", choices=DEPTH_CHOICES,
                   help="depth backend (default: config)")
    _add_config_args(p)

    p = sub.add_parser("generate", help="the Ray job: a video list -> WebDataset shards in a folder or S3")
    p.add_argument("--input", required=True, help="folder, glob, or .csv/.parquet manifest (local or s3://)")
    p.add_argument("--output", required=True, help="local folder or s3://bucket/prefix")
    p.add_argument("--depth", choices=DEPTH_CHOICES,
                   help="depth backend (default: config)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--retry-failed", action="store_true",
                   help="also redo committed shards with samples that failed with a retryable code")
    _add_config_args(p)

    p = sub.add_parser("warp-eval", help="mask quality of each warp method on real stereo pairs")
    p.add_argument("folder", help="folder of pair folders laid out like Middlebury 2005/2006")
    p.add_argument("--json", default="warp-eval.json", help="where to write the table as JSON")
    _add_config_args(p)

    p = sub.add_parser("convert", help="a monocular video -> a stereo video (side-by-side, top-bottom, anaglyph)")
    p.add_argument("input", help="a video file")
    p.add_argument("output", help="the stereo video to write (.mp4)")
    p.add_argument("--format", choices=["sbs", "half-sbs", "tb", "half-tb", "anaglyph"],
                   help="stereo layout (default: config, sbs)")
    p.add_argument("--depth", choices=DEPTH_CHOICES,
                   help="depth backend (default: config; oracle reads <video stem>.disparity.npz)")
    p.add_argument("--preview", action="store_true", help="also write <output stem>.preview.png (a contact sheet)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="inpainting model folder (`dreamstereo export` output, or toy: random weights, a smoke "
                        "test); without it OpenCV fills the holes")
    _add_config_args(p)

    p = sub.add_parser("train", help="LoRA training of the stereo inpainter on shards (Stage 1 or Stage 2)")
    p.add_argument("train_config", metavar="CONFIG", help="YAML preset, e.g. configs/train/stage1.yaml")
    _add_config_args(p)

    p = sub.add_parser("export", help="merge a training checkpoint's LoRA into a standalone model folder")
    p.add_argument("checkpoint", help="a checkpoints/step-NNNNNNNN folder (local or s3://)")
    p.add_argument("--out", required=True, help="output model folder (transformer/, vae/, prompt embedding)")
    p.add_argument("--base", help="base model folder, or toy (default: the one recorded in the checkpoint)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved transformer (default float32)")

    p = sub.add_parser("evaluate", help="score an inpainting checkpoint on held-out PBDP pairs (dense, SASI, OpenCV)")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="model folder (`dreamstereo export` output, or toy: random weights, a smoke test)")
    p.add_argument("--shards", required=True, help="a generate output (local or s3://), a brace pattern or a .tar")
    p.add_argument("--json", metavar="OUT", help="write the report here, plus OUT.md (table) and OUT.png (contact sheet)")
    _add_config_args(p)

    p = sub.add_parser("report", help="an HTML report of a generate output: counts, score histograms, gallery")
    p.add_argument("dst", metavar="DST", help="a `dreamstereo generate` output (local folder or s3://bucket/prefix)")
    p.add_argument("--out", required=True, help="folder for index.html and its images (img/)")
    _add_config_args(p)

    p = sub.add_parser("demo", help="the whole mission on built-in scenes and toy models: data, training, a stereo "
                                     "video, evaluation, report")
    p.add_argument("--out", default="demo-output", help="output folder (default ./demo-output)")
    p.add_argument("--only", choices=["all", "data"], help="data: the data side only, about a minute (default: all)")
    _add_config_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after the options: collect the ones argparse left over.
    try:
        args, extra = parser.parse_known_args(argv)
        stray = [a for a in extra if "=" not in a or a.startswith("-")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
    except SystemExit as exc:  # usage errors (one line, status 2) and --help / --version (status 0)
        return int(exc.code or 0)
    args.overrides = list(getattr(args, "overrides", [])) + extra
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _COMMANDS[args.command](args)
    except USER_ERRORS as exc:  # bad input, a bad setting, a full or unreachable output, a missing weight
        print(f"dreamstereo {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _check_output_folder(path: str) -> None:
    """Fail before any work if ``path`` cannot become a writable folder."""
    from dreamstereo.io.media import MediaError

    out = Path(path)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if out.exists() and not out.is_dir():
        raise MediaError(f"output {path!r} exists and is not a folder")
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise MediaError(f"output {path!r}: {str(existing)!r} is not a writable folder")


def _check_output_file(path: str) -> None:
    """Fail before any work if ``path`` cannot be written as a file."""
    from dreamstereo.io.media import MediaError

    out = Path(path)
    if out.is_dir():
        raise MediaError(f"output {path!r} is a folder, need a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise MediaError(f"output {path!r}: {str(parent)!r} is not a writable folder")


def _cmd_pbdp(args) -> int:
    from dreamstereo.pbdp import run_pbdp

    overrides = [f"direction={args.direction}"] if args.direction else []
    overrides += [f"disparity_scale={args.disparity_scale}"] if args.disparity_scale is not None else []
    cfg = _load("pbdp", args, overrides)
    _check_output_folder(args.out)
    manifest = run_pbdp(args.input, args.disparity, args.out, cfg)
    print(f"wrote {args.out}: {', '.join(manifest['outputs'].values())} "
          f"(mask1 {100 * manifest['mask1_ratio']:.2f}%, round trip {manifest['roundtrip_psnr_db']:.2f} dB)")
    return 0


def _cmd_process(args) -> int:
    from dreamstereo.pipeline.process import run_process

    cfg = _load("process", args, [f"depth.backend={args.depth}"] if args.depth else [])
    _check_output_folder(args.out)
    manifest = run_process(args.video, args.out, cfg)
    print(f"{args.video}: {manifest['kept']} of {len(manifest['clips'])} clip(s) kept -> {args.out}")
    return 0


def _cmd_generate(args) -> int:
    from dreamstereo.pipeline.job import run_generate

    overrides = [f"process.depth.backend={args.depth}"] if args.depth else []
    overrides += [f"ray_address={args.address}"] if args.address else []
    cfg = _load("generate", args, overrides)
    summary = run_generate(args.input, args.output, cfg, retry_failed=args.retry_failed)
    return 1 if summary["failed_shards"] else 0


def _cmd_warp_eval(args) -> int:
    from dreamstereo.config import config_hash
    from dreamstereo.io import media
    from dreamstereo.warp_eval import evaluate_folder, format_table

    cfg = _load("warp-eval", args)
    _check_output_file(args.json)
    opts = cfg.warp.options()
    opts.pop("method")
    rows = evaluate_folder(args.folder, cfg.methods, **opts)
    print(format_table(rows))
    report = {"version": __version__, "folder": str(args.folder), "config_hash": config_hash(cfg),
              "delta": cfg.warp.delta, "hole_margin": cfg.warp.hole_margin, "rows": rows}
    media.write_text(args.json, json.dumps(report, indent=2))  # all-or-nothing; a full disk names the file
    print(f"wrote {args.json}")
    return 0


def _cmd_report(args) -> int:
    from dreamstereo.report import build_report

    cfg = _load("report", args)
    _check_output_folder(args.out)
    print(build_report(args.dst, args.out, cfg))
    return 0


def _cmd_demo(args) -> int:
    from dreamstereo.demo import run_demo

    cfg = _load("demo", args, [f"only={args.only}"] if args.only else [])
    _check_output_folder(args.out)
    result = run_demo(args.out, cfg)
    width = max(len(path) for path, _ in result["open"])
    print(f"demo: done in {result['seconds']:.0f} s ({result['generate']['samples']} pairs). Open:")
    print("\n".join(f"  {path:<{width}}  {what}" for path, what in result["open"]))
    if result.get("smoke_test"):
        print(f"  (models: {result['smoke_test']})")
    return 1 if result["generate"]["failed_shards"] else 0


def _cmd_convert(args) -> int:
    from dreamstereo.inference.convert import InpaintMethod, convert_video
    from dreamstereo.inference.inpaint import StereoInpainter
    from dreamstereo.io.media import MediaError, probe_video

    overrides = [f"format={args.format}"] if args.format else []
    overrides += [f"depth.backend={args.depth}"] if args.depth else []
    cfg = _load("convert", args, overrides)
    if Path(args.output).suffix.lower() != ".mp4":
        raise MediaError(f"output {args.output!r} must be an .mp4 file")
    _check_output_file(args.output)
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise MediaError(f"output {args.output!r} is the input")
    preview = Path(args.output).with_suffix(".preview.png") if args.preview else None
    probe_video(args.input)  # a missing or unreadable input fails before a model loads
    inpainter = None
    if args.checkpoint and cfg.inpaint is not InpaintMethod.OPENCV:
        inpainter = StereoInpainter(args.checkpoint, cfg.model, cfg.device)
    convert_video(args.input, args.output, cfg, inpainter=inpainter, preview=preview, progress=not args.quiet)
    return 0


def _cmd_train(args) -> int:
    from dreamstereo.training.ray_train import run_ray_training
    from dreamstereo.training.train import check_config, train

    cfg = _load("train", args, files=[args.train_config])
    check_config(cfg)
    _check_output_folder(cfg.output_dir)
    if cfg.ray.num_workers > 0:
        result = run_ray_training(cfg)
    else:
        result = train(cfg)
        result = {"step": result["step"], "loss": result["losses"][-1] if result["losses"] else None}
    loss = result.get("loss")
    print(f"trained to step {result.get('step')} (last loss {loss if loss is None else round(loss, 4)}): "
          f"{cfg.output_dir}/metrics.jsonl, checkpoints in {cfg.checkpoint_uri or cfg.output_dir + '/checkpoints'}")
    return 0


def _cmd_export(args) -> int:
    import torch

    from dreamstereo.training.export import export_model

    _check_output_folder(args.out)
    out = export_model(args.checkpoint, args.out, base=args.base, dtype=getattr(torch, args.dtype))
    print(f"wrote {out}: transformer/ (LoRA merged), vae/, prompt_embedding.safetensors")
    return 0


def _cmd_evaluate(args) -> int:
    from dreamstereo.inference.evaluate import evaluate

    cfg = _load("evaluate", args)
    if args.json:
        _check_output_file(args.json)
    evaluate(args.checkpoint, args.shards, cfg, json_out=args.json)
    return 0


_COMMANDS = {"pbdp": _cmd_pbdp, "process": _cmd_process, "generate": _cmd_generate, "warp-eval": _cmd_warp_eval,
             "convert": _cmd_convert, "evaluate": _cmd_evaluate, "train": _cmd_train, "export": _cmd_export, "demo": _cmd_demo,
             "report": _cmd_report}

if __name__ == "__main__":
    sys.exit(main())
