"""Zero-shot classification, retrieval recall and teacher-student agreement.

Convention: functions return *fractions in [0, 1]* as Python floats; reports print them as
percent with 2 decimals (distill/report.py). Embeddings are (N, D) float tensors; they are
L2-normalised here, so callers may pass raw features.

Ties policy (all recall/accuracy metrics): *pessimistic*. An item counts as retrieved at k only
if fewer than k wrong candidates score >= the best correct one. A degenerate encoder that maps
everything to one vector therefore scores chance-or-worse, never 100% (torch.topk would break
ties by index and could report a perfect score for a constant model).

Intervals: ``bootstrap_ci`` gives percentile-bootstrap intervals over the test images from the
per-query hits that ``zero_shot_hits`` / ``retrieval_hits`` return (the means of those hits are the
fractions above).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

Template = Union[str, Callable[[str], str]]

__all__ = ["openai_templates", "zero_shot_classifier", "zero_shot_accuracy", "retrieval_recall", "agreement",
           "top1_agreement", "classify_logits", "as_percent", "zero_shot_hits", "retrieval_hits", "caption_owners",
           "bootstrap_ci", "row_cosine", "knn_overlap"]


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


def _query_hits(scores: torch.Tensor, correct: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """scores (Q, K) candidate scores, correct (Q, K) bool mask of right answers -> {k: (Q,) bool hit at k}.

    Pessimistic ties: rank = number of wrong candidates scoring >= the best right one.
    """
    if not bool(correct.any(dim=1).all()):
        raise ValueError("every query needs at least one correct candidate")
    best = scores.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values  # (Q, 1)
    rank = ((scores >= best) & ~correct).sum(dim=1)  # (Q,) wrong candidates at or above the best right one
    return {k: rank < k for k in ks}


@torch.inference_mode()
def zero_shot_hits(image_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                   ks: Sequence[int] = (1, 5)) -> dict[str, torch.Tensor]:
    """image_emb (N, D), classifier (C, D), labels (N,) int in [0, C) -> {"top1": (N,) bool, ...}:
    whether each image's class is in its top k; k larger than C counts every image as correct at k."""
    logits = F.normalize(image_emb.float(), dim=-1) @ F.normalize(classifier.float(), dim=-1).T  # (N, C)
    labels = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
    correct = F.one_hot(labels, logits.shape[1]).bool()  # (N, C)
    return {f"top{k}": hit for k, hit in _query_hits(logits, correct, ks).items()}


