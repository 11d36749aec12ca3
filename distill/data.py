"""Training and evaluation data: seeded image views, the text corpus, and eval-set tensors.

Images travel as float RGB in [0, 1], shape (3, S, S), un-normalised: the teacher and the
student each normalise their own way, so both see exactly the same view.

Views. A training item is (image i, view v). View v of image i is produced from a seed derived
from (base seed, the image's stable key, v): with ``augment`` on it is a RandomResizedCrop +
horizontal flip drawn from that seed; with it off it is the eval transform (resize the short
side, centre crop). The teacher cache stores one embedding per (i, v), and the student later
regenerates the identical view from the same seed.

Mixing. With ``data.train.mix`` (``MixSpec``) an item is, with probability ``prob``, blended with
the base (unmixed) view of a partner item of another image: mixup (lam * a + (1 - lam) * b) or
cutmix (a box of b pasted into a, lam = the share of a left). Whether, how, with whom and lam are
drawn from the item's own seed, so every worker, rank and resume mixes alike, and the teacher cache
embeds the mixed pixels the student sees (Beyer et al. 2022, "consistent" teaching; MobileCLIP's
DataCompDR). ``TrainSet.view_params`` says what was done; the cache stores it per item.

Memo. The pipeline visits the same views many times: the fine-tune, the teacher cache, every epoch
of the student, every variant of the bench. A ``ViewMemo`` keeps each decoded view as uint8 (lossless:
every view is an 8-bit image / 255) up to a byte budget, so decoding, cropping and resizing run once.

Texts. Each item carries a text: its own caption when the source has captions (a real pair),
otherwise a text drawn deterministically from the corpus (ImageNet class names with templates,
plus whatever the config adds). The contrastive-distribution loss needs B images and B texts
from the teacher's space, not pairs; the ground-truth CLIP loss needs pairs and is only computed
for batches that are all pairs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, get_worker_info
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from distill import preprocess
from distill.errors import UserError
from distill.imageio import SkipLog, try_open
from distill.sources import ImageSource

log = logging.getLogger(__name__)


def stable_int(*parts: object) -> int:
    """A 64-bit integer from ``parts``, the same in every process (``hash()`` is salted per process)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little")


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names in label order: the first synonym of timm's WordNet
    description ("goldfish, Carassius auratus" -> "goldfish")."""
    from timm.data import ImageNetInfo

    return [d.split(",")[0].strip() for d in ImageNetInfo().label_descriptions()]


def named_classes(value: Any, unknown: str) -> list[str]:
    """Class names given in a config: ``"imagenet"`` (the 1000 ImageNet-1k names) or a list; any other
    string is a UserError with the caller's ``unknown`` line."""
    if isinstance(value, str):
        if value != "imagenet":
            raise UserError(unknown)
        return imagenet_classnames()
    return [str(c) for c in value]


def eval_view(img: Image.Image, size: int, spec: dict[str, Any] | None = None) -> torch.Tensor:
    """PIL RGB -> (3, size, size) float in [0, 1]: bicubic short-side resize, centre crop.

    ``distill.preprocess.eval_pixels`` (the code the edge runtime runs, same numbers as torchvision's
    Resize + CenterCrop + to_tensor, i.e. open_clip's eval transform) by ``spec`` (default: the
    project's spec at ``size``), minus the mean/std normalisation.
    """
    return torch.from_numpy(preprocess.eval_pixels(img, spec or preprocess.default_spec(size)))


