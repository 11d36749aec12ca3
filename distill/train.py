"""Distillation as a task of the training engine (distill/engine): batches of image views with
their texts, teacher targets from the cache (default) or the teacher online, the student's
forward and the distillation loss. Both target sources give the same targets for the same view.

The views come from an indexed ``TrainSet`` (seeded sampler, resumed by step) or from a
``TrainStream`` (distill.streaming shards read front to back, resumed from the loader's own
state, which the engine keeps in the checkpoint through ``data_state``/``load_data_state``).
A stream has no item indices for a cache to address, so its teacher always runs online.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` images per process.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader

from distill import distributed as dist_utils
from distill.cache import TeacherCache
from distill.data import ResumableSampler, TrainSet, ViewSpec, stable_int, augmented_view, collate, eval_view
from distill.data_build import TrainStream
from distill.encoders import normalize_images, resize_to
from distill.engine import EngineConfig, TrainingDiverged, fit
from distill.engine.checkpoint import unwrap
from distill.errors import UserError
from distill.streaming import Sample, StreamLoader, stable_key
from distill.students import tower_of

__all__ = ["DistillTask", "StreamViews", "TrainingDiverged", "stream_collate", "train", "train_stage"]


class StreamViews:
    """A stream ``Sample`` -> {"key", "image": (3, S, S) in [0, 1], "caption"}. The augmented crop is
    seeded by (spec seed, shard name + member key, the reader's sample counter): a key met again gets
    a fresh crop, a resumed reader, whose counter continues from the checkpoint, draws the same crop
    as before, and moved shards (another folder, a mirror) give the same crops.

    A reinforced sample (``sample.teacher``, distill.reinforce) instead picks one of its K stored views,
    by the same seeding, and rebuilds it from the stored seed; the item then carries the teacher's
    embedding of exactly that view ("t_image") and of the caption ("t_text", None if uncaptioned)."""

    def __init__(self, spec: ViewSpec) -> None:
        self.spec = spec

    def seed(self, sample: Sample) -> int:
        # not the full key: the shards' location (a tmp folder, a mount, a URL) must not change the crops
        return stable_int(self.spec.seed, stable_key(sample.key), int(sample.state["samples"]))

    def __call__(self, sample: Sample) -> dict[str, Any]:
        spec, t = self.spec, sample.teacher
        seed = self.seed(sample)
        if t is not None:
            k = seed % len(t["seeds"])
            seed = int(t["seeds"][k])
        img = (augmented_view(sample.image, spec.size, seed, scale=tuple(spec.scale)) if spec.augment
               else eval_view(sample.image, spec.size))
        item = {"key": sample.key, "image": img, "caption": sample.caption}
        if t is not None:
            item["t_image"] = torch.from_numpy(t["image"][k].astype("float32"))
            item["t_text"] = None if t["text"] is None else torch.from_numpy(t["text"].astype("float32"))
        return item


def stream_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a stream batch; captions stay strings ("" for an uncaptioned sample: the task draws a corpus text)."""
    captions = [it["caption"] for it in items]
    out = {"key": [it["key"] for it in items], "image": torch.stack([it["image"] for it in items]),
           "caption": captions, "paired": all(captions) and bool(items),
           "pair_mask": torch.tensor([bool(c) for c in captions], dtype=torch.bool), "skipped": []}
    if items and "t_image" in items[0]:  # reinforced: the stored teacher targets ride along
        out["t_image"] = torch.stack([it["t_image"] for it in items])
        out["t_text"] = [it["t_text"] for it in items]
    return out


class DistillTask:
    """The student learns the teacher's embeddings: ``loss`` runs one micro-batch through the
    student and ``loss_fn`` (distill.losses) against the cached or online teacher targets.

    Uncaptioned images get a fresh corpus text at every visit (``resample_corpus_texts``), and
    ``extra_texts`` text-only rows per micro-batch feed the ``extra_text_mse`` term: the text
    tower is cheap next to the image tower, so it can see many more texts per step than there
    are images. Both draws are seeded by (step, micro-batch, rank), so a resumed run draws the same.

    With ``stream`` (a ``TrainStream``) instead of ``dataset`` the batches come from a ``StreamLoader``
    that resumes from its own state (``data_state``/``load_data_state``, kept in the checkpoint by
    the engine), uncaptioned samples always draw a corpus text, and the teacher runs online.
    """

    name = "student"

    def __init__(self, student: torch.nn.Module, loss_fn: torch.nn.Module, dataset: TrainSet | None,
                 tokenizer: Callable[[list[str]], torch.Tensor], cfg: EngineConfig, image_size: int,
                 teacher: Any = None, cache: TeacherCache | None = None, stream: TrainStream | None = None) -> None:
        if cache is None and teacher is None:
            raise ValueError("distillation needs a teacher cache or an online teacher")
        if (stream is None) == (dataset is None):
            raise ValueError("distillation needs either an indexed dataset or a stream")
        if stream is not None and cache is not None:
            raise UserError("a training stream has no item indices for the teacher cache: set cache.enabled=false "
                            "(the teacher runs online for streams) or data.train.stream.reinforced=true")
        self.model, self.loss_fn, self.dataset, self.tokenizer = student, loss_fn, dataset, tokenizer
        self.stream = stream
        self.loader = None if stream is None else StreamLoader(
            stream.source, int(cfg.batch_size), num_workers=int(cfg.num_workers), transform=StreamViews(stream.spec),
            collate=stream_collate)
        self.cfg, self.image_size, self.teacher, self.cache = cfg, image_size, teacher, cache
        self.samples_per_step = int(cfg.batch_size) * int(cfg.grad_accum) * dist_utils.world_size()
        self.teacher_scale = float(cache.manifest["logit_scale"] if cache is not None else teacher.logit_scale)
        self.max_log_scale = math.log(float(cfg.max_logit_scale))
        self.timers = {"data": 0.0, "teacher": 0.0, "student": 0.0}
        self.seen_images = self.skipped = 0
        self.forward: torch.nn.Module = student
        self._pending: tuple[float, float, float, int] = (0.0, 0.0, 0.0, 0)  # times and images of the micro-batch in flight
        self._token_rows: dict[int, torch.Tensor] = {}  # dataset.texts row -> its tokens: Python BPE every step costs (benchmarks/results/cpu_step.md)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.model, "loss": self.loss_fn}

    tower_of = staticmethod(tower_of)

    def prepare(self, device: torch.device, model: torch.nn.Module) -> None:
        self.device, self.forward = device, model
        if self.loader is not None:
            self.loader.loader_kw["pin_memory"] = device.type == "cuda"
        if self.cache is not None and getattr(self.loss_fn, "uses_teacher_means", False):
            self.loss_fn.set_teacher_means(*self.cache.mean_embeddings())  # μ for the feature_residual_* terms
        if getattr(self.loss_fn, "uses_text_bank", False):
            self.loss_fn.set_text_bank(self._caption_bank())
        unwrap(self.model).output_dict = True

    def _caption_bank(self) -> torch.Tensor:
        """The teacher's embedding of every training caption (``bank_kd``): the cache's rows, or the teacher online."""
        if self.dataset is None:
            raise UserError("loss term bank_kd needs the captions up front, which a training stream does not list: "
                            "drop loss.weights.bank_kd or train from an indexed set (data.train.sources)")
        n_caps = self.dataset.corpus_span()[0]
        if n_caps == 0:
            raise UserError("loss term bank_kd needs captioned training images and this training set has none: "
                            "drop loss.weights.bank_kd or add a captioned source")
        if self.cache is not None:
            return self.cache.text_targets(torch.arange(n_caps))
        caps = self.dataset.texts[:n_caps]
        return torch.cat([self.teacher.encode_text(caps[i:i + 256]).float().cpu() for i in range(0, n_caps, 256)])

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        if self.loader is not None:
            return self._stream_batches()  # the loader resumes from load_data_state, not from start_step
        return view_batches(self.dataset, self.cfg, start_step, self.device,
                            valid=self.cache.valid if self.cache is not None else None,
                            image_only_ratio=getattr(self.dataset, "image_only_ratio", None))  # the distillation mixes; the fine-tune does not

    def _stream_batches(self) -> Iterator[dict[str, Any]]:
        yield from self.loader
        raise UserError(f"the training stream {self.stream.source.name} ended after {self.loader.batches} batches, "
                        f"before train.steps: set resampled: true (or epochs: null) in data.train.stream, "
                        f"or fewer train.steps")

    def data_state(self) -> dict[str, Any] | None:
        """The stream's position for the checkpoint (a collective under DDP), None for the indexed set."""
        return self.loader.state_dict() if self.loader is not None else None

    def load_data_state(self, state: dict[str, Any]) -> None:
        if self.loader is not None:
            self.loader.load_state_dict(state)

    def _texts(self, batch: Mapping[str, Any], step: int, micro: int) -> tuple[list[str], torch.Tensor | None]:
        """The text of each image (a fresh corpus draw for uncaptioned ones), then the extra rows; with
        their rows in ``dataset.texts`` for the indexed set (the cache is keyed by them), None for a stream."""
        draw = torch.Generator().manual_seed(stable_int("draw", int(self.cfg.seed), step, micro))
        if self.stream is not None:
            return self._stream_texts(batch, draw), None
        text_index = batch["text_index"]
        lo, hi = self.dataset.corpus_span()
        # uncaptioned images draw a corpus text; a mixed item (unpaired) keeps its base image's caption
        captioned = batch.get("caption_mask", batch["pair_mask"])
        if self.cfg.resample_corpus_texts and hi > lo and not bool(captioned.all()):
            unp = ~captioned
            text_index = text_index.clone()
            text_index[unp] = _rank_rows(torch.randint(lo, hi, (len(unp) * dist_utils.world_size(),),
                                                       generator=draw), len(unp))[unp]
        if self.cfg.extra_texts and hi > lo:
            e = int(self.cfg.extra_texts)
            text_index = torch.cat([text_index, _rank_rows(torch.randint(lo, hi, (e * dist_utils.world_size(),),
                                                                         generator=draw), e)])
        return [self.dataset.texts[k] for k in text_index.tolist()], text_index

    def _stream_texts(self, batch: Mapping[str, Any], draw: torch.Generator) -> list[str]:
        """Captions, a corpus draw for each uncaptioned sample (seeded like the indexed set's draws), extra rows."""
        texts, corpus = list(batch["caption"]), self.stream.corpus
        bare = [i for i, c in enumerate(texts) if not c]
        if bare and not corpus:
            raise UserError(f"stream sample {batch['key'][bare[0]]} has no caption and the text corpus is empty: "
                            f"set data.train.corpus (e.g. imagenet_classes: true) or add captions (.txt/.json)")
        world = dist_utils.world_size()  # draws made for every rank and split, as for the indexed set
        if bare:
            rows = _rank_rows(torch.randint(0, len(corpus), (len(texts) * world,), generator=draw), len(texts))
            for i in bare:
                texts[i] = corpus[int(rows[i])]
        if self.cfg.extra_texts and corpus:
            e = int(self.cfg.extra_texts)
            texts += [corpus[k] for k in _rank_rows(torch.randint(0, len(corpus), (e * world,), generator=draw),
                                                    e).tolist()]
        return texts

    def _stored_targets(self, batch: Mapping[str, Any], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reinforced shards' targets: stored image embeddings, stored caption embeddings, and the teacher's
        text tower online only for rows without one (corpus draws for uncaptioned images, extra texts)."""
        stored = list(batch["t_text"]) + [None] * (len(texts) - len(batch["t_text"]))
        missing = [i for i, t in enumerate(stored) if t is None]
        if missing:
            if self.teacher is None:
                raise UserError("reinforced shards store caption embeddings only: uncaptioned samples or "
                                "train.extra_texts need the teacher's text tower online")
            online = self.teacher.encode_text([texts[i] for i in missing]).float().cpu()
            for i, row in zip(missing, online):
                stored[i] = row
        return batch["t_image"].to(self.device), torch.stack(stored).to(self.device)

    def _tokenize(self, texts: list[str], text_index: torch.Tensor | None) -> torch.Tensor:
        """The texts' tokens; an indexed set's rows are tokenized once (a finite set of texts), a stream's every time."""
        if text_index is None:
            return self.tokenizer(texts)
        rows = text_index.tolist()
        missing = sorted({r for r in rows if r not in self._token_rows})
        if missing:
            for r, t in zip(missing, self.tokenizer([self.dataset.texts[r] for r in missing])):
                self._token_rows[r] = t
        return torch.stack([self._token_rows[r] for r in rows])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def loss(self, batch: Mapping[str, Any], step: int, micro: int, autocast: Callable) -> dict[str, torch.Tensor] | None:
        t0 = time.perf_counter()
        self.skipped += len(batch["skipped"])
        n_img = len(batch["image"])  # an indexed batch whose images all failed holds an empty tensor
        if not n_img:
            return None
        images = batch["image"].to(self.device, non_blocking=True)  # (B, 3, S, S) in [0, 1]
        texts, text_index = self._texts(batch, step, micro)
        t1 = time.perf_counter()
        if self.cache is not None:
            t_img = self.cache.image_targets(batch["index"]).to(self.device)  # (B, D)
            t_txt = self.cache.text_targets(text_index).to(self.device)  # (B + extra, D)
        elif "t_image" in batch:
            t_img, t_txt = self._stored_targets(batch, texts)
        else:
            t_img = self.teacher.encode_image(images).to(self.device)
            t_txt = self.teacher.encode_text(texts).to(self.device)
        self._sync()
        t2 = time.perf_counter()
        tokens = self._tokenize(texts, text_index).to(self.device)
        with autocast():
            out = self.forward(image=normalize_images(resize_to(images, self.image_size)), text=tokens)
            out = {k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}
            s_txt_all = out["text_features"]
            out["text_features"] = s_txt_all[:n_img]
            extra = {"student_text": s_txt_all[n_img:], "teacher_text": t_txt[n_img:]} if self.cfg.extra_texts else None
            losses = self.loss_fn(out, {"image_features": t_img, "text_features": t_txt[:n_img],
                                        "logit_scale": self.teacher_scale}, has_pairs=batch["paired"], extra=extra,
                                  pair_mask=batch.get("pair_mask"))
        self._pending = (t0, t1, t2, n_img)
        return losses

    def after_backward(self) -> None:
        self._sync()
        t0, t1, t2, n_img = self._pending
        self.timers["data"] += t1 - t0
        self.timers["teacher"] += t2 - t1
        self.timers["student"] += time.perf_counter() - t2
        self.seen_images += n_img * dist_utils.world_size()

    def after_step(self) -> None:
        with torch.no_grad():  # CLIP's clamp: the student's temperature never exceeds 100
            ls = getattr(unwrap(self.model), "logit_scale", None)
            if ls is not None:
                ls.clamp_(0, self.max_log_scale)

    def stats(self) -> dict[str, Any]:
        out = {"images_seen": self.seen_images, "images_skipped": self.skipped, "timers": dict(self.timers),
               "target_source": ("cache" if self.cache is not None else "reinforced shards"
                                 if self.stream is not None and self.stream.source.reinforced else "online")}
        if self.loader is not None:
            out["stream"] = self.loader.stats(all_ranks=True)  # a collective: fit calls stats on every rank
        return out


def _rank_rows(global_rows: torch.Tensor, n: int) -> torch.Tensor:
    """This rank's ``n`` rows of draws made for the whole global batch: the ranks of a DDP run together
    draw exactly what one process with the global batch draws (the sampler splits images the same way)."""
    r = dist_utils.rank()
    return global_rows[r * n:(r + 1) * n]


def view_batches(dataset: TrainSet, cfg: EngineConfig, start_step: int, device: torch.device,
                 valid: Any = None, image_only_ratio: float | None = None) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches of ``dataset`` views from ``start_step`` optimizer steps into the
    seeded stream (distill.data.ResumableSampler), so a resumed run sees the same batches;
    ``image_only_ratio``: the share of image-only items per batch (None: no mixing)."""
    per_step = int(cfg.batch_size) * int(cfg.grad_accum) * dist_utils.world_size()
    sampler = ResumableSampler(len(dataset), seed=int(cfg.seed), start=start_step * per_step,
                               batch_size=int(cfg.batch_size), rank=dist_utils.rank(),
                               world_size=dist_utils.world_size(), valid=valid,
                               image_only=dataset.image_only_items() if image_only_ratio is not None else None,
                               image_only_ratio=image_only_ratio)
    workers = int(cfg.num_workers)
    loader = DataLoader(dataset, batch_size=int(cfg.batch_size), sampler=sampler, collate_fn=collate, drop_last=True,
                        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return iter(loader)


def train(*, student: torch.nn.Module, loss_fn: torch.nn.Module, dataset: TrainSet | None,
          tokenizer: Callable[[list[str]], torch.Tensor], cfg: Mapping[str, Any], out_dir: str | os.PathLike,
          device: torch.device, teacher: Any = None, cache: TeacherCache | None = None,
          evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
          image_size: int | None = None, stream: TrainStream | None = None) -> dict[str, Any]:
    """Distil into ``student`` with the engine, from ``dataset`` or ``stream`` (with the online
    ``teacher``). ``cfg`` is a complete train config (conf/train/*.yaml;
    ``distill.compose.train_defaults(**overrides)`` builds one without Hydra). Returns a flat dict
    of training metrics (a stream's skip counters under "stream")."""
    ecfg = cfg if isinstance(cfg, EngineConfig) else EngineConfig.from_mapping(cfg)
    spec = stream.spec if stream is not None else dataset.spec
    task = DistillTask(student, loss_fn, dataset, tokenizer, ecfg, image_size or spec.size,
                       teacher=teacher, cache=cache, stream=stream)
    return fit(task, ecfg, Path(out_dir), device, evaluate=evaluate)


def train_stage(cfg: Any, teacher: Any, student: torch.nn.Module, model_cfg: dict[str, Any], tokenizer,
                trainset: TrainSet, eval_sets: Mapping[str, Any], cache: TeacherCache | None,
                out: Path, device: torch.device) -> dict[str, Any]:
    """The train stage: the configured loss (``cfg.loss``), then ``train`` with the cache's targets or the
    teacher online, evaluated on ``eval_sets`` as it goes; returns the training figures."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from distill.evaluation import make_evaluator

    loss_fn = instantiate(cfg.loss, student_dim=int(model_cfg["embed_dim"]), teacher_dim=teacher.embed_dim,
                          _convert_="all")
    image_size = int(model_cfg["vision_cfg"]["image_size"])
    stream = trainset if isinstance(trainset, TrainStream) else None
    result = train(student=student, loss_fn=loss_fn, dataset=None if stream else trainset, tokenizer=tokenizer,
                   cfg=OmegaConf.to_container(cfg.train, resolve=True), out_dir=out, device=device,
                   teacher=teacher if cache is None else None, cache=cache,
                   evaluate=make_evaluator(eval_sets, tokenizer, image_size, device), image_size=image_size,
                   stream=stream)
    if cache is not None:
        result["cache"] = {"path": str(cache.path), "build_seconds": cache.manifest.get("build_seconds"),
                           "skipped": cache.manifest.get("skipped"),
                           "skipped_first": cache.manifest.get("skipped_first", [])}
    skips = getattr(trainset, "skips", None)  # images the training itself found unreadable (online teacher)
    if skips is not None and skips.count:
        result["skipped_inputs"] = skips.as_dict()
    return result
