"""``kind: vit`` (the default): open_clip's own VisionTransformer, narrow; weight inheritance from an
open_clip ViT teacher lives in distill.students.inherit; FLOPs are the analytic count of distill.flops."""

from __future__ import annotations

from typing import Any, Mapping

import open_clip
import torch

from distill.errors import UserError
from distill.students.base import StudentTower, register_tower

# open_clip VisionCfg fields a student config may set besides the shape (pool_type: "tok" pools the
# class token, "avg" averages the patch tokens)
_VISION_EXTRAS = ("pool_type", "final_ln_after_pool", "no_ln_pre", "ls_init_value", "patch_dropout")
_SHAPE = ("width", "layers", "heads", "patch_size", "image_size", "mlp_ratio")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


@register_tower
class VitTower(StudentTower):
    """open_clip's VisionTransformer, narrow; TinyCLIP-style inheritance from open_clip ViT teachers.

    Keys: width, layers, heads, patch_size, image_size, mlp_ratio, and open_clip's pool_type,
    final_ln_after_pool, no_ln_pre, ls_init_value, patch_dropout.
    """

    kind = "vit"
    keys = (*_SHAPE, *_VISION_EXTRAS)

    def vision_cfg(self, vision: Mapping[str, Any]) -> dict[str, Any]:
        vision = {k: v for k, v in vision.items() if k != "kind"}
        width, heads = int(vision["width"]), int(vision["heads"])
        if width % heads:
            raise UserError(f"student.vision.width={width} is not divisible by heads={heads}: pick heads dividing width")
        image_size, patch_size = int(vision["image_size"]), int(vision["patch_size"])
        if image_size % patch_size:
            raise UserError(f"student.vision.image_size={image_size} is not a multiple of patch_size={patch_size}")
        unknown = set(vision) - set(self.keys)
        if unknown:
            raise UserError(f"student.builder.vision has unknown keys {sorted(unknown)}: use width, layers, heads, "
                            f"patch_size, image_size, mlp_ratio or one of {list(_VISION_EXTRAS)} "
                            f"(or kind=timm / efficientnet_lite for another image tower)")
        cfg = {"image_size": image_size, "layers": int(vision["layers"]), "width": width,
               "head_width": width // heads, "patch_size": patch_size,
               "mlp_ratio": float(vision.get("mlp_ratio", 4.0))}
        for key in _VISION_EXTRAS:  # open_clip VisionCfg fields passed through as given
            if vision.get(key) is not None:
                cfg[key] = vision[key]
        return cfg

    def check(self, vision: Mapping[str, Any], cfg: Any = None) -> list[str]:
        out = []
        width, heads = vision.get("width"), vision.get("heads")
        if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
            out.append(f"student.builder.vision.width={width} is not divisible by heads={heads}: "
                       f"pick heads from {_divisors(width)}")
        size, patch = vision.get("image_size"), vision.get("patch_size")
        if isinstance(size, int) and isinstance(patch, int) and patch > 0 and size % patch:
            out.append(f"student.builder.vision.image_size={size} is not a multiple of patch_size={patch}: "
                       f"use image_size={size - size % patch or patch} or a patch size dividing {size}")
        for key in ("width", "layers", "heads", "patch_size", "image_size"):
            if key in vision and (not isinstance(vision[key], int) or vision[key] < 1):
                out.append(f"student.builder.vision.{key}={vision[key]!r} must be a positive integer")
        unknown = sorted(set(vision) - set(self.keys) - {"kind"})
        if unknown:
            out.append(f"student.builder.vision has unknown keys {unknown} for kind=vit: use {', '.join(_SHAPE)} or "
                       f"one of {list(_VISION_EXTRAS)} (a pretrained start: student.init=inherit from an open_clip "
                       f"ViT teacher, or kind=timm with vision.pretrained=FILE)")
        return out

    def owns(self, visual: torch.nn.Module) -> bool:
        return isinstance(visual, open_clip.transformer.VisionTransformer)

    def image_flops(self, model: torch.nn.Module, image_size: int) -> int | None:
        """None: distill.flops counts a ViT analytically (open_clip's profiler convention); its attention
        escapes FlopCounterMode on CPU (the fused fast path)."""
        return None
