"""Training checkpoints: written atomically to a local folder or S3, found again by ``resume=latest|PATH``.

A checkpoint is a folder ``step-NNNNNNNN/``:

``adapter_model.safetensors``  LoRA weights in peft layout plus ``patch_embedding.weight``/``.bias``
``adapter_config.json``        the peft ``LoraConfig``
``prompt_embedding.safetensors`` the stored empty-prompt embedding
``training_state.pt``          optimizer, LR scheduler, RNG states and data-stream positions of every rank, step:
                               tensors and plain values only, read back with ``torch.load(weights_only=True)``
``config.yaml``                the resolved ``TrainConfig`` (no credentials: those never enter a config)
``meta.json``                  step, samples, base model, versions; written last = the commit marker

Nothing in a checkpoint can run code when it is read: the tensors are safetensors, the rest JSON or YAML, and
``training_state.pt`` is a torch zip file read by torch's restricted unpickler (tensors, containers, numbers and
strings; any other object, such as a planted ``__reduce__`` payload, stops the load before it is built). Older
checkpoints pickled numpy's RNG state in it; they are refused (``CheckpointError``), and ``model.init_from``
still starts a run from their weights.

Locally the folder is assembled under a temporary name and renamed (atomic); a folder of the same step is
first renamed aside and deleted only after the new one is in place. A save killed on the way leaves
``.step-NNNNNNNN.tmp-PID`` (a partial copy) or, between the two renames, ``.step-NNNNNNNN.old-PID`` (the
previous checkpoint of that step, then its only copy): ``clean_leftovers`` deletes the first and puts the
second back at the next start. On S3 every object appears whole when its PUT completes and ``meta.json`` is
uploaded last, so a folder without it is ignored, overwritten by the next save of its step (as the generation
job's shards do with their stats files) and deleted at the next start; an existing checkpoint of the same
step loses its ``meta.json`` before any new file is uploaded, so it is never seen half old, half new.

A store belongs to one run: ``train`` refuses to start a new run (no ``resume``) in a store that holds
committed checkpoints, unless ``overwrite=true`` clears them first (``check_fresh_start``, ``clear``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dreamstereo.io import media
from dreamstereo.io.storage import S3Config, StorageError, open_storage, refused_write
from dreamstereo.models import wan_inpaint as wan
from dreamstereo.types import UserError

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"  # the commit marker, written last
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_LEFTOVER = re.compile(r"^\.(step-\d{8})\.(tmp|old)-\d+$")  # a save killed between its renames (see save)
STATE_FORMAT = 2  # training_state.pt of tensors and plain values (1: numpy RNG state pickled, refused)
_STATE_KEYS = ("format", "optimizer", "scheduler", "step", "samples", "rng", "data")


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointConflict(UserError, ValueError):
    """A new run pointed at a store that holds another run's checkpoints."""


class CheckpointError(StorageError):
    """A checkpoint file that is damaged, of an older format, or holds more than data: it is not loaded."""


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
            shutil.rmtree(staging, ignore_errors=True)
            try:  # a full disk: nothing half-written stays, the old checkpoint stays, the message names the step
                staging.mkdir()
                for name in names:
                    shutil.copyfile(folder / name, staging / name)
                media.replace_path(staging, final)  # an uncommitted leftover or a rerun's step: replaced whole
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise refused_write(f"checkpoint {str(final)!r}", exc) from None
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


