"""The data stage: the training data (an indexed ``TrainSet`` or a ``TrainStream`` of shards) and the
evaluation sets, built from the ``data`` config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distill import distributed as dist_utils
from distill.data import EvalSet, MixSpec, TrainSet, ViewSpec, build_corpus, load_eval_set, named_classes
from distill.datasets import ImageOnly, is_image_only
from distill.errors import UserError
from distill.streaming import StreamingShards


@dataclass
class TrainStream:
    """A streaming training source and what turns its samples into training items: the view spec
    (size, augmentation, seed; ``views`` does not apply) and the corpus for uncaptioned samples."""

    source: StreamingShards
    spec: ViewSpec
    corpus: list[str] = field(default_factory=list)


def eval_prompts(data_cfg: DictConfig, classnames: dict[str, list[str]]) -> list[str]:
    """Every zero-shot prompt the evaluation will use (kept out of the training corpus)."""
    out = []
    for item in data_cfg.eval.get("classification", []) or []:
        for t in item.get("templates") or ["a photo of a {}."]:
            out += [t.format(c) for c in classnames.get(item.name, [])]
    return out


def build_eval_sets(cfg: DictConfig) -> tuple[dict[str, dict[str, EvalSet]], dict[str, list[str]]]:
    """{"classification": {name: EvalSet}, "retrieval": {...}} (labels and captions in memory, images
    streamed from their sources when evaluated) and each classification set's class names."""
    size = int(cfg.image_size)
    eval_sets: dict[str, dict[str, EvalSet]] = {"classification": {}, "retrieval": {}}
    classnames: dict[str, list[str]] = {}
    for kind in ("classification", "retrieval"):
        for item in cfg.eval.get(kind, []) or []:
            src = instantiate(item.source, _convert_="all")
            if kind == "retrieval" and getattr(src, "image_only", False):  # before every image is opened
                raise UserError(f"retrieval eval set {item.name} is image-only (no captions to retrieve): "
                                f"drop it from data.eval.retrieval or use a captioned source")
            es = load_eval_set(item.name, src, size, templates=item.get("templates"))
            if kind == "classification":
                if es.labels is None or not es.classnames:
                    raise UserError(f"classification eval set {item.name} has no labels/classnames: "
                                    f"move it to data.eval.retrieval")
                classnames[item.name] = es.classnames
            elif not es.captions:
                raise UserError(f"retrieval eval set {item.name} has no captions: move it to data.eval.classification")
            eval_sets[kind][item.name] = es
    general = build_general_sets(cfg, size)
    if general:
        eval_sets["general"] = general
    return eval_sets, classnames


def build_general_sets(cfg: DictConfig, size: int) -> dict[str, EvalSet]:
    """data.eval.general: image sets without labels (captions, if any, are ignored) on which each variant
    is compared with the teacher (distill.evaluation.evaluate_general); ``classes: imagenet`` or a list
    of class names for the prompt bank, ``templates`` and ``k`` for the k-NN agreement."""
    out: dict[str, EvalSet] = {}
    for item in cfg.eval.get("general", []) or []:
        classes = item.get("classes", "imagenet")
        names = named_classes(classes, f"general eval set {item.name}: classes={classes!r} unknown: use imagenet or a "
                                       f"list of class names")
        k = int(item.get("k", 10))
        if not names or k < 1:
            raise UserError(f"general eval set {item.name} needs at least one class name and k >= 1 "
                            f"(got {len(names)} classes, k={k})")
        es = load_eval_set(item.name, instantiate(item.source, _convert_="all"), size,
                           templates=item.get("templates"))
        if len(es) <= k:
            raise UserError(f"general eval set {item.name} has {len(es)} readable images, too few for k={k}: "
                            f"lower data.eval.general[].k or add images")
        es.classnames, es.labels, es.captions, es.knn_k = names, None, None, k
        out[item.name] = es
    return out


