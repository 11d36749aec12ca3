"""Check a composed config before the first expensive stage (teacher, cache, training).

Every problem found is one line that names the key and the fix; ``check_config`` raises them all
at once as a ConfigError, so a user fixes a config in one round instead of one minute-long run
per mistake. The stages keep their own checks: this is an early, cheap pass, not the only one.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from distill.compose import config_dir
from distill.engine.optim import LR_GROUPS
from distill.errors import UserError
from distill.finetune.methods import METHODS as FINETUNE_METHODS

OPEN_CLIP_TEACHER = "distill.teachers.open_clip_teacher.OpenClipTeacher"
CONSE_TEACHER = "distill.teachers.conse.ConSETeacher"
ONNX_TEACHERS = ("distill.teachers.onnx_teacher.OnnxDualEncoder",)
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
    from distill.students import check_config as check_student  # each image tower kind checks its own keys

    # unknown vision keys are already reported by the strict key check, with the closest key
    yield from (p for p in check_student(cfg) if not p.startswith("student.builder.vision has unknown keys"))


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
        # OpenClipTeacher builds an inline model_cfg and ignores these (model_name's tokenizer too)
        for key in ("model_name", "cache_dir"):
            val = _number(cfg, f"teacher.{key}")
            if val is not None:
                yield (f"teacher.{key}={val} is ignored beside the inline teacher.model_cfg, which builds the model: "
                       f"drop it, or use teacher=openclip for a model named by teacher.model_name")
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
            yield TERMS.unknown(term, f"loss.weights.{term}")
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
    for kind in ("classification", "retrieval", "general"):
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


def _image_only_target(target: Any) -> bool:
    """Whether a source ``_target_`` builds an image-only source (its factory or class carries ``image_only``)."""
    if not isinstance(target, str):
        return False
    from hydra.utils import get_object

    try:
        return bool(getattr(get_object(target), "image_only", False))
    except Exception:  # noqa: BLE001 - instantiate reports an unimportable target with its own message
        return False


def _check_image_only(cfg: DictConfig) -> Iterator[str]:
    """data.train.image_only_ratio in [0, 1]; no image-only source as a retrieval set (it has no captions)."""
    ratio = OmegaConf.select(cfg, "data.train.image_only_ratio", default=None)
    if ratio is not None and not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio <= 1):
        yield (f"data.train.image_only_ratio={ratio} is not in [0, 1]: set the share of image-only items per batch, "
               f"e.g. data.train.image_only_ratio=0.25 (null: no mixing)")
    for where, top in _sources(cfg):
        if where.startswith("data.eval.retrieval") and any(_image_only_target(src.get("_target_"))
                                                           for _, src in _walk_sources(where, top)):
            yield (f"{where} is image-only (no captions for a retrieval metric): drop it from data.eval.retrieval "
                   f"or use a captioned source")


def _check_mix(cfg: DictConfig) -> Iterator[str]:
    """data.train.mix (distill.data.MixSpec): known values and indexed data (the fine-tune reads the unmixed views)."""
    mix = OmegaConf.select(cfg, "data.train.mix", default=None)
    if mix is None:
        return
    if not OmegaConf.is_dict(mix):
        yield f"data.train.mix={mix!r} must be a map: e.g. data.train.mix.mode=mixup (keys mode, prob, alpha)"
        return
    from distill.data import mix_problems

    mode = mix.get("mode", "none")
    problems = mix_problems(mode, mix.get("prob", 0.5), mix.get("alpha", 1.0))
    yield from problems
    if problems or mode == "none":
        return
    if OmegaConf.select(cfg, "data.train.stream", default=None) is not None:
        yield (f"data.train.mix.mode={mode} needs indexed training data and data.train.stream is a stream: set "
               f"data.train.mix.mode=none or train from data.train.sources")


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
                yield VARIANTS.unknown(name, "variants")
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
        yield FINETUNE_METHODS.unknown(method, "finetune.method")
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
        yield from _check_lora_targets(cfg)
    yield from _positive(cfg, "finetune.train.steps", True, "set finetune.train.steps=300")


def _check_lora_targets(cfg: DictConfig) -> Iterator[str]:
    """LoRA with no target module would end in peft's traceback: one line instead."""
    targets = _number(cfg, "finetune.lora.targets")
    if not targets:
        return  # null or {}: auto on both towers (distill.finetune.methods.attach_lora)
    words = {}
    for tower, val in targets.items():
        if val is None:
            yield f"finetune.lora.targets.{tower}=null: use [] for no LoRA on the {tower} tower, or auto"
            return
        words[tower] = [str(w).strip() for w in ([val] if isinstance(val, str) else val)]
    if not any(w for ws in words.values() for w in ws):
        yield (f"finetune.lora.targets has no target in any tower ({', '.join(words)} all empty), so LoRA would "
               f"train nothing: set finetune.lora.targets.image=auto (or text, or module names), or another finetune")
        return
    for tower, ws in words.items():
        if "" in ws:
            yield f"finetune.lora.targets.{tower} has an empty name: drop it (names: auto, attn or module names)"


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
    for key, val in mob.items():  # an unknown key is _check_keys' line
        if key in MOBILE_KEYS and key != "ort_style" and not isinstance(val, bool):
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


