"""`run(cfg) -> dict`: the only place that knows the order of the stages.

    teacher -> data -> fine-tune (optional) -> teacher cache -> student -> train -> export -> bench -> report

Each stage is a plain function of plain inputs, in the module of its domain, so tests can call any
stage alone: the teacher is its config's ``_target_``, the data ``distill.data_build``, the fine-tune
``distill.finetune.stage``, the cache ``distill.cache``, the student ``distill.students.stage``, the
training ``distill.train``, the export ``distill.variants`` (+ ``distill.bundle``), the bench
``distill.bench`` and the report ``distill.report``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distill import bench, runs, validate
from distill import distributed as dist_utils
from distill import report as report_mod
from distill.cache import TeacherCache, build_or_load
from distill.data import EvalSet, TrainSet, attach_view_memo
from distill.data_build import TrainStream, build_data
from distill.finetune.stage import finetune_stage
from distill.session import pick_device, resolve_out_dir, seed_everything, setup_logging
from distill.students.stage import build_student_stage, student_tokenizer
from distill.train import train_stage
from distill.variants import VARIANTS, export_stage

log = logging.getLogger("distill")


# ---------------------------------------------------------------------------------------- stages
def build_teacher(cfg: DictConfig, device: torch.device) -> Any:
    """Instantiate the configured teacher (its ``_target_``) on ``device``."""
    return instantiate(cfg, device=str(device), _convert_="all")


# ------------------------------------------------------------------------------------------ run
def run(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run every stage in order; write report.json / report.md into the run folder; return the report."""
    started = time.perf_counter()
    validate.check_config(cfg)  # before any expensive stage: every config problem, one line each
    dist_utils.setup_from_env()
    out, pinned = resolve_out_dir(cfg, out_dir)
    # every rank must continue the same run: rank 0 picks the folder (and checks it) for all
    out = dist_utils.broadcast_object(runs.select_run_dir(cfg, out, pinned) if dist_utils.rank() == 0 else None)
    setup_logging(out)
    device = start(cfg)
    main_proc = dist_utils.rank() == 0
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    p = teacher_stages(cfg, out, device)
    if p.ft_info is not None and cfg.finetune.then == "export":
        return (finetune_export(cfg, p.zero_shot, p.teacher, p.ft_info, p.trainset, p.eval_sets, out, started)
                if main_proc else {})
    student_stages(cfg, p, device, main_proc=main_proc)
    teacher, student, model_cfg, tokenizer = p.teacher, p.student, p.model_cfg, p.tokenizer
    trainset, eval_sets = p.trainset, p.eval_sets
    log.info("stage train")
    train_metrics = train_stage(cfg, teacher, student, model_cfg, tokenizer, trainset, eval_sets, p.cache, out, device)
    train_metrics["data"] = p.data_info
    dist_utils.cleanup()
    if not main_proc:
        return {"train": train_metrics}

    log.info("stage export")
    variants = list(cfg.variants)
    export_info, ctx = export_stage(cfg.export, variants, student, model_cfg, out, eval_sets, trainset, tokenizer,
                                    teacher=teacher, threads=int(cfg.bench.threads))
    log.info("stage bench")
    measured = bench.bench_variants(cfg.bench, variants, ctx, eval_sets, teacher)
    if p.memo is not None:
        p.data_info["view_memo"] = p.memo.stats()
        log.info("view memo: %(views)d views, %(mb).0f of %(budget_mb)d MB, %(hits)d hits, %(misses)d misses",
                 p.data_info["view_memo"])
    report = report_mod.report_stage(cfg, teacher, model_cfg, measured, train_metrics, export_info, out,
                                     finetune=p.ft_info, started=started,
                                     student_start=getattr(student, "pretrained_start", None))
    if train_metrics["steps"] >= int(cfg.train.steps) or train_metrics.get("early_stopped"):
        runs.mark_finished(out, cfg)  # a run stopped by train.stop_after_steps stays resumable
    log.info("report written to %s", out / "report.md")
    print(f"report: {out / 'report.md'}")
    return report


@dataclass
class Prepared:
    """What the stages before training hand to it: the data, the (tuned) teacher, its cache, the student.
    Benchmarks that retrain only the student call the same two functions as ``run``."""
    teacher: Any
    zero_shot: Any                       # the teacher as built, before any fine-tune
    ft_info: dict[str, Any] | None       # the fine-tune stage's report section (None: finetune=none)
    trainset: TrainSet | TrainStream
    eval_sets: dict[str, dict[str, EvalSet]]
    data_info: dict[str, Any]
    memo: Any = None                     # the view memo, when view_memo_mb > 0
    cache: TeacherCache | None = None
    student: torch.nn.Module | None = None
    model_cfg: dict[str, Any] | None = None
    tokenizer: Any = None


