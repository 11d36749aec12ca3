"""Narrow open_clip students and TinyCLIP-style weight inheritance from an open_clip teacher.

A student is a plain ``open_clip.model.CLIP`` built from an open_clip ``model_cfg`` dict, so the
export stage can write ``open_clip_config.json`` ({"model_cfg": ...}) next to the weights and
``open_clip.create_model("local-dir:...")`` rebuilds it.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

from distill.errors import UserError

log = logging.getLogger(__name__)

# open_clip VisionCfg fields a student config may set besides the shape (pool_type: "tok" pools the
# class token, "avg" averages the patch tokens)
_VISION_EXTRAS = ("pool_type", "final_ln_after_pool", "no_ln_pre", "ls_init_value", "patch_dropout")

TEXT_PARAM_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


# ------------------------------------------------------------------------------------------ build
def build_student(
    embed_dim: int,
    vision: Mapping[str, Any],
    text: Mapping[str, Any],
    quick_gelu: bool = False,
    teacher_model: torch.nn.Module | None = None,
    teacher_text_cfg: Mapping[str, Any] | None = None,
) -> tuple[open_clip.model.CLIP, dict[str, Any]]:
    """Build a narrow open_clip CLIP and its open_clip ``model_cfg``.

    Args:
        embed_dim: output size E of both towers (image/text features are (B, E)).
        vision: {width, layers, heads, patch_size, image_size, mlp_ratio=4}; head_width = width // heads;
            optionally open_clip VisionCfg's pool_type, final_ln_after_pool, no_ln_pre, ls_init_value, patch_dropout.
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
        (model, model_cfg) with model_cfg = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}.
    """
    vision_cfg = _vision_cfg(dict(vision))
    text, mode = dict(text), text.get("mode", "distilled")
    if mode == "distilled":
        text_cfg = _distilled_text_cfg(text)
    elif mode == "teacher":
        teacher_model = _require_open_clip(teacher_model)
        text_cfg = dict(teacher_text_cfg) if teacher_text_cfg is not None else text_cfg_of(teacher_model)
        t_dim = _text_output_dim(teacher_model)
        if t_dim != int(embed_dim):
            raise UserError(f"student.text.mode=teacher needs embed_dim == the teacher's text output dim {t_dim} "
                            f"(got {embed_dim}): set student.embed_dim={t_dim} or leave it unset")
        teacher_qg = _uses_quick_gelu(teacher_model.transformer)
        if teacher_qg != bool(quick_gelu):
            log.info("student quick_gelu=%s to match the teacher's text tower", teacher_qg)
        quick_gelu = teacher_qg
    else:
        raise UserError(f"student.text.mode={mode!r} is unknown: use 'distilled' or 'teacher'")
    model_cfg = {"embed_dim": int(embed_dim), "vision_cfg": vision_cfg, "text_cfg": text_cfg,
                 "quick_gelu": bool(quick_gelu)}
    model = open_clip.model.CLIP(**_copy_cfg(model_cfg))
    if mode == "teacher":
        attach_teacher_text_tower(model, teacher_model)
    return model, model_cfg


def _vision_cfg(vision: dict[str, Any]) -> dict[str, Any]:
    """student.builder.vision -> open_clip's vision_cfg, with one-line errors for shapes that cannot work."""
    width, heads = int(vision["width"]), int(vision["heads"])
    if width % heads:
        raise UserError(f"student.vision.width={width} is not divisible by heads={heads}: pick heads dividing width")
    image_size, patch_size = int(vision["image_size"]), int(vision["patch_size"])
    if image_size % patch_size:
        raise UserError(f"student.vision.image_size={image_size} is not a multiple of patch_size={patch_size}")
    unknown = set(vision) - {"width", "layers", "heads", "patch_size", "image_size", "mlp_ratio", *_VISION_EXTRAS}
    if unknown:
        raise UserError(f"student.builder.vision has unknown keys {sorted(unknown)}: use width, layers, heads, "
                        f"patch_size, image_size, mlp_ratio or one of {list(_VISION_EXTRAS)}")
    cfg = {"image_size": image_size, "layers": int(vision["layers"]), "width": width,
           "head_width": width // heads, "patch_size": patch_size, "mlp_ratio": float(vision.get("mlp_ratio", 4.0))}
    for key in _VISION_EXTRAS:  # open_clip VisionCfg fields passed through as given
        if vision.get(key) is not None:
            cfg[key] = vision[key]
    return cfg


def _distilled_text_cfg(text: dict[str, Any]) -> dict[str, Any]:
    tw, th = int(text["width"]), int(text["heads"])
    if tw % th:
        raise UserError(f"student.text.width={tw} is not divisible by heads={th}: pick heads dividing width")
    return {"context_length": int(text.get("context_length", 77)), "vocab_size": int(text.get("vocab_size", 49408)),
            "width": tw, "heads": th, "layers": int(text["layers"]), "mlp_ratio": float(text.get("mlp_ratio", 4.0))}


def _copy_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}


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