# ------------------------------------------------------------------------------- strict keys
# Every key of a composed config must be one the config files declare, so a misspelt or misplaced
# setting is an error before any work instead of being silently ignored. The known keys are read
# from the files (each group's options, config.yaml and the experiment deltas, unioned per key) and
# from the code they name, not kept by hand (CODE_KEYS aside), so a new option file extends them itself.

HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
# Subtrees whose keys are data rather than settings, so any key goes (or has its own check):
OPEN_KEYS = {
    "teacher.model_cfg": "an inline open_clip model config: open_clip reads it",
    "teacher.preprocess": "an ONNX teacher's preprocessing spec: distill.preprocess reads it",
    "loss.weights": "loss term names: _check_loss checks them against distill.losses.TERMS",
    "train.lr_scale": "parameter groups: _check_train and the engine check them against LR_GROUPS",
    "finetune.train.lr_scale": "parameter groups of the fine-tune's model (head, adapter, ...)",
    "bench.targets": "report.json summary entries (free-form names with dots and slashes)",
    "student.builder.vision.timm_model_kwargs": "keyword arguments of timm.create_model for the chosen model",
}
# Beside those, a `_target_`-built object (teacher, loss, optimizer, schedule, student builder,
# data sources and stream) takes exactly the parameters of what it names (read off its signature,
# open when it takes **kwargs), data.train.corpus is passed as keyword arguments to build_corpus,
# student.builder.vision takes its tower kind's keys, and a list is open unless its items are maps
# the files describe (eval sets).
KWARGS_OF = {"data.train.corpus": "distill.data.build_corpus"}
# finetune.train holds engine settings merged over conf/train/default.yaml's (distill.compose.train_defaults)
SAME_KEYS = {"finetune.train": "train"}


# Keys the code reads with a default of its own that no config file declares.
CODE_KEYS = {"student": ("embed_dim",), "bench": ("ceilings",), "student.builder.text": ("mlp_ratio",)}


def _tower_keys(vision: dict[str, Any]) -> tuple[frozenset[str] | None, str]:
    """student.builder.vision takes the keys its tower kind declares (distill.students, one class per kind)."""
    from distill import students

    kind = vision.get("kind", "vit")
    try:
        tower = students.tower_kind(kind)
    except Exception:  # noqa: BLE001 - an unknown kind is the student check's line, not a key problem
        return None, ""
    return frozenset({"kind", *tower.keys, *getattr(tower, "derived", ())}), f"kind={kind}"


# Maps whose keys the code declares per choice made inside them.
DECLARED_BY = {"student.builder.vision": _tower_keys}


class _Keys:
    """The union of one config node over every file: child keys, list items, `_target_`s seen."""

    def __init__(self) -> None:
        self.children: dict[str, _Keys] = {}
        self.item: _Keys | None = None
        self.targets: set[str] = set()
        self.is_map = False

    def at(self, dotted: str) -> "_Keys":
        node = self
        for part in filter(None, dotted.split(".")):
            node.is_map = True
            node = node.children.setdefault(part, _Keys())
        return node

    def add(self, value: Any) -> None:
        if isinstance(value, dict):
            self.is_map = True
            if isinstance(value.get("_target_"), str):
                self.targets.add(value["_target_"])
            for k, v in value.items():
                self.children.setdefault(str(k), _Keys()).add(v)
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, (dict, list)):
                    self.item = self.item or _Keys()
                    self.item.add(v)

    def merge(self, other: "_Keys") -> None:
        self.is_map |= other.is_map
        self.targets |= other.targets
        for k, v in other.children.items():
            self.children.setdefault(k, _Keys()).merge(v)
        if other.item is not None:
            self.item = self.item or _Keys()
            self.item.merge(other.item)