def start(cfg: DictConfig) -> torch.device:
    """Threads, the device (this rank's GPU under torchrun) and the seeds, before the first stage."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    device = pick_device(cfg.device)
    if dist_utils.is_dist() and device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(int(cfg.seed))
    return device


def teacher_and_data(cfg: DictConfig, device: torch.device) -> Prepared:
    """teacher -> data: the stages the fine-tune, the cache command and every run start with."""
    log.info("stage teacher: %s", cfg.teacher.get("_target_"))
    teacher = build_teacher(cfg.teacher, device)
    log.info("stage data")
    trainset, eval_sets, data_info = build_data(cfg.data)
    return Prepared(teacher=teacher, zero_shot=teacher, ft_info=None, trainset=trainset, eval_sets=eval_sets,
                    data_info=data_info)


def teacher_stages(cfg: DictConfig, out: Path, device: torch.device) -> Prepared:
    """teacher -> data (with the view memo) -> fine-tune; the fine-tune resumes from ``out/finetune``."""
    p = teacher_and_data(cfg, device)
    p.memo = attach_view_memo(p.trainset, p.eval_sets, float(cfg.get("view_memo_mb") or 0))
    p.teacher, p.ft_info = finetune_stage(cfg.finetune, p.zero_shot, p.trainset, p.eval_sets, out, device)
    return p


def targets_stage(cfg: DictConfig, p: Prepared, device: torch.device) -> Prepared:
    """The teacher's targets: its embedding cache, or a reinforced stream's companion shards; fills ``p``."""
    if isinstance(p.trainset, TrainStream) and p.trainset.source.reinforced:
        p.cache, p.data_info["reinforce"] = None, reinforce_stage(cfg.cache, p.teacher, p.trainset)
    else:
        p.cache = cache_stage(cfg.cache, p.teacher, p.trainset, device) if cfg.cache.enabled else None
    return p


def student_stages(cfg: DictConfig, p: Prepared, device: torch.device, main_proc: bool = True) -> Prepared:
    """teacher targets -> student and its tokenizer; fills ``p``."""
    targets_stage(cfg, p, device)
    # a tuned teacher may have memoised frozen-part outputs for its cache; later stages run it plainly
    p.teacher = p.teacher.release() if hasattr(p.teacher, "release") else p.teacher
    log.info("stage student")
    # reseed: building the cache draws random numbers that loading it does not, and the student's
    # initial weights must not depend on whether the cache already existed
    seed_everything(int(cfg.seed))
    # DDP broadcasts rank 0's initial weights: only rank 0 computes a teacher-informed token table
    p.student, p.model_cfg = build_student_stage(cfg.student, p.teacher,
                                                 cache_dir=cfg.cache.dir if cfg.cache.enabled else None,
                                                 token_init=main_proc)
    p.tokenizer = student_tokenizer(p.model_cfg)
    return p


def cache_stage(cfg: DictConfig, teacher: Any, trainset: TrainSet, device: torch.device) -> TeacherCache:
    """The teacher's embeddings of every training view and text: under torchrun every rank embeds
    its share of the missing chunks and rank 0 assembles them (distill.cache); all load the entry."""
    log.info("stage cache: %d items", len(trainset))
    return build_or_load(teacher, trainset, cfg.dir, chunk_size=int(cfg.chunk_size), batch_size=int(cfg.batch_size),
                         num_workers=int(cfg.num_workers), device=device, progress=dist_utils.rank() == 0)


def reinforce_stage(cfg: DictConfig, teacher: Any, stream: TrainStream) -> dict[str, Any]:
    """A reinforced stream's cache: every rank writes the companion teacher shards of its share of the
    shards that lack one (distill.reinforce), then the stream reads them with this teacher's fingerprint."""
    from distill import reinforce

    src = stream.source
    log.info("stage cache: companion teacher shards for %d shard(s)", len(src.urls))
    out = reinforce.build_companions(teacher, src.urls, stream.spec, root=src.teacher_root,
                                     batch_size=int(cfg.batch_size), image_keys=src.image_keys,
                                     caption_keys=src.caption_keys)
    src.teacher_fingerprint = reinforce.fingerprint(teacher.fingerprint, stream.spec)
    return out


def finetune_export(cfg: DictConfig, zero_shot: Any, tuned: Any, ft_info: dict[str, Any], trainset: TrainSet,
                    eval_sets: dict[str, dict[str, EvalSet]], out: Path, started: float | None = None) -> dict[str, Any]:
    """``finetune.then=export``: the tuned model at α* is written and measured. An open_clip model goes
    where a student would (open_clip folder, ONNX fp32 and int8 with their parity checks, the edge
    bundle), against the zero-shot teacher; another teacher (ConSE) through its own ONNX export, as
    the teacher variants."""
    tuned = tuned.release() if hasattr(tuned, "release") else tuned
    teacher_only = getattr(tuned, "model", None) is None
    if teacher_only:
        variants = [v for v in cfg.variants if VARIANTS[v].role == "teacher"]
        student, model_cfg, tokenizer, reference = None, {}, None, tuned
    else:
        variants = [v for v in cfg.variants if VARIANTS[v].role == "student" or v == validate.REFERENCE_VARIANT]
        student, model_cfg, tokenizer, reference = copy.deepcopy(tuned.model), dict(zero_shot.model_cfg), \
            tuned.tokenizer, zero_shot
    log.info("stage export (the tuned teacher)")
    export_info, ctx = export_stage(cfg.export, variants, student, model_cfg, out, eval_sets, trainset, tokenizer,
                                    teacher=reference, threads=int(cfg.bench.threads))
    log.info("stage bench")
    measured = bench.bench_variants(cfg.bench, variants, ctx, eval_sets, reference)
    report = report_mod.report_stage(cfg, reference, model_cfg, measured, {"finetune_only": True}, export_info, out,
                          finetune=ft_info, started=started)
    runs.mark_finished(out, cfg)
    print(f"report: {out / 'report.md'}")
    return report
