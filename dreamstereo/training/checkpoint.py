"""Training checkpoints: written atomically to a local folder or S3, found again by ``resume=latest|PATH``.

A checkpoint is a folder ``step-NNNNNNNN/``:

``adapter_model.safetensors``  LoRA weights in peft layout plus ``patch_embedding.weight``/``.bias``
``adapter_config.json``        the peft ``LoraConfig``
``prompt_embedding.safetensors`` the stored empty-prompt embedding
``training_state.pt``          optimizer, LR scheduler, RNG states and data-stream positions of every rank, step
``config.yaml``                the resolved ``TrainConfig`` (no credentials: those never enter a config)
``meta.json``                  step, samples, base model, versions; written last = the commit marker

Locally the folder is assembled under a temporary name and renamed (atomic); a folder of the same step is
first renamed aside and deleted only after the new one is in place (a crash between the two renames leaves
the old one as ``.step-NNNNNNNN.old-PID``, never deleted). On S3 every object appears whole when its PUT
completes and ``meta.json`` is uploaded last, so a folder without it is ignored and overwritten by the next
save (as the generation job's shards do with their stats files); an existing checkpoint of the same step
loses its ``meta.json`` before any new file is uploaded, so it is never seen half old, half new.

A store belongs to one run: ``train`` refuses to start a new run (no ``resume``) in a store that holds
committed checkpoints, unless ``overwrite=true`` clears them first (``check_fresh_start``, ``clear``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


class CheckpointConflict(ValueError):
    """A new run pointed at a store that holds another run's checkpoints."""


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
        """Commit the files of ``folder`` (``meta.json`` among them) as the checkpoint of ``step``; a committed
        checkpoint of the same step (a rerun) is replaced: locally it is renamed aside and deleted only once
        the new one is in place; on S3 it is uncommitted (``meta.json`` deleted) before any new file lands, so
        old and new files never mix under one commit marker."""
        names = sorted(p.name for p in folder.iterdir())
        if META_FILE not in names:
            raise ValueError(f"checkpoint folder {folder} lacks {META_FILE}")
        if self.is_s3:
            prefix = f"{step_dir(step)}/"
            old = self.storage.list(prefix)
            if old:  # uncommit the old checkpoint first, then drop what the new one will not overwrite
                self.storage.delete(prefix + META_FILE)
                for key in old:
                    if key[len(prefix):] not in names:
                        self.storage.delete(key)
            for name in [n for n in names if n != META_FILE] + [META_FILE]:  # the marker last
                self.storage.upload_file(prefix + name, folder / name)
        else:
            final = Path(self.uri) / step_dir(step)
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
            aside = final.parent / f".{final.name}.old-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(aside, ignore_errors=True)
            shutil.copytree(folder, staging)
            if final.exists():  # an uncommitted leftover, or a rerun of the same step: renamed aside, not deleted
                os.rename(final, aside)
            os.rename(staging, final)
            shutil.rmtree(aside, ignore_errors=True)
        return self.uri_of(step)

    def delete(self, step: int) -> None:
        """Delete the checkpoint of ``step``; its commit marker goes first."""
        if self.is_s3:
            keys = self.storage.list(f"{step_dir(step)}/")
            for key in [f"{step_dir(step)}/{META_FILE}"] + [k for k in keys if not k.endswith(META_FILE)]:
                self.storage.delete(key)
        else:
            path = Path(self.uri) / step_dir(step)
            (path / META_FILE).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` committed checkpoints (0 = keep all); the marker goes first."""
        if keep <= 0:
            return
        for step in self.steps()[:-keep]:
            self.delete(step)

    def clear(self) -> None:
        """Delete every committed checkpoint (``overwrite=true``)."""
        for step in self.steps():
            self.delete(step)


def check_fresh_start(store: CheckpointStore, *, resume: str | None, overwrite: bool) -> None:
    """A run without ``resume`` must not write into a store that holds another run's checkpoints: ``prune``
    would delete the new run's checkpoints first and ``resume=latest`` would find the old run's.

    Raises:
        CheckpointConflict: committed checkpoints exist, no ``resume`` and no ``overwrite``.
    """
    if resume is not None or overwrite:
        return
    steps = store.steps()
    if steps:
        raise CheckpointConflict(
            f"{store.uri} already holds committed checkpoints of another run (steps {steps[0]}..{steps[-1]}): "
            f"pass resume=latest to continue it, overwrite=true to delete them, or choose a new output_dir / "
            f"checkpoint_uri")


def check_committed(uri: str, s3: S3Config | None = None) -> None:
    """Raise ``StorageError`` unless ``uri`` is a committed checkpoint folder (nothing is downloaded)."""
    if not uri.startswith("s3://"):
        if not (Path(uri) / META_FILE).is_file():
            raise StorageError(f"{uri!r} is not a committed checkpoint folder (no {META_FILE}); give a "
                               f"checkpoints/step-NNNNNNNN folder or resume=latest")
        return
    if not open_storage(uri, s3).exists(META_FILE):
        raise StorageError(f"{uri!r} is not a committed checkpoint (no {META_FILE})")


@contextmanager
def fetched(uri: str, s3: S3Config | None = None) -> Iterator[Path]:
    """A committed checkpoint folder as a local path for the ``with`` block: a local one as it is, an
    ``s3://`` one downloaded once into a temporary folder that is deleted when the block ends.

    Raises:
        StorageError: no committed checkpoint at ``uri``.
    """
    check_committed(uri, s3)
    if not uri.startswith("s3://"):
        yield Path(uri)
        return
    storage = open_storage(uri, s3)
    with tempfile.TemporaryDirectory(prefix="dreamstereo-ckpt-") as tmp:
        local = Path(tmp)
        for key in storage.list(""):
            if "/" not in key:
                (local / key).write_bytes(storage.read_bytes(key))
        yield local


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
    check_committed(resume, store.s3)  # fails here, before any work, if it is not a committed checkpoint
    return resume


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META_FILE).read_text())
