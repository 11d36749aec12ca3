"""TinyCLIP-style weight inheritance from an open_clip ViT teacher into a ViT student."""

from __future__ import annotations

import logging
from typing import Any

import open_clip
import torch
import torch.nn.functional as F

from distill.errors import UserError

log = logging.getLogger(__name__)


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
