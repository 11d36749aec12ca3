"""Check a composed config before the first expensive stage (teacher, cache, training).

Every problem found is one line that names the key and the fix; ``check_config`` raises them all
at once as a ConfigError, so a user fixes a config in one round instead of one minute-long run
per mistake. The stages keep their own checks: this is an early, cheap pass, not the only one.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from distill.engine.optim import LR_GROUPS
from distill.errors import UserError
from distill.finetune.methods import METHODS as FINETUNE_METHODS

OPEN_CLIP_TEACHER = "distill.teachers.open_clip_teacher.OpenClipTeacher"
CONSE_TEACHER = "distill.teachers.conse.ConSETeacher"
ONNX_TEACHERS = ("distill.teachers.onnx_teacher.OnnxDualEncoder", "distill.teachers.onnx_teacher.OnnxTeacher")
REFERENCE_VARIANT = "teacher_torch_fp32"


class ConfigError(UserError):
    """Several config problems, one line each (``str`` joins them with newlines)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem found in ``cfg``; return None when there is none."""
    problems: list[str] = []
    missing = _missing_keys(cfg)
    problems += [f"{k} is required and has no value: pass {k}=..." for k in missing]
    for check in CHECKS:
        try:
            problems += list(check(cfg))
        except MissingMandatoryValue:
            continue  # already reported as a missing key
    if problems:
        raise ConfigError(problems)


def _missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in cfg.keys() if OmegaConf.is_dict(cfg) else range(len(cfg)):
        full = f"{prefix}.{key}" if prefix else str(key)
        if full == "hydra":
            continue
        if OmegaConf.is_missing(cfg, key):
            out.append(full)
            continue
        node = cfg._get_node(key)
        if OmegaConf.is_config(node) and not node._is_none() and not node._is_interpolation():
            out += _missing_keys(node, full)
    return out


def _number(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=True)


def _positive(cfg: DictConfig, key: str, integer: bool, fix: str) -> Iterator[str]:
    val = _number(cfg, key)
    if val is None:
        return
    ok = isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val) and val > 0
    if integer and ok and float(val) != int(val):
        ok = False
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        yield f"{key}={val!r} must be {kind}: {fix}"


def _check_train(cfg: DictConfig) -> Iterator[str]:
    yield from _positive(cfg, "train.steps", True, "set train.steps=1000 (optimizer steps to train)")
    yield from _positive(cfg, "train.batch_size", True, "set train.batch_size=64 (images per process)")
    yield from _positive(cfg, "train.grad_accum", True, "set train.grad_accum=1")
    yield from _positive(cfg, "train.optimizer.lr", False, "set train.optimizer.lr=5e-4")
    warmup = _number(cfg, "train.scheduler.warmup_steps")
    if warmup is not None and (not isinstance(warmup, int) or warmup < 0):
        yield f"train.scheduler.warmup_steps={warmup!r} must be an integer >= 0: set it to about 5% of train.steps"
    precision = _number(cfg, "train.precision")
    if precision is not None and precision not in ("auto", "fp32", "bf16"):
        yield f"train.precision={precision!r} is not known: use auto, fp32 or bf16"
    for tower, scale in (_number(cfg, "train.lr_scale") or {}).items():
        if tower not in LR_GROUPS:
            yield f"train.lr_scale.{tower} is not a parameter group: use one of {', '.join(LR_GROUPS)}"
        elif not isinstance(scale, (int, float)) or scale <= 0:
            yield f"train.lr_scale.{tower}={scale!r} must be a positive number"


def _check_student(cfg: DictConfig) -> Iterator[str]:
    vision = _number(cfg, "student.builder.vision") or {}
    width, heads = vision.get("width"), vision.get("heads")
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
        yield (f"student.builder.vision.width={width} is not divisible by heads={heads}: "
               f"pick heads from {_divisors(width)}")
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if isinstance(size, int) and isinstance(patch, int) and patch > 0 and size % patch:
        yield (f"student.builder.vision.image_size={size} is not a multiple of patch_size={patch}: "
               f"use image_size={size - size % patch or patch} or a patch size dividing {size}")
    for key in ("width", "layers", "heads", "patch_size", "image_size"):
        if key in vision and (not isinstance(vision[key], int) or vision[key] < 1):
            yield f"student.builder.vision.{key}={vision[key]!r} must be a positive integer"
    text = _number(cfg, "student.builder.text") or {}
    tw, th = text.get("width"), text.get("heads")
    if text.get("mode", "distilled") == "distilled" and isinstance(tw, int) and isinstance(th, int) and th > 0 \
            and tw % th:
        yield f"student.builder.text.width={tw} is not divisible by heads={th}: pick heads from {_divisors(tw)}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


def _closest(name: str, known: list[str], n: int = 3) -> str:
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    return ", ".join(close) if close else ", ".join(known[:n])


def _check_teacher(cfg: DictConfig) -> Iterator[str]:
    target = _number(cfg, "teacher._target_")
    if target == OPEN_CLIP_TEACHER:
        yield from _check_open_clip_teacher(cfg)
    elif target in ONNX_TEACHERS:
        for key in ("bundle", "image_onnx", "text_onnx"):
            path = _number(cfg, f"teacher.{key}")
            if path and not Path(path).exists():
                yield f"teacher.{key}={path} does not exist: pass the folder or file the export wrote"


def _check_open_clip_teacher(cfg: DictConfig) -> Iterator[str]:
    import open_clip

    if _number(cfg, "teacher.model_cfg") is not None:
        return
    name = _number(cfg, "teacher.model_name")
    pretrained = _number(cfg, "teacher.pretrained")
    if not name:
        yield "teacher.model_name is empty: set teacher.model_name=ViT-B-32 (python -c 'import open_clip; " \
              "print(open_clip.list_models())' lists them)"
        return
    if name.startswith("local-dir:"):
        if not Path(name.split(":", 1)[1]).is_dir():
            yield f"teacher.model_name={name}: that folder does not exist; pass local-dir:/path/to/export/open_clip"
        return
    if name.startswith("hf-hub:"):
        return
    known = open_clip.list_models()
    if name not in known:
        yield f"teacher.model_name={name} is not an open_clip model; closest: {_closest(name, known)}"
        return
    if pretrained and (os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))):
        if not os.path.isfile(pretrained):
            yield f"teacher.pretrained={pretrained} does not exist: pass the path of a checkpoint file"
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            yield (f"teacher.pretrained={pretrained} is not a weights tag of {name}; its tags: "
                   f"{', '.join(tags) or 'none'} (or a checkpoint file path, or null for random weights)")


def _check_loss(cfg: DictConfig) -> Iterator[str]:
    weights = _number(cfg, "loss.weights")
    if weights is None:
        return
    from distill.losses import TERMS

    for term, w in weights.items():
        if term not in TERMS:
            yield f"loss.weights.{term} is not a loss term; closest: {_closest(term, list(TERMS))}"
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            yield f"loss.weights.{term}={w!r} must be a number >= 0"
    if weights and all(isinstance(w, (int, float)) and w == 0 for w in weights.values()):
        yield "loss.weights are all zero: nothing would be trained; give at least one term a positive weight"
    extra_rows, extra_w = OmegaConf.select(cfg, "train.extra_texts", default=0) or 0, weights.get("extra_text_mse", 0)
    if isinstance(extra_rows, int) and isinstance(extra_w, (int, float)):
        if extra_rows > 0 and not extra_w:
            yield (f"train.extra_texts={extra_rows} draws text-only rows that no loss term uses: "
                   f"set loss.weights.extra_text_mse (e.g. +loss.weights.extra_text_mse=1.0) or train.extra_texts=0")
        if extra_w and extra_rows <= 0:
            yield "loss.weights.extra_text_mse needs text-only rows: set train.extra_texts (e.g. 64)"


# data source arguments that name local files or folders
_PATH_ARGS = {"path": Path.is_file, "root": Path.is_dir}


def _sources(cfg: DictConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each data source config, resolved on its own: one with a missing value (already reported)
    does not hide the others."""
    nodes = [(f"data.train.sources[{i}]", f"data.train.sources.{i}")
             for i in range(len(OmegaConf.select(cfg, "data.train.sources", default=None) or []))]
    for kind in ("classification", "retrieval"):
        items = OmegaConf.select(cfg, f"data.eval.{kind}", default=None) or []
        nodes += [(f"data.eval.{kind}[{i}].source", f"data.eval.{kind}.{i}.source") for i in range(len(items))]
    for where, key in nodes:
        try:
            src = OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
        except (MissingMandatoryValue, InterpolationResolutionError):
            continue
        yield where, src if isinstance(src, dict) else {}


