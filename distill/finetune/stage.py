"""The fine-tune stage: teacher -> fine-tune on the domain pairs -> WiSE-FT α* -> the teacher the cache,
the distillation and the report use.

It returns a new teacher (the zero-shot one is left untouched, for the report's chain table and
the bench) whose fingerprint covers the tuned weights, the method and α, so a changed fine-tune
never reuses old teacher embeddings.
"""

from __future__ import annotations

import copy
import json
import logging
import resource
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from distill import evaluation
from distill.data import EvalSet, TrainSet
from distill.engine import EngineConfig, fit
from distill.compose import train_defaults
from distill.errors import UserError
from distill.finetune import methods, wise
from distill.finetune.conse import ConSEModule, ConSESubject, MemoisedTeacher, tuned_conse
from distill.finetune.split import ValSet, carve, item_labels
from distill.finetune.subjects import OpenClipSubject
from distill.finetune.task import FineTuneTask
from distill.teachers.base import freeze, hash_state_dict
from distill.teachers.conse import ConSETeacher

log = logging.getLogger("distill")


def subject_for(teacher: Any) -> tuple[Any, torch.nn.Module]:
    """(the subject, a trainable copy of the teacher's model)."""
    model = getattr(teacher, "model", None)
    if model is not None and hasattr(model, "visual") and hasattr(model, "encode_text"):
        subject = OpenClipSubject.of_teacher(teacher)
    elif isinstance(teacher, ConSETeacher):
        subject, model = ConSESubject(), ConSEModule(teacher)
        model.memo, model.text_memo = {}, {}
    else:
        raise UserError(f"finetune needs a trainable teacher (open_clip or ConSE); {type(teacher).__name__} cannot be "
                        f"fine-tuned: use teacher=openclip or finetune=none")
    model = copy.deepcopy(model).float()
    for p in model.parameters():
        p.requires_grad_(True)
    return subject, model


def apply_method(model: torch.nn.Module, layout: methods.Layout, cfg: DictConfig) -> tuple[torch.nn.Module, dict]:
    """The model ready to train by ``cfg.method`` (peft-wrapped for LoRA) and its parameter counts."""
    method = methods.METHODS.get(cfg.method, where="finetune.method")
    if method.prepare is None:
        raise UserError(f"finetune.method={cfg.method} tunes nothing: pick a method that trains (python -m distill list)")
    return method.prepare(model, layout, cfg)


def check_base(ft_dir: Path, base: str, method: str) -> None:
    """Refuse to resume a fine-tune whose checkpoints were made from another base model or method."""
    marker = ft_dir / "base.json"
    want = {"base_fingerprint": base, "method": method}
    if marker.exists() and (ft_dir / "checkpoints").exists():
        have = json.loads(marker.read_text())
        if have != want:
            raise UserError(f"fine-tune checkpoints in {ft_dir} come from another base model or method ({have}, this "
                            f"run: {want}): delete {ft_dir} or start a new run folder")
    ft_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(want))


def check_resume(resume: str | None, base: str, method: str) -> str | None:
    """An explicit ``finetune.train.resume`` path, checked like this run's own checkpoints: it may name
    another run's folder (its ``finetune`` folder is meant), that ``finetune`` folder, its checkpoints
    folder or one checkpoint; returns the path the engine should resume from."""
    if not resume or resume in ("auto", "never"):
        return resume
    path = Path(resume)
    want = {"base_fingerprint": base, "method": method}
    for ft_dir in (path / "finetune", path, path.parent, path.parent.parent):
        marker = ft_dir / "base.json"
        if marker.is_file():
            have = json.loads(marker.read_text())
            if have != want:
                raise UserError(f"finetune.train.resume={resume}: that fine-tune comes from another base model or "
                                f"method ({have}, this run: {want}); resume a fine-tune of this base, or drop "
                                f"finetune.train.resume")
            return str(ft_dir) if ft_dir == path / "finetune" else resume
    raise UserError(f"finetune.train.resume={resume}: no fine-tune there (no base.json in it or above it); pass "
                    f"a run folder or its finetune folder, or finetune.train.resume=auto")


