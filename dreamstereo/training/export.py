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

from dreamstereo import __version__, toy_models
from dreamstereo.io.storage import S3Config
from dreamstereo.models import wan_inpaint as wan
from dreamstereo.training import checkpoint as ckpt

logger = logging.getLogger(__name__)


def export_model(checkpoint: str, out: str | Path, *, base: str | None = None, s3: S3Config | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write the merged model of ``checkpoint`` (local or ``s3://``) to ``out``; returns ``out``.

    Args:
        base: the base model folder; None = the one recorded in the checkpoint's ``meta.json``.

    Raises:
        StorageError: ``checkpoint`` is not a committed checkpoint (``CheckpointError``: one of its files is
            missing or not what its name says; nothing in it is unpickled). WeightsError: the base is missing.
    """
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
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (transformer if dtype == torch.float32 else transformer.to(dtype)).save_pretrained(out / "transformer")
        vae_src = wan.model_folder(base) / "vae"
        if vae_src.is_dir():
            shutil.copytree(vae_src, out / "vae", dirs_exist_ok=True)
        shutil.copyfile(folder / wan.PROMPT_EMBEDDING_FILE, out / wan.PROMPT_EMBEDDING_FILE)
        wan.write_model_info(out, {"checkpoint": checkpoint, "step": meta.get("step"), "base": base,
                                   "lora_rank": adapter["r"], "lora_alpha": adapter["lora_alpha"],
                                   "in_channels": wan.INPAINT_IN_CHANNELS,
                                   "dtype": str(dtype).removeprefix("torch."), "package_version": __version__,
                                   **({"smoke_test": note} if note else {})})
    logger.info("exported %s (step %s) -> %s", checkpoint, meta.get("step"), out)
    if note:
        logger.warning("%s: %s", out, note)
    return out
