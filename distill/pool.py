"""A general, packaged image pool for the offline experiments: varied pictures from Debian packages
(desktop wallpapers and photos, Battle for Wesnoth's painted portraits, scenery and unit art), with
no captions: an image-only source (its items train the image-side loss terms only, see
``distill.datasets.ImageOnly``).

Files are found through ``dpkg -L <package>`` (distill.datasets.package_files), never a hard-coded
path; a missing package is one MissingDataError line naming the ``apt-get install`` command.
Each picture is in ``train`` or ``heldout`` by the sha256 of its package-relative key, so the split
never changes when another package is added. A high-resolution photo (the wallpaper parts) gives
``crops`` items, each a seeded random crop of it, so one 4K wallpaper is several different pictures
for the student; the game art is used whole. An unreadable file raises on ``open`` and the caller
skips and counts it (distill.imageio), like every other source.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from distill.datasets import IMAGE_EXTS, SOURCES, apt_hint, stable_fraction, package_files
from distill.errors import MissingDataError, UserError
from distill.imageio import load_rgb


@dataclass(frozen=True)
class PoolPart:
    """Which files of a Debian package belong to the pool: under ``prefix``, with one of ``include``'s
    substrings in the path (any when empty), none of ``exclude``'s; ``photos`` parts give crops."""

    package: str
    prefix: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    photos: bool = False
    base_sprites: bool = False  # keep "unit.png", drop its animation frames "unit-attack-1.png"


WESNOTH = "/usr/share/games/wesnoth/1.16/data/core/images/"
POOL_PARTS: dict[str, PoolPart] = {
    # the same photo at other resolutions is one picture, not three
    "mate-backgrounds": PoolPart("mate-backgrounds", "/usr/share/backgrounds/", exclude=("_3840x2160", "_5640x3172"),
                                 photos=True),
    "gnome-backgrounds": PoolPart("gnome-backgrounds", "/usr/share/backgrounds/", photos=True),
    "ukui-wallpapers": PoolPart("ukui-wallpapers", "/usr/share/backgrounds/", photos=True),
    "lomiri-wallpapers-20.04": PoolPart("lomiri-wallpapers-20.04", "/usr/share/backgrounds/", photos=True),
    # painted character portraits (the "transparent/" copies are duplicates), landscapes, objects
    "wesnoth-portraits": PoolPart("wesnoth-1.16-data", WESNOTH, include=("portraits/",), exclude=("/transparent/",)),
    "wesnoth-scenes": PoolPart("wesnoth-1.16-data", WESNOTH, include=("story/", "scenery/", "items/", "maps/"),
                               exclude=("/l10n/", "--overlay")),
    "wesnoth-units": PoolPart("wesnoth-1.16-data", WESNOTH, include=("units/",), base_sprites=True),
}
POOL_PACKAGES = sorted({p.package for p in POOL_PARTS.values()})  # what tools/setup.sh installs


def _part_files(name: str, part: PoolPart) -> list[tuple[str, str]]:
    """(path, key) of the part's images, sorted; key = "<part>/<path under the prefix>"."""
    out = []
    for f in package_files(part.package):
        if not f.lower().endswith(IMAGE_EXTS) or not f.startswith(part.prefix):
            continue
        rel = f[len(part.prefix):]
        if part.include and not any(s in rel for s in part.include):
            continue
        if any(s in rel for s in part.exclude):
            continue
        if part.base_sprites and any(ch.isdigit() or ch == "-" for ch in os.path.splitext(os.path.basename(rel))[0]):
            continue
        if os.path.isfile(f):
            out.append((f, f"{name}/{rel}"))
    return sorted(out, key=lambda t: t[1])