# ------------------------------------------------------------------------------------ inheritance
def _even_layers(n_student: int, n_teacher: int, how: str) -> list[int | None]:
    """Teacher layer index for each student layer (None = leave random)."""
    if how == "uniform":
        if n_student == 1:
            return [n_teacher - 1]
        return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]
    if how == "first":
        return [i if i < n_teacher else None for i in range(n_student)]
    raise UserError(f"inheritance layers={how!r} is unknown: use 'uniform' or 'first'")


def _top(scores: torch.Tensor, k: int, how: str) -> torch.Tensor:
    """k indices out of len(scores): the first k, or the k largest scores (kept in ascending order)."""
    n = scores.numel()
    if k >= n or how == "first":
        return torch.arange(min(k, n))
    if how == "importance":
        return torch.topk(scores, k).indices.sort().values
    raise UserError(f"inheritance channels={how!r} is unknown: use 'first' or 'importance'")


class _Copier:
    """Copies sliced teacher tensors into student parameters and fills the report."""

    def __init__(self, student: torch.nn.Module) -> None:
        self.params = dict(student.named_parameters())
        self.report: dict[str, str] = {}

    def put(self, name: str, src: torch.Tensor, index: list[torch.Tensor | None]) -> None:
        """student[name] <- src indexed along each dim by index[d] (None = whole dim)."""
        dst = self.params.get(name)
        if dst is None:
            return
        out, sliced = src.detach(), False
        for d, idx in enumerate(index):
            if idx is None:
                continue
            idx = idx.to(out.device)
            if idx.numel() != out.shape[d] or not torch.equal(idx, torch.arange(out.shape[d], device=out.device)):
                sliced = True
            out = out.index_select(d, idx)
        if tuple(out.shape) != tuple(dst.shape):
            self.report[name] = "random"
            return
        with torch.no_grad():
            dst.copy_(out.to(dst.device, dst.dtype))
        self.report[name] = "sliced" if sliced else "inherited"

    def mark(self, name: str, how: str) -> None:
        if name in self.params:
            self.report[name] = how


def _block_scores(tb: torch.nn.Module) -> torch.Tensor:
    """Residual-channel importance of one teacher block: squared column norms of what reads the
    residual stream (in_proj, c_fc) plus squared row norms of what writes it (out_proj, c_proj)."""
    return (tb.attn.in_proj_weight.detach().pow(2).sum(0) + tb.mlp.c_fc.weight.detach().pow(2).sum(0)
            + tb.attn.out_proj.weight.detach().pow(2).sum(1) + tb.mlp.c_proj.weight.detach().pow(2).sum(1))


def _residual_index(t_blocks, w_s: int, how: str) -> torch.Tensor:
    w_t = t_blocks[0].ln_1.weight.numel()
    if how == "importance" and w_s < w_t:
        return _top(sum(_block_scores(b) for b in t_blocks), w_s, how)
    return _top(torch.zeros(w_t), w_s, "first")


def _attn_index(sb: torch.nn.Module, tb: torch.nn.Module, how: str) -> torch.Tensor:
    """Indices (into the teacher's q/k/v channel axis) of the student's q/k/v channels.

    Whole heads when head widths match; else the same channel subset inside each chosen head
    (keeps q·k pairing and the per-head grouping); when neither fits (more student heads than
    teacher heads, or wider student heads), plain channels within q, k and v.
    """
    w_s, w_t = sb.attn.in_proj_weight.shape[1], tb.attn.in_proj_weight.shape[1]
    h_s, h_t = sb.attn.num_heads, tb.attn.num_heads
    d_s, d_t = w_s // h_s, w_t // h_t
    wq = tb.attn.in_proj_weight.detach().view(3, h_t, d_t, w_t)  # (qkv, heads, head_dim, in)
    wo = tb.attn.out_proj.weight.detach().view(w_t, h_t, d_t)  # (out, heads, head_dim)
    ch_score = wq.pow(2).sum((0, 3)) + wo.pow(2).sum(0)  # (h_t, d_t)
    if h_s <= h_t and d_s <= d_t:
        heads = _top(ch_score.sum(1), h_s, how)
        return torch.cat([h * d_t + _top(ch_score[h], d_s, how) for h in heads.tolist()])
    return _top(ch_score.reshape(-1), w_s, how)


