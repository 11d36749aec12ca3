"""The project's one image preprocessing, torch-free (numpy + Pillow only).

Training (``distill.imageio.load_rgb`` and ``distill.data.eval_view``), evaluation
(``distill.data.load_eval_set``) and the edge runtime (``distill.edge``) all call the functions
here, and ``distill.export.write_bundle`` stores the spec as the bundle's preprocess.json, so a
device sees exactly the pixels the student was trained and evaluated on.

The spec (a JSON-able dict; ``default_spec`` builds it, ``check_spec`` validates it and fills what
an older preprocess.json lacks):

    size            S: the output is (3, S, S)
    interpolation   PIL resampling filter of the resize: bicubic | bilinear | nearest | lanczos
    resize_mode     shortest: the short side becomes S (the long side int(S * long / short)), then
                    a centre crop S x S with offsets int(round(d / 2)), as torchvision's
                    Resize(S) + CenterCrop(S), i.e. open_clip's eval transform;
                    squash: resize straight to S x S
    mean, std       per channel, applied to pixels / 255: (x / 255 - mean) / std, float32
    rgb             how any decoded image becomes 8-bit RGB, in this order:
      max_side        4096: a JPEG whose sides are both >= 2 * max_side is decoded at 1/2, 1/4 or
                      1/8 scale (draft); then an image still larger than max_side is reduced by
                      the integer factor ceil(long side / max_side) (box filter) when its mode is
                      one of reduce_modes (RGB, RGBA, L, LA, CMYK); other modes stay full size
      high_bit_depth  rescale_range: I;16*, I (32-bit) and F images become L by
                      round((a - min) / (max - min) * 255), all zeros when flat (PIL would clip)
      palette         composite: P with a transparency entry goes through RGBA (so onto the
                      background), P without one is converted to RGB
      alpha           composite: LA, La, PA, RGBA, RGBa are pasted onto the background with their
                      alpha channel as the mask (transparent pixels become the background)
      background      [255, 255, 255]: white, because stamps and logos are drawn on white and
                      black would turn every transparent stamp into a silhouette
      other_modes     pil_convert: L, 1, CMYK, YCbCr, LAB, HSV -> PIL's convert("RGB")
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

# open_clip.constants.OPENAI_DATASET_MEAN / _STD, repeated so that this module needs no open_clip
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_SIDE = 4096
REDUCE_MODES = ("RGB", "RGBA", "L", "LA", "CMYK")
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
RESIZE_MODES = ("shortest", "squash")
DEFAULT_RGB: dict[str, Any] = {"max_side": MAX_SIDE, "reduce_modes": list(REDUCE_MODES),
                               "high_bit_depth": "rescale_range", "palette": "composite", "alpha": "composite",
                               "background": [255, 255, 255], "other_modes": "pil_convert"}
# the rules that have one implemented value; a spec naming another value is refused, not ignored
_FIXED_RGB = {"reduce_modes": list(REDUCE_MODES), "high_bit_depth": "rescale_range", "palette": "composite",
              "alpha": "composite", "other_modes": "pil_convert"}


class SpecError(ValueError):
    """A preprocessing spec this implementation cannot follow exactly."""


def default_spec(size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD
                 ) -> dict[str, Any]:
    """The project's eval/edge preprocessing at ``size`` px (also an open_clip preprocess_cfg superset)."""
    return {"size": int(size), "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "interpolation": "bicubic", "resize_mode": "shortest", "rgb": _copy_rgb(DEFAULT_RGB)}


def _copy_rgb(rgb: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in rgb.items()}


def check_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A complete, validated copy of ``spec``; raises SpecError (one line) on what cannot be followed.

    Missing keys take the project's defaults: a preprocess.json written before the ``rgb`` rules were
    recorded describes a student trained with exactly these rules (training always used them).
    """
    if "size" not in spec:
        raise SpecError("preprocess spec has no size")
    size = spec["size"]
    if isinstance(size, (list, tuple)):
        if len(size) not in (1, 2) or len(set(size)) != 1:
            raise SpecError(f"preprocess size {list(size)} is not square; only S x S inputs are supported")
        size = size[0]
    try:
        out = default_spec(int(size))
    except (TypeError, ValueError):
        raise SpecError(f"preprocess size {size!r} is not an integer") from None
    if out["size"] < 1:
        raise SpecError(f"preprocess size {size!r} must be positive")
    for k, v in spec.items():
        if k not in ("size", "rgb"):
            out[k] = list(v) if isinstance(v, tuple) else v
    for k in ("mean", "std"):
        v = out[k]
        if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            raise SpecError(f"preprocess {k} must be three numbers, got {v!r}")
        out[k] = [float(x) for x in v]
    if any(s == 0 for s in out["std"]):
        raise SpecError(f"preprocess std {out['std']} has a zero")
    if out["interpolation"] not in RESAMPLE:
        raise SpecError(f"preprocess interpolation {out['interpolation']!r} is not supported "
                        f"(use one of {', '.join(RESAMPLE)})")
    if out["resize_mode"] not in RESIZE_MODES:
        raise SpecError(f"preprocess resize_mode {out['resize_mode']!r} is not supported "
                        f"(use one of {', '.join(RESIZE_MODES)})")
    rgb = dict(out["rgb"])
    given = spec.get("rgb") or {}
    if not isinstance(given, Mapping):
        raise SpecError(f"preprocess rgb must be a mapping, got {type(given).__name__}")
    for k, v in given.items():
        if k not in DEFAULT_RGB:
            raise SpecError(f"preprocess rgb rule {k!r} is unknown to this version (knows {', '.join(DEFAULT_RGB)})")
        rgb[k] = list(v) if isinstance(v, tuple) else v
    for k, want in _FIXED_RGB.items():
        if rgb[k] != want:
            raise SpecError(f"preprocess rgb.{k}={rgb[k]!r} is not implemented (only {want!r})")
    bg = rgb["background"]
    if not (isinstance(bg, list) and len(bg) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in bg)):
        raise SpecError(f"preprocess rgb.background must be three integers 0..255, got {bg!r}")
    if not isinstance(rgb["max_side"], int) or isinstance(rgb["max_side"], bool) or rgb["max_side"] < 1:
        raise SpecError(f"preprocess rgb.max_side must be a positive integer, got {rgb['max_side']!r}")
    out["rgb"] = rgb
    return out


def _rgb_rules(rules: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return DEFAULT_RGB if rules is None else rules


# ---------------------------------------------------------------------------- any image -> RGB

def to_rgb(img: Image.Image, rules: Mapping[str, Any] | None = None) -> Image.Image:
    """Any PIL mode -> 8-bit RGB by the spec's ``rgb`` rules (see the module docstring)."""
    background = tuple(_rgb_rules(rules)["background"])
    if img.mode in HIGH_BIT_DEPTH_MODES:
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        bg = Image.new("RGB", img.size, background)
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return img


def rgb_image(img: Image.Image, rules: Mapping[str, Any] | None = None) -> Image.Image:
    """An opened (lazy or loaded) PIL image -> fully decoded 8-bit RGB: huge-image reduction, then ``to_rgb``."""
    rules = _rgb_rules(rules)
    max_side = int(rules["max_side"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if max(img.size) > max_side and img.format == "JPEG":
            img.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4, 1/8 scale: cheap; a no-op once loaded
        img.load()  # truncated files raise here (LOAD_TRUNCATED_IMAGES stays False)
    if max(img.size) > max_side and img.mode in rules["reduce_modes"]:
        img = img.reduce(math.ceil(max(img.size) / max_side))
    return to_rgb(img, rules)


def open_rgb(path: str | os.PathLike | Any, rules: Mapping[str, Any] | None = None) -> Image.Image:
    """Open a file (path or binary file object) as RGB, fully decoded. Raises on unreadable input."""
    if isinstance(path, (str, os.PathLike)):
        if not os.path.exists(path):
            raise FileNotFoundError("file not found")
        if os.path.getsize(path) == 0:
            raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    return rgb_image(img, rules)


# ---------------------------------------------------------------------------- RGB -> model input

def resize_crop(img: Image.Image, spec: Mapping[str, Any]) -> Image.Image:
    """RGB image -> S x S RGB image by the spec's resize_mode and interpolation."""
    size = int(spec["size"][0] if isinstance(spec["size"], (list, tuple)) else spec["size"])
    resample = RESAMPLE[spec.get("interpolation", "bicubic")]
    mode = spec.get("resize_mode", "shortest")
    w, h = img.size
    if mode == "shortest":
        # torchvision Resize(int): the short side becomes S, the long side int(S * long / short)
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
        # torchvision CenterCrop: offsets rounded half to even, as in int(round(x))
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        return img.crop((left, top, left + size, top + size))
    if mode == "squash":
        return img.resize((size, size), resample) if (w, h) != (size, size) else img
    raise SpecError(f"preprocess resize_mode {mode!r} is not supported (use one of {', '.join(RESIZE_MODES)})")


def to_unit(img: Image.Image) -> np.ndarray:
    """8-bit RGB image -> (3, H, W) float32 in [0, 1], the same numbers as torchvision's to_tensor."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.float32).transpose(2, 0, 1)) / np.float32(255.0)


def normalize(x: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """(..., 3, H, W) float32 in [0, 1] -> (x - mean) / std, float32."""
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def eval_pixels(img: Image.Image, spec: Mapping[str, Any]) -> np.ndarray:
    """An RGB image (as ``open_rgb`` returns; other modes go through ``to_rgb``) -> (3, S, S) float32 in
    [0, 1], un-normalised: the eval view the pipeline stores and the edge runtime normalises."""
    return to_unit(resize_crop(to_rgb(img, spec.get("rgb")), spec))


def preprocess_image(img: Image.Image, spec: Mapping[str, Any]) -> np.ndarray:
    """An opened PIL image -> (3, S, S) float32 normalised model input (what the ONNX "pixels" takes)."""
    return normalize(eval_pixels(rgb_image(img, spec.get("rgb")), spec), spec)


def load_image(path: str | os.PathLike | Any, spec: Mapping[str, Any]) -> np.ndarray:
    """An image file -> (3, S, S) float32 normalised model input. Raises on unreadable files."""
    return normalize(eval_pixels(open_rgb(path, spec.get("rgb")), spec), spec)
