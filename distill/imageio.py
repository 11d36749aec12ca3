"""Reading images robustly: every odd file becomes RGB or a counted, logged skip.

Real data has missing, zero-byte, truncated, non-image, CMYK, 16-bit, palette, RGBA and huge
images. ``load_rgb`` converts what is readable to 8-bit RGB (transparency composited onto
white, 16-bit scaled down, huge images reduced); ``try_open`` turns what is not into a skip that
``SkipLog`` counts, with the first few paths and reasons kept for the log and the report.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFile

log = logging.getLogger(__name__)

# Above this many pixels an image is decoded at reduced size (JPEG draft) or reduced after
# decoding; PIL refuses files beyond 2x its own MAX_IMAGE_PIXELS as decompression bombs, and we
# count those as skips rather than crash.
MAX_SIDE = 4096


@dataclass
class SkipLog:
    """Counts unreadable items and keeps the first ``keep`` (key, reason) pairs."""

    keep: int = 5
    count: int = 0
    first: list[tuple[str, str]] = field(default_factory=list)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    def add(self, key: str, reason: str) -> None:
        with self._lock:
            self.count += 1
            if len(self.first) < self.keep:
                self.first.append((key, reason))
                log.warning("skipping unreadable image %s: %s", key, reason)

    def summary(self) -> str:
        if not self.count:
            return "0 images skipped"
        shown = "; ".join(f"{k} ({r})" for k, r in self.first)
        more = f" and {self.count - len(self.first)} more" if self.count > len(self.first) else ""
        return f"{self.count} unreadable image(s) skipped: {shown}{more}"

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first": [{"key": k, "reason": r} for k, r in self.first]}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency goes onto white (stamps and logos are drawn on
    white, and black would turn every RGBA stamp into a silhouette); 16/32-bit greys are scaled
    by their actual range instead of being clipped at 255 (PIL's convert('L') clips)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return img


def load_rgb(path: str | os.PathLike | Any) -> Image.Image:
    """Open a file (path or binary file object) as RGB, fully decoded. Raises on unreadable input."""
    if isinstance(path, (str, os.PathLike)):
        if not os.path.exists(path):
            raise FileNotFoundError("file not found")
        if os.path.getsize(path) == 0:
            raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
        w, h = img.size
        if max(w, h) > MAX_SIDE and img.format == "JPEG":
            img.draft("RGB", (MAX_SIDE, MAX_SIDE))  # decode at 1/2, 1/4, 1/8 scale: cheap
        img.load()  # truncated files raise here (LOAD_TRUNCATED_IMAGES stays False)
    if max(img.size) > MAX_SIDE:
        factor = int(np.ceil(max(img.size) / MAX_SIDE))
        img = img.reduce(factor) if img.mode in ("RGB", "RGBA", "L", "LA", "CMYK") else img
    return to_rgb(img)


def try_open(source: Any, i: int, skips: SkipLog) -> Image.Image | None:
    """``source.open(i)`` or None; the failure is counted in ``skips`` with its key and reason."""
    try:
        return source.open(i)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        try:
            key = source.key(i)
        except Exception:  # a broken key must not hide the original failure
            key = f"item {i}"
        skips.add(key, _reason(e))
        return None


def _reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, Image.DecompressionBombError):
        return "image too large (decompression-bomb limit)"
    if type(e).__name__ == "UnidentifiedImageError":
        return "not an image"
    msg = str(e).split("\n")[0]
    return msg[:120] or type(e).__name__


# PIL would otherwise keep partially decoded truncated files silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False
