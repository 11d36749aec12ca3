"""Phone and NPU files for an edge bundle, in ``bundle/mobile/`` (docs/guide.md, "Phones and NPUs").

``write_mobile_files(bundle_dir, ...)`` writes, next to the bundle's fp32 ONNX files:

- ``image_encoder.ort``, ``text_encoder.ort`` (and ``image_encoder.qdq_int8.ort``): ORT-format
  models (``onnxruntime.tools.convert_onnx_models_to_ort``), what a reduced/minimal onnxruntime
  build loads. Optimised for ``target_platform="arm"``: the converter then leaves out the NCHWc
  layout transformer, whose ``com.microsoft.nchwc`` kernels exist only in x86 builds, and keeps
  signed int8 QDQ (ARM's preference) instead of rewriting it to uint8 for x86. Every .ort is listed
  op by op from its flatbuffer and refused if an x86-only domain (``X86_ONLY_DOMAINS``) is left.
  ``ort_style="fixed"`` bakes in the CPU fusions (FusedMatMul, BiasGelu...: contrib kernels every
  CPU build has); ``"runtime"`` keeps a basic-level, ONNX-only graph (what NNAPI/CoreML can take,
  ORT's advice for them) and saves only the QDQ fusions a minimal build can replay on the CPU.
- ``required_operators[.with_runtime_opt].config``: the operator list of all the .ort files, for
  ``build.py --include_ops_by_config`` (a reduced onnxruntime build).
- ``image_encoder.fp16.onnx``, ``text_encoder.fp16.onnx``: fp16 weights and compute, float32
  inputs and outputs (``keep_io_types``), for GPU/NPU providers. No .ort of them: converted on a
  CPU-only session, the file would carry the Casts the CPU provider inserts around fp16 ops it lacks.
- ``image_encoder.qdq_int8.onnx``: static QDQ int8 (``distill.quantize.quantize_static_onnx``),
  calibrated on the given training views. The bundle's dynamic int8 runs on onnxruntime's CPU
  provider only; QDQ is the int8 form NNAPI, QNN and CoreML take.
- With ``batch1=True`` every file above has a fixed batch of 1 (``.b1`` in its name; NNAPI takes
  no dynamic shapes), and the fp32 towers are written at batch 1 too.
- ``usability.txt`` / ``usability.json``: onnxruntime's mobile usability check of each ONNX file
  (``check_onnx_model_mobile_usability``): how many nodes, in how many partitions, NNAPI and CoreML
  would take.

Every new file is checked against the fp32 ONNX it came from (``distill.onnx_tools.check_file``) and
added with its sha256 to bundle.json "files"; the figures go to bundle.json "extra"/"mobile".
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distill import onnx_tools
from distill.errors import ExportCheckError, UserError, one_line

log = logging.getLogger(__name__)

MOBILE_DIR = "mobile"
ORT_STYLES = ("fixed", "runtime")
# MLAS's NCHWc blocked-layout kernels are compiled for x86 only: an .ort holding them fails on ARM
X86_ONLY_DOMAINS = ("com.microsoft.nchwc",)
EPS = {"NNAPI": ("nnapi", None), "CoreML NeuralNetwork": ("coreml", "coreml_supported_neuralnetwork_ops.md"),
       "CoreML MLProgram": ("coreml", "coreml_supported_mlprogram_ops.md")}
# text parity inputs: real prompts through the bundle's tokenizer, so the EOT pooling sees real token positions
CHECK_PROMPTS = ("a photo of a dog.", "a red sneaker on a white background", "an aerial view of a harbour at night",
                 "a diagram.")
ORT_TOL = 0.9999  # the .ort holds the same graph, only optimised: rounding-level differences at most
# static QDQ int8's floor: room for students and calibration data other than those measured, while a
# broken calibration still fails (benchmarks/results/config_choices.md, "Phone and NPU files")
INT8_TOL = 0.995
FP16_TOL = 0.999


# ---------------------------------------------------------------------------- onnxruntime.tools

def _tool(module: str, fix: str) -> Any:
    """Import an onnxruntime.tools / transformers module, one UserError line when this onnxruntime
    lacks it. Root handlers are restored: onnxruntime.tools' logger calls logging.basicConfig on import."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        import onnxruntime

        raise UserError(f"onnxruntime {onnxruntime.__version__} has no {module} ({one_line(e)}): "
                        f"install the full onnxruntime wheel (pip install 'onnxruntime>=1.17'), or {fix}") from None
    finally:
        root.handlers[:] = handlers
        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # "Created config" at INFO per call