def crop_params(width: int, height: int, seed: int, scale: tuple[float, float] = (0.6, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True) -> tuple[int, int, int, int, bool]:
    """The (top, left, h, w, flip) of ``augmented_view``'s seeded RandomResizedCrop of a ``width`` x
    ``height`` image. torchvision's RandomResizedCrop draws from the global torch RNG, which workers and
    resumes would perturb; this follows its algorithm with a private ``random.Random(seed)``."""
    rng = random.Random(seed)
    w, h = width, height
    area = w * h
    top, left, ch, cw = 0, 0, h, w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        log_r = (torch.log(torch.tensor(ratio[0])).item(), torch.log(torch.tensor(ratio[1])).item())
        ar = float(torch.exp(torch.tensor(rng.uniform(*log_r))))
        cw_, ch_ = int(round((target * ar) ** 0.5)), int(round((target / ar) ** 0.5))
        if 0 < cw_ <= w and 0 < ch_ <= h:
            top, left, ch, cw = rng.randint(0, h - ch_), rng.randint(0, w - cw_), ch_, cw_
            break
    flip = bool(hflip and rng.random() < 0.5)
    return top, left, ch, cw, flip


def apply_crop(img: Image.Image, size: int, crop: tuple[int, int, int, int, bool]) -> torch.Tensor:
    """PIL RGB -> (3, size, size) in [0, 1]: the (top, left, h, w, flip) crop bicubic-resized to ``size``."""
    top, left, ch, cw, flip = crop
    img = TF.resized_crop(img, top, left, ch, cw, [size, size], interpolation=InterpolationMode.BICUBIC)
    if flip:
        img = TF.hflip(img)
    return TF.to_tensor(img)


def augmented_view(img: Image.Image, size: int, seed: int, scale: tuple[float, float] = (0.6, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True) -> torch.Tensor:
    """A RandomResizedCrop (+ flip) fully determined by ``seed`` -> (3, size, size) in [0, 1]
    (``crop_params`` draws it, ``apply_crop`` cuts it)."""
    return apply_crop(img, size, crop_params(*img.size, seed, scale=scale, ratio=ratio, hflip=hflip))


def build_corpus(
    templates: Sequence[str] = ("a photo of a {}.",),
    imagenet_classes: bool = True,
    extra: Sequence[str] = (),
    exclude: Iterable[str] = (),
    words: dict[str, Any] | None = None,
) -> list[str]:
    """Unique texts for unpaired images: ImageNet class names x templates, plus ``extra``, plus
    (optionally) English words from a dictionary, ``words = {"templates": [...], "limit": N,
    "seed": s}``: each word in one template picked by a stable hash, so the text student sees a
    broad vocabulary rather than only the 1000 ImageNet names.

    Texts equal (case-insensitively, ignoring a final '.') to one in ``exclude`` are dropped, so
    evaluation prompts never appear verbatim in training.
    """

    def norm(t: str) -> str:
        return t.strip().lower().rstrip(".").strip()

    banned = {norm(t) for t in exclude}
    texts: list[str] = []
    if imagenet_classes:
        texts += [t.format(n) for t in templates for n in imagenet_classnames()]
    texts += list(extra)
    if words:
        from distill.datasets import english_words

        wt = list(words.get("templates") or ["{}"])
        for w in english_words(limit=words.get("limit"), seed=int(words.get("seed", 0))):
            texts.append(wt[stable_int("word", w) % len(wt)].format(w))
    seen: set[str] = set()
    out = []
    for t in texts:
        k = norm(t)
        if k and k not in banned and k not in seen:
            seen.add(k)
            out.append(t)
    return out


class ViewMemo:
    """Decoded views as uint8, up to ``budget_mb``; past the budget new views are simply not kept.

    Only the process that owns it reads or fills it: a DataLoader worker holds a copy, and copies
    filled in every worker would multiply the memory. A hit returns to_tensor's own arithmetic
    (uint8 / 255 in float32), so it is bit-identical to decoding the view again."""

    def __init__(self, budget_mb: float) -> None:
        self.budget = int(float(budget_mb) * 2**20)
        self.used = self.hits = self.misses = 0
        self.full = False
        self._rows: dict[Any, torch.Tensor] = {}
        self._meta: dict[Any, Any] = {}  # what ``put`` was given beside a view (a training view's crop)

    def get(self, key: Any) -> torch.Tensor | None:
        if get_worker_info() is not None:
            return None
        row = self._rows.get(key)
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return row.float().div_(255)

    def meta(self, key: Any) -> Any:
        """What ``put`` stored beside the view of ``key`` (None: nothing, or no such view)."""
        return self._meta.get(key)

    def put(self, key: Any, view: torch.Tensor, meta: Any = None) -> None:
        if get_worker_info() is not None or key in self._rows:
            return
        if self.used + view.numel() > self.budget:
            self.full = True
            return
        self._rows[key] = view.mul(255).round_().to(torch.uint8)
        if meta is not None:
            self._meta[key] = meta
        self.used += view.numel()

    def stats(self) -> dict[str, Any]:
        return {"views": len(self._rows), "mb": round(self.used / 2**20, 1), "budget_mb": round(self.budget / 2**20),
                "hits": self.hits, "misses": self.misses, "full": self.full}


def attach_view_memo(trainset: Any, eval_sets: dict[str, dict[str, Any]], budget_mb: float) -> ViewMemo | None:
    """One memo shared by the training set (not a stream: it is read once) and every eval set;
    ``budget_mb`` 0 turns it off."""
    if not budget_mb or float(budget_mb) <= 0:
        return None
    memo = ViewMemo(budget_mb)
    if isinstance(trainset, TrainSet):
        trainset.memo = memo
    for sets in eval_sets.values():
        for es in sets.values():
            es.memo = memo
    return memo


MIX_MODES = ("none", "mixup", "cutmix", "both")
MIX_CODES = ("none", "mixup", "cutmix")  # what an item gets ("both" picks one of the two per item)


def mix_problems(mode: Any, prob: Any, alpha: Any) -> list[str]:
    """One line per bad ``data.train.mix`` value (empty: the values are fine)."""
    out = []
    if mode not in MIX_MODES:
        out.append(f"data.train.mix.mode={mode!r} is not known: use none, mixup, cutmix or both")

    def number(v: Any) -> float:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")

    if not 0.0 <= number(prob) <= 1.0:
        out.append(f"data.train.mix.prob={prob!r} is not in [0, 1]: set the share of mixed items, "
                   f"e.g. data.train.mix.prob=0.5")
    if not (math.isfinite(number(alpha)) and number(alpha) > 0):
        out.append(f"data.train.mix.alpha={alpha!r} must be a positive number (the mixing weight is drawn from "
                   f"Beta(alpha, alpha)): e.g. data.train.mix.alpha=1.0")
    return out


@dataclass(frozen=True)
class MixSpec:
    """Mixup / cutmix of training items, consistent with the teacher (``TrainSet``): ``mode`` none,
    mixup, cutmix or both (one of the two per item), each item mixed with probability ``prob``, the
    mixing weight drawn from Beta(``alpha``, ``alpha``)."""

    mode: str = "none"
    prob: float = 0.5
    alpha: float = 1.0

    def __post_init__(self) -> None:
        problems = mix_problems(self.mode, self.prob, self.alpha)
        if problems:
            raise UserError(problems[0])

    @classmethod
    def from_config(cls, cfg: Any) -> "MixSpec":
        """``data.train.mix`` (a mapping, None or a MixSpec) -> MixSpec; a bad value is a one-line UserError."""
        if cfg is None:
            return cls()
        if isinstance(cfg, MixSpec):
            return cfg
        values = dict(cfg)
        unknown = sorted(set(values) - {"mode", "prob", "alpha"})
        if unknown:
            raise UserError(f"data.train.mix.{unknown[0]} is not a setting: use mode, prob and alpha")
        return cls(**values)

    def describe(self) -> str:
        return f"mix={self.mode}:prob={float(self.prob)!r}:alpha={float(self.alpha)!r}"


@dataclass
class ViewSpec:
    size: int
    views: int = 1  # K stored views per image
    augment: bool = False
    scale: tuple[float, float] = (0.6, 1.0)
    seed: int = 0
    mix: MixSpec = field(default_factory=MixSpec)  # mixup / cutmix (TrainSet); none by default

    def __post_init__(self) -> None:
        self.mix = MixSpec.from_config(self.mix)

    def base_describe(self) -> str:
        """The views before any mixing."""
        return f"size={self.size};views={self.views};augment={self.augment};scale={tuple(self.scale)};seed={self.seed}"

    def describe(self) -> str:
        # mix appears only when on, so every fingerprint made before it existed stays as it was
        return self.base_describe() + (f";{self.mix.describe()}" if self.mix.mode != "none" else "")


class TrainSet(Dataset):
    """(image, view) items over the concatenation of several ImageSources, with a text each.

    Item j is image j // K, view j % K. ``__getitem__`` returns a dict:
    ``index`` (int), ``image`` ((3, S, S) float [0, 1] or None when unreadable), ``text_index``
    (int into ``self.texts``), ``paired`` (bool).

    Items of image-only sources (``image_only`` attribute, distill.datasets.ImageOnly) are never
    paired; ``image_only_ratio`` (None: no mixing) is their share of every batch (ResumableSampler).

    With ``spec.mix`` an item may be mixed with a partner's base view (see the module docstring):
    it is then not a real caption pair (``paired`` False) and keeps its base image's text.
    ``view_params(j)`` gives its crop, mix mode, partner, lam and cutmix box.
    """

    RECENT = 1024  # view_params of the items rendered last (load_view then paired/view_params: one render)

    def __init__(self, sources: Sequence[ImageSource], spec: ViewSpec, corpus: Sequence[str] = (),
                 image_only_ratio: float | None = None) -> None:
        if not sources:
            raise UserError("no training data: set data.train.sources to at least one source")
        self.sources = list(sources)
        self.spec = spec
        self.index: list[tuple[int, int]] = [(s, i) for s, src in enumerate(self.sources) for i in range(len(src))]
        if not self.index:
            raise UserError("the training sources are empty: check data.train.sources (paths, splits, limits)")
        captions: list[str] = []
        self._caption_of: list[int] = []
        cap_pos: dict[str, int] = {}
        for s, i in self.index:
            caps = self.sources[s].captions
            if caps is None:
                self._caption_of.append(-1)
                continue
            c = caps[i]
            if c not in cap_pos:
                cap_pos[c] = len(captions)
                captions.append(c)
            self._caption_of.append(cap_pos[c])
        self._image_only = [bool(getattr(self.sources[s], "image_only", False)) for s, _ in self.index]
        self.image_only_ratio = check_image_only_ratio(image_only_ratio, sum(self._image_only),
                                                       len(self._image_only) - sum(self._image_only))
        self.corpus = [t for t in corpus if t not in cap_pos]
        self.texts: list[str] = captions + self.corpus
        if any(c < 0 for c in self._caption_of) and not self.corpus:
            raise UserError("some training images have no caption and the text corpus is empty: "
                            "set data.train.corpus (e.g. imagenet_classes: true)")
        self.skips = SkipLog()
        self.memo: ViewMemo | None = None
        self._recent: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index) * self.spec.views

    def key(self, j: int) -> str:
        s, i = self.index[j // self.spec.views]
        return self.sources[s].key(i)

    def view_seed(self, j: int) -> int:
        return stable_int(self.spec.seed, self.key(j), j % self.spec.views)

    def text_index(self, j: int) -> int:
        c = self._caption_of[j // self.spec.views]
        if c >= 0:
            return c
        n_caps = len(self.texts) - len(self.corpus)
        return n_caps + self.view_seed(j) % len(self.corpus)

    def corpus_span(self) -> tuple[int, int]:
        """[start, end) of the corpus texts inside ``texts`` (captions come first)."""
        return len(self.texts) - len(self.corpus), len(self.texts)

    def captioned(self, j: int) -> bool:
        """Whether item j's image has its own caption (its text is then that caption, mixed or not)."""
        return self._caption_of[j // self.spec.views] >= 0

    def paired(self, j: int) -> bool:
        """A real (image, caption) pair: a captioned item that is not mixed with another image."""
        if not self.captioned(j):
            return False
        if self.mix_plan(j) is None:
            return True
        return self.view_params(j)["mix"] == "none"  # left unmixed when its partner is unreadable

    def image_only_items(self) -> list[bool]:
        """Per item j: whether it comes from an image-only source (the sampler's two groups)."""
        return [self._image_only[j // self.spec.views] for j in range(len(self))]

    def identity_files(self) -> list[tuple[str, list[str] | None]]:
        """(source name, the files its items are read from) per source, None for a source without
        files; the teacher cache hashes these files (distill.cache.data_identity)."""
        from distill.datasets import source_identity_files

        return [(getattr(src, "name", type(src).__name__), source_identity_files(src)) for src in self.sources]

    def fingerprint(self) -> str:
        """Hash of every item key, the view spec and the texts. The teacher cache adds the files'
        identity (sizes, mtimes, content hashes) on top: see ``identity_files``."""
        h = hashlib.sha256()
        h.update(self.spec.describe().encode())
        for src in self.sources:
            h.update(getattr(src, "name", type(src).__name__).encode())
        for j in range(len(self.index)):
            h.update(self.sources[self.index[j][0]].key(self.index[j][1]).encode())
        for t in self.texts:
            h.update(t.encode() + b"\x00")
        return h.hexdigest()[:16]

    def base_view(self, j: int) -> tuple[torch.Tensor | None, tuple[int, int, int, int, bool] | None]:
        """Item j's own view before any mixing, and its crop (top, left, h, w, flip; None for the
        un-augmented eval transform); (None, None) when the image is unreadable. Kept in the memo with
        its crop, so a view met again (as an item or as a partner) costs a lookup, not a decode."""
        key = ("train", self.spec.base_describe(), j)
        if self.memo is not None and (hit := self.memo.get(key)) is not None:
            return hit, self.memo.meta(key)
        s, i = self.index[j // self.spec.views]
        img = try_open(self.sources[s], i, self.skips)
        if img is None:
            return None, None
        crop = None
        if self.spec.augment:
            crop = crop_params(*img.size, self.view_seed(j), scale=tuple(self.spec.scale))
            view = apply_crop(img, self.spec.size, crop)
        else:
            view = eval_view(img, self.spec.size)
        if self.memo is not None:
            self.memo.put(key, view, meta=crop)
        return view, crop

    def mix_plan(self, j: int) -> dict[str, Any] | None:
        """How item j is to be mixed, from its seed alone (None: not mixed): {"mix": mixup | cutmix,
        "partner": an item of another image (its base view is mixed in), "lam": a's share, "box": the
        cutmix box (top, left, h, w) in view pixels, else None}. Whether the partner can be read is
        ``view_params``'s business."""
        m = self.spec.mix
        if m.mode == "none" or len(self.index) < 2:
            return None
        k = self.spec.views
        rng = np.random.default_rng(stable_int(self.spec.seed, self.key(j), j % k, "mix"))
        if not rng.random() < m.prob:
            return None
        mode = m.mode if m.mode != "both" else ("mixup" if rng.random() < 0.5 else "cutmix")
        other = int(rng.integers(len(self.index) - 1))
        other += other >= j // k  # never the item's own image
        partner = other * k + int(rng.integers(k))
        lam = float(rng.beta(m.alpha, m.alpha))
        box = None
        if mode == "cutmix":  # a square of area ~(1 - lam), wholly inside the view; lam from the actual box
            size = self.spec.size
            side = int(round(size * math.sqrt(1.0 - lam)))
            if side == 0:
                return None  # nothing to paste: the item is its own view
            top, left = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
            box, lam = (top, left, side, side), 1.0 - side * side / (size * size)
        return {"mix": mode, "partner": partner, "lam": lam, "box": box}

    def _render(self, j: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """Item j's pixels (None: unreadable) and its ``view_params``, computed together."""
        view, crop = self.base_view(j)
        params: dict[str, Any] = {"valid": view is not None, "crop": None, "mix": "none", "partner": None,
                                  "lam": 1.0, "box": None}
        if crop is not None:
            params["crop"] = dict(zip(("top", "left", "h", "w", "flip"), (*map(int, crop[:4]), bool(crop[4]))))
        plan = self.mix_plan(j) if view is not None else None
        if plan is not None:
            other, _ = self.base_view(plan["partner"])  # unreadable: counted in skips, the item stays unmixed
            if other is not None:
                view = mix_views(view, other, plan)
                params.update(plan)
                if plan["box"] is not None:
                    params["box"] = dict(zip(("top", "left", "h", "w"), plan["box"]))
        self._recent[j] = params
        self._recent.move_to_end(j)
        while len(self._recent) > self.RECENT:
            self._recent.popitem(last=False)
        return view, params

    def view_params(self, j: int) -> dict[str, Any]:
        """What item j's pixels are: {"valid": readable, "crop": {top, left, h, w, flip} of the original
        image (None: eval transform), "mix": none | mixup | cutmix, "partner": the item whose base view
        is mixed in (None), "lam": item j's own share (1.0 unmixed), "box": the cutmix box {top, left,
        h, w} in view pixels (None)}. The teacher cache stores these per item."""
        if j in self._recent:
            return dict(self._recent[j])
        return dict(self._render(j)[1])

    def load_view(self, j: int) -> torch.Tensor | None:
        return self._render(j)[0]

    def unmixed(self) -> "TrainSet | UnmixedViews":
        """The items as a fine-tune must see them: this set itself when nothing is mixed, else
        ``UnmixedViews`` (each item's own view, caption pairs intact)."""
        return self if self.spec.mix.mode == "none" else UnmixedViews(self)

    def __getitem__(self, j: int) -> dict[str, Any]:
        view, params = self._render(j)
        captioned = self.captioned(j)
        return {"index": j, "image": view, "text_index": self.text_index(j),
                "paired": captioned and params["mix"] == "none", "captioned": captioned, "params": params}


class UnmixedViews(Dataset):
    """A TrainSet's items before mixing (``TrainSet.unmixed``): each item's own augmented view, paired
    when its image has a caption. A fine-tune trains on real (image, caption) pairs, so with
    ``data.train.mix`` on it reads these while the teacher cache and the student read the mixed ones.
    Everything else (spec, index, texts, keys, skips, memo) is the TrainSet's own."""

    def __init__(self, trainset: "TrainSet") -> None:
        self.trainset = trainset

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainset, name)

    def __len__(self) -> int:
        return len(self.trainset)

    def paired(self, j: int) -> bool:
        return self.trainset.captioned(j)

    def load_view(self, j: int) -> torch.Tensor | None:
        return self.trainset.base_view(j)[0]

    def __getitem__(self, j: int) -> dict[str, Any]:
        view, _ = self.trainset.base_view(j)
        captioned = self.trainset.captioned(j)
        return {"index": j, "image": view, "text_index": self.trainset.text_index(j), "paired": captioned,
                "captioned": captioned, "params": None}


def mix_views(a: torch.Tensor, b: torch.Tensor, plan: dict[str, Any]) -> torch.Tensor:
    """``a`` mixed with ``b`` as ``plan`` says: mixup lam * a + (1 - lam) * b, or cutmix (``b``'s box in ``a``)."""
    if plan["mix"] == "mixup":
        lam = float(plan["lam"])
        return (lam * a + (1.0 - lam) * b).clamp_(0.0, 1.0)  # [0, 1] like every view (float rounding aside)
    top, left, h, w = plan["box"]
    out = a.clone()
    out[:, top:top + h, left:left + w] = b[:, top:top + h, left:left + w]
    return out


def check_image_only_ratio(ratio: float | None, n_image_only: int, n_other: int) -> float | None:
    """``data.train.image_only_ratio`` as a float (None: no mixing), or a one-line UserError when it
    is outside [0, 1] or asks for a group the sources do not have."""
    if ratio is None:
        return None
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        r = float("nan")
    if not 0.0 <= r <= 1.0:
        raise UserError(f"data.train.image_only_ratio={ratio} is not in [0, 1]: set the share of image-only "
                        f"items per batch, e.g. data.train.image_only_ratio=0.25 (null: no mixing)")
    if r > 0 and not n_image_only:
        raise UserError(f"data.train.image_only_ratio={ratio} but no training source is image-only: add one "
                        f"(distill.datasets.image_only / image_files / csv_images, distill.pool.general_pool) "
                        f"or set data.train.image_only_ratio=null")
    if r < 1 and not n_other:
        raise UserError(f"data.train.image_only_ratio={ratio} but every training source is image-only: set "
                        f"data.train.image_only_ratio=1 (or null), or add a captioned source")
    return r


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack readable items; unreadable ones are dropped and their indices reported in ``skipped``."""
    ok = [it for it in items if it["image"] is not None]
    return {
        "index": torch.tensor([it["index"] for it in ok], dtype=torch.long),
        "image": torch.stack([it["image"] for it in ok]) if ok else torch.empty(0),
        "text_index": torch.tensor([it["text_index"] for it in ok], dtype=torch.long),
        "paired": all(it["paired"] for it in ok) and bool(ok),
        "pair_mask": torch.tensor([bool(it["paired"]) for it in ok], dtype=torch.bool),
        # an item with its own caption (a mixed one included: it keeps its base image's caption)
        "caption_mask": torch.tensor([bool(it.get("captioned", it["paired"])) for it in ok], dtype=torch.bool),
        "params": [it.get("params") for it in ok],  # TrainSet.view_params of each item (the cache stores them)
        "skipped": [it["index"] for it in items if it["image"] is None],
    }


class ResumableSampler(Sampler[int]):
    """An endless stream of indices: epoch e is a permutation seeded by (seed, e).

    Position ``start`` counts samples of the *global* stream, so a resumed run continues at the
    exact sample it stopped at. With ``world_size`` > 1 each global batch of
    ``batch_size * world_size`` indices is split into contiguous per-rank chunks, so the ranks
    together see exactly the batch one process would see.

    With ``image_only`` (per item: in the image-only group) and ``image_only_ratio`` r, global batch
    b holds floor((b+1)·r·G) − floor(b·r·G) image-only items (G = the global batch) and paired ones
    for the rest, each group an endless seeded permutation of its own, the batch shuffled by (seed, b):
    the share is exact over any run of batches, and position ``start`` alone still fixes the stream.
    """

    def __init__(self, n: int, seed: int = 0, start: int = 0, batch_size: int = 1,
                 rank: int = 0, world_size: int = 1, valid: Sequence[bool | int] | None = None,
                 image_only: Sequence[bool] | None = None, image_only_ratio: float | None = None) -> None:
        # valid[i]: False skips item i; an int > 1 repeats it in every epoch (class-balanced sampling)
        self.order = [i for i in range(n) for _ in range(1 if valid is None else int(valid[i]))]
        if not self.order:
            raise UserError("no readable training images: every image failed to load (see the skip log)")
        self.seed, self.start, self.bs, self.rank, self.world = seed, start, batch_size, rank, world_size
        self.ratio = None if image_only is None or image_only_ratio is None else float(image_only_ratio)
        if self.ratio is not None:
            self.groups = ([i for i in self.order if image_only[i]], [i for i in self.order if not image_only[i]])
            for group, need, what in ((self.groups[0], self.ratio > 0, "image-only"),
                                      (self.groups[1], self.ratio < 1, "paired")):
                if need and not group:
                    raise UserError(f"no readable {what} training images for data.train.image_only_ratio="
                                    f"{self.ratio} (see the skip log): fix the data or change the ratio")

    def _perm_stream(self, order: list[int], start: int, *tag: object) -> Iterator[int]:
        n = len(order)
        epoch, offset = divmod(start, n)
        while True:
            g = torch.Generator().manual_seed(stable_int(self.seed, *tag, epoch) % (2**63))
            perm = torch.randperm(n, generator=g).tolist()
            for p in perm[offset:]:
                yield order[p]
            epoch, offset = epoch + 1, 0

    def _image_only_before(self, batch: int, gb: int) -> int:
        """How many image-only items the global batches before ``batch`` hold."""
        return math.floor(batch * gb * self.ratio)

    def global_stream(self, start: int) -> Iterator[int]:
        if self.ratio is None:
            yield from self._perm_stream(self.order, start)
            return
        gb = self.bs * self.world
        b, skip = divmod(start, gb)
        a0 = self._image_only_before(b, gb)
        img = self._perm_stream(self.groups[0], a0, "image_only") if self.groups[0] else iter(())
        pair = self._perm_stream(self.groups[1], b * gb - a0, "paired") if self.groups[1] else iter(())
        while True:
            k = self._image_only_before(b + 1, gb) - self._image_only_before(b, gb)
            chunk = [next(img) for _ in range(k)] + [next(pair) for _ in range(gb - k)]
            g = torch.Generator().manual_seed(stable_int(self.seed, "mix", b) % (2**63))
            chunk = [chunk[p] for p in torch.randperm(gb, generator=g).tolist()]
            yield from chunk[skip:]
            b, skip = b + 1, 0

    def __iter__(self) -> Iterator[int]:
        gb = self.bs * self.world
        stream = self.global_stream(self.start)
        while True:
            chunk = [next(stream) for _ in range(gb)]
            yield from chunk[self.rank * self.bs:(self.rank + 1) * self.bs]


class EvalSet:
    """An evaluation set: labels or captions in memory, images decoded when needed, chunk by chunk.

    Images come either from ``source`` (its readable items ``indices``, through ``eval_view`` at
    ``size`` px, as ``load_eval_set`` builds it) or from an in-memory (N, 3, S, S) [0, 1] tensor given
    as ``images`` (tests, hand-made sets). ``chunks`` streams them (what evaluation uses, so a 10k-image
    set never sits in memory as float pixels; a ``memo`` keeps them as uint8 within its budget),
    ``head`` gives a small batch, and ``images`` decodes them all at once for callers that want one
    tensor (bit-identical to the chunks).
    """

    def __init__(self, name: str, images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 classnames: list[str] | None = None, templates: list[str] | None = None,
                 captions: list[str] | None = None, skipped: int = 0, keys: list[str] | None = None, *,
                 source: ImageSource | None = None, indices: Sequence[int] | None = None,
                 size: int | None = None) -> None:
        if (images is None) == (source is None):
            raise ValueError("EvalSet needs exactly one of images (a tensor) or source (with indices and size)")
        self.name, self.labels, self.classnames, self.templates = name, labels, classnames, templates
        self.captions, self.skipped, self.keys = captions, skipped, list(keys or [])
        self.source, self.size, self._tensor = source, size, images
        self.indices = list(range(len(images))) if images is not None else list(indices or [])
        self.memo: ViewMemo | None = None  # decoded views, shared with the training set (attach_view_memo)
        self.skip_log: dict[str, Any] = {"count": int(skipped), "first": []}  # filled by load_eval_set

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"EvalSet({self.name!r}, {len(self)} images, {'in memory' if self._tensor is not None else 'streamed'})"

    def _decode(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start`` to ``stop`` - 1 (positions in the set) as (B, 3, S, S), with the eval transform."""
        if self._tensor is not None:
            return self._tensor[start:stop]
        out = torch.empty(0, 3, self.size, self.size)
        for p in range(start, stop):
            key = ("eval", self.name, self.size, self.indices[p])
            view = self.memo.get(key) if self.memo is not None else None
            if view is None:
                img = try_open(self.source, self.indices[p], SkipLog(keep=0))
                if img is None:  # it was readable when the set was loaded: the data changed under the run
                    raise UserError(f"eval set {self.name}: image {self.keys[p] if self.keys else p} became "
                                    f"unreadable after loading; restore the data or rerun")
                view = eval_view(img, self.size)
                if self.memo is not None:
                    self.memo.put(key, view)
            if p == start:  # filled in place, not stacked from a list: no second copy of the chunk
                out = torch.empty((stop - start, *view.shape), dtype=view.dtype)
            out[p - start] = view
        return out

    def chunks(self, chunk_size: int = 256) -> Iterator[torch.Tensor]:
        """The images in order, ``chunk_size`` at a time, each (B, 3, S, S) [0, 1]."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        for i in range(0, len(self), chunk_size):
            yield self._decode(i, min(i + chunk_size, len(self)))

    def head(self, n: int = 8) -> torch.Tensor:
        """The first ``n`` images (fewer if the set is smaller): a small batch, e.g. for timing."""
        return self._decode(0, min(n, len(self)))

    @property
    def images(self) -> torch.Tensor:
        """Every image as one (N, 3, S, S) tensor, decoded on each access: for small sets only."""
        return self._tensor if self._tensor is not None else self._decode(0, len(self))


def load_eval_set(name: str, source: ImageSource, size: int, templates: Sequence[str] | None = None) -> EvalSet:
    """An evaluation set over ``source`` at ``size`` px with the eval transform.

    Opens every image once to find the readable ones (unreadable ones are counted in ``skipped`` and
    logged, as training does) and keeps their labels or captions; pixels are decoded again, chunk by
    chunk, when the set is evaluated (``EvalSet.chunks``).
    """
    skips = SkipLog()
    indices, labels, caps, keys = [], [], [], []
    for i in range(len(source)):
        if try_open(source, i, skips) is None:
            continue
        indices.append(i)
        keys.append(source.key(i))
        if source.labels is not None:
            labels.append(int(source.labels[i]))
        if source.captions is not None:
            caps.append(source.captions[i])
    if not indices:
        raise UserError(f"evaluation set {name} has no readable image ({skips.summary()})")
    if skips.count:
        log.warning("eval set %s: %s", name, skips.summary())
    es = EvalSet(
        name=name,
        labels=torch.tensor(labels) if source.labels is not None else None,
        classnames=list(source.classnames) if source.classnames is not None else None,
        templates=list(templates) if templates else None,
        captions=caps if source.captions is not None else None,
        skipped=skips.count,
        keys=keys,
        source=source,
        indices=indices,
        size=size,
    )
    es.skip_log = skips.as_dict()  # the report names the first skipped images
    return es