def _walk_sources(where: str, src: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield where, src
    inner = src.get("source")
    if isinstance(inner, dict):  # wrappers such as distill.datasets.repeat / mixup
        yield from _walk_sources(f"{where}.source", inner)


def _check_data(cfg: DictConfig) -> Iterator[str]:
    for where, top in _sources(cfg):
        for at, src in _walk_sources(where, top):
            for arg, exists in _PATH_ARGS.items():
                val = src.get(arg)
                if isinstance(val, str) and not exists(Path(val)):
                    kind = "file" if arg == "path" else "folder"
                    yield f"{at}.{arg}: no such {kind} {val}; check the path (relative paths start at {os.getcwd()})"
            urls = src.get("urls")
            if isinstance(urls, str):
                yield from _check_urls(at, urls)


def _check_urls(at: str, urls: str) -> Iterator[str]:
    if urls.startswith(("pipe:", "http://", "https://", "s3://", "gs://")):
        return
    from braceexpand import braceexpand

    paths = [p for part in urls.split("::") for p in braceexpand(part)]
    absent = [p for p in paths if not Path(p).is_file()]
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        yield f"{at}.urls: shard {absent[0]}{more} not found ({len(paths)} expected); check the path or brace range"


def _check_bench(cfg: DictConfig) -> Iterator[str]:
    sizes = _number(cfg, "bench.batch_sizes") or []
    bad = [b for b in sizes if not isinstance(b, int) or b < 1]
    if bad:
        yield f"bench.batch_sizes has {bad}: use positive integers, e.g. bench.batch_sizes=[1,32]"
    variants = _number(cfg, "variants")
    if variants is not None:
        from distill.variants import VARIANTS

        for name in variants:
            if name not in VARIANTS:
                yield f"variants: {name} is not a deployment variant; closest: {_closest(name, list(VARIANTS))}"
        if REFERENCE_VARIANT not in variants:
            yield (f"variants={list(variants)} lacks {REFERENCE_VARIANT}, the reference every ratio in the "
                   f"report is taken against: add it")
    threads = _number(cfg, "bench.threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        yield f"bench.threads={threads!r} must be a positive integer"


def _check_finetune(cfg: DictConfig) -> Iterator[str]:
    method = _number(cfg, "finetune.method")
    if method in (None, "none"):
        return
    if method not in FINETUNE_METHODS:
        yield f"finetune.method={method!r} is not known: use one of {', '.join(FINETUNE_METHODS)}"
    if _number(cfg, "teacher._target_") not in (OPEN_CLIP_TEACHER, CONSE_TEACHER):
        yield (f"finetune={method} needs a trainable teacher: teacher={_number(cfg, 'teacher._target_')} cannot be "
               f"fine-tuned; use teacher=openclip, openclip_tiny or conse, or finetune=none")
    then = _number(cfg, "finetune.then")
    if then not in ("distill", "export"):
        yield f"finetune.then={then!r} is not known: use distill (tuned teacher -> student) or export (tuned model only)"
    frac = _number(cfg, "finetune.val_fraction")
    if not isinstance(frac, (int, float)) or not 0 < frac < 1:
        yield f"finetune.val_fraction={frac!r} must lie in (0, 1): set finetune.val_fraction=0.1"
    alphas = list(_number(cfg, "finetune.wise_ft.alphas") or [])
    fixed = _number(cfg, "finetune.wise_ft.alpha")
    for a in alphas + ([] if fixed is None else [fixed]):
        if not isinstance(a, (int, float)) or not 0 <= a <= 1:
            yield f"finetune WiSE-FT alpha={a!r} must lie in [0, 1] (0: zero-shot weights, 1: fine-tuned)"
    if not alphas:
        yield "finetune.wise_ft.alphas is empty: give at least one α in [0, 1], e.g. [0, 0.5, 1]"
    if method == "lora":
        yield from _positive(cfg, "finetune.lora.rank", True, "set finetune.lora.rank=8")
    yield from _positive(cfg, "finetune.train.steps", True, "set finetune.train.steps=300")


def _check_stream(cfg: DictConfig) -> Iterator[str]:
    """A training stream has no item indices: no teacher cache, no fine-tune split, no static-int8 calibration set."""
    if OmegaConf.select(cfg, "data.train.stream", default=None) is None:
        return
    reinforced = bool(_number(cfg, "data.train.stream.reinforced"))
    if _number(cfg, "cache.enabled") and not reinforced:
        yield ("cache.enabled=true cannot serve data.train.stream (the cache addresses items by index): "
               "set data.train.stream.reinforced=true (teacher embeddings in companion shards) or "
               "cache.enabled=false (the teacher runs online)")
    if reinforced and not _number(cfg, "cache.enabled"):
        yield ("data.train.stream.reinforced=true stores the teacher's embeddings, which is the cache: set "
               "cache.enabled=true, or reinforced=false to run the teacher online")
    if _number(cfg, "finetune.method") not in (None, "none"):
        yield "finetune needs indexed training data (data.train.sources): use finetune=none with data.train.stream"
    if float((_number(cfg, "loss.weights") or {}).get("bank_kd") or 0):
        yield ("loss.weights.bank_kd needs the training captions up front, which data.train.stream does not list: "
               "drop loss.weights.bank_kd or train from data.train.sources")
    if "student_onnx_static_int8" in (_number(cfg, "variants") or []):
        yield ("variants: student_onnx_static_int8 calibrates on indexed training images: drop it for "
               "data.train.stream")


MOBILE_KEYS = ("enabled", "batch1", "fp16", "static_int8", "ort", "ort_style")


def _check_export(cfg: DictConfig) -> Iterator[str]:
    """export.mobile (distill.mobile): known keys and values, and what its files are made from."""
    mob = _number(cfg, "export.mobile")
    if mob is None:
        return
    for key, val in mob.items():
        if key not in MOBILE_KEYS:
            yield f"export.mobile.{key} is not a setting; closest: {_closest(str(key), list(MOBILE_KEYS))}"
        elif key != "ort_style" and not isinstance(val, bool):
            yield f"export.mobile.{key}={val!r} must be true or false"
    from distill.mobile import ORT_STYLES

    if mob.get("ort_style", "fixed") not in ORT_STYLES:
        yield (f"export.mobile.ort_style={mob.get('ort_style')!r} is not known: use fixed (CPU fusions baked in) or "
               f"runtime (ONNX-only graph, for NNAPI/CoreML)")
    if not mob.get("enabled"):
        return
    if mob.get("static_int8", True):
        n = _number(cfg, "export.int8.calibration_images")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            yield (f"export.int8.calibration_images={n!r} must be a positive integer for export.mobile.static_int8: "
                   f"set it to 64, or export.mobile.static_int8=false")


CHECKS: tuple[Callable[[DictConfig], Iterator[str]], ...] = (
    _check_train, _check_student, _check_teacher, _check_loss, _check_data, _check_bench, _check_finetune,
    _check_stream, _check_export)
