"""`run(cfg) -> dict`: the only place that knows the order of the stages.

    teacher -> data -> fine-tune (optional) -> teacher cache -> student -> train -> export -> bench -> report

Each stage is a plain function of plain inputs, so tests can call any stage alone.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distill import bench, evaluation, export, flops, metrics, runs, students, validate
from distill import distributed as dist_utils
from distill import report as report_mod
from distill.cache import TeacherCache, build_or_load, text_embeddings
from distill.data import EvalSet, TrainSet, ViewSpec, attach_view_memo, build_corpus, load_eval_set
from distill.encoders import ClipEncoder
from distill.errors import UserError
from distill.finetune.stage import finetune_stage
from distill.train import TrainStream, train
from distill.variants import VARIANTS, VariantContext

log = logging.getLogger("distill")


# ----------------------------------------------------------------------------------------- setup
def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present (the local rank's GPU under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available: use device=auto or device=cpu")
    return dev


def resolve_out_dir(cfg: DictConfig, out_dir: str | os.PathLike | None) -> tuple[Path, bool]:
    """The run folder and whether the user pinned it (``out_dir``, ``hydra.run.dir=...``); an
    unpinned folder is Hydra's time-stamped default, which ``train.resume=auto`` may swap for an
    unfinished sibling run (distill.runs)."""
    pinned = True
    if out_dir is None:
        out_dir = cfg.get("out_dir")
    if out_dir is None:

        hc = HydraConfig.get()
        out_dir = hc.runtime.output_dir
        pinned = any(o.split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in hc.overrides.hydra)
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path, pinned


def _setup_logging(out_dir: Path) -> None:
    """INFO to ``run.log`` in the run folder, unless Hydra already logs into that folder."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    # the torch exporter's IR passes log every deduplicated initializer at INFO: hundreds of lines
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    target = (out_dir / "run.log").resolve()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().parent == target.parent
           for h in root.handlers):
        return
    fh = logging.FileHandler(target)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(fh)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------- stages
def build_teacher(cfg: DictConfig, device: torch.device) -> Any:
    """Instantiate the configured teacher (its ``_target_``) on ``device``."""
    return instantiate(cfg, device=str(device), _convert_="all")


def eval_prompts(data_cfg: DictConfig, classnames: dict[str, list[str]]) -> list[str]:
    """Every zero-shot prompt the evaluation will use (kept out of the training corpus)."""
    out = []
    for item in data_cfg.eval.get("classification", []) or []:
        for t in item.get("templates") or ["a photo of a {}."]:
            out += [t.format(c) for c in classnames.get(item.name, [])]
    return out


def build_data(cfg: DictConfig) -> tuple[TrainSet | TrainStream, dict[str, dict[str, EvalSet]], dict[str, Any]]:
    """Training set (sources + corpus + view spec) and evaluation sets (labels and captions in memory,
    images streamed from their sources when evaluated: distill.data.EvalSet). With ``train.stream``
    (distill.streaming.StreamingShards) the training data is a ``TrainStream`` instead of a TrainSet."""
    size = int(cfg.image_size)
    eval_sets: dict[str, dict[str, EvalSet]] = {"classification": {}, "retrieval": {}}
    classnames: dict[str, list[str]] = {}
    for kind in ("classification", "retrieval"):
        for item in cfg.eval.get(kind, []) or []:
            src = instantiate(item.source, _convert_="all")
            es = load_eval_set(item.name, src, size, templates=item.get("templates"))
            if kind == "classification":
                if es.labels is None or not es.classnames:
                    raise UserError(f"classification eval set {item.name} has no labels/classnames: "
                                    f"move it to data.eval.retrieval")
                classnames[item.name] = es.classnames
            elif not es.captions:
                raise UserError(f"retrieval eval set {item.name} has no captions: move it to data.eval.classification")
            eval_sets[kind][item.name] = es
    tc = cfg.train
    sources = [instantiate(s, _convert_="all") for s in tc.sources]
    corpus_cfg = _as_dict(tc.get("corpus"))
    excluded = eval_prompts(cfg, classnames)
    corpus = build_corpus(**corpus_cfg, exclude=excluded) if corpus_cfg else []
    spec = ViewSpec(size=size, views=int(tc.get("views", 1)), augment=bool(tc.get("augment", False)),
                    scale=tuple(tc.get("scale", (0.6, 1.0))), seed=int(tc.get("seed", 0)))
    evals = {"eval_sets": {k: {n: len(e) for n, e in v.items()} for k, v in eval_sets.items()},
             "eval_skipped": {n: e.skipped for v in eval_sets.values() for n, e in v.items()}}
    if tc.get("stream") is not None:
        if sources:
            raise UserError("data.train has both a stream and sources: set data.train.sources=[] to train "
                            "from the stream")
        src = instantiate(tc.stream, _convert_="all")
        # a one-epoch stream ends at different steps on different ranks, and the others would wait forever
        if dist_utils.world_size() > 1 and not src.resampled and src.epochs is not None:
            raise UserError("data.train.stream under DDP needs resampled: true (or epochs: null): "
                            "a one-epoch stream runs out at different steps on different ranks")
        info = {"train_texts": len(corpus), "corpus_texts": len(corpus),
                "eval_prompts_excluded_from_corpus": len(excluded), "sources": [src.name],
                "stream": {"shards": len(src.urls), "resampled": src.resampled,
                           "epochs": None if src.resampled else src.epochs,
                           "buffer": src.buffer, "seed": src.seed, "reinforced": src.reinforced}}
        return TrainStream(src, spec, corpus), eval_sets, {**info, **evals}
    trainset = TrainSet(sources, spec, corpus)
    info = {
        "train_images": len(trainset.index),
        "train_items": len(trainset),
        "train_texts": len(trainset.texts),
        "corpus_texts": len(trainset.corpus),
        "eval_prompts_excluded_from_corpus": len(excluded),
        "sources": [getattr(s, "name", type(s).__name__) for s in sources],
        **evals,
    }
    return trainset, eval_sets, info


