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
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageFile

from distill import preprocess

log = logging.getLogger(__name__)

# Above this many pixels on a side an image is decoded at reduced size (JPEG draft) or reduced after
# decoding; PIL refuses files beyond 2x its own MAX_IMAGE_PIXELS as decompression bombs, and we
# count those as skips rather than crash. The rule lives in distill.preprocess (shared with the edge).
MAX_SIDE = preprocess.MAX_SIDE


@dataclass
class SkipLog:
    """Counts unreadable items and keeps the first ``keep`` (key, reason) pairs."""

    keep: int = 20  # the log and the report name this many; the rest are counted
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
    """Any PIL mode -> 8-bit RGB by the project's rules (``distill.preprocess.to_rgb``): transparency
    goes onto white (stamps and logos are drawn on white, and black would turn every RGBA stamp into a
    silhouette); 16/32-bit greys are scaled by their actual range instead of being clipped at 255."""
    return preprocess.to_rgb(img)


def load_rgb(path: str | os.PathLike | Any) -> Image.Image:
    """Open a file (path or binary file object) as RGB, fully decoded. Raises on unreadable input.

    The same function the edge runtime uses (``distill.preprocess.open_rgb``), so a device sees the
    pixels the student was trained on.
    """
    return preprocess.open_rgb(path)


def try_open(source: Any, i: int, skips: SkipLog) -> Image.Image | None:
    """``source.open(i)`` or None; the failure is counted in ``skips`` with its key and reason."""
    try:
        return source.open(i)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        try:
            key = source.key(i)
        except Exception:  # a broken key must not hide the original failure
            key = f"item {i}"
        skips.add(key, error_reason(e))
        return None


def error_reason(e: BaseException) -> str:
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
