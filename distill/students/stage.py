"""The student stage: the configured student built from its ``student`` config (any registered image
tower kind), with optional weight inheritance and a teacher-informed token table, and its tokenizer."""

from __future__ import annotations

import logging
import time
from typing import Any

import open_clip
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from distill.errors import UserError
from distill.students.inherit import inherit_from_teacher
from distill.students.tokens import init_tokens_from_embeddings, init_tokens_from_teacher, token_texts

log = logging.getLogger("distill")


def build_student_stage(cfg: DictConfig, teacher: Any, cache_dir: str | None = None,
                        token_init: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The narrow student (open_clip CLIP) and its open_clip model_cfg; optional inheritance and
    teacher-informed token table (its teacher embeddings kept under ``cache_dir`` when given;
    ``token_init=False`` skips it, for DDP ranks > 0, which receive rank 0's initial weights)."""
    teacher_model = teacher.model
    kwargs: dict[str, Any] = {"embed_dim": int(cfg.get("embed_dim") or teacher.embed_dim)}
    if cfg.builder.text.get("mode") == "teacher":
        kwargs["teacher_model"] = teacher_model
    model, model_cfg = instantiate(cfg.builder, **kwargs, _convert_="all")
    if cfg.get("init", "random") == "inherit":
        if teacher_model is None:
            raise UserError("student.init=inherit needs an open_clip teacher: use student.init=random")
        report = inherit_from_teacher(model, teacher_model)
        log.info("inherited %d tensors from the teacher", sum(v != "random" for v in report.values()))
    mode = cfg.get("token_init", "random")
    if mode == "teacher" and token_init:
        if cfg.builder.text.get("mode", "distilled") != "distilled":
            raise UserError("student.token_init=teacher applies to a distilled text tower: use student.token_init=random")
        t0 = time.time()
        tok = student_tokenizer(model_cfg)
        if cache_dir is None:
            info = init_tokens_from_teacher(model, teacher.encode_text, tok)
        else:
            ids, texts = token_texts(model, tok)
            from distill.cache import text_embeddings

            feats = text_embeddings(teacher, texts, cache_dir, desc="teacher tokens")
            info = init_tokens_from_embeddings(model, ids, torch.from_numpy(feats))
        log.info("token table from the teacher: %d tokens, %d components (%.0f%% of the variance), %.0fs",
                 info["tokens"], info["width"], 100 * info["explained_variance"], time.time() - t0)
    elif mode not in ("random", "teacher"):
        raise UserError(f"student.token_init={mode!r} is unknown: use random or teacher")
    return model, model_cfg


def student_tokenizer(model_cfg: dict[str, Any]) -> open_clip.SimpleTokenizer:
    """open_clip's tokenizer at the student text tower's context length."""
    return open_clip.SimpleTokenizer(context_length=int(model_cfg["text_cfg"].get("context_length", 77)))