def _package(path: Path, group: str) -> str:
    """Where Hydra puts a config file's keys: its `# @package` header, else its group path."""
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            pkg = line.split(None, 2)[2].strip()
            pkg = pkg.replace("_group_", group.replace("/", "."))
            return "" if pkg == "_global_" else pkg.removeprefix("_global_.")
        if line.strip() and not line.startswith("#"):
            break
    return group.replace("/", ".")


@functools.lru_cache(maxsize=4)
def known_keys(conf_dir: str | None = None) -> _Keys:
    """Every key the config files under ``conf_dir`` (default: the packaged configs) declare."""
    conf = Path(conf_dir or config_dir())
    files = sorted(conf.rglob("*.yaml"))
    loaded = {f: OmegaConf.to_container(OmegaConf.load(f), resolve=False) or {} for f in files}
    groups = {f: "/".join(f.relative_to(conf).parts[:-1]) for f in files}
    packages = {f: {_package(f, groups[f])} for f in files}
    # a defaults entry `sub@pkg: option` in a group's file places group/sub's options at pkg
    for f, data in loaded.items():
        entries = (data.get("defaults") if isinstance(data, dict) else None) or []
        for name in (k for e in entries if isinstance(e, dict) for k in e):
            sub, _, pkg = str(name).partition("@")
            if pkg and not sub.startswith(("/", "override")):
                base = next(iter(packages[f]))
                for g in (g for g in files if groups[g] == f"{groups[f]}/{sub}".strip("/")):
                    packages[g].add(f"{base}.{pkg}".strip("."))
    root = _Keys()
    for f, data in loaded.items():
        if not isinstance(data, dict):
            continue
        data = {k: v for k, v in data.items() if k != "defaults" and not (groups[f] == "" and k == "hydra")}
        for pkg in packages[f]:
            root.at(pkg).add(data)
    for alias, source in SAME_KEYS.items():
        root.at(alias).merge(root.at(source))
    return root


@functools.lru_cache(maxsize=64)
def _parameters(target: str) -> frozenset[str] | None:
    """The keyword parameters of ``target`` (a dotted name), or None: not importable, or takes **kwargs."""
    from hydra.utils import get_object

    try:
        params = inspect.signature(get_object(target)).parameters.values()
    except Exception:  # noqa: BLE001 - instantiate reports an unimportable target with its own message
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _allowed(value: dict[str, Any], node: _Keys, where: str) -> tuple[frozenset[str] | None, str]:
    """(the keys ``value`` may hold, whose they are for the message); None: any key goes."""
    if where in DECLARED_BY:
        return DECLARED_BY[where](value)
    target = value.get("_target_") if isinstance(value.get("_target_"), str) else None
    if target is None and len(node.targets) == 1:  # e.g. finetune.train.optimizer, merged over train's AdamW
        target = next(iter(node.targets))
    target = target or KWARGS_OF.get(where)
    extra = set(CODE_KEYS.get(where, ()))
    if target is not None:
        params = _parameters(target)
        if params is not None:
            return params | HYDRA_KEYS | extra, target.rsplit(".", 1)[-1]
    if node.is_map and node.children:
        return frozenset(node.children) | extra, ""
    return None, ""


def _unknown_keys(value: Any, node: _Keys, where: str, shown: str) -> Iterator[str]:
    """One line per key of ``value`` that ``node`` does not know (the topmost one of a subtree)."""
    if where in OPEN_KEYS:
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            yield from _unknown_keys(v, node.item or _Keys(), f"{where}[]", f"{shown}[{i}]")
        return
    if not isinstance(value, dict):
        return
    allowed, owner = _allowed(value, node, where)
    if allowed is None:
        return
    for key, v in value.items():
        full = f"{shown}.{key}" if shown else str(key)
        if key in allowed:
            yield from _unknown_keys(v, node.children.get(key) or _Keys(), f"{where}.{key}".lstrip("."), full)
            continue
        names = sorted(allowed - HYDRA_KEYS)
        close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
        hint = f"closest: {', '.join(close)}" if close else \
            f"known: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
        of = f" of {owner}" if owner else ""
        yield f"{full} is not a setting{of}; {hint} (fix the name or drop it)"


def _check_keys(cfg: DictConfig) -> Iterator[str]:
    """Every key no config file (or the code it names) knows: misspelt, or set where it does nothing."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    yield from _unknown_keys(tree, known_keys(), "", "")


CHECKS: tuple[Callable[[DictConfig], Iterator[str]], ...] = (
    _check_keys, _check_train, _check_student, _check_teacher, _check_loss, _check_data, _check_image_only, _check_mix,
    _check_bench, _check_finetune, _check_stream, _check_export)