@contextlib.contextmanager
def _env(name: str, value: str):
    """Set an environment variable while inside (the converter reads its optimisation level from one)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# ---------------------------------------------------------------------------- the files

def _stage_fp32(src: Path, dst: Path, batch1: bool) -> Path:
    """The fp32 tower as the mobile files start from it: a copy, or with batch fixed at 1."""
    if not batch1:
        shutil.copyfile(src, dst)
        return dst
    import onnx

    tools = _tool("onnxruntime.tools.onnx_model_utils", "set export.mobile.batch1=false")
    model = onnx.load(str(src))
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inp.type.tensor_type.shape.dim]
    tools.make_input_shape_fixed(model.graph, inp.name, [1, *dims[1:]])
    tools.fix_output_shapes(model)
    onnx.save(model, str(dst))
    return dst


def _fp16(src: Path, dst: Path) -> Path:
    """fp16 weights and compute with float32 inputs/outputs (onnxruntime's float16 converter)."""
    import onnx

    f16 = _tool("onnxruntime.transformers.float16", "set export.mobile.fp16=false")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values clipped to fp16 range": the -inf attention mask, by design
        model = f16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    # the converter appends its input Casts after their consumers: ORT sorts, onnx.checker refuses
    _tool("onnxruntime.transformers.onnx_model", "set export.mobile.fp16=false").OnnxModel(model).topological_sort()
    onnx.save(model, str(dst))
    return dst


def _check_inputs(bundle: Path, fp32: dict[str, Path], images: np.ndarray | None, batch1: bool
                  ) -> dict[str, list[tuple[np.ndarray]]]:
    """Per tower, the parity batches: ``images`` (else 4 seeded N(0,1) images) and CHECK_PROMPTS
    through the bundle's tokenizer; one row per batch when the files are batch-1."""
    out: dict[str, np.ndarray] = {}
    if "image" in fp32:
        (dims,) = onnx_tools.io_shapes(fp32["image"])["inputs"].values()
        out["image"] = (np.asarray(images, np.float32) if images is not None and len(images)
                        else np.random.default_rng(0).standard_normal((4, *dims[1:]), dtype=np.float32))
    if "text" in fp32:
        from distill.tokenizer_np import NumpyTokenizer

        out["text"] = NumpyTokenizer.from_dir(bundle / "tokenizer")(list(CHECK_PROMPTS))
    return {t: _batches(x, batch1) for t, x in out.items()}


def _batches(x: np.ndarray, batch1: bool) -> list[tuple[np.ndarray]]:
    return [(x[i:i + 1],) for i in range(len(x))] if batch1 else [(x[i:i + 4],) for i in range(0, len(x), 4)]


def _reference(path: Path, threads: int | None):
    """reference(x) -> the fp32 file's output under onnxruntime (what the new files must match)."""
    sess = onnx_tools.session(path, threads=threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _check(path: Path, ref: Path, inputs: list, tol: float, threads: int | None, what: str) -> dict[str, float]:
    res = onnx_tools.check_file(path, inputs, _reference(ref, threads), tol=tol, threads=threads,
                                against=f"fp32 {ref.name}", hint=what)
    return {"min_cosine": round(res["min_cosine"], 7), "max_abs_err": float(f"{res['max_abs_err']:.3e}"),
            "tol": tol, "against": ref.name, "rows": int(sum(len(b[0]) for b in inputs))}


# ---------------------------------------------------------------------------- ORT format

def _convert_to_ort(stage: Path, out: Path, style: str) -> Path:
    """Convert every .onnx in ``stage`` to .ort in ``out`` (Fixed or Runtime style, level "all",
    target arm) and write the reduced-build config there; returns the config's path."""
    conv = _tool("onnxruntime.tools.convert_onnx_models_to_ort", "set export.mobile.ort=false")
    styles = [conv.OptimizationStyle.Fixed if style == "fixed" else conv.OptimizationStyle.Runtime]
    printed = io.StringIO()
    try:  # level "all" pinned: the converter reads it from the environment, and names its files by it
        with _env("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", "all"), contextlib.redirect_stdout(printed):
            conv.convert_onnx_models_to_ort(stage, output_dir=out, optimization_styles=styles, target_platform="arm")
    except Exception as e:  # noqa: BLE001 - the converter prints which model failed, then raises
        said = [ln for ln in printed.getvalue().splitlines() if ln.startswith("Error converting")]
        raise ExportCheckError(f"ORT-format conversion failed: {(said or [one_line(e)])[-1][:200]}; "
                               f"set export.mobile.ort=false to skip the .ort files") from None
    (config,) = out.glob("required_operators*.config")
    # its comment lines name the models by absolute build-machine paths: keep the file names only
    lines = [f"# - {Path(ln[4:]).name}" if ln.startswith("# - ") else ln for ln in config.read_text().splitlines()]
    config.write_text("\n".join(lines) + "\n")
    return config


def ort_ops(path: str | Path) -> dict[str, list[str]]:
    """{domain: sorted op types} of an ORT-format file, read from its flatbuffer (the same reader
    the reduced-build config is made with)."""
    fmt = _tool("onnxruntime.tools.ort_format_model", "set export.mobile.ort=false")
    required: dict[str, dict[int, set[str]]] = {}
    fmt.OrtFormatModelProcessor(str(path), required, None).process()
    return {d: sorted(set().union(*by_opset.values())) for d, by_opset in sorted(required.items())}


def config_ops(path: str | Path) -> dict[str, list[str]]:
    """{domain: sorted op types} listed in a required-operators config file."""
    out: dict[str, set[str]] = {}
    for line in Path(path).read_text().splitlines():
        if line and not line.startswith("#"):
            domain, _opset, ops = line.split(";", 2)
            out.setdefault(domain, set()).update(o.split("{", 1)[0] for o in ops.split(",") if o)
    return {d: sorted(v) for d, v in sorted(out.items())}


def _check_ort(onnx_file: Path, ort_file: Path, inputs: list, threads: int | None) -> dict[str, Any]:
    """An .ort loads, matches its .onnx (ORT_TOL) and holds no x86-only operator."""
    ops = ort_ops(ort_file)
    x86 = sorted(f"{d}:{o}" for d in ops if d in X86_ONLY_DOMAINS for o in ops[d])
    if x86:
        raise ExportCheckError(f"{ort_file.name}: holds x86-only operators {', '.join(x86)}; convert with "
                               f"target_platform='arm' (onnxruntime's converter then skips the NCHWc transformer)")
    res = _check_parity(ort_file, onnx_file, inputs, threads)
    return {**res, "ops": ops}


def _check_parity(path: Path, ref: Path, inputs: list, threads: int | None) -> dict[str, Any]:
    """``_check`` without onnx.checker, which cannot read ORT-format files."""
    sess = onnx_tools.session(path, threads=threads)
    name = sess.get_inputs()[0].name
    want = _reference(ref, threads)
    got = [sess.run(None, {name: b[0]})[0] for b in inputs]
    res = onnx_tools.parity(got, [want(b[0]) for b in inputs], tol=ORT_TOL, name=path.name, against=f"fp32 {ref.name}",
                            hint="set export.mobile.ort=false to skip the .ort files")
    return {"min_cosine": round(res["min_cosine"], 7), "max_abs_err": float(f"{res['max_abs_err']:.3e}"),
            "tol": ORT_TOL, "against": ref.name, "rows": int(sum(len(b[0]) for b in inputs))}


# ---------------------------------------------------------------------------- usability

class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def usability(path: Path, tmp: Path) -> tuple[dict[str, Any], list[str]]:
    """onnxruntime's mobile usability check of one ONNX file: ({EP: figures}, the checker's report
    lines). Figures: nodes, nodes the EP would take and in how many partitions, as the file is
    (fixed or dynamic shapes) and, for dynamic files, once shapes were fixed; ORT's YES/MAYBE/NO."""
    uc = _tool("onnxruntime.tools.mobile_helpers.usability_checker", "set export.mobile.enabled=false")
    utils = _tool("onnxruntime.tools.onnx_model_utils", "set export.mobile.enabled=false")
    opt = tmp / f"{path.stem}.basic.onnx"
    uc.optimize_model(path, opt, use_external_initializers=True)  # what analyze_model does first: basic level
    handler, logger = _Lines(), logging.getLogger(f"distill.mobile.usability.{path.stem}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the report goes to usability.txt, not the run log
    logger.info("Checking %s for usability with ORT Mobile.", path.name)
    uc.checker(opt.resolve(), logger)
    model = utils.ModelProtoWithShapeInfo(opt).model_with_shape_info
    dynamic = bool(uc.check_shapes(model.graph)[0])
    figures = {}
    for ep, (kind, table) in EPS.items():
        def part(fixed_inputs: bool):
            return (uc.check_nnapi_partitions(model, fixed_inputs) if kind == "nnapi"
                    else uc.check_coreml_partitions(model, fixed_inputs, table))
        info = part(True)
        figures[ep] = _figures(info)
        if dynamic:
            figures[ep]["if_shapes_fixed"] = _figures(part(False))
    return figures, handler.lines


def _figures(info: Any) -> dict[str, Any]:
    return {"nodes": info.num_nodes, "supported_nodes": info.num_supported_nodes,
            "supported_pct": round(100 * info.num_supported_nodes / max(info.num_nodes, 1), 1),
            "partitions": info.num_partitions, "suitability": info.suitability().name,
            "unsupported_ops": sorted(info.unsupported_ops)}


# ---------------------------------------------------------------------------- the bundle

def _names(batch1: bool) -> dict[tuple[str, str], str]:
    """{(tower, precision): file stem}, e.g. ("image", "qdq_int8") -> "image_encoder.b1.qdq_int8"."""
    b = ".b1" if batch1 else ""
    return {(t, p): f"{t}_encoder{b}{'' if p == 'fp32' else '.' + p}"
            for t in ("image", "text") for p in ("fp32", "fp16", "qdq_int8")}


def _update_bundle(bundle: Path, files: Sequence[Path], extra: dict[str, Any]) -> None:
    """Add ``files`` with their sha256 to bundle.json "files" and ``extra`` as "extra"/"mobile";
    then the bundle's SHA256SUMS."""
    meta_path = bundle / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = {k: v for k, v in meta["files"].items() if not k.startswith(MOBILE_DIR + "/")}
    meta["files"].update({p.relative_to(bundle).as_posix(): onnx_tools.sha256_file(p) for p in sorted(files)})
    meta.setdefault("extra", {})["mobile"] = extra
    meta_path.write_text(json.dumps(meta, indent=1))
    onnx_tools.write_checksums(bundle)


def _bundle_inputs(bundle: Path, image_onnx: Any, text_onnx: Any) -> dict[str, Path]:
    meta_path = bundle / "bundle.json"
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: not found; write the bundle (distill.bundle.write_bundle) before its mobile files")
    files = json.loads(meta_path.read_text()).get("files", {})
    towers = {"image": Path(image_onnx) if image_onnx else bundle / "image_encoder.onnx",
              "text": Path(text_onnx) if text_onnx else (bundle / "text_encoder.onnx"
                                                         if "text_encoder.onnx" in files else None)}
    for t, p in towers.items():
        if p is not None and not p.is_file():
            raise UserError(f"{p}: no such ONNX file for the {t} tower; pass {t}_onnx= the fp32 file the bundle ships")
    return {t: p for t, p in towers.items() if p is not None}


def write_mobile_files(bundle_dir: str | Path, *, image_onnx: str | Path | None = None,
                       text_onnx: str | Path | None = None, calibration: Sequence[np.ndarray] | None = None,
                       batch1: bool = False, fp16: bool = True, static_int8: bool = True, ort: bool = True,
                       ort_style: str = "fixed", check_images: np.ndarray | None = None,
                       int8_min_cosine: float = INT8_TOL, fp16_min_cosine: float = FP16_TOL,
                       threads: int | None = None) -> dict[str, Any]:
    """Write ``bundle_dir/mobile/`` (see the module docstring) and register it in bundle.json.

    image_onnx / text_onnx: the fp32 towers (default: the bundle's own). calibration: (B, 3, S, S)
    float32 normalised *training* views for the static int8 file (required when static_int8).
    check_images: (N, 3, S, S) normalised images the int8 and fp16 files are compared on, ideally
    held out from the calibration (default: the calibration views for int8, N(0,1) noise for fp16).
    Returns {"dir", "batch", "ort_style", "files": {name: bytes}, "parity": {name: figures},
    "ort_ops": {name: {domain: ops}}, "required_operators": {domain: ops}, "usability": {onnx: {EP:
    figures}}, "seconds"}. Raises UserError / ExportCheckError, one line naming the file and the fix.
    """
    t0 = time.perf_counter()
    bundle = Path(bundle_dir)
    towers = _bundle_inputs(bundle, image_onnx, text_onnx)
    if ort_style not in ORT_STYLES:
        raise UserError(f"export.mobile.ort_style={ort_style!r} is unknown: use {' or '.join(ORT_STYLES)}")
    calib = [np.asarray(c, np.float32) for c in (calibration or []) if len(c)]
    if static_int8 and "image" in towers and not calib:
        raise UserError("mobile static int8 needs calibration images from the training set (none given): "
                        "pass calibration= or set export.mobile.static_int8=false")
    out = bundle / MOBILE_DIR
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=bundle, prefix=".mobile-") as tmp:
        stage, scratch = Path(tmp) / "stage", Path(tmp) / "scratch"
        stage.mkdir(), scratch.mkdir()
        res = _make_files(bundle, towers, stage, out, scratch, calib, check_images, batch1=batch1, fp16=fp16,
                          static_int8=static_int8, ort=ort, ort_style=ort_style, tols=(int8_min_cosine, fp16_min_cosine),
                          threads=threads)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    res.update(dir=str(out), batch=1 if batch1 else "dynamic", ort_style=ort_style if ort else None,
               files={p.relative_to(bundle).as_posix(): p.stat().st_size for p in files},
               seconds=round(time.perf_counter() - t0, 1))
    _update_bundle(bundle, files, summary(res))
    log.info("mobile files: %d in %s (%.0fs): %s", len(files), out, res["seconds"],
             ", ".join(f"{k} cos {v['min_cosine']:.5f}" for k, v in res["parity"].items()))
    return res


def _make_files(bundle: Path, towers: dict[str, Path], stage: Path, out: Path, scratch: Path,
                calib: list[np.ndarray], check_images: np.ndarray | None, *, batch1: bool, fp16: bool,
                static_int8: bool, ort: bool, ort_style: str, tols: tuple[float, float],
                threads: int | None) -> dict[str, Any]:
    """The files themselves: ``stage`` holds what becomes .ort, ``out`` what ships as .onnx."""
    names, int8_tol, fp16_tol = _names(batch1), *tols
    fp32 = {t: _stage_fp32(p, stage / f"{names[t, 'fp32']}.onnx", batch1) for t, p in towers.items()}
    inputs = _check_inputs(bundle, fp32, check_images, batch1)
    parity: dict[str, Any] = {}
    if batch1:  # the batch-1 fp32 files ship too: same numbers as the bundle's own
        parity.update({f.name: _check(f, towers[t], inputs[t], ORT_TOL, threads, "set export.mobile.batch1=false")
                       for t, f in fp32.items()})
    onnx_files = {f"{t}_fp32": f for t, f in fp32.items()}
    if fp16:
        for t, src in fp32.items():
            f = _fp16(src, out / f"{names[t, 'fp16']}.onnx")
            parity[f.name] = _check(f, src, inputs[t], fp16_tol, threads, "set export.mobile.fp16=false to skip it")
            onnx_files[f"{t}_fp16"] = f
    if static_int8 and "image" in fp32:
        from distill.quantize import quantize_static_onnx

        rows = [c[i:i + 1] for c in calib for i in range(len(c))] if batch1 else calib
        f = quantize_static_onnx(fp32["image"], stage / f"{names['image', 'qdq_int8']}.onnx", rows)
        held = check_images is not None and len(check_images)
        parity[f.name] = _check(f, fp32["image"], inputs["image"] if held else _batches(np.concatenate(calib), batch1),
                                int8_tol, threads, "check the calibration images, or set export.mobile.static_int8=false")
        parity[f.name]["on"] = "held-out images" if held else "the calibration images"
        onnx_files["image_qdq_int8"] = f
    res: dict[str, Any] = {"parity": parity, "ort_ops": {}, "required_operators": None}
    if ort:
        config = _convert_to_ort(stage, out, ort_style)
        res["required_operators"] = {"file": config.name, "ops": config_ops(config)}
        suffix = ".with_runtime_opt.ort" if ort_style == "runtime" else ".ort"
        for src in sorted(stage.glob("*.onnx")):
            o = out / (src.name[:-len(".onnx")] + suffix)
            tower = "image" if src.name.startswith("image") else "text"
            checked = _check_ort(src, o, inputs[tower], threads)
            res["ort_ops"][o.name] = checked.pop("ops")
            parity[o.name] = checked
    res["usability"], report = {}, []
    for f in onnx_files.values():
        res["usability"][f.name], lines = usability(f, scratch)
        report += lines + [""]
    for key, f in onnx_files.items():  # QDQ and batch-1 fp32 ship as ONNX too (full builds, NPU providers);
        if f.parent == stage and (batch1 or not key.endswith("fp32")):  # dynamic fp32 is the bundle's own file
            shutil.move(str(f), out / f.name)
    (out / "usability.txt").write_text("\n".join(report))
    (out / "usability.json").write_text(json.dumps(res["usability"], indent=1))
    return res


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """The short form of ``write_mobile_files``' result (bundle.json "extra"/"mobile", report["export"]):
    layout, file sizes, parity and the share of nodes each NPU provider would take, per file."""
    return {"batch": res["batch"], "ort_style": res["ort_style"], "seconds": res.get("seconds"),
            "files": res.get("files"), "required_operators": (res["required_operators"] or {}).get("file"),
            "parity": {k: {"min_cosine": v["min_cosine"], "tol": v["tol"], "against": v["against"]}
                       for k, v in res["parity"].items()},
            "npu_coverage_pct": {f: {ep: v["supported_pct"] for ep, v in eps.items()}
                                 for f, eps in res["usability"].items()},
            "usability_report": f"{MOBILE_DIR}/usability.txt"}


def training_views(trainset: Any, n: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    """``n`` calibration views spread over the training set (as ``student_onnx_static_int8`` takes
    them), and up to n/4 views of *other* training images the int8 file is checked on. Evaluation
    images are never used: the bench measures on them."""
    from distill.encoders import normalize_images

    size, per_image = len(trainset), int(getattr(getattr(trainset, "spec", None), "views", 1) or 1)
    step = max(1, size // max(1, n))
    calib_idx = list(range(0, size, step))[:n]
    taken = {j // per_image for j in calib_idx}
    held_idx = [j for j in range(step // 2, size, step) if j // per_image not in taken][:max(1, n // 4)]

    def views(idx: list[int]) -> list[np.ndarray]:
        return [normalize_images(v[None]).numpy() for v in (trainset.load_view(j) for j in idx) if v is not None]

    held = views(held_idx)
    return views(calib_idx), (np.concatenate(held) if held else None)
