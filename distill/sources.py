"""The ImageSource protocol: an indexable collection of images with optional captions/labels.

Every data source (CSV pairs, class folders, WebDataset shards, packaged Debian sets) is an
ImageSource. Loading an image may fail (corrupt, truncated, missing); ``open`` raises and the
caller (distill.data) skips and counts the failure.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from PIL import Image


@runtime_checkable
class ImageSource(Protocol):
    name: str  # short id used in fingerprints and logs, e.g. "fashion-mnist/test"
    captions: Sequence[str] | None  # one caption per item, or None
    labels: Sequence[int] | None  # one class index per item, or None
    classnames: Sequence[str] | None  # names for label indices, or None

    def __len__(self) -> int: ...

    def key(self, i: int) -> str:
        """A stable identifier of item i (file path, or "set/split/index"); used in cache fingerprints."""
        ...

    def open(self, i: int) -> Image.Image:
        """Item i as an RGB PIL image. Raises (OSError, ValueError, ...) when unreadable."""
        ...
