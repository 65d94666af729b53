"""``dreamstereo export``: merge a checkpoint's LoRA into the base weights -> a standalone model folder.

The folder holds ``transformer/`` (36 input channels, LoRA folded in, diffusers format), ``vae/`` (copied
from the base), ``prompt_embedding.safetensors`` and ``dreamstereo_model.json`` (where it came from), so
``models.wan_inpaint.load_inpaint_model``/``load_vae`` read it with no peft, umT5 or base folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from dreamstereo import __version__, toy_models
from dreamstereo.io import media
from dreamstereo.io.storage import S3Config, refused_write
from dreamstereo.models import wan_inpaint as wan
from dreamstereo.training import checkpoint as ckpt
from dreamstereo.types import UserError

logger = logging.getLogger(__name__)


def export_model(checkpoint: str, out: str | Path, *, base: str | None = None, s3: S3Config | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write the merged model of ``checkpoint`` (local or ``s3://``) to ``out``; returns ``out``.

    The model is written in a hidden folder inside ``out`` and moved into place when whole (``io.media.
    staged_folder``), so a full disk or a kill leaves no half-written model; an earlier export's files in ``out``
    are replaced.

    Args:
        base: the base model folder; None = the one recorded in the checkpoint's ``meta.json``.

    Raises:
        StorageError: ``checkpoint`` is not a committed checkpoint (``CheckpointError``: one of its files is
            missing or not what its name says; nothing in it is unpickled). WeightsError: the base is missing.
        UserError: ``out`` holds files that are not an exported model. UnwritableStorageError: a full disk.
    """
    out = Path(out)
    _check_replaceable(out)
    with ckpt.fetched(checkpoint, s3) as folder:  # an s3:// checkpoint: a temporary copy, deleted after
        meta = ckpt.read_meta(folder, checkpoint)
        base = base or meta.get("base")
        note = wan.smoke_test(base) or (toy_models.SMOKE_TEST if meta.get("smoke_test") else None)
        if not base:
            raise wan.WeightsError(f"checkpoint {checkpoint!r} records no base model: give --base, "
                                   f"{wan.DOWNLOAD_HINT}")
        # Every file is read and checked before any model is built.
        adapter = ckpt.read_json(folder, ckpt.ADAPTER_CONFIG_FILE, checkpoint)
        rank, alpha = adapter.get("r"), adapter.get("lora_alpha")
        if (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1
                or not isinstance(alpha, (int, float)) or isinstance(alpha, bool)):
            raise ckpt.CheckpointError(f"checkpoint {checkpoint!r}: {ckpt.ADAPTER_CONFIG_FILE} lacks an integer "
                                       f"\"r\" and a number \"lora_alpha\"")
        tensors = ckpt.load_tensors(folder, ckpt.ADAPTER_FILE, checkpoint)
        ckpt.load_prompt(folder, checkpoint)  # a safetensors embedding, not just any file of that name
        transformer = wan.load_inpaint_model(base, dtype=torch.float32)
        targets = adapter.get("target_modules") or list(wan.LORA_TARGETS)
        wan.add_lora(transformer, rank=int(adapter["r"]), alpha=float(adapter["lora_alpha"]), targets=targets)
        try:
            wan.load_trainable_state_dict(transformer, tensors)
        except (RuntimeError, ValueError, KeyError) as exc:  # tensors of another rank or other modules
            raise ckpt.CheckpointError(f"checkpoint {checkpoint!r}: {ckpt.ADAPTER_FILE} does not fit its "
                                       f"{ckpt.ADAPTER_CONFIG_FILE} (r={rank}, targets {targets}): "
                                       f"{str(exc).splitlines()[0][:200]}") from None
        wan.merge_lora(transformer)
        base_vae = wan.model_folder(base) / "vae"
        info = {"checkpoint": checkpoint, "step": meta.get("step"), "base": base, "lora_rank": adapter["r"],
                "lora_alpha": adapter["lora_alpha"], "in_channels": wan.INPAINT_IN_CHANNELS,
                "dtype": str(dtype).removeprefix("torch."), "package_version": __version__,
                **({"smoke_test": note} if note else {})}
        try:  # written in a hidden folder inside out, moved into place when whole (the model info last)
            with media.staged_folder(out, last=(wan.MODEL_INFO_FILE,)) as stage:
                model = transformer if dtype == torch.float32 else transformer.to(dtype)
                model.save_pretrained(stage / "transformer")
                if base_vae.is_dir():
                    (stage / "vae").mkdir()
                    for file in sorted(p for p in base_vae.iterdir() if p.is_file()):
                        shutil.copyfile(file, stage / "vae" / file.name)
                shutil.copyfile(folder / wan.PROMPT_EMBEDDING_FILE, stage / wan.PROMPT_EMBEDDING_FILE)
                wan.write_model_info(stage, info)
        except (OSError, SafetensorError) as exc:  # (safetensors reports a full disk as its own error type)
            raise refused_write(f"the exported model {str(out)!r}", exc) from None
    logger.info("exported %s (step %s) -> %s", checkpoint, meta.get("step"), out)
    if note:
        logger.warning("%s: %s", out, note)
    return out


def _check_replaceable(out: Path) -> None:
    """Refuse, before any work, an ``out`` that is a file or a folder of other things (they would mix)."""
    if out.is_dir():  # (the staging folder of an export killed half-way is no content: the next run clears it)
        content = [p for p in out.iterdir() if not p.name.startswith(media.STAGE_PREFIX)]
        if not content or (out / wan.MODEL_INFO_FILE).is_file():
            return
    if out.exists():
        raise UserError(f"output {str(out)!r} exists and is not an exported model (no {wan.MODEL_INFO_FILE}): give "
                        "a new or empty folder (an earlier export there is replaced)")

