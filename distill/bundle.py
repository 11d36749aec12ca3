"""The edge bundle: the folder ``distill.edge`` loads on a device without PyTorch (ONNX files, class
embeddings, tokenizer, preprocessing spec, golden vectors, the browser page, the torch-free runtime
and its launcher, checksums), and the run's bundle and phone files built from a run's exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from distill import preprocess as preprocess_spec
from distill.errors import UserError
from distill.export import default_preprocess, onnx_opset, plain
from distill.onnx_tools import external_data, output_dim, sha256_file, write_checksums

log = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1


def _copy_onnx(src: str | Path, dst: Path) -> list[Path]:
    """Copy an ONNX file and any external-data files it names (same relative location)."""
    src = Path(src)
    shutil.copyfile(src, dst)
    copied = [dst]
    for loc in external_data(src):
        shutil.copyfile(src.parent / loc, dst.parent / loc)
        copied.append(dst.parent / loc)
    return copied


WEB_DIR = Path(__file__).resolve().parent / "web"
WEB_PAGE = ("index.html", "app.js", "preprocess.js", "tokenizer.js")
# onnxruntime-web's wasm-only build (SIMD + threads), what the page imports; from `npm ci` in distill/web
ORT_WEB_DIST = WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"
ORT_WEB_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")


def _copy_web(out: Path) -> list[Path]:
    """The browser page (distill/web) and the onnxruntime-web runtime files into bundle/web/; without
    the npm package, one warning and the page alone (it then says what is missing)."""
    web = out / "web"
    (web / "ort").mkdir(parents=True)
    copied = [Path(shutil.copyfile(WEB_DIR / f, web / f)) for f in WEB_PAGE]
    if not all((ORT_WEB_DIST / f).is_file() for f in ORT_WEB_FILES):
        log.warning("bundle web page without its runtime: onnxruntime-web is not installed; run `npm ci --prefix "
                    "%s` (or bash tools/setup.sh) and write the bundle again", WEB_DIR)
        return copied
    return copied + [Path(shutil.copyfile(ORT_WEB_DIST / f, web / "ort" / f)) for f in ORT_WEB_FILES]


# what a bundle carries so that it runs with no package installed: the edge runtime's torch-free modules
# (found by following its imports), a launcher and the pip requirements
RUNTIME_DIR = "runtime"
RUNTIME_ROOT = "edge"  # distill/edge.py; what it imports is copied with it
LAUNCHER = "edge.py"
LAUNCHER_SOURCE = '''#!/usr/bin/env python3
"""This bundle's torch-free runtime: python edge.py classify IMAGE... | embed ... | selftest | serve.

Needs only onnxruntime, numpy and Pillow (pip install -r requirements.txt); README.md has the commands.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "runtime"))  # the bundle's copy wins over any installed distill
sys.dont_write_bytecode = True  # leave the folder exactly as SHA256SUMS lists it

try:
    from distill import edge
except ImportError as e:  # numpy, Pillow or onnxruntime missing: one line, not a traceback
    print(f"error: {e}; install the runtime: pip install -r {os.path.join(HERE, 'requirements.txt')}", file=sys.stderr)
    sys.exit(2)
