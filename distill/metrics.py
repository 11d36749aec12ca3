"""Zero-shot classification, retrieval recall and teacher-student agreement.

Convention: functions return *fractions in [0, 1]* as Python floats; reports print them as
percent with 2 decimals (distill/report.py). Embeddings are (N, D) float tensors; they are
L2-normalised here, so callers may pass raw features.

Ties policy (all recall/accuracy metrics): *pessimistic*. An item counts as retrieved at k only
if fewer than k wrong candidates score >= the best correct one. A degenerate encoder that maps
everything to one vector therefore scores chance-or-worse, never 100% (torch.topk would break
ties by index and could report a perfect score for a constant model).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

Template = Union[str, Callable[[str], str]]

__all__ = ["openai_templates", "zero_shot_classifier", "zero_shot_accuracy", "retrieval_recall", "agreement",
           "top1_agreement", "classify_logits", "as_percent"]


def openai_templates() -> list[Template]:
    """open_clip's 80 OpenAI ImageNet prompt templates (callables ``name -> prompt``)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES)


def _fill(template: Template, name: str) -> str:
    return template(name) if callable(template) else template.format(name)


@torch.inference_mode()
def zero_shot_classifier(encode_text: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                         templates: Sequence[Template], batch_size: int = 256) -> torch.Tensor:
    """Class-name prompts -> (C, D) classifier: per class the mean of the L2-normalised template
    embeddings, re-normalised.

    Same maths as ``open_clip.build_zero_shot_classifier`` (which returns the (D, C) transpose),
    reimplemented because that one needs an open_clip model plus tokenizer, while our teachers and
    students (ONNX, packaged, torch int8) take strings through ``encode_text``. Templates may be
    ``str.format`` strings with one ``{}`` or callables (open_clip's are callables).
    """
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    texts = [_fill(t, c) for c in classnames for t in templates]
    chunks = [encode_text(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    emb = F.normalize(torch.cat(chunks).float(), dim=-1)  # (C*T, D)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(emb, dim=-1)


def _hits_at(scores: torch.Tensor, correct: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """scores (Q, K) candidate scores, correct (Q, K) bool mask of right answers -> {k: fraction}.

    Pessimistic ties: rank = number of wrong candidates scoring >= the best right one.
    """
    if not bool(correct.any(dim=1).all()):
        raise ValueError("every query needs at least one correct candidate")
    best = scores.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values  # (Q, 1)
    rank = ((scores >= best) & ~correct).sum(dim=1)  # (Q,) wrong candidates at or above the best right one
    return {k: float((rank < k).float().mean()) for k in ks}


@torch.inference_mode()
def zero_shot_accuracy(image_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """image_emb (N, D), classifier (C, D), labels (N,) int in [0, C) -> {"top1": f, "top5": f}
    as fractions; k larger than C counts every image as correct at k."""
    logits = F.normalize(image_emb.float(), dim=-1) @ F.normalize(classifier.float(), dim=-1).T  # (N, C)
    labels = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
    correct = F.one_hot(labels, logits.shape[1]).bool()  # (N, C)
    return {f"top{k}": v for k, v in _hits_at(logits, correct, ks).items()}


@torch.inference_mode()
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     image_for_text: Sequence[int] | torch.Tensor | None = None) -> dict[str, float]:
    """Recall@k both ways -> {"i2t_r1", ..., "t2i_r10"} as fractions.

    image_emb (N, D); text_emb (M, D). Without ``image_for_text``, M == N and caption i belongs to
    image i. With it, caption j belongs to image ``image_for_text[j]`` (several captions per image):
    image->text counts a hit when any of the image's captions is in the top k; text->image has one
    right image per caption.
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    if image_for_text is None:
        if n != m:
            raise ValueError(f"{n} images and {m} captions: pass image_for_text to map captions to images")
        owner = torch.arange(n)
    else:
        owner = torch.as_tensor(image_for_text, dtype=torch.long).cpu()
        if owner.shape != (m,) or int(owner.min()) < 0 or int(owner.max()) >= n:
            raise ValueError(f"image_for_text must give an image index in [0, {n}) for each of the {m} captions")
    sim = (F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T).cpu()  # (N, M)
    correct = owner.unsqueeze(0) == torch.arange(n).unsqueeze(1)  # (N, M) caption j belongs to image i
    out = {f"i2t_r{k}": v for k, v in _hits_at(sim, correct, ks).items()}
    out.update({f"t2i_r{k}": v for k, v in _hits_at(sim.T, correct.T, ks).items()})
    return out


@torch.inference_mode()
def agreement(emb_a: torch.Tensor, emb_b: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of (N, D) and (N, D)."""
    if emb_a.shape != emb_b.shape:
        raise ValueError(f"agreement needs equal shapes, got {tuple(emb_a.shape)} and {tuple(emb_b.shape)}")
    return float(F.cosine_similarity(emb_a.float(), emb_b.float(), dim=-1).mean())


@torch.inference_mode()
def top1_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Fraction of rows of (N, C) and (N, C) whose argmax class is the same."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"top1_agreement needs equal shapes, got {tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    return float((logits_a.argmax(dim=-1) == logits_b.argmax(dim=-1)).float().mean())


def classify_logits(image_emb: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(N, D) x (C, D) -> (N, C) cosine logits."""
    return F.normalize(image_emb.float(), dim=-1) @ F.normalize(classifier.float(), dim=-1).T


def as_percent(metrics: Mapping[str, float], digits: int = 2) -> dict[str, float]:
    """{name: fraction} -> {name: percent rounded to ``digits``} for reports."""
    return {k: round(100.0 * v, digits) for k, v in metrics.items()}
