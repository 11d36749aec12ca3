"""The student's text tower: a narrow distilled open_clip text transformer, or the teacher's own
text tower copied and frozen; which parameters belong to which tower."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import open_clip
import torch
from open_clip.transformer import QuickGELU

from distill.errors import UserError

log = logging.getLogger(__name__)

TEXT_PARAM_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def _distilled_text_cfg(text: dict[str, Any]) -> dict[str, Any]:
    tw, th = int(text["width"]), int(text["heads"])
    if tw % th:
        raise UserError(f"student.text.width={tw} is not divisible by heads={th}: pick heads dividing width")
    return {"context_length": int(text.get("context_length", 77)), "vocab_size": int(text.get("vocab_size", 49408)),
            "width": tw, "heads": th, "layers": int(text["layers"]), "mlp_ratio": float(text.get("mlp_ratio", 4.0))}


def copy_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A model_cfg with its nested dicts copied (open_clip's constructors may keep or change them)."""
    return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}


def text_cfg_for(embed_dim: int, text: Mapping[str, Any], quick_gelu: bool = False,
                 teacher_model: torch.nn.Module | None = None,
                 teacher_text_cfg: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], bool, str]:
    """(open_clip text_cfg, quick_gelu, mode) of student.builder.text: ``mode="distilled"`` a narrow
    text transformer; ``mode="teacher"`` the teacher's text tower (its config, its activation)."""
    text, mode = dict(text), text.get("mode", "distilled")
    if mode == "distilled":
        return _distilled_text_cfg(text), bool(quick_gelu), mode
    if mode != "teacher":
        raise UserError(f"student.text.mode={mode!r} is unknown: use 'distilled' or 'teacher'")
    teacher_model = _require_open_clip(teacher_model)
    text_cfg = dict(teacher_text_cfg) if teacher_text_cfg is not None else text_cfg_of(teacher_model)
    t_dim = _text_output_dim(teacher_model)
    if t_dim != int(embed_dim):
        raise UserError(f"student.text.mode=teacher needs embed_dim == the teacher's text output dim {t_dim} "
                        f"(got {embed_dim}): set student.embed_dim={t_dim} or leave it unset")
    teacher_qg = _uses_quick_gelu(teacher_model.transformer)
    if teacher_qg != bool(quick_gelu):
        log.info("student quick_gelu=%s to match the teacher's text tower", teacher_qg)
    return text_cfg, teacher_qg, mode


def _require_open_clip(teacher_model: Any) -> open_clip.model.CLIP:
    if not isinstance(teacher_model, open_clip.model.CLIP):
        kind = "no teacher model" if teacher_model is None else type(teacher_model).__name__
        raise UserError(f"student.text.mode=teacher needs an open_clip CLIP teacher with a built-in text tower "
                        f"(got {kind}): use student.text.mode=distilled or an open_clip teacher")
    return teacher_model


def _uses_quick_gelu(transformer: torch.nn.Module) -> bool:
    return any(isinstance(m, QuickGELU) for m in transformer.modules())


def _text_output_dim(model: open_clip.model.CLIP) -> int:
    p = model.text_projection
    if p is None:
        return int(model.token_embedding.embedding_dim)
    return int(p.out_features if isinstance(p, torch.nn.Linear) else p.shape[1])


def text_cfg_of(model: open_clip.model.CLIP) -> dict[str, Any]:
    """Read an open_clip text_cfg off a built CLIP (when its config dict is not at hand).

    Covers the options that change the parameter layout or the output of open_clip's standard
    text tower; ``attach_teacher_text_tower`` checks the rebuilt tower's names and shapes.
    """
    model = _require_open_clip(model)
    block = model.transformer.resblocks[0]
    width = int(model.token_embedding.embedding_dim)
    cfg: dict[str, Any] = {
        "context_length": int(model.positional_embedding.shape[0]),
        "vocab_size": int(model.token_embedding.num_embeddings),
        "width": width,
        "heads": int(block.attn.num_heads),
        "layers": len(model.transformer.resblocks),
        "mlp_ratio": block.mlp.c_fc.out_features / width,
    }
    ls = getattr(block, "ls_1", None)
    if ls is not None and hasattr(ls, "gamma"):
        cfg["ls_init_value"] = 1e-5  # only sizes the LayerScale; values are copied from the teacher
    if model.attn_mask is None:
        cfg["no_causal_mask"] = True
    if model.text_pool_type != "argmax":
        cfg["pool_type"] = model.text_pool_type
        cfg["eos_id"] = int(model.text_eos_id)
    if model.text_projection is None:
        cfg["proj_type"] = "none"
    elif isinstance(model.text_projection, torch.nn.Linear):
        cfg["proj_type"] = "linear"
        cfg["proj_bias"] = model.text_projection.bias is not None
    eps = float(getattr(model.ln_final, "eps", 1e-5))
    if eps != 1e-5:
        cfg["norm_kwargs"] = {"eps": eps}
    return cfg


def _is_text_param(name: str) -> bool:
    return name.startswith(TEXT_PARAM_PREFIXES)


def tower_of(param_name: str) -> str:
    """"text" or "image" for a parameter of an open_clip CLIP ("" for the logit scale and the like):
    which train.lr_scale entry applies to it."""
    return "text" if _is_text_param(param_name) else "image" if param_name.startswith("visual.") else ""


def attach_teacher_text_tower(student: open_clip.model.CLIP, teacher_model: open_clip.model.CLIP) -> list[str]:
    """Copy the teacher's text tower into ``student`` and freeze it (requires_grad False).

    Copies token_embedding, positional_embedding, transformer, ln_final, text_projection and the
    causal attn_mask. The student's text_cfg must equal the teacher's. Returns the frozen names.
    """
    teacher_model = _require_open_clip(teacher_model)
    s_params = {n: p for n, p in student.named_parameters() if _is_text_param(n)}
    t_params = {n: p for n, p in teacher_model.named_parameters() if _is_text_param(n)}
    s_shapes = {n: tuple(p.shape) for n, p in s_params.items()}
    t_shapes = {n: tuple(p.shape) for n, p in t_params.items()}
    if s_shapes != t_shapes:
        diff = sorted(set(s_shapes.items()) ^ set(t_shapes.items()))[:3]
        raise UserError(f"the teacher's text tower cannot be rebuilt in the student (first differences: {diff}); "
                        f"use student.text.mode=distilled")
    with torch.no_grad():
        for n, p in s_params.items():
            p.copy_(t_params[n].to(p.device, p.dtype))
            p.requires_grad_(False)
    if teacher_model.attn_mask is not None:
        student.attn_mask = teacher_model.attn_mask.detach().clone().to(student.token_embedding.weight.device)
    student.text_pool_type = teacher_model.text_pool_type
    student.text_eos_id = teacher_model.text_eos_id
    return sorted(s_params)
