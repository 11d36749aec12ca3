"""One evaluation path: zero-shot top-1/top-5, retrieval R@1/5/10 both ways, bootstrap intervals
and agreement with a reference encoder. Training-time evaluation (``make_evaluator``)
and the bench (``distill.bench.measure_variants``) both call ``evaluate``.

Images are streamed: an eval set is decoded ``chunk_size`` images at a time and each chunk is
encoded in batches of ``image_batch``, so only the (N, D) embeddings stay in memory, never the
(N, 3, S, S) pixels. The chunk size is rounded to a multiple of the batch size, so the encoder sees
exactly the batches an all-at-once pass would give it (ORT dynamic int8 quantises activations per
batch, so batch boundaries change its numbers).

An eval set is a ``distill.data.EvalSet``, or a mapping (the bench's form):
``{"images": (N, 3, H, W) tensor or an EvalSet, "labels": (N,), "classnames", "templates"}`` for
classification; ``{"images", "captions": N strings, or N lists of strings, or M strings plus
"image_for_text": M ints}`` for retrieval.

A "general" set (images only, no labels or captions) measures how close an encoder stays to a
reference encoder away from the training domains: ``evaluate_general`` keeps its image embeddings and
its zero-shot logits over a class-prompt bank (``classnames`` x ``templates``, e.g. the 1000 ImageNet
names), and ``agreement`` compares them with the reference's: image cosine, top-1 agreement over the
prompts, and k-NN agreement (the overlap of each image's ``knn_k`` nearest neighbours among the set).
Only the bench evaluates general sets (``evaluate(..., general=True)``); training-time evaluation skips them.

Numbers are fractions in [0, 1] (distill/metrics.py). Intervals are percentile-bootstrap 95%
intervals over the test images (``metrics.bootstrap_ci``; the same seeded draws for every encoder),
for top-1 and every R@K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from distill import metrics

__all__ = ["DEFAULT_TEMPLATES", "SetResult", "evaluate", "evaluate_classification", "evaluate_retrieval",
           "evaluate_general", "encode_images", "encode_texts", "flatten_captions", "flat_metrics", "agreement", "evaluate_encoder",
           "make_evaluator"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)
CI_KEYS = ("top1", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


@dataclass
class SetResult:
    """One encoder on one eval set: metrics (fractions), their 95% intervals, and what agreement needs."""

    metrics: dict[str, float]
    ci95: dict[str, tuple[float, float]]
    image_emb: torch.Tensor  # (N, D) float32 on the CPU
    logits: torch.Tensor | None = None  # (N, C) zero-shot cosine logits (classification and general sets)
    knn_k: int | None = None  # general sets: neighbours compared by the k-NN agreement

    def row(self, digits: int = 6) -> dict[str, Any]:
        """Rounded metrics for report.json, each interval next to its metric: {"top1", "top1_ci95": [lo, hi], ...}."""
        out: dict[str, Any] = {}
        for k, v in self.metrics.items():
            out[k] = round(float(v), digits)
            if k in self.ci95:
                out[f"{k}_ci95"] = [round(float(x), digits) for x in self.ci95[k]]
        return out


def _get(es: Any, key: str, default: Any = None) -> Any:
    return es.get(key, default) if isinstance(es, Mapping) else getattr(es, key, default)


def image_chunks(es: Any, chunk_size: int = 256) -> Iterator[torch.Tensor]:
    """An eval set's images (EvalSet, mapping with "images", or a bare tensor) ``chunk_size`` at a time."""
    src = es["images"] if isinstance(es, Mapping) else es
    if hasattr(src, "chunks"):  # an EvalSet: decode lazily, never all at once
        yield from src.chunks(chunk_size)
        return
    for i in range(0, src.shape[0], chunk_size):
        yield src[i:i + chunk_size]


