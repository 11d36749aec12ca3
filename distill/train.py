"""Distillation as a task of the training engine (distill/engine): batches of image views with
their texts, teacher targets from the cache (default) or the teacher online, the student's
forward and the distillation loss. Both target sources give the same targets for the same view.

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
from distill.data import ResumableSampler, TrainSet, _stable_int, collate
from distill.encoders import normalize_images, resize_to
from distill.engine import EngineConfig, TrainingDiverged, fit
from distill.engine.checkpoint import unwrap
from distill.students import tower_of

__all__ = ["DistillTask", "TrainingDiverged", "train"]


class DistillTask:
    """The student learns the teacher's embeddings: ``loss`` runs one micro-batch through the
    student and ``loss_fn`` (distill.losses) against the cached or online teacher targets.

    Uncaptioned images get a fresh corpus text at every visit (``resample_corpus_texts``), and
    ``extra_texts`` text-only rows per micro-batch feed the ``extra_text_mse`` term: the text
    tower is cheap next to the image tower, so it can see many more texts per step than there
    are images. Both draws are seeded by (step, micro-batch, rank), so a resumed run draws the same.
    """

    name = "student"

    def __init__(self, student: torch.nn.Module, loss_fn: torch.nn.Module, dataset: TrainSet,
                 tokenizer: Callable[[list[str]], torch.Tensor], cfg: EngineConfig, image_size: int,
                 teacher: Any = None, cache: TeacherCache | None = None) -> None:
        if cache is None and teacher is None:
            raise ValueError("distillation needs a teacher cache or an online teacher")
        self.model, self.loss_fn, self.dataset, self.tokenizer = student, loss_fn, dataset, tokenizer
        self.cfg, self.image_size, self.teacher, self.cache = cfg, image_size, teacher, cache
        self.samples_per_step = int(cfg.batch_size) * int(cfg.grad_accum) * dist_utils.world_size()
        self.teacher_scale = float(cache.manifest["logit_scale"] if cache is not None else teacher.logit_scale)
        self.max_log_scale = math.log(float(cfg.max_logit_scale))
        self.timers = {"data": 0.0, "teacher": 0.0, "student": 0.0}
        self.seen_images = self.skipped = 0
        self.forward: torch.nn.Module = student
        self._pending: tuple[float, float, float, int] = (0.0, 0.0, 0.0, 0)  # times and images of the micro-batch in flight

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.model, "loss": self.loss_fn}

    tower_of = staticmethod(tower_of)

    def prepare(self, device: torch.device, model: torch.nn.Module) -> None:
        self.device, self.forward = device, model
        if self.cache is not None and getattr(self.loss_fn, "uses_teacher_means", False):
            self.loss_fn.set_teacher_means(*self.cache.mean_embeddings())  # μ for the feature_residual_* terms
        unwrap(self.model).output_dict = True

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        return view_batches(self.dataset, self.cfg, start_step, self.device,
                            valid=self.cache.valid if self.cache is not None else None)

    def _texts(self, batch: Mapping[str, Any], step: int, micro: int) -> torch.Tensor:
        """The text row of each image (a fresh corpus draw for uncaptioned ones), then the extra rows."""
        text_index = batch["text_index"]
        lo, hi = self.dataset.corpus_span()
        draw = torch.Generator().manual_seed(_stable_int("draw", int(self.cfg.seed), step, micro, dist_utils.rank()))
        if self.cfg.resample_corpus_texts and hi > lo and not batch["paired"]:
            unp = ~batch["pair_mask"]
            text_index = text_index.clone()
            text_index[unp] = torch.randint(lo, hi, (int(unp.sum()),), generator=draw)
        if self.cfg.extra_texts and hi > lo:
            text_index = torch.cat([text_index, torch.randint(lo, hi, (int(self.cfg.extra_texts),), generator=draw)])
        return text_index

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def loss(self, batch: Mapping[str, Any], step: int, micro: int, autocast: Callable) -> dict[str, torch.Tensor] | None:
        t0 = time.perf_counter()
        self.skipped += len(batch["skipped"])
        if not len(batch["index"]):
            return None
        images = batch["image"].to(self.device, non_blocking=True)  # (B, 3, S, S) in [0, 1]
        text_index = self._texts(batch, step, micro)
        n_img = len(batch["index"])
        texts = [self.dataset.texts[k] for k in text_index.tolist()]
        t1 = time.perf_counter()
        if self.cache is not None:
            t_img = self.cache.image_targets(batch["index"]).to(self.device)  # (B, D)
            t_txt = self.cache.text_targets(text_index).to(self.device)  # (B + extra, D)
        else:
            t_img = self.teacher.encode_image(images).to(self.device)
            t_txt = self.teacher.encode_text(texts).to(self.device)
        self._sync()
        t2 = time.perf_counter()
        tokens = self.tokenizer(texts).to(self.device)
        with autocast():
            out = self.forward(image=normalize_images(resize_to(images, self.image_size)), text=tokens)
            out = {k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}
            s_txt_all = out["text_features"]
            out["text_features"] = s_txt_all[:n_img]
            extra = {"student_text": s_txt_all[n_img:], "teacher_text": t_txt[n_img:]} if self.cfg.extra_texts else None
            losses = self.loss_fn(out, {"image_features": t_img, "text_features": t_txt[:n_img],
                                        "logit_scale": self.teacher_scale}, has_pairs=batch["paired"], extra=extra)
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
        return {"images_seen": self.seen_images, "images_skipped": self.skipped, "timers": dict(self.timers),
                "target_source": "cache" if self.cache is not None else "online"}


def view_batches(dataset: TrainSet, cfg: EngineConfig, start_step: int, device: torch.device,
                 valid: Any = None) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches of ``dataset`` views from ``start_step`` optimizer steps into the
    seeded stream (distill.data.ResumableSampler), so a resumed run sees the same batches."""
    per_step = int(cfg.batch_size) * int(cfg.grad_accum) * dist_utils.world_size()
    sampler = ResumableSampler(len(dataset), seed=int(cfg.seed), start=start_step * per_step,
                               batch_size=int(cfg.batch_size), rank=dist_utils.rank(),
                               world_size=dist_utils.world_size(), valid=valid)
    workers = int(cfg.num_workers)
    loader = DataLoader(dataset, batch_size=int(cfg.batch_size), sampler=sampler, collate_fn=collate, drop_last=True,
                        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return iter(loader)


def train(*, student: torch.nn.Module, loss_fn: torch.nn.Module, dataset: TrainSet,
          tokenizer: Callable[[list[str]], torch.Tensor], cfg: Mapping[str, Any], out_dir: str | os.PathLike,
          device: torch.device, teacher: Any = None, cache: TeacherCache | None = None,
          evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
          image_size: int | None = None) -> dict[str, Any]:
    """Distil into ``student`` with the engine. ``cfg`` is a complete train config
    (conf/train/*.yaml; ``distill.engine.config.defaults(**overrides)`` builds one without Hydra).
    Returns a flat dict of training metrics."""
    ecfg = cfg if isinstance(cfg, EngineConfig) else EngineConfig.from_mapping(cfg)
    task = DistillTask(student, loss_fn, dataset, tokenizer, ecfg, image_size or dataset.spec.size,
                       teacher=teacher, cache=cache)
    return fit(task, ecfg, Path(out_dir), device, evaluate=evaluate)