def general_sets(eval_sets: Mapping[str, Mapping[str, EvalSet]], names: list[str]) -> dict[str, dict[str, EvalSet]]:
    out: dict[str, dict[str, EvalSet]] = {"classification": {}, "retrieval": {}}
    for name in names:
        kind = next((k for k, sets in eval_sets.items() if name in sets), None)
        if kind is None:
            have = [n for sets in eval_sets.values() for n in sets]
            raise UserError(f"finetune.general names {name!r}, which is not an evaluation set; have: {have}")
        out[kind][name] = eval_sets[kind][name]
    return out


def _score(subject: Any, valset: ValSet, general: Mapping[str, Mapping[str, EvalSet]]):
    def score(model: torch.nn.Module) -> dict[str, float]:
        enc = subject.encoder(model)
        out = valset.score(enc)
        if any(general.values()):
            res = evaluation.evaluate(enc, general, image_batch=64, text_batch=64, resamples=0)
            out.update({f"general/{k}": v for k, v in evaluation.flat_metrics(res).items()})
        return out

    return score


def _final_module(model: torch.nn.Module, theta0: Mapping[str, torch.Tensor], alpha: float, subject: Any,
                  valset: ValSet) -> tuple[torch.nn.Module, float | None]:
    """A plain module at α (LoRA merged) and, for LoRA, the max |merged − unmerged| image feature."""
    if not methods.is_peft(model):
        model.load_state_dict(wise.wise_ft(theta0, model.state_dict(), alpha))
        return model, None
    probe = valset.images[:8].float() / 255
    with wise.at_alpha(model, theta0, alpha):
        before = subject.encoder(model.eval()).encode_image(probe)
    plain = methods.merged(model, alpha).eval()
    parity = float((subject.encoder(plain).encode_image(probe) - before).abs().max())
    if parity > 1e-4:
        raise RuntimeError(f"LoRA merge changed the outputs by {parity:.2e}: the merged model is not the trained one")
    return plain, parity


def tuned_teacher(teacher: Any, module: torch.nn.Module, method: str, alpha: float) -> Any:
    """A copy of ``teacher`` running ``module``; its fingerprint covers the tuned weights, method and α."""
    if isinstance(module, ConSEModule):
        tuned = tuned_conse(teacher, module, method, alpha)
        return MemoisedTeacher(tuned, module) if module.memo is not None else tuned
    t = copy.copy(teacher)
    t.model = freeze(module.to(teacher.device))
    t.logit_scale = float(module.logit_scale.exp())
    t.fingerprint = hash_state_dict(module.state_dict(), extra=[
        "finetuned", f"base={teacher.fingerprint}", f"method={method}", f"alpha={alpha}"])
    t.name = f"{teacher.name} + {method} (WiSE-FT α={alpha:g})"
    return t


