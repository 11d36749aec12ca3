"""The teacher-informed token table of a distilled text tower."""

from __future__ import annotations

import math
from typing import Any

import open_clip
import torch

from distill.errors import UserError


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