def _inherit_blocks(cp: _Copier, prefix: str, s_blocks, t_blocks, r: torch.Tensor, layers: str,
                    channels: str) -> None:
    lmap = _even_layers(len(s_blocks), len(t_blocks), layers)
    for i, (sb, ti) in enumerate(zip(s_blocks, lmap)):
        p = f"{prefix}.{i}."
        if ti is None:
            continue
        tb = t_blocks[ti]
        w_t = tb.attn.in_proj_weight.shape[1]
        a = _attn_index(sb, tb, channels)
        qkv = torch.cat([a + j * w_t for j in range(3)])
        fc_score = tb.mlp.c_fc.weight.detach().pow(2).sum(1) + tb.mlp.c_proj.weight.detach().pow(2).sum(0)
        m = _top(fc_score, sb.mlp.c_fc.out_features, channels)
        cp.put(p + "ln_1.weight", tb.ln_1.weight, [r])
        cp.put(p + "ln_1.bias", tb.ln_1.bias, [r])
        cp.put(p + "ln_2.weight", tb.ln_2.weight, [r])
        cp.put(p + "ln_2.bias", tb.ln_2.bias, [r])
        cp.put(p + "attn.in_proj_weight", tb.attn.in_proj_weight, [qkv, r])
        if tb.attn.in_proj_bias is not None:
            cp.put(p + "attn.in_proj_bias", tb.attn.in_proj_bias, [qkv])
        cp.put(p + "attn.out_proj.weight", tb.attn.out_proj.weight, [r, a])
        if tb.attn.out_proj.bias is not None:
            cp.put(p + "attn.out_proj.bias", tb.attn.out_proj.bias, [r])
        cp.put(p + "mlp.c_fc.weight", tb.mlp.c_fc.weight, [m, r])
        cp.put(p + "mlp.c_fc.bias", tb.mlp.c_fc.bias, [m])
        cp.put(p + "mlp.c_proj.weight", tb.mlp.c_proj.weight, [r, m])
        cp.put(p + "mlp.c_proj.bias", tb.mlp.c_proj.bias, [r])
        for ls in ("ls_1", "ls_2"):
            if hasattr(getattr(tb, ls, None), "gamma"):
                cp.put(p + f"{ls}.gamma", getattr(tb, ls).gamma, [r])


def _resize_grid(pos: torch.Tensor, grid_s: tuple[int, int], grid_t: tuple[int, int]) -> torch.Tensor:
    """(1 + Ht*Wt, C) -> (1 + Hs*Ws, C): bicubic on the patch grid, class token kept (as open_clip's
    resize_pos_embed, which works on a whole state dict rather than a tensor)."""
    cls, grid = pos[:1], pos[1:]
    c = grid.shape[1]
    grid = grid.reshape(1, grid_t[0], grid_t[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=grid_s, mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(grid_s[0] * grid_s[1], c)])


def _embed_index(student, teacher, channels: str) -> torch.Tensor:
    """Indices of the shared embedding dims; one set for both towers, so image and text stay aligned."""
    e_s, e_t = int(student.visual.output_dim), int(teacher.visual.output_dim)
    score = torch.zeros(e_t)
    if channels == "importance" and e_s < e_t:
        if getattr(teacher.visual, "proj", None) is not None:
            score = score + teacher.visual.proj.detach().pow(2).sum(0)
        if isinstance(teacher.text_projection, torch.nn.Parameter):
            score = score + teacher.text_projection.detach().pow(2).sum(0)
        return _top(score, e_s, "importance")
    return _top(score, e_s, "first")