def finetune_stage(cfg: DictConfig, teacher: Any, trainset: TrainSet, eval_sets: Mapping[str, Mapping[str, EvalSet]],
                   out_dir: Path, device: torch.device) -> tuple[Any, dict[str, Any] | None]:
    """(the teacher to distil from, report["finetune"]); ``finetune.method=none`` returns the teacher as is."""
    if methods.METHODS.get(cfg.method, where="finetune.method").prepare is None:  # "none"
        return teacher, None
    t_start = time.perf_counter()
    trainset = trainset.unmixed()  # real pairs: with data.train.mix on, only the distillation sees mixed views
    subject, model = subject_for(teacher)
    model, counts = apply_method(model, subject.layout, cfg)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    labels, prompts = item_labels(trainset, list(cfg.prompt_templates))
    weights, val = carve(trainset, labels, float(cfg.val_fraction), bool(cfg.class_balanced),
                         need_caption=cfg.loss == "contrastive")
    valset = ValSet.load(trainset, val, labels)
    general = general_sets(eval_sets, list(cfg.general or []))
    ft_dir = out_dir / "finetune"
    check_base(ft_dir, teacher.fingerprint, cfg.method)
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    train_cfg["resume"] = check_resume(train_cfg.get("resume", "auto"), teacher.fingerprint, cfg.method)
    ecfg = EngineConfig.from_mapping(train_defaults(**train_cfg))
    task = FineTuneTask(model, subject, trainset, ecfg, item_labels=labels, weights=weights, loss=cfg.loss,
                        class_texts=prompts, mask_same_label=bool(cfg.mask_same_label),
                        label_smoothing=float(cfg.label_smoothing), l2_pull=float(cfg.l2_pull), method=cfg.method)
    log.info("stage finetune: %s, %d of %d parameters train (%.2f%%), %d validation images", cfg.method,
             counts["trainable"], counts["total"], 100 * counts["trainable"] / counts["total"], len(valset.labels))
    result = fit(task, ecfg, ft_dir, device, evaluate=lambda m: valset.score(subject.encoder(m)))
    train_s = time.perf_counter() - t_start
    score = _score(subject, valset, general)
    wc = cfg.wise_ft
    rows = wise.sweep(model, theta0, score, list(wc.alphas))
    alpha = wise.choose(rows, str(wc.metric), str(wc.mode), wc.get("alpha"))
    # the plot's general axis: a classification set's top-1, else a retrieval set's image->text R@5
    gen_key = next((k for k in rows[0] if k.startswith("general/") and k.endswith(("/top1", "/i2t_r5"))), None)
    png = wise.plot(rows, "val/top1", gen_key, alpha, ft_dir / "wise_ft.png")
    chain = _chain(model, theta0, subject, eval_sets) if cfg.chain_eval else {}
    files = methods.METHODS.get(cfg.method).save(model, ft_dir)
    final, parity = _final_module(model, theta0, alpha, subject, valset)
    section = {
        "method": cfg.method, "then": cfg.then, "loss": cfg.loss, "trainable_params": counts["trainable"], "total_params": counts["total"],
        "trainable_pct": round(100 * counts["trainable"] / counts["total"], 4),
        "steps": result["steps"], "seconds": round(train_s, 1), "images_per_s": result.get("images_per_s"),
        "step_ms": result["step_ms"],  # the optimizer steps alone; "seconds" holds the setup and evaluation too
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_gpu_gb": result.get("peak_memory_gb"), "best_step": result.get("best_step"),
        "early_stopped": result.get("early_stopped"),
        "restored_best": result.get("restored_best"), "logit_scale_final": result.get("logit_scale_final"),
        "val_images": len(valset.labels), "alpha": alpha, "wise_ft": {"rule": OmegaConf.to_container(wc, resolve=True),
                                                                        "sweep": rows, "plot": str(png)},
        "merge_parity_max_abs": parity, "files": files, "chain": chain,
        "base_fingerprint": teacher.fingerprint,
    }
    tuned = tuned_teacher(teacher, final, cfg.method, alpha)
    section["tuned_fingerprint"] = tuned.fingerprint
    section["stage_seconds"] = round(time.perf_counter() - t_start, 1)  # "seconds" is the training alone
    (ft_dir / "finetune.json").write_text(json.dumps(section, indent=2))
    log.info("finetune: α*=%.1f, val top-1 %.3f (zero-shot %.3f), training %.0fs, stage %.0fs", alpha,
             wise.scores_at(rows, alpha)["val/top1"], rows[0]["val/top1"] if rows[0]["alpha"] == 0 else float("nan"),
             section["seconds"], section["stage_seconds"])
    return tuned, section


def _chain(model: torch.nn.Module, theta0: Mapping[str, torch.Tensor], subject: Any,
           eval_sets: Mapping[str, Mapping[str, EvalSet]]) -> dict[str, dict[str, float]]:
    """The zero-shot (α=0) and fully fine-tuned (α=1) teacher on every evaluation set: the first two
    rows of the report's chain table (α*, the student and int8 come from the bench)."""
    out = {}
    for label, a in (("zero_shot", 0.0), ("fine_tuned", 1.0)):
        with wise.at_alpha(model, theta0, a) as m:
            m.eval()
            res = evaluation.evaluate(subject.encoder(m), eval_sets, image_batch=64, text_batch=64, resamples=0)
            out[label] = evaluation.flat_metrics(res)
    return out
