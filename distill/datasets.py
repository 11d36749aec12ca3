"""Image sources: the user's own data (CSV/TSV pairs, class folders, WebDataset shards) and two
real data sets that install from Debian packages (Fashion-MNIST, Tux Paint stamps).

Every source is an ImageSource (distill/sources.py): ``len``, ``key(i)``, ``open(i)`` -> RGB,
plus ``captions``, ``labels`` and ``classnames`` (each may be None). Sources list their items
up front and open images lazily; ``open`` raises on an unreadable file and the caller skips and
counts it (distill.imageio). Each source here also has ``identity_files()``: the files its items
are read from (images, CSV, tar shards, IDX files), whose sizes, mtimes and contents the teacher
cache folds into its fingerprint (distill.cache.data_identity), so that a file replaced at the
same path builds a new cache entry.

The packaged sets are found through ``dpkg -L <package>`` (the installed package's own file
list), never a hard-coded path; a missing package is a one-line MissingDataError naming the
``apt-get install`` command.

Each source a config can name as a ``_target_`` is registered in ``SOURCES`` under its Python name
(``python -m distill list`` prints them).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import random
import shutil
import subprocess
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from distill.errors import MissingDataError, UserError
from distill.imageio import load_rgb
from distill.registry import Registry
from distill.sources import ImageSource

# name = the ``_target_``'s last part in conf/data; distill.streaming registers its StreamingShards here too
# distill.pool registers the packaged general pool
SOURCES: Registry = Registry("data source", discover=("distill.streaming", "distill.pool"))

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def apt_hint(package: str) -> str:
    return f"sudo apt-get install --no-install-recommends {package}"


@lru_cache(maxsize=None)
def package_files(package: str) -> tuple[str, ...]:
    """Files an installed Debian package owns (``dpkg -L``); MissingDataError when it is absent."""
    if shutil.which("dpkg") is None:
        raise MissingDataError(f"the Debian package {package} is needed but this system has no dpkg: "
                               f"run on Debian/Ubuntu with `{apt_hint(package)}`")
    res = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    files = tuple(line for line in res.stdout.splitlines() if line.startswith("/"))
    if res.returncode != 0 or not files:
        raise MissingDataError(f"data package {package} is not installed: run `{apt_hint(package)}` "
                               f"(or bash tools/setup.sh)")
    return files


def stable_fraction(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


def source_identity_files(source: ImageSource) -> list[str] | None:
    """The files ``source`` reads its items from, or None when it has none (an in-memory source,
    which its item keys alone identify)."""
    fn = getattr(source, "identity_files", None)
    files = fn() if fn is not None else None
    return list(files) if files is not None else None


# --------------------------------------------------------------------------------------------
# The user's own data
# --------------------------------------------------------------------------------------------


class FileListSource:
    """Items are image files on disk; the common base of CSV pairs and class folders."""

    def __init__(self, name: str, paths: Sequence[str], captions: Sequence[str] | None = None,
                 labels: Sequence[int] | None = None, classnames: Sequence[str] | None = None,
                 index_files: Sequence[str] = ()) -> None:
        self.name = name
        self.paths = list(paths)
        self.index_files = list(index_files)  # e.g. the CSV the paths and captions came from
        self.captions = list(captions) if captions is not None else None
        self.labels = list(labels) if labels is not None else None
        self.classnames = list(classnames) if classnames is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, i: int) -> str:
        return self.paths[i]

    def open(self, i: int) -> Image.Image:
        return load_rgb(self.paths[i])

    def identity_files(self) -> list[str]:
        """The index files (CSV) and every image file, for the teacher cache's data identity."""
        return [*self.index_files, *self.paths]

    def subset(self, idx: Sequence[int], name: str | None = None) -> "FileListSource":
        return FileListSource(
            name or self.name, [self.paths[i] for i in idx],
            [self.captions[i] for i in idx] if self.captions is not None else None,
            [self.labels[i] for i in idx] if self.labels is not None else None, self.classnames,
            self.index_files)