def inherit_from_teacher(
    student: open_clip.model.CLIP,
    teacher: open_clip.model.CLIP,
    layers: str = "uniform",
    channels: str = "first",
) -> dict[str, str]:
    """TinyCLIP-style manual weight inheritance (Wu et al. 2023) from a wider/deeper open_clip CLIP.

    Depth: ``layers="uniform"`` maps student layer i of L_s to teacher layer
    round(i (L_t - 1) / (L_s - 1)) (evenly spaced, first and last kept); ``"first"`` takes the
    first L_s. Width: ``channels="first"`` keeps the first channels, ``"importance"`` the ones with
    the largest L2 norm (residual channels scored over all blocks of a tower; heads, channels
    within heads and MLP hidden units scored per block). Q/K/V keep their per-head structure:
    whole heads when head widths match, else the same channel subset inside each kept head,
    else plain channels within q, k and v. Also: LayerNorms, class/positional embeddings
    (patch grid interpolated when it differs), conv1 (only when patch sizes match), output
    projections (width x embed_dim, one embed-dim subset shared by both towers), token embedding
    columns, logit_scale. A same-size student becomes an exact copy.

    Returns {student parameter name: "inherited" (exact copy) | "sliced" | "random"}.
    """
    teacher = _require_inherit_teacher(teacher)
    student = _require_inherit_teacher(student)
    cp = _Copier(student)
    e = _embed_index(student, teacher, channels)
    _inherit_vision(cp, student, teacher, e, layers, channels)
    _inherit_text(cp, student, teacher, e, layers, channels)
    cp.put("logit_scale", teacher.logit_scale, [])
    if student.logit_bias is not None and teacher.logit_bias is not None:
        cp.put("logit_bias", teacher.logit_bias, [])
    for name in cp.params:
        cp.report.setdefault(name, "random")
    counts = {k: sum(v == k for v in cp.report.values()) for k in ("inherited", "sliced", "random")}
    log.info("inheritance (layers=%s, channels=%s): %s", layers, channels, counts)
    return cp.report


def _inherit_vision(cp: "_Copier", student: open_clip.model.CLIP, teacher: open_clip.model.CLIP, e: torch.Tensor,
                    layers: str, channels: str) -> None:
    sv, tv = student.visual, teacher.visual
    s_blocks, t_blocks = sv.transformer.resblocks, tv.transformer.resblocks
    rv = _residual_index(t_blocks, sv.transformer.width, channels)
    if tuple(sv.patch_size) == tuple(tv.patch_size):
        cp.put("visual.conv1.weight", tv.conv1.weight, [rv])
    else:
        cp.mark("visual.conv1.weight", "random")
        log.info("conv1 left random: student patch %s != teacher patch %s", sv.patch_size, tv.patch_size)
    cp.put("visual.class_embedding", tv.class_embedding, [rv])
    pos = tv.positional_embedding.detach()
    if tuple(sv.grid_size) != tuple(tv.grid_size):
        pos = _resize_grid(pos.index_select(1, rv), tuple(sv.grid_size), tuple(tv.grid_size))
        cp.put("visual.positional_embedding", pos, [])
        if cp.report.get("visual.positional_embedding") == "inherited":
            cp.report["visual.positional_embedding"] = "sliced"  # interpolated, not a copy
    else:
        cp.put("visual.positional_embedding", pos, [None, rv])
    for ln in ("ln_pre", "ln_post"):
        if isinstance(getattr(tv, ln), torch.nn.LayerNorm):
            cp.put(f"visual.{ln}.weight", getattr(tv, ln).weight, [rv])
            cp.put(f"visual.{ln}.bias", getattr(tv, ln).bias, [rv])
    if getattr(tv, "proj", None) is not None:
        cp.put("visual.proj", tv.proj, [rv, e])
    _inherit_blocks(cp, "visual.transformer.resblocks", s_blocks, t_blocks, rv, layers, channels)


def _inherit_text(cp: "_Copier", student: open_clip.model.CLIP, teacher: open_clip.model.CLIP, e: torch.Tensor,
                  layers: str, channels: str) -> None:
    rt = _residual_index(teacher.transformer.resblocks, student.transformer.width, channels)
    if student.token_embedding.num_embeddings == teacher.token_embedding.num_embeddings:
        cp.put("token_embedding.weight", teacher.token_embedding.weight, [None, rt])
    n_ctx = student.positional_embedding.shape[0]
    if n_ctx <= teacher.positional_embedding.shape[0]:
        cp.put("positional_embedding", teacher.positional_embedding, [torch.arange(n_ctx), rt])
    cp.put("ln_final.weight", teacher.ln_final.weight, [rt])
    cp.put("ln_final.bias", teacher.ln_final.bias, [rt])
    tp = teacher.text_projection
    if isinstance(tp, torch.nn.Parameter):
        cp.put("text_projection", tp, [rt, e])
    elif isinstance(tp, torch.nn.Linear):
        cp.put("text_projection.weight", tp.weight, [e, rt])
        if tp.bias is not None:
            cp.put("text_projection.bias", tp.bias, [e])
    _inherit_blocks(cp, "transformer.resblocks", student.transformer.resblocks, teacher.transformer.resblocks,
                    rt, layers, channels)