@torch.inference_mode()
def zero_shot_accuracy(image_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """image_emb (N, D), classifier (C, D), labels (N,) int in [0, C) -> {"top1": f, "top5": f}
    as fractions; k larger than C counts every image as correct at k."""
    return {k: float(hit.float().mean()) for k, hit in zero_shot_hits(image_emb, classifier, labels, ks).items()}


def caption_owners(n: int, m: int, image_for_text: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """(M,) image index of each caption: caption i belongs to image i without ``image_for_text``."""
    if image_for_text is None:
        if n != m:
            raise ValueError(f"{n} images and {m} captions: pass image_for_text to map captions to images")
        return torch.arange(n)
    owner = torch.as_tensor(image_for_text, dtype=torch.long).cpu()
    if owner.shape != (m,) or int(owner.min()) < 0 or int(owner.max()) >= n:
        raise ValueError(f"image_for_text must give an image index in [0, {n}) for each of the {m} captions")
    return owner


@torch.inference_mode()
def retrieval_hits(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                   image_for_text: Sequence[int] | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-query hits both ways: {"i2t_r1": (N,) bool per image, ..., "t2i_r1": (M,) bool per caption}.
    Arguments as in ``retrieval_recall``."""
    n, m = image_emb.shape[0], text_emb.shape[0]
    owner = caption_owners(n, m, image_for_text)
    sim = (F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T).cpu()  # (N, M)
    correct = owner.unsqueeze(0) == torch.arange(n).unsqueeze(1)  # (N, M) caption j belongs to image i
    out = {f"i2t_r{k}": v for k, v in _query_hits(sim, correct, ks).items()}
    out.update({f"t2i_r{k}": v for k, v in _query_hits(sim.T, correct.T, ks).items()})
    return out


@torch.inference_mode()
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     image_for_text: Sequence[int] | torch.Tensor | None = None) -> dict[str, float]:
    """Recall@k both ways -> {"i2t_r1", ..., "t2i_r10"} as fractions.

    image_emb (N, D); text_emb (M, D). Without ``image_for_text``, M == N and caption i belongs to
    image i. With it, caption j belongs to image ``image_for_text[j]`` (several captions per image):
    image->text counts a hit when any of the image's captions is in the top k; text->image has one
    right image per caption.
    """
    hits = retrieval_hits(image_emb, text_emb, ks, image_for_text)
    return {k: float(hit.float().mean()) for k, hit in hits.items()}


def bootstrap_ci(hits: Mapping[str, Sequence[float] | np.ndarray | torch.Tensor], n_images: int,
                 owners: Mapping[str, Sequence[int] | np.ndarray | torch.Tensor] | None = None, *,
                 resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 block: int = 100) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap intervals of mean hit rates, resampling the ``n_images`` test images.

    hits[name]: per-query 0/1 (or any per-query score); a query belongs to image i = its position, or
    ``owners[name][j]`` when given (captions: a drawn image brings all its captions, so the statistic
    of a resample is hits of the drawn images' queries / their number). Every metric sees the same
    ``resamples`` draws from ``numpy.random.default_rng(seed)`` (paired, reproducible); -> {name: (lo, hi)},
    the (1 - level) / 2 and (1 + level) / 2 percentiles of the resampled statistics.
    """
    if n_images < 1 or resamples < 1:
        raise ValueError("bootstrap_ci needs at least one image and one resample")
    names = list(hits)
    num, den = np.zeros((n_images, len(names))), np.zeros((n_images, len(names)))
    for c, name in enumerate(names):
        h = torch.as_tensor(hits[name]).double().cpu().numpy().reshape(-1)
        own = np.arange(len(h)) if owners is None or name not in owners else \
            torch.as_tensor(owners[name]).long().cpu().numpy().reshape(-1)
        num[:, c] = np.bincount(own, weights=h, minlength=n_images)[:n_images]
        den[:, c] = np.bincount(own, minlength=n_images)[:n_images]
    rng = np.random.default_rng(seed)
    stats = np.empty((resamples, len(names)))
    for start in range(0, resamples, block):
        b = min(block, resamples - start)
        draws = rng.integers(0, n_images, size=(b, n_images)) + n_images * np.arange(b)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_images).reshape(b, n_images).astype(np.float64)
        stats[start:start + b] = (counts @ num) / np.maximum(counts @ den, 1e-12)  # (b, metrics)
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return {name: (float(lo[c]), float(hi[c])) for c, name in enumerate(names)}


@torch.inference_mode()
def agreement(emb_a: torch.Tensor, emb_b: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of (N, D) and (N, D)."""
    if emb_a.shape != emb_b.shape:
        raise ValueError(f"agreement needs equal shapes, got {tuple(emb_a.shape)} and {tuple(emb_b.shape)}")
    return float(F.cosine_similarity(emb_a.float(), emb_b.float(), dim=-1).mean())


@torch.inference_mode()
def row_cosine(emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
    """(N,) cosine similarity of matching rows of (N, D) and (N, D)."""
    if emb_a.shape != emb_b.shape:
        raise ValueError(f"row_cosine needs equal shapes, got {tuple(emb_a.shape)} and {tuple(emb_b.shape)}")
    return F.cosine_similarity(emb_a.float(), emb_b.float(), dim=-1)


@torch.inference_mode()
def knn_overlap(emb_a: torch.Tensor, emb_b: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) k-NN agreement: per image, the share of its ``k`` nearest other images (cosine) in space A
    that are also among its ``k`` nearest in space B. The spaces may differ in size (it compares
    neighbour sets, not vectors): 1.0 when both encoders organise the images alike."""
    n = emb_a.shape[0]
    if emb_b.shape[0] != n:
        raise ValueError(f"knn_overlap needs the same images, got {n} and {emb_b.shape[0]} rows")
    if not 1 <= k < n:
        raise ValueError(f"knn_overlap needs 1 <= k < number of images, got k={k} for {n} images")

    def neighbours(emb: torch.Tensor) -> torch.Tensor:
        e = F.normalize(emb.float(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))  # an image is not its own neighbour
        return sim.topk(k, dim=-1).indices  # (N, k)

    na, nb = neighbours(emb_a), neighbours(emb_b)
    hits = (na[:, :, None] == nb[:, None, :]).any(dim=-1)  # (N, k): a's neighbour j is among b's
    return hits.float().mean(dim=-1)


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
