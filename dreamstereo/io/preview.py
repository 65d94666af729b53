"""Contact sheets for people to look at (never an input to another stage)."""

from __future__ import annotations

import cv2
import numpy as np

from dreamstereo.io.media import to_uint8

OVERLAY_COLOUR = np.array([255, 0, 255], np.uint8)  # magenta: rare in natural images


def colourize_disparity(disparity: np.ndarray) -> np.ndarray:
    """``(H, W)`` float disparity -> ``(H, W, 3)`` uint8 RGB colour map (near = warm), min-max scaled."""
    lo, hi = float(disparity.min()), float(disparity.max())
    scaled = np.zeros_like(disparity) if hi <= lo else (disparity - lo) / (hi - lo)
    bgr = cv2.applyColorMap(to_uint8(scaled), cv2.COLORMAP_INFERNO)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.65) -> np.ndarray:
    """``(H, W, 3)`` image with ``(H, W)`` bool ``mask`` blended in magenta."""
    out = to_uint8(image).copy()
    out[mask] = (alpha * OVERLAY_COLOUR + (1 - alpha) * out[mask]).astype(np.uint8)
    return out


def contact_sheet(tiles: list[tuple[str, np.ndarray]], columns: int = 2) -> np.ndarray:
    """Grid of labelled ``(H, W, 3)`` tiles (same size) as one uint8 RGB image."""
    h, w = tiles[0][1].shape[:2]
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * (h + 4), columns * (w + 4), 3), 32, np.uint8)
    scale = max(0.35, min(w, h) / 400)
    for k, (label, tile) in enumerate(tiles):
        r, c = divmod(k, columns)
        y, x = r * (h + 4) + 2, c * (w + 4) + 2
        sheet[y:y + h, x:x + w] = to_uint8(tile)
        cv2.putText(sheet, label, (x + 4, y + int(18 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale,
                    (255, 255, 255), max(1, int(scale * 1.5)), cv2.LINE_AA)
    return sheet


def fit_width(image: np.ndarray, max_width: int) -> np.ndarray:
    """``(H, W, 3)`` image as uint8, scaled down (area-averaged, aspect kept) to at most ``max_width`` pixels wide."""
    image = to_uint8(image)
    if image.shape[1] > max_width:
        height = max(1, round(image.shape[0] * max_width / image.shape[1]))
        image = cv2.resize(image, (max_width, height), interpolation=cv2.INTER_AREA)
    return image


def encode_jpeg(image: np.ndarray, max_width: int = 640, quality: int = 85) -> bytes:
    """``(H, W, 3)`` uint8 RGB as JPEG bytes, scaled down to at most ``max_width`` pixels wide."""
    image = fit_width(image, max_width)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not encode a {image.shape} image as JPEG")
    return data.tobytes()


def decode_image(data: bytes) -> np.ndarray | None:
    """``(H, W, 3)`` uint8 RGB of encoded image bytes (JPEG, PNG), or None when they do not decode."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