def _require_inherit_teacher(model: Any) -> open_clip.model.CLIP:
    if not isinstance(model, open_clip.model.CLIP) or not isinstance(model.visual,
                                                                     open_clip.transformer.VisionTransformer):
        raise UserError(f"weight inheritance needs open_clip ViT CLIP models (got {type(model).__name__}"
                        f"{'' if not hasattr(model, 'visual') else ' with ' + type(model.visual).__name__}): "
                        f"use student.init=random")
    return model


# ------------------------------------------------------------------------- teacher-informed token table
def token_strings(tokenizer: open_clip.SimpleTokenizer) -> list[str | None]:
    """The text of every BPE token id (None for <start_of_text>/<end_of_text>): bytes decoded,
    the end-of-word mark dropped ("cat</w>" -> "cat", "sel" -> "sel")."""
    out: list[str | None] = []
    specials = {tokenizer.sot_token_id, tokenizer.eot_token_id} if hasattr(tokenizer, "sot_token_id") else {
        tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]}
    for i in range(len(tokenizer.decoder)):
        if i in specials:
            out.append(None)
            continue
        bpe = tokenizer.decoder[i]
        raw = bytearray(tokenizer.byte_decoder[c] for c in bpe.replace("</w>", ""))
        out.append(raw.decode("utf-8", errors="replace").strip() or None)
    return out


def token_texts(student: open_clip.model.CLIP, tokenizer: open_clip.SimpleTokenizer) -> tuple[list[int], list[str]]:
    """(ids, texts) of the tokens a teacher can embed, after checking the student's vocabulary is the tokenizer's."""
    strings = token_strings(tokenizer)
    vocab = student.token_embedding.weight.shape[0]
    if len(strings) != vocab:
        raise UserError(f"student.token_init=teacher needs the open_clip tokenizer's vocabulary ({len(strings)} "
                        f"tokens) but the student has vocab_size={vocab}: set student.builder.text.vocab_size="
                        f"{len(strings)} or student.token_init=random")
    ids = [i for i, t in enumerate(strings) if t]
    return ids, [strings[i] for i in ids]


@torch.no_grad()
def init_tokens_from_embeddings(student: open_clip.model.CLIP, ids: list[int], feats: torch.Tensor,
                                projection: bool = True) -> dict[str, Any]:
    """Start the distilled text tower's token table where the teacher puts each token.

    ``feats`` (N, D) are the teacher's embeddings of the texts of token ``ids`` (see
    ``token_strings``). Their principal components, as many as the text width, become those rows
    of the token table (rescaled to open_clip's init std 0.02), and with ``projection`` the text
    projection maps the components back to the teacher's space. A narrow text tower otherwise
    learns one token at a time from the corpus, and tokens the corpus never shows stay random.
    Other rows keep their random init; the model stays a plain open_clip CLIP.
    Returns {"tokens", "width", "explained_variance"}.
    """
    emb = student.token_embedding.weight  # (V, W)
    width = emb.shape[1]
    feats = torch.as_tensor(feats).float().cpu()
    d = feats.shape[1]
    if width > d:
        raise UserError(f"student.token_init=teacher: text width {width} exceeds the teacher's dim {d}; "
                        f"use student.token_init=random")
    centred = feats - feats.mean(0, keepdim=True)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)  # vt: (D, D)
    comps = vt[:width]  # (W, D)
    coords = centred @ comps.T  # (N, W)
    emb[torch.tensor(ids)] = (coords * (0.02 / coords.std())).to(emb.dtype)
    if projection and getattr(student, "text_projection", None) is not None \
            and tuple(student.text_projection.shape) == (width, d):
        # ln_final leaves unit-variance features; read them back along the same components, with
        # the Frobenius norm of open_clip's random init (std width**-0.5 over a (W, D) matrix)
        student.text_projection.copy_((comps * math.sqrt(d / width)).to(student.text_projection.dtype))
    var = (s[:width] ** 2).sum() / (s ** 2).sum()
    return {"tokens": len(ids), "width": width, "explained_variance": round(float(var), 4)}


def init_tokens_from_teacher(student: open_clip.model.CLIP, encode_text, tokenizer: open_clip.SimpleTokenizer,
                             batch_size: int = 1024, projection: bool = True) -> dict[str, Any]:
    """``init_tokens_from_embeddings`` with every token's text encoded by ``encode_text(list[str]) -> (B, D)``."""
    ids, texts = token_texts(student, tokenizer)
    feats = torch.cat([torch.as_tensor(encode_text(texts[k:k + batch_size])).float().cpu()
                       for k in range(0, len(ids), batch_size)])
    return init_tokens_from_embeddings(student, ids, feats, projection=projection)