class PoolSource:
    """The pool's items: (file, crop r) with r = -1 for a whole picture, 0..crops-1 for a photo's crops."""

    image_only = True  # no captions: image-side terms only (distill.datasets.ImageOnly)

    def __init__(self, name: str, items: Sequence[tuple[str, str, int]], crop_scale: tuple[float, float],
                 max_side: int, seed: int) -> None:
        self.name = name
        self._items = list(items)  # (path, key, crop index or -1)
        self.crop_scale, self.max_side, self.seed = (float(crop_scale[0]), float(crop_scale[1])), int(max_side), int(seed)
        self.captions = self.labels = self.classnames = None
        self._recent: OrderedDict[str, Image.Image] = OrderedDict()  # decoded photos, newest last

    KEEP = 2  # photos kept decoded (a 4K RGB photo is 25 MB)

    def __getstate__(self) -> dict:  # DataLoader workers start with an empty memo, not the parent's photos
        return {**self.__dict__, "_recent": OrderedDict()}

    def __len__(self) -> int:
        return len(self._items)

    def key(self, i: int) -> str:
        path, key, r = self._items[i]
        return key if r < 0 else f"{key}#crop{r}s{self.seed}"

    def identity_files(self) -> list[str]:
        """Every picture file, once (a photo's crops share it)."""
        return list(dict.fromkeys(p for p, _, _ in self._items))

    def crop_box(self, i: int, w: int, h: int) -> tuple[int, int, int, int]:
        """The (left, top, right, bottom) of crop i in a w x h photo, drawn from (seed, key) alone:
        a square of side ``crop_scale`` x the short side, placed uniformly."""
        rng = random.Random(f"pool-crop/{self.seed}/{self._items[i][1]}/{self._items[i][2]}")
        side = max(1, int(round(min(w, h) * rng.uniform(*self.crop_scale))))
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        return left, top, left + side, top + side

    def _photo(self, path: str) -> Image.Image:
        """The decoded photo, kept for the next crop: a photo's crops are neighbouring items, and
        decoding a 4K wallpaper costs far more than cropping it (benchmarks/RESULTS.md, general pool)."""
        hit = self._recent.get(path)
        if hit is None:
            hit = self._recent[path] = load_rgb(path)
        self._recent.move_to_end(path)
        while len(self._recent) > self.KEEP:
            self._recent.popitem(last=False)
        return hit

    def open(self, i: int) -> Image.Image:
        path, _, r = self._items[i]
        img = self._photo(path) if r >= 0 else load_rgb(path)
        if r >= 0:
            img = img.crop(self.crop_box(i, *img.size))
        if max(img.size) > self.max_side:  # the views are 224 px at most: keep later decoding cheap
            img.thumbnail((self.max_side, self.max_side), Image.BICUBIC)
        return img


@SOURCES.register("general_pool")
def general_pool(split: str = "train", parts: Sequence[str] | None = None, heldout_fraction: float = 0.1,
                 crops: int = 6, crop_scale: Sequence[float] = (0.35, 0.7), max_side: int = 512, seed: int = 0,
                 limit: int | None = None) -> PoolSource:
    """The packaged general pool (``POOL_PARTS``; ``parts`` picks some), image-only.

    ``split``: ``train``, ``heldout`` (a picture whose key's sha256 falls in the first
    ``heldout_fraction``) or ``all``. Each photo gives ``crops`` items (seeded random square crops
    of ``crop_scale`` x its short side; 0 = the whole photo once); other pictures one item each.
    Every item is shrunk to at most ``max_side`` px. ``limit`` keeps the first N items (key order).
    """
    if split not in ("train", "heldout", "all"):
        raise UserError(f"general_pool split {split!r} unknown: use train, heldout or all")
    if not 0.0 <= float(heldout_fraction) < 1.0:
        raise UserError(f"general_pool heldout_fraction={heldout_fraction} must be in [0, 1)")
    lo, hi = (float(c) for c in crop_scale)
    if int(crops) < 0 or not 0.0 < lo <= hi <= 1.0:
        raise UserError(f"general_pool needs crops >= 0 and 0 < crop_scale[0] <= crop_scale[1] <= 1 "
                        f"(got crops={crops}, crop_scale={list(crop_scale)})")
    names = list(parts) if parts is not None else list(POOL_PARTS)
    unknown = [n for n in names if n not in POOL_PARTS]
    if unknown:
        raise UserError(f"general_pool parts {unknown} unknown: use some of {list(POOL_PARTS)}")
    missing = []
    for pkg in sorted({POOL_PARTS[n].package for n in names}):
        try:
            package_files(pkg)
        except MissingDataError:
            missing.append(pkg)
    if missing:  # one command for all of them, rather than one failure per rerun
        raise MissingDataError(f"the general pool needs {', '.join(missing)}: run `{apt_hint(' '.join(missing))}` "
                               f"(or bash tools/setup.sh)")
    items: list[tuple[str, str, int]] = []
    for n in names:
        part = POOL_PARTS[n]
        for path, key in _part_files(n, part):
            if split != "all" and (stable_fraction(key) < float(heldout_fraction)) != (split == "heldout"):
                continue
            items += [(path, key, r) for r in range(int(crops))] if part.photos and int(crops) > 0 else [(path, key, -1)]
    if not items:
        raise MissingDataError(f"the general pool's packages hold no images for parts {names}: run "
                               f"`{apt_hint('--reinstall ' + ' '.join(sorted({POOL_PARTS[n].package for n in names})))}`")
    if limit is not None:
        items = items[:int(limit)]
    return PoolSource(f"pool/{split}/h{float(heldout_fraction):g}/c{int(crops)}", items, (lo, hi), max_side, seed)


general_pool.image_only = True  # configs name the factory: the config check (distill.validate) reads this mark
