"""Structured configs: dataclass schemas in code, YAML files and ``key=value`` overrides on top.

``load_config(schema, yaml_paths, overrides)`` merges ``schema -> YAML files -> dotlist`` with OmegaConf
and returns a real dataclass instance (``__post_init__`` validation runs there). Unknown keys, wrong
types and bad enum values raise ``ConfigError`` naming the key.

Each schema lives beside the code it configures (``stages/*`` for the stage sections, ``pipeline/clip.py``,
``pipeline/job.py``, ``training/config.py``, ...); the command -> schema registry is ``cli.SCHEMAS``. A
schema that renamed a key lists ``MOVED_KEYS = {"old.key": "new.key"}``: the old key keeps working, with a
deprecation warning.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dreamstereo.types import UserError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def load_config(schema: type[T], yaml_paths: list[str | Path] = (), overrides: list[str] = ()) -> T:
    """Merge ``schema`` defaults, YAML files and ``key=value`` overrides into a validated dataclass."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
    moved = getattr(schema, "MOVED_KEYS", {})
    overrides = [_moved_override(item, moved) for item in overrides]
    try:
        merged = OmegaConf.structured(schema)
        for path in yaml_paths:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            try:  # OmegaConf reads YAML with a safe loader: a !!python/... tag is an error, never code
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {str(path)!r} is not plain YAML: "
                                  f"{' '.join(str(exc).split())}") from None
            merged = OmegaConf.merge(merged, _moved_yaml(loaded, moved, path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"config key {key!r}: {msg}" if key else f"config: {msg}") from None
    except ValueError as exc:  # a schema's __post_init__ check (stage configs raise plain ValueError)
        raise ConfigError(str(exc)) from None


def _moved_override(item: str, moved: dict[str, str]) -> str:
    key, _, value = item.partition("=")
    if key.strip() in moved:
        logger.warning("config key %r is deprecated: use %r (read as that)", key.strip(), moved[key.strip()])
        return f"{moved[key.strip()]}={value}"
    return item


def _moved_yaml(loaded, moved: dict[str, str], path: Path):
    for old, new in moved.items():
        value = OmegaConf.select(loaded, old, default=_ABSENT)
        if value is _ABSENT:
            continue
        logger.warning("%s: config key %r is deprecated: use %r (read as that)", path, old, new)
        parent, _, leaf = old.rpartition(".")
        node = OmegaConf.select(loaded, parent) if parent else loaded
        del node[leaf]
        OmegaConf.update(loaded, new, value, force_add=True)
    return loaded


_ABSENT = object()


def to_plain(config: Any) -> Any:
    """A config dataclass as plain dicts/lists/scalars, enums by value (as written in YAML files)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {k: to_plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_plain(v) for v in config]
    if isinstance(config, enum.Enum):
        return config.value
    return config


def to_yaml(config: Any, *, note: str | None = None) -> str:
    """Resolved config as YAML (enums by value); ``load_config`` reads it back to an equal config.

    ``note`` goes first as a comment, e.g. that the run used random toy weights (a smoke test).
    """
    head = "".join(f"# {line}\n" for line in note.splitlines()) if note else ""
    return head + OmegaConf.to_yaml(OmegaConf.create(to_plain(config)))


def config_hash(config: Any) -> str:
    """Short stable hash of a resolved config, for stats files and manifests."""
    return hashlib.sha256(json.dumps(to_plain(config), sort_keys=True).encode()).hexdigest()[:16]