def build_student_stage(cfg: DictConfig, teacher: Any, cache_dir: str | None = None,
                        token_init: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The narrow student (open_clip CLIP) and its open_clip model_cfg; optional inheritance and
    teacher-informed token table (its teacher embeddings kept under ``cache_dir`` when given;
    ``token_init=False`` skips it, for DDP ranks > 0, which receive rank 0's initial weights)."""
    teacher_model = teacher.model
    kwargs: dict[str, Any] = {"embed_dim": int(cfg.get("embed_dim") or teacher.embed_dim)}
    if cfg.builder.text.get("mode") == "teacher":
        kwargs["teacher_model"] = teacher_model
    model, model_cfg = instantiate(cfg.builder, **kwargs, _convert_="all")
    if cfg.get("init", "random") == "inherit":
        if teacher_model is None:
            raise UserError("student.init=inherit needs an open_clip teacher: use student.init=random")
        report = students.inherit_from_teacher(model, teacher_model)
        log.info("inherited %d tensors from the teacher", sum(v != "random" for v in report.values()))
    mode = cfg.get("token_init", "random")
    if mode == "teacher" and token_init:
        if cfg.builder.text.get("mode", "distilled") != "distilled":
            raise UserError("student.token_init=teacher applies to a distilled text tower: use student.token_init=random")
        t0 = time.time()
        tok = student_tokenizer(model_cfg)
        if cache_dir is None:
            info = students.init_tokens_from_teacher(model, teacher.encode_text, tok)
        else:
            ids, texts = students.token_texts(model, tok)
            feats = text_embeddings(teacher, texts, cache_dir, desc="teacher tokens")
            info = students.init_tokens_from_embeddings(model, ids, torch.from_numpy(feats))
        log.info("token table from the teacher: %d tokens, %d components (%.0f%% of the variance), %.0fs",
                 info["tokens"], info["width"], 100 * info["explained_variance"], time.time() - t0)
    elif mode not in ("random", "teacher"):
        raise UserError(f"student.token_init={mode!r} is unknown: use random or teacher")
    return model, model_cfg


def student_tokenizer(model_cfg: dict[str, Any]):
    return open_clip.SimpleTokenizer(context_length=int(model_cfg["text_cfg"].get("context_length", 77)))


def make_evaluator(eval_sets: dict[str, dict[str, EvalSet]], tokenizer, image_size: int, device: torch.device):
    """A callback for the training loop: the student's zero-shot top-1/5 and retrieval recall
    (``evaluate_encoder``, the bench's evaluation path)."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        enc = ClipEncoder(model, tokenizer, image_size, device=device)
        return evaluate_encoder(enc, eval_sets)

    return evaluate


def evaluate_encoder(enc: Any, eval_sets: dict[str, dict[str, EvalSet]], metrics: Any = None,
                     batch_size: int = 64) -> dict[str, float]:
    """Flat metrics dict, e.g. {"fashion-mnist/test/top1": 0.31, "tuxpaint/val/i2t_r5": 0.4}, from
    ``distill.evaluation.evaluate`` (streamed, ``batch_size`` images and captions per call). No
    intervals: the training log and TensorBoard take floats. ``metrics`` is ignored (older callers pass it)."""
    results = evaluation.evaluate(enc, eval_sets, image_batch=batch_size, text_batch=batch_size, resamples=0)
    return evaluation.flat_metrics(results)


def export_stage(cfg: DictConfig, variants: list[str], student: torch.nn.Module, model_cfg: dict[str, Any],
                 out_dir: Path, eval_sets: dict[str, dict[str, EvalSet]], trainset: TrainSet, tokenizer,
                 teacher: Any = None, threads: int | None = None) -> tuple[dict[str, Any], VariantContext]:
    """The open_clip folder, each configured variant's export step (distill.variants), then the
    edge bundle from what they wrote. Returns report["export"] and the context the bench reuses."""
    ctx = VariantContext(cfg=cfg, student=student.cpu().eval() if student is not None else None, model_cfg=model_cfg,
                         export_dir=out_dir / "export", tokenizer=tokenizer, teacher=teacher, trainset=trainset,
                         threads=threads)
    if cfg.open_clip and student is not None:
        ctx.require("student_torch_fp32")
    failed: dict[str, str] = {}
    for name in variants:
        try:
            ctx.require(name)
        except Exception as e:
            if not VARIANTS[name].optional:
                raise
            log.warning("variant %s: export failed: %s", name, e)  # reported failed; the rest still run
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ctx.built["failed"] = failed
    labels = bundle_labels(cfg, eval_sets) if cfg.bundle else None
    if labels is not None and "onnx" in ctx.info:
        ctx.info["bundle"] = str(_write_bundle(ctx, *labels))
    elif cfg.bundle:
        log.warning("no edge bundle: it needs the student_onnx_fp32 variant and a label set (a classification "
                    "eval set, export.bundle_labels or retrieval captions)")
    mob = _as_dict(cfg.get("mobile"))
    if mob.get("enabled") and "bundle" in ctx.info:
        ctx.info["mobile"] = _mobile_files(cfg, mob, ctx, trainset, threads)
    return ctx.info, ctx


def _mobile_files(cfg: DictConfig, mob: dict[str, Any], ctx: VariantContext, trainset: Any,
                  threads: int | None) -> dict[str, Any]:
    """Phone/NPU files into the bundle (distill.mobile); static int8 calibrates on indexed training views,
    so a stream's bundle goes without it (one warning) rather than failing the run."""
    from distill import mobile

    static = bool(mob.get("static_int8", True))
    if static and isinstance(trainset, TrainStream):
        log.warning("export.mobile: no static int8 file, it calibrates on indexed training images and this run "
                    "streams (set export.mobile.static_int8=false to silence this)")
        static = False
    calib, held = mobile.training_views(trainset, int(cfg.int8.calibration_images)) if static else (None, None)
    res = mobile.write_mobile_files(ctx.info["bundle"], calibration=calib, check_images=held,
                                    batch1=bool(mob.get("batch1", False)), fp16=bool(mob.get("fp16", True)),
                                    static_int8=static, ort=bool(mob.get("ort", True)),
                                    ort_style=str(mob.get("ort_style", "fixed")), threads=threads)
    return {"dir": res["dir"], **mobile.summary(res)}  # the full figures: bundle/mobile/*.json


def _write_bundle(ctx: VariantContext, names: list[str], templates: list[str], source: str) -> Path:
    enc = ClipEncoder(ctx.student, ctx.tokenizer, ctx.image_size)
    clf = metrics.zero_shot_classifier(enc.encode_text, names, templates)
    where = ({"classification_set": source.split(":", 1)[1]} if source.startswith("classification:")
             else {"label_source": source})
    return export.write_bundle(
        ctx.export_dir / "bundle", image_onnx=ctx.info["onnx"]["image"]["path"],
        image_int8_onnx=(ctx.info.get("onnx_int8") or {}).get("image"), text_onnx=ctx.info["onnx"]["text"]["path"],
        text_int8_onnx=(ctx.info.get("onnx_int8") or {}).get("text"),
        class_embeddings=clf.cpu().numpy().astype(np.float32), labels=list(names),
        preprocess=export.default_preprocess(ctx.image_size), context_length=ctx.context_length,
        extra={**where, "templates": list(templates)})  # the browser page fills typed prompts into these


def bundle_labels(cfg: DictConfig, eval_sets: dict[str, dict[str, EvalSet]]
                  ) -> tuple[list[str], list[str], str] | None:
    """(labels, templates, where they came from) for the edge bundle: the first classification
    set's classes with its templates; else ``export.bundle_labels`` (each its own prompt); else the
    first retrieval set's unique captions, at most ``export.bundle_max_labels``, so that CSV and
    WebDataset runs ship a bundle too. None when there is nothing to label with."""
    if eval_sets["classification"]:
        name, es = next(iter(eval_sets["classification"].items()))
        return list(es.classnames), list(es.templates or ["a photo of a {}."]), f"classification:{name}"
    given = cfg.get("bundle_labels")
    if given:
        return [str(x) for x in given], ["{}"], "export.bundle_labels"
    for name, es in eval_sets["retrieval"].items():
        caps = [c for c in dict.fromkeys(es.captions or []) if c.strip()]
        if caps:
            cap = int(cfg.get("bundle_max_labels", 1000))
            if len(caps) > cap:
                log.info("edge bundle: %d unique captions in %s, keeping the first %d (export.bundle_max_labels)",
                         len(caps), name, cap)
            return caps[:cap], ["{}"], f"captions of {name}"
    return None


def bench_stage(cfg: DictConfig, variants: list[str], ctx: VariantContext,
                eval_sets: dict[str, dict[str, EvalSet]], teacher: Any) -> dict[str, Any]:
    """Build each configured variant's encoder and measure them all the same way (distill.bench)."""
    threads = int(cfg.threads)
    torch.set_num_threads(threads)
    stats = {"teacher": teacher.stats(),
             "student": flops.clip_model_stats(ctx.student, ctx.model_cfg) if ctx.student is not None else {}}
    onnx_teacher = ctx.built.get("teacher_onnx_fp32")
    if not stats["teacher"]["flops"] and onnx_teacher is not None:  # towers the analytic count cannot model
        log.info("teacher FLOPs counted on its ONNX export: the analytic count does not model its towers")
        stats["teacher"] = {**stats["teacher"], "flops": onnx_teacher.stats()["flops"]}
    rows = []
    for name in variants:
        spec = VARIANTS[name]
        try:
            if name in ctx.built["failed"]:
                raise RuntimeError(ctx.built["failed"][name])
            enc, files = spec.encoder(ctx), spec.files(ctx)
        except Exception as e:  # a variant that cannot be built is reported failed; the rest still run
            log.warning("variant %s failed to build: %s", name, e)
            enc, files = _Unbuildable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"), []
        st = stats[spec.role]
        rows.append(bench.Variant(name=name, role=spec.role, runtime=spec.runtime, precision=spec.precision,
                                  encoder=enc, params=st["params"], flops=st["flops"],
                                  files=files or list(st.get("files", []))))
    ceilings = bench.matmul_ceiling(threads) if cfg.get("ceilings", True) else None
    timing = {"threads": threads, "batch_sizes": list(cfg.batch_sizes), "warmup": int(cfg.warmup),
              "repeats": int(cfg.repeats), "rounds": int(cfg.rounds), "settle_s": float(cfg.settle_s)}
    measured = bench.measure_variants(
        rows, eval_sets, batch_sizes=tuple(cfg.batch_sizes), threads=threads, reference=validate.REFERENCE_VARIANT,
        warmup=timing["warmup"], repeats=timing["repeats"], rounds=timing["rounds"], settle_s=timing["settle_s"],
        ceilings=ceilings, own_reference={n: VARIANTS[n].reference for n in variants if VARIANTS[n].reference in variants})
    return {"variants": measured, "ceilings": ceilings, "timing": timing}


class _Unbuildable:
    """Stands in for a variant whose encoder could not be built, so the bench reports it failed."""

    image_size = 0

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(self.reason)

    encode_text = encode_image


# ------------------------------------------------------------------------------------------ run
def run(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run every stage in order; write report.json / report.md into the run folder; return the report."""
    started = time.perf_counter()
    validate.check_config(cfg)  # before any expensive stage: every config problem, one line each
    distributed = dist_utils.setup_from_env()
    out, pinned = resolve_out_dir(cfg, out_dir)
    # every rank must continue the same run: rank 0 picks the folder (and checks it) for all
    out = dist_utils.broadcast_object(runs.select_run_dir(cfg, out, pinned) if dist_utils.rank() == 0 else None)
    _setup_logging(out)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    device = pick_device(cfg.device)
    if distributed and device.type == "cuda":
        torch.cuda.set_device(device)
    main_proc = dist_utils.rank() == 0
    seed_everything(int(cfg.seed))
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
    measured = bench_stage(cfg.bench, variants, ctx, eval_sets, teacher)
    if p.memo is not None:
        p.data_info["view_memo"] = p.memo.stats()
        log.info("view memo: %(views)d views, %(mb).0f of %(budget_mb)d MB, %(hits)d hits, %(misses)d misses",
                 p.data_info["view_memo"])
    report = report_stage(cfg, teacher, model_cfg, measured, train_metrics, export_info, out, finetune=p.ft_info,
                          started=started)
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


def teacher_stages(cfg: DictConfig, out: Path, device: torch.device) -> Prepared:
    """teacher -> data (with the view memo) -> fine-tune; the fine-tune resumes from ``out/finetune``."""
    log.info("stage teacher: %s", cfg.teacher.get("_target_"))
    teacher = build_teacher(cfg.teacher, device)
    log.info("stage data")
    trainset, eval_sets, data_info = build_data(cfg.data)
    memo = attach_view_memo(trainset, eval_sets, float(cfg.get("view_memo_mb") or 0))
    tuned, ft_info = finetune_stage(cfg.finetune, teacher, trainset, eval_sets, out, device)
    return Prepared(teacher=tuned, zero_shot=teacher, ft_info=ft_info, trainset=trainset, eval_sets=eval_sets,
                    data_info=data_info, memo=memo)


def student_stages(cfg: DictConfig, p: Prepared, device: torch.device, main_proc: bool = True) -> Prepared:
    """teacher cache (or a reinforced stream's companion shards) -> student and its tokenizer; fills ``p``."""
    if isinstance(p.trainset, TrainStream) and p.trainset.source.reinforced:
        p.cache, p.data_info["reinforce"] = None, reinforce_stage(cfg.cache, p.teacher, p.trainset)
    else:
        p.cache = cache_stage(cfg.cache, p.teacher, p.trainset, device) if cfg.cache.enabled else None
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


def train_stage(cfg: DictConfig, teacher: Any, student: torch.nn.Module, model_cfg: dict[str, Any], tokenizer,
                trainset: TrainSet, eval_sets: dict[str, dict[str, EvalSet]], cache: TeacherCache | None,
                out: Path, device: torch.device) -> dict[str, Any]:
    """Distil into the student (distill.train on the engine); returns the training figures."""
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
                           "skipped": cache.manifest.get("skipped")}
    return result


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
    measured = bench_stage(cfg.bench, variants, ctx, eval_sets, reference)
    report = report_stage(cfg, reference, model_cfg, measured, {"finetune_only": True}, export_info, out,
                          finetune=ft_info, started=started)
    runs.mark_finished(out, cfg)
    print(f"report: {out / 'report.md'}")
    return report


def report_stage(cfg: DictConfig, teacher: Any, model_cfg: dict[str, Any], measured: dict[str, Any],
                 train_metrics: dict[str, Any], export_info: dict[str, Any], out: Path,
                 finetune: dict[str, Any] | None = None, started: float | None = None) -> dict[str, Any]:
    """report.json / report.md (and plots) in the run folder, with the summary and the targets."""
    t = {"name": teacher.name, "embed_dim": teacher.embed_dim, "fingerprint": teacher.fingerprint}
    if teacher.activation:
        t.update(activation=teacher.activation, activation_reason=getattr(teacher, "activation_reason", None))
    report = report_mod.new_report(
        cfg.experiment_name, bench.environment(), teacher=t, student={"name": cfg.student.name, "model_cfg": model_cfg},
        variants=measured["variants"], training=train_metrics, export=export_info, ceilings=measured["ceilings"],
        timing=measured["timing"], command="python -m distill " + " ".join(_overrides()))
    if finetune is not None:
        report["finetune"] = finetune
    if started is not None:  # this invocation's wall time, every stage included (a reused teacher cache shortens it)
        report["run_minutes"] = round((time.perf_counter() - started) / 60, 2)
    report["summary"] = report_mod.summarize(report)
    report["targets"] = evaluate_targets(report, _as_dict(cfg.bench.get("targets")))
    report_mod.write_report(report, out)
    return report


def evaluate_targets(report: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
    """Targets from conf (bench.targets): {summary key: {at_least: x} | {at_most: x}} -> met/missed.

    The keys name entries of ``report["summary"]`` (nested keys joined by '.'); a target whose
    figure is missing is reported as not met, never silently dropped.
    """

    out = {}
    for key, spec in targets.items():
        val: Any = report["summary"]
        for part in key.split("."):
            val = val.get(part) if isinstance(val, dict) else None
        out[key] = report_mod.target(val if isinstance(val, (int, float)) else None, **spec)
    return out


def _as_dict(node: Any) -> dict[str, Any]:
    """A config node (or None) as a plain dict."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except Exception:  # called without Hydra (tests): no command line to record
        return []
