"""The training loop: plain PyTorch, from one CPU to several GPUs (DDP under torchrun).

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` images per process.
Targets come from the teacher cache (default) or from the teacher online; both give the same
targets for the same view. Checkpoints are written atomically and carry everything a resumed
run needs to reach the same weights as an uninterrupted one: weights (safetensors), optimizer,
scheduler, RNG states, the step, and the data position.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill import distributed as dist_utils
from distill.cache import TeacherCache
from distill.data import ResumableSampler, TrainSet, _stable_int, collate
from distill.encoders import normalize_images, resize_to
from distill.errors import UserError
from distill.students import TEXT_PARAM_PREFIXES

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


def param_groups(modules: list[torch.nn.Module], weight_decay: float, lr: float | None = None,
                 lr_scale: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases, embeddings-as-vectors and the logit scale
    (open_clip's rule: ndim < 2, or 'bn'/'ln'/'bias'/'logit_scale' in the name).

    ``lr_scale`` ({"text": 2.0} and/or {"image": ...}) gives the student's text tower (open_clip's
    text parameter names) or image tower (``visual.*``) its own learning rate, ``lr`` x scale, in
    groups of their own after the two base groups; the logit scale and the loss's parameters stay
    at ``lr``. The cosine schedule scales every group alike. Without it: [decay, no_decay].
    """
    given = dict(lr_scale or {})
    unknown = sorted(set(given) - {"text", "image"})
    if unknown:
        raise UserError(f"train.lr_scale has unknown key(s) {unknown}: use 'text' and/or 'image'")
    scales = {k: float(v) for k, v in given.items() if float(v) != 1.0}
    if scales and lr is None:
        raise UserError("train.lr_scale needs train.optimizer.lr: the scale multiplies it")
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {("", True): [], ("", False): []}
    for m in modules:
        for n, p in m.named_parameters():
            if not p.requires_grad:
                continue
            decays = not (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n)
            tower = "text" if n.startswith(TEXT_PARAM_PREFIXES) else "image" if n.startswith("visual.") else ""
            groups.setdefault((tower if tower in scales else "", decays), []).append(p)
    out = []
    for (tower, decays), params in groups.items():
        if tower and not params:
            continue
        g: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if tower:
            g.update(lr=lr * scales[tower], tower=tower)
        out.append(g)
    return out


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: absent from some builds
        return False


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base LR, then cosine decay to ``min_lr_ratio`` x base at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def _rng_state() -> dict[str, Any]:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_checkpoint(ckpt_root: Path, step: int, student: torch.nn.Module, loss_fn: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, extra: dict[str, Any], keep: int = 2) -> Path:
    """Write ``ckpt_root/step_XXXXXXX`` atomically (temp folder, then rename) and point latest.json at it."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    sd = {k: v.detach().contiguous().cpu() for k, v in _unwrap(student).state_dict().items()}
    save_file(sd, str(tmp / "student.safetensors"))
    lsd = {k: v.detach().contiguous().cpu() for k, v in loss_fn.state_dict().items()}
    if lsd:
        save_file(lsd, str(tmp / "loss.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                "step": step, **extra}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest = ckpt_root / "latest.json"
    latest_tmp = ckpt_root / "latest.json.tmp"
    latest_tmp.write_text(json.dumps({"step": step, "path": final.name}))
    os.replace(latest_tmp, latest)
    olds = sorted(p for p in ckpt_root.glob("step_*") if p != final)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def find_checkpoint(resume: str | None, ckpt_root: Path) -> Path | None:
    """``auto``: this run's latest checkpoint if any; a path: that checkpoint folder or a run's
    ``checkpoints`` folder / run folder (its latest); None/"never": start fresh."""
    if not resume or resume == "never":
        return None
    roots = [ckpt_root] if resume == "auto" else [Path(resume), Path(resume) / "checkpoints"]
    for r in roots:
        if (r / "state.pt").exists():
            return r
        if (r / "latest.json").exists():
            return r / json.loads((r / "latest.json").read_text())["path"]
    if resume == "auto":
        return None
    raise UserError(f"train.resume={resume}: no checkpoint found there; pass a run folder, its checkpoints "
                    f"folder, or train.resume=auto")


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop the records a killed run wrote after its last checkpoint (``step > last_step``), so a
    resumed run's metrics.jsonl holds every step once. Returns the number of records dropped."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by the kill
            dropped += 1
            continue
        if int(rec.get("step", 0)) > last_step:
            dropped += 1
        else:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return dropped


def train(
    *,
    student: torch.nn.Module,
    loss_fn: torch.nn.Module,
    dataset: TrainSet,
    tokenizer: Callable[[list[str]], torch.Tensor],
    cfg: Mapping[str, Any],
    out_dir: str | os.PathLike,
    device: torch.device,
    teacher: Any = None,
    cache: TeacherCache | None = None,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Train ``student`` to match the teacher. Returns a flat dict of training metrics.

    cfg keys (conf/train/*.yaml): steps, batch_size, grad_accum, optimizer (a Hydra partial of
    torch.optim.AdamW; its weight_decay applies to matrices only), lr_scale ({text, image}: per-tower
    multipliers of the optimizer's lr), scheduler (a partial of cosine_schedule), clip_grad,
    max_logit_scale, precision (auto|fp32|bf16: auto is bf16 on CUDA and fp32 on a CPU; bf16 on a
    CPU needs native bf16, else fp32 with a warning), grad_checkpointing, compile, num_workers, seed,
    log_every, eval_every, ckpt_every, keep_checkpoints, resume (auto|never|path), stop_after_steps,
    early_stop {metric, patience, mode}, tensorboard, progress.
    """
    if cache is None and teacher is None:
        raise ValueError("train needs a teacher cache or an online teacher")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    main = rank == 0
    steps, bs, accum = int(cfg["steps"]), int(cfg["batch_size"]), int(cfg.get("grad_accum", 1))
    image_size = image_size or dataset.spec.size
    torch.manual_seed(int(cfg.get("seed", 0)))

    precision = cfg.get("precision", "auto")
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"train.precision={precision!r} is not known: use auto, fp32 or bf16")
    use_bf16 = device.type == "cuda" and precision in ("auto", "bf16")
    if precision == "bf16" and device.type == "cpu":
        # only on request: on a CPU with native bf16 (AVX-512 BF16, AMX) oneDNN's bf16 matmuls make
        # the step faster (benchmarks/RESULTS.md); without it there is no bf16 kernel to gain from
        use_bf16 = cpu_has_native_bf16()
        if not use_bf16:
            log.warning("train.precision=bf16: this CPU has no native bf16 (AVX-512 BF16 or AMX); training in fp32")
    elif precision == "bf16" and device.type != "cuda":
        log.warning("train.precision=bf16 needs CUDA or a CPU; training in fp32 on %s", device.type)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    student.to(device).train()
    loss_fn.to(device).train()
    if cache is not None and getattr(loss_fn, "uses_teacher_means", False):
        loss_fn.set_teacher_means(*cache.mean_embeddings())  # μ for the feature_residual_* terms
    if cfg.get("grad_checkpointing", False):
        student.set_grad_checkpointing(True)
    _unwrap(student).output_dict = True
    model: torch.nn.Module = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(cfg.get("find_unused_parameters", True)))
    if cfg.get("compile", False):
        model = torch.compile(model)

    # Optimizer and scheduler are Hydra partials (conf/train/*.yaml: optimizer, scheduler).
    make_opt = instantiate(cfg["optimizer"]) if "optimizer" in cfg else partial(torch.optim.AdamW, lr=1e-3)
    keywords = getattr(make_opt, "keywords", {})
    wd = float(keywords.get("weight_decay", 0.0))
    optimizer = make_opt(param_groups([student, loss_fn], wd, lr=keywords.get("lr"), lr_scale=cfg.get("lr_scale")))
    make_sched = instantiate(cfg["scheduler"]) if "scheduler" in cfg else partial(cosine_schedule, warmup_steps=0)
    scheduler = make_sched(optimizer, total_steps=steps)

    ckpt_root = out_dir / "checkpoints"
    start_step, best, bad_evals, history_best_step = 0, None, 0, None
    resumed_from = find_checkpoint(cfg.get("resume", "auto"), ckpt_root)
    if resumed_from is not None:
        _unwrap(student).load_state_dict(load_file(str(resumed_from / "student.safetensors"), device=str(device)))
        if (resumed_from / "loss.safetensors").exists():
            loss_fn.load_state_dict(load_file(str(resumed_from / "loss.safetensors"), device=str(device)))
        state = torch.load(resumed_from / "state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_step, best, bad_evals = state["step"], state.get("best"), state.get("bad_evals", 0)
        history_best_step = state.get("best_step")
        if main:
            log.info("resumed from %s at step %d", resumed_from, start_step)

    valid = cache.valid if cache is not None else None
    per_step = bs * accum * world  # samples of the global stream one optimizer step consumes
    seed = int(cfg.get("seed", 0))
    resample = bool(cfg.get("resample_corpus_texts", True))
    extra_texts = int(cfg.get("extra_texts", 0) or 0)
    sampler = ResumableSampler(len(dataset), seed=int(cfg.get("seed", 0)), start=start_step * per_step,
                               batch_size=bs, rank=rank, world_size=world, valid=valid)
    loader = DataLoader(dataset, batch_size=bs, sampler=sampler, collate_fn=collate, drop_last=True,
                        num_workers=int(cfg.get("num_workers", 0)), pin_memory=device.type == "cuda",
                        persistent_workers=int(cfg.get("num_workers", 0)) > 0)
    batches = iter(loader)

    writer = None
    if main and cfg.get("tensorboard", True):
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last checkpoint
            writer = SummaryWriter(str(out_dir / "tensorboard"),
                                   purge_step=start_step + 1 if resumed_from is not None else None)
        except ImportError:  # tensorboard is optional
            writer = None
    if main and resumed_from is not None:
        truncate_metrics(out_dir / "metrics.jsonl", start_step)
    metrics_file = (out_dir / "metrics.jsonl").open("a") if main else None
    early = cfg.get("early_stop") or {}
    stop_after = cfg.get("stop_after_steps")
    teacher_scale = float(cache.manifest["logit_scale"] if cache is not None else teacher.logit_scale)
    max_scale = math.log(float(cfg.get("max_logit_scale", 100.0)))
    timers = {"data_s": 0.0, "teacher_s": 0.0, "student_s": 0.0, "optim_s": 0.0}
    seen_images, skipped = 0, 0
    last: dict[str, float] = {}
    t_start = time.perf_counter()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    bar = tqdm(total=steps, initial=start_step, desc="train", unit="step",
               disable=not (main and cfg.get("progress", True)))
    step = start_step
    stopped_early = False
    while step < steps:
        if stop_after is not None and step - start_step >= int(stop_after):
            break
        optimizer.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        t_step = time.perf_counter()
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            skipped += len(batch["skipped"])
            if not len(batch["index"]):
                continue
            images = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S) in [0, 1]
            text_index = batch["text_index"]
            lo, hi = dataset.corpus_span()
            draw = torch.Generator().manual_seed(_stable_int("draw", seed, step, micro, rank))
            if resample and hi > lo and not batch["paired"]:
                # An image without a caption gets a fresh corpus text at every visit (seeded by
                # step, so a resumed run draws the same): over a run the text side sees the
                # whole corpus, not one fixed text per image view.
                unp = ~batch["pair_mask"]
                text_index = text_index.clone()
                text_index[unp] = torch.randint(lo, hi, (int(unp.sum()),), generator=draw)
            if extra_texts and hi > lo:
                # Text-only rows for the feature term: the text tower is cheap next to the image
                # tower, so it can see many more texts per step than there are images.
                extra_index = torch.randint(lo, hi, (extra_texts,), generator=draw)
                text_index = torch.cat([text_index, extra_index])
            n_img = len(batch["index"])
            texts = [dataset.texts[k] for k in text_index.tolist()]
            t1 = time.perf_counter()
            if cache is not None:
                t_img = cache.image_targets(batch["index"]).to(device)  # (B, D)
                t_txt = cache.text_targets(text_index).to(device)  # (B + extra, D)
            else:
                t_img = teacher.encode_image(images).to(device)
                t_txt = teacher.encode_text(texts).to(device)
            sync()
            t2 = time.perf_counter()
            tokens = tokenizer(texts).to(device)
            with autocast():
                out = model(image=normalize_images(resize_to(images, image_size)), text=tokens)
                out = {k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}
                s_txt_all = out["text_features"]
                out["text_features"] = s_txt_all[:n_img]
                extra = {"student_text": s_txt_all[n_img:], "teacher_text": t_txt[n_img:]} if extra_texts else None
                losses = loss_fn(out, {"image_features": t_img, "text_features": t_txt[:n_img],
                                       "logit_scale": teacher_scale}, has_pairs=batch["paired"], extra=extra)
            total = sum(v for k, v in losses.items() if k.endswith("_loss"))
            if not torch.isfinite(total):
                last_ckpt = find_checkpoint("auto", ckpt_root)
                raise TrainingDiverged(
                    f"loss became {total.item()} at step {step + 1}; last good checkpoint: "
                    f"{last_ckpt or 'none (no checkpoint written yet)'}; lower train.lr or raise train.warmup_steps")
            (total / accum).backward()
            sync()
            t3 = time.perf_counter()
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / accum
            seen_images += len(batch["index"]) * world
            timers["data_s"] += t1 - t0
            timers["teacher_s"] += t2 - t1
            timers["student_s"] += t3 - t2
        t4 = time.perf_counter()
        if world > 1:  # the loss's projector sits outside DDP: average its gradients by hand
            dist_utils.all_reduce_grads(loss_fn.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], float(cfg.get("clip_grad", 1.0)) or float("inf"))
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # CLIP's clamp: the student's temperature never exceeds 100
            ls = getattr(_unwrap(student), "logit_scale", None)
            if ls is not None:
                ls.clamp_(0, max_scale)
        sync()
        timers["optim_s"] += time.perf_counter() - t4
        step += 1
        dt = time.perf_counter() - t_step
        last = {**terms, "loss": sum(v for k, v in terms.items() if k.endswith("_loss")),
                "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                "images_per_s": per_step / max(dt, 1e-9), "step": step}
        if main:
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", img_s=f"{last['images_per_s']:.0f}")
            if step % int(cfg.get("log_every", 10)) == 0 or step == steps:
                metrics_file.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()}) + "\n")
                metrics_file.flush()
                if writer:
                    for k, v in last.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)

        eval_every = int(cfg.get("eval_every", 0) or 0)
        if evaluate is not None and eval_every and (step % eval_every == 0 or step == steps):
            _unwrap(student).eval()
            res = evaluate(_unwrap(student)) if main else {}
            _unwrap(student).train()
            if main:
                metrics_file.write(json.dumps({"step": step, **{f"val/{k}": v for k, v in res.items()}}) + "\n")
                metrics_file.flush()
                if writer:
                    for k, v in res.items():
                        writer.add_scalar(f"val/{k}", v, step)
            metric = early.get("metric")
            if metric and main:
                if metric not in res:
                    raise UserError(f"train.early_stop.metric={metric} is not an evaluation metric; known: {sorted(res)}")
                val = res[metric] if early.get("mode", "max") == "max" else -res[metric]
                if best is None or val > best:
                    best, bad_evals, history_best_step = val, 0, step
                    save_file({k: v.detach().contiguous().cpu() for k, v in _unwrap(student).state_dict().items()},
                              str(out_dir / "best_student.safetensors"))
                else:
                    bad_evals += 1
                    if bad_evals >= int(early.get("patience", 3)):
                        log.info("early stop at step %d: %s did not improve for %d evaluations", step, metric, bad_evals)
                        stopped_early = True
            stopped_early = dist_utils.broadcast_flag(stopped_early)

        ckpt_every = int(cfg.get("ckpt_every", 0) or 0)
        if ckpt_every and (step % ckpt_every == 0 or step == steps or stopped_early):
            if main:
                save_checkpoint(ckpt_root, step, student, loss_fn, optimizer, scheduler,
                                {"best": best, "bad_evals": bad_evals, "best_step": history_best_step},
                                keep=int(cfg.get("keep_checkpoints", 2)))
            dist_utils.barrier()
        if stopped_early:
            break
    bar.close()
    if metrics_file:
        metrics_file.close()
    if writer:
        writer.close()
    if stopped_early and (out_dir / "best_student.safetensors").exists():
        _unwrap(student).load_state_dict(load_file(str(out_dir / "best_student.safetensors"), device=str(device)))
    elapsed = time.perf_counter() - t_start
    run_steps = max(1, step - start_step)
    result = {
        "steps": step,
        "resumed_from_step": start_step if resumed_from is not None else None,
        "final_loss": last.get("loss"),
        **{f"final_{k}": v for k, v in last.items() if k.endswith("_loss")},
        "images_seen": seen_images,
        "images_skipped": skipped,
        "seconds": round(elapsed, 2),
        "images_per_s": round(seen_images / max(elapsed, 1e-9), 2),
        "step_time_split_ms": {k.replace("_s", ""): round(1000 * v / run_steps, 2) for k, v in timers.items()},
        "precision": "bf16" if use_bf16 else "fp32",
        "world_size": world,
        "target_source": "cache" if cache is not None else "online",
        "early_stopped": stopped_early,
        "best_step": history_best_step,
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return result