if not os.path.abspath(edge.__file__).startswith(os.path.join(HERE, "runtime") + os.sep):
    print(f"error: distill was already imported from {edge.__file__}, not {HERE}/runtime; run "
          f"python -S edge.py or remove the sitecustomize/.pth hook that imports it", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(edge.main(sys.argv[1:], default_bundle=HERE, prog="python edge.py"))
'''
# lower bounds of what the runtime code uses: Image.Resampling (Pillow 9.1), the project's tested
# numpy floor, and an onnxruntime that runs the models' opset (raised to 1.23 for opset 23 graphs)
REQUIREMENTS = {"onnxruntime": "1.18", "numpy": "1.24", "Pillow": "9.1"}
GOLDEN_TEXTS = ("a photo of a cat.", "A Photo of Two DOGS, playing in the snow!", "", "fish &amp; chips",
                "café crème brûlée, ñandú and Zürich", ("a very long caption that keeps on going " * 12).strip())


def runtime_modules(root: str = RUNTIME_ROOT) -> list[str]:
    """The distill modules the edge runtime imports, transitively, at module level or inside functions
    (read from the source with ast, so a new import is shipped without a list to keep up to date)."""
    import ast

    pkg = Path(__file__).resolve().parent
    todo, seen = [root], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if not (pkg / f"{name}.py").is_file():
            raise UserError(f"the edge runtime imports distill.{name}, which is not a module file under {pkg}; "
                            f"the bundle can only carry plain modules of distill/")
        seen.add(name)
        for node in ast.walk(ast.parse((pkg / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("distill.")]
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "distill"):
                parts = (node.module or "").split(".")[0 if node.level else 1:]
                if parts and parts[0]:
                    todo.append(parts[0])
                else:  # from distill import a, b: the names that are modules
                    todo += [a.name for a in node.names if (pkg / f"{a.name}.py").is_file()]
    return sorted(seen)


def _copy_runtime(out: Path) -> list[Path]:
    """runtime/distill/ (the torch-free modules, byte for byte from this package, and a minimal
    __init__), the launcher and requirements.txt."""
    import distill

    pkg = Path(__file__).resolve().parent
    dst = out / RUNTIME_DIR / "distill"
    dst.mkdir(parents=True)
    copied = [Path(shutil.copyfile(pkg / f"{m}.py", dst / f"{m}.py")) for m in runtime_modules()]
    (dst / "__init__.py").write_text('"""clip-distill\'s torch-free edge runtime, copied into this bundle by '
                                     'distill.export.write_bundle."""\n\n__version__ = '
                                     f'"{distill.__version__}"\n')
    (out / LAUNCHER).write_text(LAUNCHER_SOURCE)
    return copied + [dst / "__init__.py", out / LAUNCHER]


def _requirements(out: Path, onnx_files: Sequence[Path]) -> Path:
    """requirements.txt pins the versions the golden vectors were computed with (this process's), so a
    device that installs it reproduces them; the floors the runtime needs at least are listed beside."""
    from importlib.metadata import PackageNotFoundError, version

    floors = dict(REQUIREMENTS)
    if any(onnx_opset(f) >= 23 for f in onnx_files):  # the ONNX Attention op
        floors["onnxruntime"] = "1.23"
    lines = ["# The versions this bundle's golden vectors were computed with (python edge.py selftest passes with them).\n",
             "# The runtime needs at least: " + ", ".join(f"{k}>={v}" for k, v in floors.items()) + "\n"]
    for name, floor in floors.items():
        try:
            lines.append(f"{name}=={version(name)}\n")
        except PackageNotFoundError:  # producer without it (never in practice: export needs all three)
            lines.append(f"{name}>={floor}\n")
    (out / "requirements.txt").write_text("".join(lines))
    return out / "requirements.txt"


def _golden_pngs(folder: Path) -> list[Path]:
    """Deterministic synthetic images that exercise the preprocessing: a downscaled non-square gradient,
    an upscaled noisy checkerboard, transparency (composited on white) and a 16-bit grey image."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    grad = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], -1).astype(np.uint8)
    check = ((np.indices((40, 40)).sum(0) // 5) % 2)[..., None] * np.array([200, 40, 90])
    check = np.clip(check + rng.integers(0, 50, (40, 40, 3)), 0, 255).astype(np.uint8)
    alpha = np.zeros((50, 70, 4), np.uint8)
    alpha[..., :3], alpha[..., 3] = (30, 120, 200), np.linspace(0, 255, 70).astype(np.uint8)[None]
    grey16 = (np.add.outer(np.arange(96) * 300, np.arange(128) * 150) + 1000).astype(np.uint16)
    images = {"gradient.png": Image.fromarray(grad, "RGB"), "checker.png": Image.fromarray(check, "RGB"),
              "alpha.png": Image.fromarray(alpha, "RGBA"), "grey16.png": Image.fromarray(grey16)}
    for name, img in images.items():
        img.save(folder / name)
    return [folder / name for name in images]


def _golden_json(doc: Mapping[str, Any]) -> str:
    """Indented JSON with each list of numbers on one line (readable, and a tenth of the lines)."""
    import re

    return re.sub(r"\[[^\[\]{}\"]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "),
                  json.dumps(doc, indent=1, ensure_ascii=False))


def _write_golden(out: Path, threads: int | None = None) -> list[Path]:
    """golden/*.png, golden/*.pixels.npy and golden.json: the fixed inputs and what this bundle's
    tokenizer, preprocessing and every encoder file make of them (onnxruntime, one input per run)."""
    from distill import edge

    pngs = _golden_pngs(out / "golden")
    rels = [p.relative_to(out).as_posix() for p in pngs]
    tokens, pixels = edge.golden_inputs(out, GOLDEN_TEXTS, rels)
    encoders = [f for f in edge.ENCODERS if (out / f).is_file()]
    emb = edge.golden_embeddings(out, encoders, tokens, pixels, threads)
    written, images = list(pngs), []
    std = min(json.loads((out / "preprocess.json").read_text())["std"])
    for rel, px in zip(rels, pixels):
        npy = out / rel.replace(".png", ".pixels.npy")
        np.save(npy, px)
        written.append(npy)
        images.append({"file": rel, "pixels": {
            "file": npy.relative_to(out).as_posix(), "shape": list(px.shape), "dtype": "float32",
            "mean": [float(v) for v in px.mean((1, 2))], "std": [float(v) for v in px.std((1, 2))],
            "sha256_float32_le": hashlib.sha256(px.astype("<f4").tobytes()).hexdigest()}})
    doc = {"format": 1, "about": "see README.md, 'Check a port against the golden vectors'",
           "tolerance": {"min_cosine": dict(edge.GOLDEN_MIN_COSINE),
                         "pixels_max_abs": round(edge.GOLDEN_PIXEL_LEVELS / 255.0 / std, 6)},
           "texts": [{"text": t, "tokens": [int(i) for i in row]} for t, row in zip(GOLDEN_TEXTS, tokens)],
           "images": images,
           "embeddings": {f: {"precision": edge.ENCODERS[f][1], "input": edge.ENCODERS[f][0] + "s",
                              "batch_size": 1, "rows": [[float(v) for v in r] for r in emb[f]]} for f in encoders}}
    (out / edge.GOLDEN_FILE).write_text(_golden_json(doc))
    return written + [out / edge.GOLDEN_FILE]


BUNDLE_README = """# Edge bundle: zero-shot image classifier (clip-distill {version})

{num_classes} labels (labels.json), {embed_dim}-d embeddings, {size} x {size} px input. Models: {models}.
Everything needed to run it is in this folder: the models, the tokenizer, the preprocessing spec, and a
torch-free Python runtime (runtime/distill/, copied from clip-distill) started by edge.py.

## Install (Python 3.10+, no PyTorch)

    python3 -m venv .venv && . .venv/bin/activate
    pip install -r requirements.txt        # onnxruntime, numpy, Pillow

## Run

    python edge.py classify photo1.jpg photo2.jpg         # top-5 labels per image
    python edge.py classify --precision fp32 --top-k 3 --json photo.jpg
    python edge.py embed --images a.jpg b.jpg -o img.npy  # L2-normalised rows; row order in img.npy.json
    python edge.py embed --texts "a photo of a dog" "a photo of a cat" -o txt.npy
    python edge.py serve --port 8765                      # browser page at http://127.0.0.1:8765/web/
    python edge.py selftest                               # recompute golden.json with this runtime

edge.py runs from any folder (`python /path/to/bundle/edge.py ...`) and uses its own folder as the
bundle (`--bundle DIR` picks another). Exit codes: 0 ok; 1 some images unreadable (one line each, the
rest are processed) or a selftest mismatch; 2 bad bundle or usage (one line naming the file and the fix).
`--precision`: `auto` (default) runs the int8 image encoder when present and the fp32 text encoder;
`int8` also the int8 text encoder when present; `fp32` the fp32 files. int8 runs one input at a time
by default, because dynamic int8 scales activations over the whole batch (`--batch-size` overrides).

## Verify the copy

    sha256sum -c SHA256SUMS                 # macOS: shasum -a 256 -c SHA256SUMS

SHA256SUMS lists every file of bundle.json's manifest and bundle.json itself. Every edge.py command also
checks each file in bundle.json against its sha256 before it runs, and refuses a modified or partly
copied bundle with one line naming the file.

## Check a port against the golden vectors

A port (Swift, Kotlin, C++, a browser...) checks itself step by step against golden.json, which this
bundle's producer computed with onnxruntime; `python edge.py selftest` runs the same checks with the
Python runtime and prints one line each.

1. Tokenizer: for every `texts[i].text` your tokenizer gives exactly `texts[i].tokens` ({context_length}
   ids: start-of-text, byte-level BPE ids from tokenizer/ after CLIP's cleaning (html unescape twice,
   whitespace collapsed, lower case), end-of-text, zero padding; longer texts are cut to
   {context_length} with end-of-text last).
2. Preprocessing: decode every `images[i].file` (golden/*.png: a gradient, a checkerboard, transparency,
   16-bit grey) and preprocess it by preprocess.json into (3, S, S) float32. Compare with
   `images[i].pixels.file` (a .npy file: a short text header, then float32 little-endian, C order):
   max abs diff <= `tolerance.pixels_max_abs` ({pixel_levels} grey levels). Per-channel `mean` and `std`
   are in golden.json for a first look; `sha256_float32_le` matches only a bit-exact port.
3. Encoders: run each file named in `embeddings` with one input per run (batch 1: the int8 files
   quantise activations per run): text encoders on `texts[i].tokens` ("tokens", (1, L) int64), image
   encoders on your pixels from step 2 ("pixels", (1, 3, S, S) float32). The cosine between your output
   and `rows[i]` must be >= `tolerance.min_cosine[precision]`: fp32 {tol_fp32} (only summation order
   differs between runtimes), int8 {tol_int8} (a CPU that rounds fp32 differently can move an
   activation across a quantisation step, which int8 amplifies). If step 3 fails for an image encoder
   only, feed it the golden .npy pixels: a pass then points at the preprocessing.
"""


def _write_readme(out: Path, emb: np.ndarray, context_length: int, spec: Mapping[str, Any]) -> Path:
    import distill
    from distill import edge

    size = spec["size"][0] if isinstance(spec["size"], (list, tuple)) else spec["size"]
    models = ", ".join(f for f in edge.ENCODERS if (out / f).is_file())
    text = BUNDLE_README.format(version=distill.__version__, num_classes=emb.shape[0], embed_dim=emb.shape[1],
                                size=int(size), models=models, context_length=int(context_length),
                                pixel_levels=edge.GOLDEN_PIXEL_LEVELS, tol_fp32=edge.GOLDEN_MIN_COSINE["fp32"],
                                tol_int8=edge.GOLDEN_MIN_COSINE["int8"])
    (out / "README.md").write_text(text)
    return out / "README.md"


def _copy_models(out: Path, sources: Mapping[str, str | Path | None], embed_dim: int) -> list[Path]:
    """The ONNX files into the bundle under their role names; their output sizes must agree with D."""
    files: list[Path] = []
    dims: dict[str, int] = {}
    for role, src in sources.items():
        if src is None:
            continue
        files += _copy_onnx(src, out / role)
        dims[role] = output_dim(out / role)
    if len(set(dims.values()) | {embed_dim}) != 1:
        raise UserError(f"embedding sizes disagree: class_embeddings D={embed_dim}, ONNX {dims}; "
                        f"rebuild class embeddings with the exported student's text tower")
    return files


def _bundle_meta(out: Path, files: Sequence[Path], emb: np.ndarray, context_length: int, logit_scale: float,
                 extra: Mapping[str, Any] | None) -> dict[str, Any]:
    import onnxruntime
    import open_clip
    import torch

    import distill

    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "embed_dim": int(emb.shape[1]),
        "num_classes": int(emb.shape[0]),
        "context_length": int(context_length),
        "logit_scale": float(logit_scale),
        "files": {p.relative_to(out).as_posix(): sha256_file(p) for p in files},
        "producer": {"clip_distill": distill.__version__, "torch": torch.__version__,
                     "open_clip": open_clip.__version__, "onnxruntime": onnxruntime.__version__},
        "rebuild": "python -m distill +experiment=... (export.bundle=true) or distill.bundle.write_bundle",
        "extra": plain(dict(extra or {})),
    }


def write_bundle(out_dir: str | Path, *, image_onnx: str | Path, image_int8_onnx: str | Path | None = None,
                 text_onnx: str | Path | None = None, text_int8_onnx: str | Path | None = None,
                 class_embeddings: np.ndarray, labels: Sequence[str], preprocess: Mapping[str, Any],
                 context_length: int, logit_scale: float = 100.0, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the edge bundle folder that ``distill.edge.load_bundle`` reads and that runs on its own.

    class_embeddings: (C, D) float32, one L2-normalised row per label (normalised here if not).
    preprocess: the spec the student's training/eval data used (at least ``size``; the rest defaults
    to ``default_preprocess``), written complete to preprocess.json so the edge runtime follows it.
    Layout (``distill.edge``'s docstring has it all): image_encoder.onnx, [image_encoder.int8.onnx],
    [text_encoder.onnx], [text_encoder.int8.onnx], tokenizer/, class_embeddings.npy, labels.json,
    preprocess.json, golden.json + golden/ (golden vectors), web/ (the browser page and, when installed,
    onnxruntime-web), runtime/distill/ + edge.py (the torch-free runtime and its launcher),
    requirements.txt, README.md, bundle.json (format version, embed_dim, files with sha256, producer
    versions) and SHA256SUMS (``write_checksums``).
    """
    from distill.tokenizer_np import NumpyTokenizer

    try:  # validate before anything is written: the edge runtime refuses a spec it cannot follow exactly
        pre = preprocess_spec.check_spec(plain(preprocess))
    except preprocess_spec.SpecError as e:
        raise UserError(f"bundle preprocess spec: {e}") from None
    if text_int8_onnx is not None and text_onnx is None:
        raise UserError("write_bundle got text_int8_onnx without text_onnx; pass the fp32 text encoder too")
    emb = np.asarray(class_embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(labels):
        raise UserError(f"class_embeddings shape {emb.shape} does not match {len(labels)} labels; pass (C, D)")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = _copy_models(out, {"image_encoder.onnx": image_onnx, "image_encoder.int8.onnx": image_int8_onnx,
                               "text_encoder.onnx": text_onnx, "text_encoder.int8.onnx": text_int8_onnx}, emb.shape[1])
    onnx_files = [f for f in files if f.suffix == ".onnx"]
    np.save(out / "class_embeddings.npy", emb)
    (out / "labels.json").write_text(json.dumps(list(labels), indent=1, ensure_ascii=False))
    (out / "preprocess.json").write_text(json.dumps(pre, indent=1))
    NumpyTokenizer(context_length=context_length).save(out / "tokenizer")
    files += [out / "class_embeddings.npy", out / "labels.json", out / "preprocess.json",
              out / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz", out / "tokenizer" / "tokenizer.json"]
    files += _copy_web(out) + _write_golden(out) + _copy_runtime(out)
    files += [_requirements(out, onnx_files), _write_readme(out, emb, context_length, pre)]
    meta = _bundle_meta(out, files, emb, context_length, logit_scale, extra)
    (out / "bundle.json").write_text(json.dumps(meta, indent=1))
    write_checksums(out)
    return out


# ------------------------------------------------------------------------- a run's bundle
def bundle_labels(cfg: Any, eval_sets: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str], str] | None:
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


def write_run_bundle(cfg: Any, ctx: Any, eval_sets: Mapping[str, Mapping[str, Any]], trainset: Any,
                     threads: int | None) -> None:
    """The run's edge bundle (``ctx.info["bundle"]``) from the exported student files and, with
    ``export.mobile.enabled``, its phone files (``ctx.info["mobile"]``); ``cfg`` is the export config,
    ``ctx`` the variants' ``VariantContext``."""
    labels = bundle_labels(cfg, eval_sets) if cfg.bundle else None
    if labels is not None and "onnx" in ctx.info:
        ctx.info["bundle"] = str(_bundle_from_context(ctx, *labels))
    elif cfg.bundle:
        log.warning("no edge bundle: it needs the student_onnx_fp32 variant and a label set (a classification "
                    "eval set, export.bundle_labels or retrieval captions)")
    mob = plain(cfg.get("mobile") or {})
    if mob.get("enabled") and "bundle" in ctx.info:
        ctx.info["mobile"] = _mobile_files(cfg, mob, ctx, trainset, threads)


def _bundle_from_context(ctx: Any, names: list[str], templates: list[str], source: str) -> Path:
    from distill import metrics
    from distill.encoders import ClipEncoder

    enc = ClipEncoder(ctx.student, ctx.tokenizer, ctx.image_size)
    clf = metrics.zero_shot_classifier(enc.encode_text, names, templates)
    where = ({"classification_set": source.split(":", 1)[1]} if source.startswith("classification:")
             else {"label_source": source})
    return write_bundle(
        ctx.export_dir / "bundle", image_onnx=ctx.info["onnx"]["image"]["path"],
        image_int8_onnx=(ctx.info.get("onnx_int8") or {}).get("image"), text_onnx=ctx.info["onnx"]["text"]["path"],
        text_int8_onnx=(ctx.info.get("onnx_int8") or {}).get("text"),
        class_embeddings=clf.cpu().numpy().astype(np.float32), labels=list(names),
        preprocess=default_preprocess(ctx.image_size), context_length=ctx.context_length,
        extra={**where, "templates": list(templates)})  # the browser page fills typed prompts into these


def _mobile_files(cfg: Any, mob: dict[str, Any], ctx: Any, trainset: Any, threads: int | None) -> dict[str, Any]:
    """Phone/NPU files into the bundle (distill.mobile); static int8 calibrates on indexed training views,
    so a stream's bundle goes without it (one warning) rather than failing the run."""
    from distill import mobile
    from distill.data_build import TrainStream

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
