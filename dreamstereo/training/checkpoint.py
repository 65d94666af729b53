"""Training checkpoints: written atomically to a local folder or S3, found again by ``resume=latest|PATH``.

A checkpoint is a folder ``step-NNNNNNNN/``:

``adapter_model.safetensors``  LoRA weights in peft layout plus ``patch_embedding.weight``/``.bias``
``adapter_config.json``        the peft ``LoraConfig``
``prompt_embedding.safetensors`` the stored empty-prompt embedding
``training_state.pt``          optimizer, LR scheduler, RNG states, step, data-stream positions
``config.yaml``                the resolved ``TrainConfig`` (no credentials: those never enter a config)
``meta.json``                  step, samples, base model, versions; written last = the commit marker

Locally the folder is assembled under a temporary name and renamed (atomic); on S3 every object appears
whole when its PUT completes and ``meta.json`` is uploaded last, so a folder without it is ignored and
overwritten by the next save (as the generation job's shards do with their stats files).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from dreamstereo.pipeline.io.storage import S3Config, StorageError, open_storage

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"  # the commit marker, written last
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointStore:
    """Checkpoints under a local folder or ``s3://bucket/prefix``."""

    def __init__(self, uri: str, s3: S3Config | None = None):
        self.uri = uri.rstrip("/")
        self.s3 = s3
        self.is_s3 = uri.startswith("s3://")
        self.storage = open_storage(self.uri, s3)

    def steps(self) -> list[int]:
        """Steps of committed checkpoints (their ``meta.json`` exists), ascending."""
        if not self.is_s3:
            root = Path(self.uri)
            if not root.is_dir():
                return []
            return sorted(int(m.group(1)) for p in root.iterdir()
                          if (m := _STEP_DIR.match(p.name)) and (p / META_FILE).is_file())
        steps = set()
        for key in self.storage.list(""):
            parts = key.split("/")
            if len(parts) == 2 and parts[1] == META_FILE and (m := _STEP_DIR.match(parts[0])):
                steps.add(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def uri_of(self, step: int) -> str:
        return f"{self.uri}/{step_dir(step)}"

    def save(self, step: int, folder: Path) -> str:
        """Commit the files of ``folder`` (``meta.json`` among them) as the checkpoint of ``step``."""
        names = sorted(p.name for p in folder.iterdir())
        if META_FILE not in names:
            raise ValueError(f"checkpoint folder {folder} lacks {META_FILE}")
        if self.is_s3:
            for name in [n for n in names if n != META_FILE] + [META_FILE]:  # the marker last
                self.storage.upload_file(f"{step_dir(step)}/{name}", folder / name)
        else:
            final = Path(self.uri) / step_dir(step)
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(folder, staging)
            if final.exists():  # an uncommitted leftover, or a rerun of the same step
                shutil.rmtree(final)
            os.rename(staging, final)
        return self.uri_of(step)

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` committed checkpoints (0 = keep all); the marker goes first."""
        if keep <= 0:
            return
        for step in self.steps()[:-keep]:
            if self.is_s3:
                keys = self.storage.list(f"{step_dir(step)}/")
                for key in [f"{step_dir(step)}/{META_FILE}"] + [k for k in keys if not k.endswith(META_FILE)]:
                    self.storage.delete(key)
            else:
                path = Path(self.uri) / step_dir(step)
                (path / META_FILE).unlink(missing_ok=True)
                shutil.rmtree(path, ignore_errors=True)


def fetch(uri: str, s3: S3Config | None = None) -> Path:
    """A committed checkpoint folder as a local path (an ``s3://`` checkpoint is downloaded to a temp dir).

    Raises:
        StorageError: no committed checkpoint at ``uri``.
    """
    if not uri.startswith("s3://"):
        path = Path(uri)
        if not (path / META_FILE).is_file():
            raise StorageError(f"{uri!r} is not a committed checkpoint folder (no {META_FILE}); give a "
                               f"checkpoints/step-NNNNNNNN folder or resume=latest")
        return path
    storage = open_storage(uri, s3)
    if not storage.exists(META_FILE):
        raise StorageError(f"{uri!r} is not a committed checkpoint (no {META_FILE})")
    local = Path(tempfile.mkdtemp(prefix="dreamstereo-ckpt-"))
    for key in storage.list(""):
        if "/" not in key:
            (local / key).write_bytes(storage.read_bytes(key))
    return local


def resolve_resume(resume: str | None, store: CheckpointStore) -> str | None:
    """The checkpoint URI to resume from: ``None`` -> none; ``latest`` -> the newest committed one, or none
    with a warning when there is none yet; anything else -> that path, which must be a committed checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        step = store.latest()
        if step is None:
            logger.warning("resume=latest: no checkpoint under %s yet, starting a new run", store.uri)
            return None
        return store.uri_of(step)
    fetch(resume, store.s3)  # fails here, before any work, if it is not a committed checkpoint
    return resume


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META_FILE).read_text())