def encode_images(encoder: Any, es: Any, batch_size: int = 32, chunk_size: int = 256) -> torch.Tensor:
    """(N, D) float32 CPU embeddings of an eval set's images, streamed (see the module docstring)."""
    chunk = max(batch_size, chunk_size // batch_size * batch_size)  # whole batches per chunk
    out = []
    for x in image_chunks(es, chunk):
        out += [torch.as_tensor(encoder.encode_image(x[i:i + batch_size])).float().cpu()
                for i in range(0, x.shape[0], batch_size)]
        del x  # free this chunk before the next one is decoded: one chunk of pixels at a time
    return torch.cat(out)


def encode_texts(encoder: Any, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(M, D) float32 CPU embeddings of ``texts``, ``batch_size`` at a time."""
    return torch.cat([torch.as_tensor(encoder.encode_text(list(texts[i:i + batch_size]))).float().cpu()
                      for i in range(0, len(texts), batch_size)])


def flatten_captions(captions: Sequence[Any], image_for_text: Sequence[int] | None = None
                     ) -> tuple[list[str], list[int] | None]:
    """Captions as (M strings, image of each or None when caption i belongs to image i)."""
    if image_for_text is not None:
        return list(captions), list(image_for_text)
    if captions and not isinstance(captions[0], str):  # several captions per image
        flat, owner = [], []
        for i, group in enumerate(captions):
            flat += list(group)
            owner += [i] * len(group)
        return flat, owner
    return list(captions), None


def _intervals(hits: Mapping[str, torch.Tensor], n: int, owners: Mapping[str, Any] | None,
               resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    chosen = {k: v for k, v in hits.items() if k in CI_KEYS}
    if resamples < 1 or not chosen:
        return {}
    return metrics.bootstrap_ci(chosen, n, owners, resamples=resamples, seed=seed)


def evaluate_classification(encoder: Any, es: Any, *, image_batch: int = 32, chunk_size: int = 256,
                            resamples: int = 1000, seed: int = 0) -> SetResult:
    """Zero-shot top-1/top-5 with a class-name x template classifier (``metrics.zero_shot_classifier``)."""
    emb = encode_images(encoder, es, image_batch, chunk_size)  # (N, D)
    templates = list(_get(es, "templates") or DEFAULT_TEMPLATES)
    clf = metrics.zero_shot_classifier(encoder.encode_text, list(_get(es, "classnames")), templates)  # (C, D)
    hits = metrics.zero_shot_hits(emb, clf, _get(es, "labels"))
    scores = {k: float(h.float().mean()) for k, h in hits.items()}
    return SetResult(scores, _intervals(hits, emb.shape[0], None, resamples, seed), emb,
                     metrics.classify_logits(emb, clf))


def evaluate_retrieval(encoder: Any, es: Any, *, image_batch: int = 32, text_batch: int = 256,
                       chunk_size: int = 256, resamples: int = 1000, seed: int = 0) -> SetResult:
    """Image->text and text->image R@1/5/10; intervals resample images, each with all its captions."""
    emb = encode_images(encoder, es, image_batch, chunk_size)
    caps, owner = flatten_captions(_get(es, "captions"), _get(es, "image_for_text"))
    hits = metrics.retrieval_hits(emb, encode_texts(encoder, caps, text_batch), image_for_text=owner)
    scores = {k: float(h.float().mean()) for k, h in hits.items()}
    owners = {k: metrics.caption_owners(emb.shape[0], len(caps), owner) for k in hits if k.startswith("t2i")}
    return SetResult(scores, _intervals(hits, emb.shape[0], owners, resamples, seed), emb)


def evaluate_general(encoder: Any, es: Any, *, image_batch: int = 32, text_batch: int = 256,
                     chunk_size: int = 256) -> SetResult:
    """Image embeddings and zero-shot logits over the set's class-prompt bank; no metrics of its own
    (the set has no labels): ``agreement`` compares them with a reference encoder's."""
    emb = encode_images(encoder, es, image_batch, chunk_size)
    templates = list(_get(es, "templates") or DEFAULT_TEMPLATES)
    clf = metrics.zero_shot_classifier(encoder.encode_text, list(_get(es, "classnames")), templates,
                                       batch_size=text_batch)
    return SetResult({}, {}, emb, metrics.classify_logits(emb, clf), knn_k=int(_get(es, "knn_k") or 10))


def evaluate(encoder: Any, eval_sets: Mapping[str, Mapping[str, Any]], *, image_batch: int = 32,
             text_batch: int = 256, chunk_size: int = 256, resamples: int = 1000,
             seed: int = 0, general: bool = False) -> dict[str, dict[str, SetResult]]:
    """Every eval set: {"classification": {name: SetResult}, "retrieval": {name: SetResult}}, plus
    "general" when ``general`` is true and the sets have any.

    ``encoder``: ``encode_image((B, 3, H, W) [0, 1]) -> (B, D)`` and ``encode_text(list[str]) -> (B, D)``
    (tensors or arrays, any device). ``resamples=0`` skips the intervals (training-time evaluation).
    """
    opts = {"image_batch": image_batch, "chunk_size": chunk_size, "resamples": resamples, "seed": seed}
    out = {"classification": {n: evaluate_classification(encoder, es, **opts)
                              for n, es in (eval_sets.get("classification") or {}).items()},
           "retrieval": {n: evaluate_retrieval(encoder, es, text_batch=text_batch, **opts)
                         for n, es in (eval_sets.get("retrieval") or {}).items()}}
    if general and eval_sets.get("general"):
        out["general"] = {n: evaluate_general(encoder, es, image_batch=image_batch, text_batch=text_batch,
                                              chunk_size=chunk_size)
                          for n, es in eval_sets["general"].items()}
    return out


def flat_metrics(results: Mapping[str, Mapping[str, SetResult]]) -> dict[str, float]:
    """{"fashion-mnist/test/top1": 0.31, "tuxpaint/val/i2t_r5": 0.4, ...}: the training log's form."""
    return {f"{name}/{k}": v for sets in results.values() for name, r in sets.items() for k, v in r.metrics.items()}


def evaluate_encoder(enc: Any, eval_sets: Mapping[str, Mapping[str, Any]], batch_size: int = 64) -> dict[str, float]:
    """Flat metrics dict, e.g. {"fashion-mnist/test/top1": 0.31, "tuxpaint/val/i2t_r5": 0.4}, from
    ``evaluate`` (streamed, ``batch_size`` images and captions per call). No intervals: the training
    log and TensorBoard take floats."""
    results = evaluate(enc, eval_sets, image_batch=batch_size, text_batch=batch_size, resamples=0)
    return flat_metrics(results)


def make_evaluator(eval_sets: Mapping[str, Mapping[str, Any]], tokenizer: Any, image_size: int,
                   device: torch.device) -> Any:
    """A callback for the training loop: the open_clip student's zero-shot top-1/5 and retrieval recall
    (``evaluate_encoder``, the bench's evaluation path)."""
    from distill.encoders import ClipEncoder

    def evaluate_student(model: torch.nn.Module) -> dict[str, float]:
        return evaluate_encoder(ClipEncoder(model, tokenizer, image_size, device=device), eval_sets)

    return evaluate_student


def _general_agreement(r: SetResult, ref: SetResult, resamples: int, seed: int) -> dict[str, Any]:
    """A general set: mean image cosine (None when the embedding sizes differ), top-1 agreement over the
    prompt bank and k-NN agreement, each with a bootstrap 95% interval over the images."""
    per_image: dict[str, torch.Tensor] = {}
    if r.image_emb.shape == ref.image_emb.shape:
        per_image["image_cosine"] = metrics.row_cosine(r.image_emb, ref.image_emb)
    per_image["top1"] = (r.logits.argmax(-1) == ref.logits.argmax(-1)).float()
    k = min(int(r.knn_k or 10), r.image_emb.shape[0] - 1)
    if k >= 1:
        per_image["knn"] = metrics.knn_overlap(r.image_emb, ref.image_emb, k)
    entry: dict[str, Any] = {"image_cosine": None, "n": int(r.image_emb.shape[0]), "knn_k": k}
    entry.update({name: float(v.mean()) for name, v in per_image.items()})
    if resamples > 0:
        for name, (lo, hi) in metrics.bootstrap_ci(per_image, r.image_emb.shape[0], resamples=resamples,
                                                   seed=seed).items():
            entry[f"{name}_ci95"] = [lo, hi]
    return entry


def agreement(results: Mapping[str, Mapping[str, SetResult]], reference: Mapping[str, Mapping[str, SetResult]],
              *, resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per eval set (retrieval sets as "retrieval/<name>", general sets as "general/<name>"):
    {"image_cosine": mean cosine of matching image embeddings (None when the embedding sizes differ),
    "top1": share of equal zero-shot argmax (classification and general sets)} of ``results`` against
    the ``reference`` encoder's results; general sets add "knn" (k-NN agreement), "n", "knn_k" and
    bootstrap intervals ("<metric>_ci95", ``resamples`` draws, 0: none)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, sets in results.items():
        for name, r in sets.items():
            ref = reference.get(kind, {}).get(name)
            if ref is None:
                continue
            if kind == "general":
                out[f"general/{name}"] = _general_agreement(r, ref, resamples, seed)
                continue
            entry = out.setdefault(name if kind == "classification" else f"retrieval/{name}", {})
            same = r.image_emb.shape == ref.image_emb.shape  # no cosine between e.g. 768-d and 512-d spaces
            entry["image_cosine"] = metrics.agreement(r.image_emb, ref.image_emb) if same else None
            if r.logits is not None and ref.logits is not None:
                entry["top1"] = metrics.top1_agreement(r.logits, ref.logits)
    return out
