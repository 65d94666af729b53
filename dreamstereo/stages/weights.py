"""Loading pretrained depth weights (Depth Anything V2, DepthCrafter and its SVD base) from a local folder or a
hub id, with one error that says how to provide them."""

from __future__ import annotations

import os
from pathlib import Path

from dreamstereo.types import UserError


class DepthWeightsError(UserError, RuntimeError):
    """Model weights that cannot be loaded: not a local folder, and not downloadable from here."""


def load_pretrained(loader, weights: str, what: str, *, subfolder: str | None = None,
                     option: str = "depth.weights"):
    """``loader.from_pretrained``: a local folder, else the hub cache, else a download (unless
    ``HF_HUB_OFFLINE`` is set); a :class:`DepthWeightsError` saying how to provide the weights otherwise.

    ``subfolder`` selects a component of a multi-model repository or folder (e.g. ``vae``); ``option``
    is the config key named in the error message.
    """
    local = Path(weights).expanduser()
    try:
        if local.exists():
            return loader.from_pretrained(str(local / subfolder) if subfolder else str(local))
        extra = {"subfolder": subfolder} if subfolder else {}
        try:
            return loader.from_pretrained(weights, local_files_only=True, **extra)  # cached: no network
        except OSError:
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                raise
            return loader.from_pretrained(weights, **extra)
    except (OSError, ValueError) as exc:
        name = Path(weights).name
        if local.exists():
            raise DepthWeightsError(f"{what} weights: the local folder {str(local / (subfolder or ''))!r} does not "
                                    f"hold a loadable model ({str(exc).splitlines()[0][:160]})") from None
        raise DepthWeightsError(
            f"{what} weights {weights!r}{f' ({subfolder}/)' if subfolder else ''} are not a local folder and "
            f"could not be fetched from the hub ({str(exc).splitlines()[0][:160]}). Download them where you "
            f"have internet, e.g. `huggingface-cli download {weights} --local-dir /models/{name}`, then pass "
            f"{option}=/models/{name}") from None