@SOURCES.register("CsvPairs")
def CsvPairs(path: str, img_key: str = "filepath", caption_key: str = "title", sep: str = "\t",
             root: str | None = None, limit: int | None = None) -> FileListSource:
    """Image-caption pairs from a CSV/TSV file (open_clip's ``--csv-img-key/--csv-caption-key/
    --csv-separator`` format). Relative image paths resolve against ``root`` or the file's folder."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"caption file not found: {p} (point data.train_file / data.val_file at your CSV/TSV file)")
    sep = "\t" if sep in ("\\t", "tab") else sep
    base = Path(root).expanduser() if root else p.parent
    paths, caps = [], []
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        cols = reader.fieldnames or []
        for k, what in ((img_key, "img_key"), (caption_key, "caption_key")):
            if k not in cols:
                raise UserError(f"{p}: no column {k!r} (columns: {cols}); set {what} or sep "
                                f"(separator now {sep!r})")
        for row in reader:
            if limit is not None and len(paths) >= limit:
                break
            fp = Path(row[img_key] or "")
            paths.append(str(fp if fp.is_absolute() else base / fp))
            caps.append((row[caption_key] or "").strip())
    if not paths:
        raise UserError(f"{p} has no rows: add image/caption rows or point path at another file")
    return FileListSource(f"csv:{p.name}", paths, captions=caps, index_files=[str(p)])


@SOURCES.register("ClassFolder")
def ClassFolder(root: str, templates: Sequence[str] = ("a photo of a {}.",), limit: int | None = None,
                per_class: int | None = None) -> FileListSource:
    """One subfolder per class (``root/<class>/*.jpg``). Class names come from folder names
    (underscores become spaces); the caption of an image is its class name in a template, picked
    per image by a stable hash so that a run is reproducible."""
    r = Path(root).expanduser()
    if not r.is_dir():
        raise UserError(f"image folder not found: {r} (point data.train_root / data.val_root at a folder with one subfolder per class)")
    classes = sorted(d.name for d in r.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{r} has no class subfolders: expected {r}/<class name>/<images>")
    names = [c.replace("_", " ") for c in classes]
    paths, labels, caps = [], [], []
    for li, c in enumerate(classes):
        files = sorted(str(f) for f in (r / c).rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        if per_class is not None:
            files = files[:per_class]
        for f in files:
            paths.append(f)
            labels.append(li)
            t = templates[int(stable_fraction(f) * len(templates))] if templates else "{}"
            caps.append(t.format(names[li]))
    if limit is not None:
        paths, labels, caps = paths[:limit], labels[:limit], caps[:limit]
    if not paths:
        raise UserError(f"{r} has class folders but no images with extensions {IMAGE_EXTS}")
    return FileListSource(f"folder:{r.name}", paths, captions=caps, labels=labels, classnames=names)


@SOURCES.register("WebDatasetShards")
class WebDatasetShards:
    """WebDataset tar shards (``/data/shard-{000000..000099}.tar``) as an indexed source.

    Items are grouped by webdataset's convention (members sharing the basename before the first
    dot form one sample: ``0001.jpg`` + ``0001.txt``). The shards are indexed once (member
    offsets, no extraction) and images are read by seeking into the tar file, so the teacher
    cache can address any sample. Shards must be local files (or a mounted network filesystem);
    stream-only URLs (``pipe:``, ``http://``) cannot be indexed.
    """

    def __init__(self, urls: str | Sequence[str], image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
                 caption_keys: Sequence[str] = ("txt", "caption", "json"), limit: int | None = None) -> None:
        from braceexpand import braceexpand  # webdataset's own brace expansion dependency

        specs = [urls] if isinstance(urls, str) else list(urls)
        self.shards = [s for spec in specs for pat in str(spec).split("::") for s in braceexpand(pat)]
        for s in self.shards:
            if "://" in s or s.startswith("pipe:"):
                raise UserError(f"shard {s} is a stream URL: copy the shards to local disk and set "
                                f"data.train_urls / data.val_urls to the local pattern")
            if not Path(s).is_file():
                raise UserError(f"shard not found: {s} (check data.train_urls / data.val_urls; brace patterns like "
                                f"shard-{{000..009}}.tar are expanded)")
        self.name = f"wds:{Path(self.shards[0]).name}+{len(self.shards) - 1}"
        self._img: list[tuple[int, int, int]] = []  # (shard, offset, size)
        self._keys: list[str] = []
        caps: list[str] = []
        for si, shard in enumerate(self.shards):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    stem, _, ext = base.partition(".")
                    groups.setdefault(os.path.join(os.path.dirname(m.name), stem), {})[ext.lower()] = m
                for stem, members in groups.items():
                    im = next((members[k] for k in image_keys if k in members), None)
                    if im is None:
                        continue
                    cap = ""
                    for k in caption_keys:
                        if k in members:
                            raw = tf.extractfile(members[k]).read().decode("utf-8", "replace")
                            cap = json_caption(raw) if k == "json" else raw.strip()
                            break
                    self._img.append((si, im.offset_data, im.size))
                    self._keys.append(f"{shard}#{stem}")
                    caps.append(cap)
                    if limit is not None and len(self._img) >= limit:
                        break
            if limit is not None and len(self._img) >= limit:
                break
        if not self._img:
            raise UserError(f"no samples with an image ({'/'.join(image_keys)}) in {len(self.shards)} shard(s) "
                            f"{self.shards[0]}...: check image_keys")
        self.captions = caps
        self.labels = None
        self.classnames = None

    def __len__(self) -> int:
        return len(self._img)

    def key(self, i: int) -> str:
        return self._keys[i]

    def identity_files(self) -> list[str]:
        """The tar shards the items come from (not their members: shards are hashed as whole files)."""
        return self.shards[:self._img[-1][0] + 1]

    def open(self, i: int) -> Image.Image:
        si, off, size = self._img[i]
        with open(self.shards[si], "rb") as f:
            f.seek(off)
            data = f.read(size)
        if not data:
            raise ValueError("empty file (0 bytes)")
        return load_rgb(io.BytesIO(data))


def json_caption(raw: str) -> str:
    import json

    try:
        d = json.loads(raw)
    except ValueError:
        return ""
    for k in ("caption", "text", "title"):
        if isinstance(d, dict) and isinstance(d.get(k), str):
            return d[k].strip()
    return ""


# --------------------------------------------------------------------------------------------
# Packaged real data sets (Debian)
# --------------------------------------------------------------------------------------------


class _ArrayImages:
    """An ImageSource over a uint8 (N, H, W) grey array with labels."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, classnames: Sequence[str],
                 index: np.ndarray, invert: bool, caption_templates: Sequence[str] | None = None,
                 files: Sequence[str] | None = None) -> None:
        self.name = name + ("/inverted" if invert else "")
        self._images, self._index, self._invert = images, index, invert
        self._files = list(files) if files is not None else None
        self.labels = [int(labels[j]) for j in index]
        self.classnames = list(classnames)
        self.captions = None
        if caption_templates:  # like a class folder: each image captioned from its label
            t = list(caption_templates)
            self.name += "/captioned"
            self.captions = [t[int(stable_fraction(f"{self.name}/{j}") * len(t))].format(self.classnames[c].lower())
                             for j, c in zip(index, self.labels)]

    def __len__(self) -> int:
        return len(self._index)

    def key(self, i: int) -> str:
        return f"{self.name}/{int(self._index[i])}"

    def identity_files(self) -> list[str] | None:
        """The files the arrays were read from (IDX files), or None for arrays built in memory."""
        return self._files

    def open(self, i: int) -> Image.Image:
        a = self._images[self._index[i]]
        if self._invert:
            a = 255 - a
        return Image.fromarray(a, "L").convert("RGB")


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_files(part: str) -> tuple[str, str]:
    files = package_files("dataset-fashion-mnist")
    prefix = "t10k" if part == "test" else "train"
    img = next((f for f in files if f.endswith(f"/{prefix}-images-idx3-ubyte.gz")), None)
    lab = next((f for f in files if f.endswith(f"/{prefix}-labels-idx1-ubyte.gz")), None)
    if img is None or lab is None or not os.path.exists(img):
        raise MissingDataError("dataset-fashion-mnist is installed but its IDX files are missing: run "
                               f"`sudo apt-get install --reinstall dataset-fashion-mnist`")
    return img, lab


@lru_cache(maxsize=2)
def _fashion_arrays(part: str) -> tuple[np.ndarray, np.ndarray]:
    img, lab = _fashion_files(part)
    return _read_idx(img), _read_idx(lab)


@SOURCES.register("fashion_mnist")
def fashion_mnist(split: str = "test", limit: int | None = None, per_class: int | None = None,
                  invert: bool = False, caption_templates: Sequence[str] | None = None) -> _ArrayImages:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (70k 28x28 grey images, 10 classes).

    Splits (fixed): ``train`` = the first 55,000 images of the training file, ``val`` = its last
    5,000, ``test`` = the 10,000 test images. ``per_class`` keeps the first N of each class (in
    file order), then ``limit`` the first N overall. ``invert`` makes the images dark-on-white,
    like product photos (the originals are light-on-black). ``caption_templates`` captions each
    image from its label (one template per image by a stable hash), as a class folder does: for
    training splits only, with templates the evaluation does not use.
    """
    if split not in ("train", "val", "test"):
        raise UserError(f"fashion_mnist split {split!r} unknown: use train, val or test")
    part = "test" if split == "test" else "train"
    images, labels = _fashion_arrays(part)
    index = {"train": np.arange(0, 55_000), "val": np.arange(55_000, 60_000),
             "test": np.arange(len(images))}[split]
    if per_class is not None:
        counts: dict[int, int] = {}
        keep = []
        for j in index:
            c = int(labels[j])
            if counts.get(c, 0) < per_class:
                counts[c] = counts.get(c, 0) + 1
                keep.append(j)
        index = np.asarray(keep)
    if limit is not None:
        index = index[:limit]
    return _ArrayImages(f"fashion-mnist/{split}", images, labels, FASHION_MNIST_CLASSES, index, invert,
                        caption_templates, files=_fashion_files(part))


TUXPAINT_EXCLUDE = ("symbols",)  # letters, digits, money, chess pieces: not photos with captions


@lru_cache(maxsize=1)
def _tuxpaint_pairs() -> tuple[tuple[str, str, str], ...]:
    files = package_files("tuxpaint-stamps-default")
    fileset = set(files)
    roots = [f for f in files if f.rstrip("/").endswith("/tuxpaint/stamps")]
    if not roots:
        raise MissingDataError("tuxpaint-stamps-default has no stamps folder: run "
                               "`sudo apt-get install --reinstall tuxpaint-stamps-default`")
    root = roots[0].rstrip("/")
    pairs = []
    for f in sorted(files):
        if not f.endswith(".png") or not f.startswith(root + "/"):
            continue
        rel = f[len(root) + 1:]
        if rel.split("/")[0] in TUXPAINT_EXCLUDE:
            continue
        txt = f[:-4] + ".txt"
        if txt not in fileset or not os.path.exists(txt):
            continue  # "_mirror" variants share their original's caption: skip the duplicate
        with open(txt, encoding="utf-8", errors="replace") as fh:
            caption = fh.readline().strip()
        if caption:
            pairs.append((f, rel, caption))
    if not pairs:
        raise MissingDataError("no captioned stamps found in tuxpaint-stamps-default: run "
                               "`sudo apt-get install --reinstall tuxpaint-stamps-default`")
    return tuple(pairs)


@SOURCES.register("tuxpaint")
def tuxpaint(split: str = "all", limit: int | None = None, val_fraction: float = 0.2) -> FileListSource:
    """Tux Paint stamps from Debian's ``tuxpaint-stamps-default``: 538 real PNGs (animals, food,
    plants, vehicles...) with English captions (the first line of each stamp's .txt), leaving out
    ``symbols/`` and the caption-less ``_mirror`` duplicates. RGBA stamps are composited on white.

    Split (fixed): an image is in ``val`` when the sha256 of its path relative to the stamps
    folder falls in the first ``val_fraction`` (about 108 of 538 at 0.2), else in ``train``;
    ``all`` is every pair. The split does not change when the package adds stamps elsewhere.
    """
    if split not in ("train", "val", "all"):
        raise UserError(f"tuxpaint split {split!r} unknown: use train, val or all")
    pairs = _tuxpaint_pairs()
    if split != "all":
        want_val = split == "val"
        pairs = tuple(p for p in pairs if (stable_fraction(p[1]) < val_fraction) == want_val)
    if limit is not None:
        pairs = pairs[:limit]
    return FileListSource(f"tuxpaint/{split}", [p[0] for p in pairs], captions=[p[2] for p in pairs])


class Repeated:
    """Every item of ``source`` ``times`` times, as distinct items (keys ``<key>#<r>``).

    With the view spec's K views, each image then gets ``times * K`` differently augmented views,
    each with its own cached teacher target, and is drawn ``times`` as often: for a small set that
    matters more than its share of the data (distillation keeps learning from new views of the
    same images: Beyer et al. 2022, "a good teacher is patient and consistent").
    """

    def __init__(self, source: ImageSource, times: int) -> None:
        if int(times) < 1:
            raise UserError(f"repeat times={times} must be >= 1")
        self.source, self.times, self._n = source, int(times), len(source)
        self.image_only = is_image_only(source)
        self.name = f"{source.name}/x{self.times}"
        self.captions = list(source.captions) * self.times if source.captions is not None else None
        self.labels = list(source.labels) * self.times if source.labels is not None else None
        self.classnames = source.classnames

    def __len__(self) -> int:
        return self._n * self.times

    def key(self, i: int) -> str:
        return f"{self.source.key(i % self._n)}#{i // self._n}"

    def identity_files(self) -> list[str] | None:
        """The wrapped source's files (each once)."""
        return source_identity_files(self.source)

    def open(self, i: int) -> Image.Image:
        return self.source.open(i % self._n)


@SOURCES.register("repeat")
def repeat(source: ImageSource, times: int) -> Repeated:
    """``Repeated(source, times)``, for configs: ``{_target_: distill.datasets.repeat, source: {...}, times: 8}``."""
    return Repeated(source, times)


class Mixed:
    """``n`` new images, each a blend of two images of ``source`` (mixup, Zhang et al. 2018).

    Image i blends a pseudo-random pair with a weight drawn from Beta(alpha, alpha), all fixed by
    ``seed`` and i, so keys, teacher targets and pixels stay reproducible. The teacher embeds the
    blend itself (nothing is interpolated in embedding space), which gives the student many more
    distinct inputs than crops of a small set alone (function matching: Beyer et al. 2022).
    Uncaptioned (a blend has no caption of its own); the second image is resized to the first's size.
    """

    def __init__(self, source: ImageSource, n: int, alpha: float = 1.0, seed: int = 0) -> None:
        if len(source) < 2 or int(n) < 1:
            raise UserError(f"mixup needs a source of at least 2 images and n >= 1 (got {len(source)} images, n={n})")
        self.source, self.n, self.alpha, self.seed = source, int(n), float(alpha), int(seed)
        self.name = f"{source.name}/mix{self.n}a{self.alpha:g}s{self.seed}"
        self.image_only = is_image_only(source)
        self.captions = self.labels = self.classnames = None

    def __len__(self) -> int:
        return self.n

    def _draw(self, i: int) -> tuple[int, int, float]:
        rng = random.Random(f"{self.name}/{i}")
        a = rng.randrange(len(self.source))
        b = (a + 1 + rng.randrange(len(self.source) - 1)) % len(self.source)
        return a, b, round(rng.betavariate(self.alpha, self.alpha), 4)

    def key(self, i: int) -> str:
        a, b, lam = self._draw(i)
        return f"mix({self.source.key(a)}|{self.source.key(b)}|{lam})"

    def identity_files(self) -> list[str] | None:
        """The wrapped source's files."""
        return source_identity_files(self.source)

    def open(self, i: int) -> Image.Image:
        a, b, lam = self._draw(i)
        x, y = self.source.open(a), self.source.open(b)
        return Image.blend(x, y.resize(x.size, Image.BICUBIC), 1.0 - lam)


@SOURCES.register("mixup")
def mixup(source: ImageSource, n: int, alpha: float = 1.0, seed: int = 0) -> Mixed:
    """``Mixed(source, n, alpha, seed)``, for configs: ``{_target_: distill.datasets.mixup, source: {...}, n: 4000}``."""
    return Mixed(source, n, alpha, seed)


def english_words(min_len: int = 3, limit: int | None = None, seed: int = 0) -> list[str]:
    """Lower-case English words from Debian's ``wamerican`` word list (about 64k of 3+ letters):
    a generic vocabulary for the student's text tower, chosen without looking at any eval set.
    ``limit`` keeps a fixed pseudo-random subset (stable hash order)."""
    files = package_files("wamerican")
    path = next((f for f in files if f.endswith("/dict/american-english")), None)
    if path is None or not os.path.exists(path):
        raise MissingDataError("wamerican is installed but its word list is missing: run "
                               "`sudo apt-get install --reinstall wamerican`")
    with open(path, encoding="utf-8", errors="replace") as f:
        words = sorted({w.strip() for w in f if w.strip().isalpha() and w.strip().islower()
                        and w.strip().isascii() and len(w.strip()) >= min_len})
    if limit is not None and limit < len(words):
        words = sorted(words, key=lambda w: stable_fraction(f"{seed}:{w}"))[:limit]
    return words


# --------------------------------------------------------------------------------------------
# Image-only sources: images without captions, for the image-side loss terms only
# --------------------------------------------------------------------------------------------


def is_image_only(source: ImageSource) -> bool:
    """Whether ``source`` is marked image-only (``ImageOnly``, ``image_files``, ``csv_images``, the pool)."""
    return bool(getattr(source, "image_only", False))


class ImageOnly:
    """``source``'s images with its captions dropped and the image-only mark: in training each item
    gets a corpus text (never a caption pair) and ``data.train.image_only_ratio`` sets its share of
    every batch; as a retrieval eval set it is refused (it has no captions to retrieve)."""

    image_only = True

    def __init__(self, source: ImageSource) -> None:
        self.source = source
        self.name = f"{source.name}/image-only"
        self.captions = None
        self.labels, self.classnames = source.labels, source.classnames

    def __len__(self) -> int:
        return len(self.source)

    def key(self, i: int) -> str:
        return self.source.key(i)

    def identity_files(self) -> list[str] | None:
        """The wrapped source's files."""
        return source_identity_files(self.source)

    def open(self, i: int) -> Image.Image:
        return self.source.open(i)


@SOURCES.register("image_only")
def image_only(source: ImageSource) -> ImageOnly:
    """``ImageOnly(source)``, for configs: ``{_target_: distill.datasets.image_only, source: {...}}``
    (e.g. WebDataset shards without text, or a captioned set used for its images alone)."""
    return ImageOnly(source)


image_only.image_only = True  # configs name the factory: the config check (distill.validate) reads this mark


@SOURCES.register("image_files")
def image_files(root: str, limit: int | None = None) -> ImageOnly:
    """Every image file under ``root`` (any depth, no class folders), sorted, as an image-only source."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(f"image folder not found: {base} (point the source's root at a folder of images)")
    paths = sorted(str(p) for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTS)}) under {base}: check the source's root")
    if limit is not None:
        paths = paths[:int(limit)]
    return ImageOnly(FileListSource(f"files:{base}", paths))


image_files.image_only = True


@SOURCES.register("csv_images")
def csv_images(path: str, img_key: str = "filepath", sep: str = "\t", root: str | None = None,
               limit: int | None = None) -> ImageOnly:
    """The images of a CSV/TSV file that has no caption column (column ``img_key``), image-only;
    relative paths resolve against ``root`` or the file's folder."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"image list not found: {p} (point the source's path at your CSV/TSV file)")
    sep = "\t" if sep in ("\\t", "tab") else sep
    base = Path(root).expanduser() if root else p.parent
    paths = []
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        if img_key not in (reader.fieldnames or []):
            raise UserError(f"{p}: no column {img_key!r} (columns: {reader.fieldnames}); set img_key or sep "
                            f"(separator now {sep!r})")
        for row in reader:
            if limit is not None and len(paths) >= int(limit):
                break
            paths.append(str(base / row[img_key]))
    return ImageOnly(FileListSource(f"csv-images:{p}", paths, index_files=[str(p)]))


csv_images.image_only = True