def build_data(cfg: DictConfig) -> tuple[TrainSet | TrainStream, dict[str, dict[str, EvalSet]], dict[str, Any]]:
    """Training set (sources + corpus + view spec), evaluation sets, and the figures the report keeps.
    With ``train.stream`` (distill.streaming.StreamingShards) the training data is a ``TrainStream``."""
    tc = cfg.train
    mix = MixSpec.from_config(tc.get("mix"))  # a bad value is one line before any image is opened
    if mix.mode != "none" and tc.get("stream") is not None:
        raise UserError(f"data.train.mix.mode={mix.mode} needs indexed training data and data.train.stream is a "
                        f"stream: set data.train.mix.mode=none or train from data.train.sources")
    eval_sets, classnames = build_eval_sets(cfg)
    sources = [instantiate(s, _convert_="all") for s in tc.sources]
    if tc.get("image_only_ratio") is not None and not 0 <= float(tc.image_only_ratio) <= 1:  # before the pool is listed
        raise UserError(f"data.train.image_only_ratio={tc.image_only_ratio} is not in [0, 1]: set the share of "
                        f"image-only items per batch, e.g. data.train.image_only_ratio=0.25 (null: no mixing)")
    # data.train.image_only_sources: appended to the sources, each marked image-only (captions dropped)
    for s in tc.get("image_only_sources") or []:
        src = instantiate(s, _convert_="all")
        sources.append(src if is_image_only(src) else ImageOnly(src))
    corpus_cfg = OmegaConf.to_container(tc.corpus, resolve=True) if tc.get("corpus") is not None else {}
    excluded = eval_prompts(cfg, classnames)
    corpus = build_corpus(**corpus_cfg, exclude=excluded) if corpus_cfg else []
    spec = ViewSpec(size=int(cfg.image_size), views=int(tc.get("views", 1)), augment=bool(tc.get("augment", False)),
                    scale=tuple(tc.get("scale", (0.6, 1.0))), seed=int(tc.get("seed", 0)), mix=mix)
    evals = {"eval_sets": {k: {n: len(e) for n, e in v.items()} for k, v in eval_sets.items()},
             "eval_skipped": {n: e.skipped for v in eval_sets.values() for n, e in v.items()},
             "eval_skipped_first": {n: e.skip_log["first"] for v in eval_sets.values() for n, e in v.items()
                                    if e.skipped}}
    if tc.get("stream") is not None:
        if tc.get("image_only_ratio") is not None:
            raise UserError("data.train.image_only_ratio mixes indexed sources, not a stream: set "
                            "data.train.image_only_ratio=null or train from data.train.sources")
        if sources:
            raise UserError("data.train has both a stream and sources: set data.train.sources=[] to train "
                            "from the stream")
        stream, info = _train_stream(tc, spec, corpus, len(excluded))
        return stream, eval_sets, {**info, **evals}
    trainset = TrainSet(sources, spec, corpus, image_only_ratio=tc.get("image_only_ratio"))
    info = {
        "train_images": len(trainset.index),
        "train_items": len(trainset),
        "train_texts": len(trainset.texts),
        "corpus_texts": len(trainset.corpus),
        "image_only_items": sum(trainset.image_only_items()),
        "image_only_ratio": trainset.image_only_ratio,
        "eval_prompts_excluded_from_corpus": len(excluded),
        "sources": [getattr(s, "name", type(s).__name__) for s in sources],
        **evals,
    }
    return trainset, eval_sets, info


def _train_stream(tc: DictConfig, spec: ViewSpec, corpus: list[str], excluded: int
                  ) -> tuple[TrainStream, dict[str, Any]]:
    src = instantiate(tc.stream, _convert_="all")
    # a one-epoch stream ends at different steps on different ranks, and the others would wait forever
    if dist_utils.world_size() > 1 and not src.resampled and src.epochs is not None:
        raise UserError("data.train.stream under DDP needs resampled: true (or epochs: null): "
                        "a one-epoch stream runs out at different steps on different ranks")
    info = {"train_texts": len(corpus), "corpus_texts": len(corpus), "eval_prompts_excluded_from_corpus": excluded,
            "sources": [src.name],
            "stream": {"shards": len(src.urls), "resampled": src.resampled,
                       "epochs": None if src.resampled else src.epochs,
                       "buffer": src.buffer, "seed": src.seed, "reinforced": src.reinforced}}
    return TrainStream(src, spec, corpus), info