def check_location(store: CheckpointStore) -> None:
    """Fail at start, not at the first save, when a local store cannot become a folder: the path, or the
    nearest part of it that exists, is a file, or that folder is not writable.

    Raises:
        CheckpointError: naming the path and what it is.
    """
    if store.is_s3:
        return
    path = Path(store.uri)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {str(existing)!r}, which is a file"
        raise CheckpointError(f"checkpoint folder {store.uri!r} {where}: give checkpoint_uri=DIR (a folder) or an "
                              f"s3:// prefix, or another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"checkpoint folder {store.uri!r}: {str(existing)!r} is not writable")


def clean_leftovers(store: CheckpointStore) -> list[str]:
    """Tidy what killed saves left in a local store; rank 0 calls it at start, before it looks for ``latest``.

    Every leftover goes, whatever PID its name carries: only rank 0 writes to a store, a store belongs to one
    run (``check_fresh_start``), and a PID says nothing once the writer ran on another node or in another
    container (where PIDs repeat), so "its process is gone" cannot be told from the name. A
    ``.step-NNNNNNNN.old-PID`` that is a committed checkpoint while ``step-NNNNNNNN`` is not (the save died
    between its two renames) is renamed back, so no committed step is lost; every other ``.tmp-`` / ``.old-``
    folder is deleted. On S3 a killed save leaves a ``step-NNNNNNNN/`` prefix without ``meta.json``: its
    objects are deleted.

    Returns:
        What was done, one line per leftover (also logged).
    """
    if store.is_s3:
        keys = store.storage.list("")
        steps = {key.split("/")[0] for key in keys if "/" in key and _STEP_DIR.match(key.split("/")[0])}
        committed = {key.split("/")[0] for key in keys if key.count("/") == 1 and key.endswith(f"/{META_FILE}")}
        done = []
        for name in sorted(steps - committed):
            for key in [k for k in keys if k.startswith(f"{name}/")]:
                store.storage.delete(key)
            done.append(f"deleted {name}/ (uncommitted: left by a save that did not finish)")
        for line in done:
            logger.warning("checkpoint store %s: %s", store.uri, line)
        return done
    root = Path(store.uri)
    if not root.is_dir():
        return []
    done = []
    leftovers = sorted((p for p in root.iterdir() if _LEFTOVER.match(p.name) and p.is_dir()),
                       key=lambda p: (_LEFTOVER.match(p.name).group(2) != "old", p.name))  # .old- first
    for path in leftovers:
        name, kind = _LEFTOVER.match(path.name).groups()
        final = root / name
        if kind == "old" and (path / META_FILE).is_file() and not (final / META_FILE).is_file():
            shutil.rmtree(final, ignore_errors=True)  # an uncommitted partial copy, if any
            os.rename(path, final)
            done.append(f"restored {final.name} from {path.name} (a save stopped between its renames)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"deleted {path.name} (left by a save that did not finish)")
    for line in done:
        logger.warning("checkpoint store %s: %s", store.uri, line)
    return done


# ----------------------------------------------------------------------------------------------------
# Reading the files of a checkpoint: data only, and a damaged or foreign file is named, not loaded


def _refuse(uri: str, name: str, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {uri!r}: {name} {what}")


def read_json(folder: Path, name: str, uri: str) -> dict:
    """A JSON object file of a checkpoint (``meta.json``, ``adapter_config.json``).

    Raises:
        CheckpointError: missing, not JSON or not an object.
    """
    try:
        value = json.loads((folder / name).read_text())
    except FileNotFoundError:
        raise _refuse(uri, name, "is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(uri, name, f"is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _refuse(uri, name, f"holds a JSON {type(value).__name__}, not an object")
    return value


def read_meta(folder: Path, uri: str | None = None) -> dict:
    return read_json(folder, META_FILE, uri or str(folder))


def load_tensors(folder: Path, name: str, uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file of a checkpoint (``adapter_model.safetensors``).

    Raises:
        CheckpointError: missing or not a safetensors file.
    """
    try:
        return load_file(str(folder / name))
    except FileNotFoundError:
        raise _refuse(uri, name, "is missing") from None
    except SafetensorError as exc:
        raise _refuse(uri, name, f"is not a safetensors file ({exc})") from None


def load_prompt(folder: Path, uri: str) -> tuple[torch.Tensor, str]:
    """The stored empty-prompt embedding of a checkpoint and its source (``models.wan_inpaint``'s file).

    Raises:
        CheckpointError: missing or not a prompt-embedding safetensors file.
    """
    name = wan.PROMPT_EMBEDDING_FILE
    try:
        return wan.load_prompt_embedding(folder / name)
    except FileNotFoundError:
        raise _refuse(uri, name, "is missing") from None
    except SafetensorError as exc:
        raise _refuse(uri, name, f"is not a prompt-embedding safetensors file ({exc})") from None


def _plain(value) -> bool:
    """Whether ``value`` is made of tensors, containers, numbers, strings and None only."""
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))


def load_training_state(folder: Path, uri: str) -> dict:
    """``training_state.pt`` as written by ``train.write_checkpoint``, read without running any code: it must
    be a torch zip file (a bare pickle is refused unread) whose pickle names no class or function beyond
    torch's ``weights_only`` allowlist, and what comes out must be plain data of this format.

    Raises:
        CheckpointError: a damaged file, an older format (numpy RNG state pickled), or anything else; the
            message says to start from the weights with ``model.init_from`` instead.
    """
    path = folder / STATE_FILE
    instead = (f": it is not loaded (unpickling it could run code); start from its weights with "
               f"model.init_from={uri} and a new output_dir (optimizer state and data position restart)")
    if not path.is_file():
        raise _refuse(uri, STATE_FILE, "is missing")
    if not zipfile.is_zipfile(path):
        raise _refuse(uri, STATE_FILE, "is not a torch zip file" + instead)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = str(exc).strip().splitlines()[-3:]
        detail = next((line for line in found if "GLOBAL" in line), "objects beyond tensors and plain values")
        raise _refuse(uri, STATE_FILE, f"holds more than data (written before dreamstereo stored it as plain "
                                       f"values, or altered: {detail.strip()})" + instead) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:  # torch's reader on a damaged zip
        raise _refuse(uri, STATE_FILE, f"is damaged ({str(exc).splitlines()[0]})" + instead) from None
    if not (isinstance(state, dict) and _plain(state) and state.get("format") == STATE_FORMAT
            and all(k in state for k in _STATE_KEYS)):
        raise _refuse(uri, STATE_FILE, f"is not a training state of format {STATE_FORMAT}" + instead)
    return state


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or infinity."""
    with torch.no_grad():
        return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
