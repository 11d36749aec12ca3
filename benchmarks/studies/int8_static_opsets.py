"""Static int8 of student image towers: which ops to quantise, which calibration, which format.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/studies/int8_static_opsets.py [RUNS_DIR]

benchmarks/results/int8_towers.md found static QDQ int8 (Conv/MatMul/Gemm only, min-max) slower than
ORT dynamic int8 at batch 1 on the depthwise-separable conv towers, and far from fp32 on RepViT and
EfficientNet-Lite0. The hypothesis here: with only Conv/MatMul/Gemm quantised, every activation,
residual Add, SE Mul and pooling between two convolutions stays fp32, so the optimised graph keeps a
DequantizeLinear/QuantizeLinear pair (and an NHWC<->NCHW layout change) around each of them, and that
costs more than int8 convolutions save. Quantising every op ORT can quantise lets ORT fuse
DQ -> Add/Mul/Pool -> Q into QLinear ops and keep the tensors int8 (NHWC) from one conv to the next.

For each run folder under RUNS_DIR (default /tmp/i8/full: one ``python -m distill +experiment=offline
student=NAME`` run per tower family, see int8_towers.md) the fp32 image tower
``export/onnx/image_encoder.onnx`` is quantised with onnxruntime.quantization into:

  a  dynamic            distill.quantize.quantize_dynamic_onnx, default mode, the shipped op set
                        (MatMul/Gemm on conv towers, every dynamic op on ViT: distill.variants.int8_ops)
  b  static_conv        distill.quantize.quantize_static_onnx as today (QDQ, Conv/MatMul/Gemm, min-max)
  c  static_all         QDQ, every op type ORT quantises (op_types_to_quantize=None), min-max
  d  static_all_pct     as c, Percentile calibration (99.999th percentile)
  e  static_qop_all     as c in QOperator format (QLinearConv etc. written into the file)
  f  static_all_s8sym   as c with int8 symmetric activations (S8S8)
  g  static_all_norr    as c without reduce_range (8-bit weights; an accuracy probe)
  h  static_all_skip2   as c with the first two Conv nodes (the stem and the first block's first
                        convolution, at full resolution) left fp32 (an accuracy probe)
  i  static_all_hsdec   as c after rewriting HardSigmoid (what quant_pre_process makes of HardSwish:
                        x * HardSigmoid(x)) into Mul, Add, Clip, which ORT quantises and runs as int8
                        (towers with HardSwish only)
  +  static_all_entropy as c, Entropy calibration

All static variants: int8 per-channel weights, reduce_range (but g), uint8 activations (but f), after
ORT's quant_pre_process, calibrated on 64 training-like views (32 inverted Fashion-MNIST training
images and 32 Tux Paint training photos, each a seeded RandomResizedCrop as distill.data.augmented_view
draws it, normalised with the CLIP mean/std as the pipeline feeds the ONNX file). Measured against the
fp32 file: mean and min cosine of the embedding on 256 other views (192 inverted Fashion-MNIST test
images, 64 Tux Paint validation photos, eval transform), batch-1 median latency (onnxruntime CPU,
1 intra-op thread, ORT_ENABLE_ALL, the same session options for every variant; the variants timed in
interleaved rounds), file size, and the op counts of ORT's optimised graph (QuantizeLinear /
DequantizeLinear left, fp32 convolutions, layout Transposes). Everything runs on one thread (ORT's
calibration and pre-processing sessions too). A study: run in full when run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import collections  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from distill import datasets  # noqa: E402
from distill.data import augmented_view, eval_view  # noqa: E402
from distill.encoders import normalize_images  # noqa: E402
from distill.quantize import (DEFAULT_DYNAMIC_MODE, pre_process, QuietRoot,  # noqa: E402
                              quantize_dynamic_onnx, quantize_static_onnx)

FAMILIES = {  # student name -> family label (int8_towers.md's)
    "vit_w192_d6_p32_160": "ViT (open_clip)",
    "mobilenetv4_conv_small": "MobileNetV4",
    "efficientvit_b0": "EfficientViT",
    "lcnet_100": "PP-LCNet",
    "repvit_m0_9": "RepViT",
    "efficientnet_lite0_pretrained": "EfficientNet-Lite0 (ImageNet start)",
    "fastvit_t8": "FastViT",
}
VARIANTS = {
    "dynamic": "a) dynamic, shipped op set",
    "static_conv": "b) static QDQ Conv/MatMul/Gemm, min-max (today)",
    "static_all": "c) static QDQ all ops, min-max",
    "static_all_pct": "d) static QDQ all ops, percentile",
    "static_qop_all": "e) static QOperator all ops, min-max",
    "static_all_s8sym": "f) static QDQ all ops, s8 symmetric activations",
    "static_all_norr": "g) static QDQ all ops, min-max, no reduce_range",
    "static_all_entropy": "d') static QDQ all ops, entropy",
    "static_all_skip2": "h) static QDQ all ops, min-max, first 2 convs fp32",
    "static_all_hsdec": "i) static QDQ all ops, min-max, HardSigmoid as Mul/Add/Clip",
}
DEFAULT_VARIANTS = ["dynamic", "static_conv", "static_all", "static_all_pct", "static_all_entropy", "static_qop_all",
                    "static_all_s8sym", "static_all_norr", "static_all_skip2", "static_all_hsdec"]
MIN_COSINE = 0.99
# g drops reduce_range, which distill.quantize keeps so that one file stays exact on AVX2 CPUs without VNNI
# (u8 x s8 pair sums saturate at 16 bits there): a probe of accuracy, not a candidate for shipping.
NOT_CANDIDATES = ("static_all_norr",)


class NotApplicable(Exception):
    """A variant that would be the same file as another one for this tower."""


# ----------------------------------------------------------------------------- one thread everywhere

_SessionOptions = ort.SessionOptions


def _one_thread_options():
    so = _SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return so


# onnxruntime.quantization builds its calibration / pre-processing sessions with default options (one
# thread per core); on this shared machine every session of this study gets one thread.
ort.SessionOptions = _one_thread_options  # type: ignore[assignment]


def timing_session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    """The one set of session options every variant is timed with (optionally saving the optimised graph)."""
    so = _one_thread_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- data

def views(size: int, n_calib: int, n_eval: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(calibration batches of one view, evaluation views (N, 3, S, S)), CLIP-normalised float32."""
    fm_train = datasets.fashion_mnist(split="train", per_class=50, invert=True)  # the runs' training images
    tux_train = datasets.tuxpaint(split="train")
    half = n_calib // 2
    calib = []
    for k, (src, n) in enumerate(((fm_train, half), (tux_train, n_calib - half))):
        step = max(1, len(src) // n)
        for i in range(n):
            j = (i * step) % len(src)
            calib.append(augmented_view(src.open(j).convert("RGB"), size, seed=1000 * k + j))
    fm_test = datasets.fashion_mnist(split="test", invert=True)
    tux_val = datasets.tuxpaint(split="val")
    n_tux = min(len(tux_val), n_eval // 4)
    n_fm = n_eval - n_tux
    ev = [eval_view(fm_test.open(j * (len(fm_test) // n_fm)), size) for j in range(n_fm)]
    ev += [eval_view(tux_val.open(j).convert("RGB"), size) for j in range(n_tux)]
    norm = lambda xs: normalize_images(torch.stack(xs)).numpy().astype(np.float32)  # noqa: E731
    c = norm(calib)
    return [c[i:i + 1] for i in range(len(c))], norm(ev)


# ----------------------------------------------------------------------------- variants

def decompose_hardsigmoid(path: Path) -> int:
    """Rewrite every HardSigmoid(x; alpha, beta) of ``path`` in place as Clip(Add(Mul(x, alpha), beta), 0, 1),
    ops ORT's QDQ quantiser handles (QLinearMul, QLinearAdd; the Clip folds into the Add's output range);
    -> how many were rewritten."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g, nodes, count = model.graph, [], 0
    for n in g.node:
        if n.op_type != "HardSigmoid":
            nodes.append(n)
            continue
        count += 1
        attr = {a.name: a.f for a in n.attribute}
        k = f"{n.name or n.output[0]}_hsdec"
        for suffix, v in (("alpha", attr.get("alpha", 0.2)), ("beta", attr.get("beta", 0.5)), ("lo", 0.0), ("hi", 1.0)):
            g.initializer.append(numpy_helper.from_array(np.array(v, np.float32), f"{k}_{suffix}"))
        nodes += [helper.make_node("Mul", [n.input[0], f"{k}_alpha"], [f"{k}_m"], name=f"{k}_mul"),
                  helper.make_node("Add", [f"{k}_m", f"{k}_beta"], [f"{k}_a"], name=f"{k}_add"),
                  helper.make_node("Clip", [f"{k}_a", f"{k}_lo", f"{k}_hi"], list(n.output), name=f"{k}_clip")]
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(path))
    return count


def static(src: Path, dst: Path, calib: list[np.ndarray], *, fmt: str = "qdq", op_types=None, method: str = "minmax",
           act: str = "u8", reduce_range: bool = True, skip_convs: int = 0, hsdec: bool = False) -> Path:
    """ORT static int8 of ``src`` (quant_pre_process first, as distill.quantize does); op_types None:
    every op type ORT can quantise (its QLinear and QDQ registries). skip_convs: leave the first N Conv
    nodes (graph order) fp32. hsdec: decompose_hardsigmoid first (ValueError when there is none)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from distill.quantize import ArrayReader

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    extra = {"CalibTensorRangeSymmetric": False}
    if act == "s8":
        extra = {"ActivationSymmetric": True}
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        pre_process(src, pre)
        if hsdec and not decompose_hardsigmoid(pre):
            raise NotApplicable("no HardSwish/HardSigmoid in this tower (the file would be static_all's)")
        convs = [n.name for n in onnx.load(str(pre), load_external_data=False).graph.node if n.op_type == "Conv"]
        with QuietRoot():
            quantize_static(str(pre), str(dst), ArrayReader(calib, "pixels"), nodes_to_exclude=convs[:skip_convs],
                            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                            op_types_to_quantize=list(op_types) if op_types else None, per_channel=True,
                            reduce_range=reduce_range,
                            activation_type=QuantType.QInt8 if act == "s8" else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=methods[method], extra_options=extra)
    return dst


def build(name: str, src: Path, dst: Path, calib: list[np.ndarray], conv_tower: bool) -> Path:
    if name == "dynamic":
        return quantize_dynamic_onnx(src, dst, mode=DEFAULT_DYNAMIC_MODE,
                                     **({"op_types": ("MatMul", "Gemm")} if conv_tower else {}))
    if name == "static_conv":
        return quantize_static_onnx(src, dst, calib)
    kw = {"static_all": {}, "static_all_pct": {"method": "percentile"}, "static_all_entropy": {"method": "entropy"},
          "static_qop_all": {"fmt": "qop"}, "static_all_s8sym": {"act": "s8"},
          "static_all_norr": {"reduce_range": False}, "static_all_skip2": {"skip_convs": 2},
          "static_all_hsdec": {"hsdec": True}}[name]
    return static(src, dst, calib, **kw)


def graph_ops(path: Path) -> dict[str, int]:
    """Op-type counts of ORT's optimised graph (ORT_ENABLE_ALL, as timed), domain-prefixed when not ONNX."""
    model = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter((f"{n.domain}:" if n.domain not in ("", "ai.onnx") else "") + n.op_type
                                    for n in model.graph.node))


def summarise_ops(ops: dict[str, int]) -> dict[str, int]:
    get = lambda *names: sum(v for k, v in ops.items() if k.split(":")[-1] in names)  # noqa: E731
    return {"qdq": get("QuantizeLinear", "DequantizeLinear"), "dynamic_q": get("DynamicQuantizeLinear"),
            "int8_ops": sum(v for k, v in ops.items() if k.split(":")[-1].startswith("QLinear")
                            or k.split(":")[-1] in ("ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
                                                    "MatMulIntegerToFloat", "QGemm", "QAttention")),
            "fp32_convs": get("Conv", "FusedConv"), "transposes": get("Transpose", "ReorderInput", "ReorderOutput")}


def activation_scales(path: Path) -> dict[str, float]:
    """The per-tensor (one-value) scale initialisers of a QDQ/QOperator file: the calibrated activation ranges."""
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    return {i.name: float(numpy_helper.to_array(i).reshape(-1)[0]) for i in model.graph.initializer
            if i.name.endswith("_scale") and int(np.prod(i.dims)) == 1}


def family(run: Path, args, work: Path, t0: float) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    student = cfg["student"]["name"]
    vision = cfg["student"]["builder"]["vision"]
    conv_tower = vision.get("kind", "vit") != "vit"
    size = int(vision["image_size"])
    src = run / "export" / "onnx" / "image_encoder.onnx"
    out = work / student
    out.mkdir(parents=True, exist_ok=True)
    calib, x = views(size, args.calib, args.eval)
    files, errors, build_s = {"fp32": src}, {}, {}
    for name in args.variants:
        t = time.time()
        try:
            files[name] = build(name, src, out / f"{name}.onnx", calib, conv_tower)
        except NotApplicable as e:
            errors[name] = f"n/a: {e}"
        except Exception as e:  # noqa: BLE001  (a variant that does not build is a finding)
            errors[name] = f"did not build: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc()
        build_s[name] = round(time.time() - t, 1)
        print(f"[{time.time() - t0:.0f}s] {student} {name}: built in {build_s[name]} s", flush=True)
        gc.collect()

    sessions, ops = {}, {}
    for name, path in files.items():
        try:
            opt = out / f"{name}.optimized.onnx"
            timing_session(path, optimized=opt)  # a separate session writes the optimised graph
            ops[name] = graph_ops(opt)
            sessions[name] = timing_session(path)
        except Exception as e:  # noqa: BLE001
            errors[name] = f"did not load: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    emb = {}
    for name, s in list(sessions.items()):
        try:
            y = np.concatenate([s.run(None, {"pixels": x[i:i + 32]})[0] for i in range(0, len(x), 32)])
            emb[name] = y / np.linalg.norm(y, axis=-1, keepdims=True)
        except Exception as e:  # noqa: BLE001
            errors[name] = f"did not run: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            sessions.pop(name)
    one = x[:1]
    timed = common.interleaved_times({k: (lambda s=s: s.run(None, {"pixels": one})) for k, s in sessions.items()},
                                     rounds=args.rounds, per_round=args.per_round, warmup=args.warmup, settle_s=0.0)
    print(f"[{time.time() - t0:.0f}s] {student}: timed", flush=True)
    rows = []
    for name in ["fp32", *args.variants]:
        row = {"variant": name, "label": VARIANTS.get(name, "fp32 (reference)")}
        if name in errors:
            row["error"] = errors[name]
        if name in sessions:
            cos = (emb[name] * emb["fp32"]).sum(-1)
            t = [v for r in timed[name] for v in r]
            row.update({"cos_mean": round(float(cos.mean()), 5), "cos_min": round(float(cos.min()), 5),
                        "cos_fm": round(float(cos[:len(cos) - min(len(cos) // 4, 108)].mean()), 5),
                        **{k: v for k, v in common.summarise_times(t).items() if k in ("median_ms", "p90_ms")},
                        "round_medians_ms": [round(float(np.median(r)), 3) for r in timed[name]],
                        "size_mb": round(Path(files[name]).stat().st_size / 2 ** 20, 2),
                        **summarise_ops(ops[name]), "ops": ops[name], "build_s": build_s.get(name)})
        rows.append(row)
    ok = {r["variant"]: r for r in rows if "median_ms" in r}
    if "static_all" in ok:  # how many calibrated ranges a calibration method changed against min-max
        base = activation_scales(files["static_all"])
        for k in ("static_all_pct", "static_all_entropy"):
            if k in ok:
                other = activation_scales(files[k])
                ok[k]["scales_changed_vs_minmax"] = sum(1 for n, v in other.items()
                                                        if n in base and not np.isclose(v, base[n], rtol=1e-4))
                ok[k]["scales_compared"] = sum(1 for n in other if n in base)
    dyn = ok.get("dynamic")
    for r in ok.values():
        r["vs_fp32"] = round(ok["fp32"]["median_ms"] / r["median_ms"], 2)
        if dyn:
            r["vs_dynamic"] = round(dyn["median_ms"] / r["median_ms"], 2)
    good = [r for k, r in ok.items()
            if k.startswith("static") and k not in NOT_CANDIDATES and r["cos_mean"] >= MIN_COSINE]
    best = min(good, key=lambda r: r["median_ms"]) if good else None
    if best and dyn and best["median_ms"] < dyn["median_ms"]:
        rec = best["variant"]
        why = (f"{best['vs_dynamic']}x dynamic's speed at b1, cosine {best['cos_mean']:.4f}, "
               f"{best['size_mb']} MB vs {dyn['size_mb']} MB")
    else:
        rec = "dynamic"
        why = ("no static variant reaches cosine >= 0.99" if not best else
               f"the fastest static variant with cosine >= 0.99 ({best['variant']}, {best['median_ms']} ms) is "
               f"not faster than dynamic ({dyn['median_ms'] if dyn else '?'} ms)")
    for f in out.glob("*.optimized.onnx"):
        f.unlink()
    return {"student": student, "family": FAMILIES.get(student, student), "conv_tower": conv_tower,
            "image_size": size, "fp32_onnx": str(src), "rows": rows, "recommended": rec, "why": why}


# ----------------------------------------------------------------------------- report

def _cell(v, fmt="{}"):
    return "-" if v is None else fmt.format(v)


def shown_command(argv: list[str]) -> str:
    """The command line, less the --note texts (they are in the file's Notes section)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return common.command(out) + (" --note ..." if len(out) < len(argv) else "")


def report(args, fams: list[dict], minutes: float) -> list[str]:
    lines = [
        "# Static int8 of student image towers: op set, calibration, format (per tower family)", "",
        f"Command: `OMP_NUM_THREADS=1 {shown_command(args.argv)}`  ",
        f"Run took {minutes:.1f} min, finished {args.finished}.", "",
        f"Inputs: the fp32 image ONNX of each run folder in `{args.runs}` (the 80-step students of "
        "`int8_towers.md`: short-budget towers, so the cosine to fp32 measures numeric damage, not accuracy). "
        f"Calibration: {args.calib} training-like views (half inverted Fashion-MNIST training images, half Tux Paint "
        "training photos; seeded RandomResizedCrop, CLIP mean/std as the pipeline feeds the file), one view a "
        f"batch. Cosine: int8 vs fp32 embedding on {args.eval} other views (3/4 inverted Fashion-MNIST test images, "
        "1/4 Tux Paint validation photos, eval transform); `cos FM` is the Fashion-MNIST part alone. Latency: batch 1, "
        "onnxruntime CPU, 1 intra-op thread, ORT_ENABLE_ALL, the same session options for every variant, "
        f"{args.warmup} warm-up calls then {args.per_round} timed calls per round, {args.rounds} rounds with the "
        "variants interleaved (median of all timed calls). Q/DQ left: QuantizeLinear + DequantizeLinear nodes in "
        "ORT's optimised graph (DynamicQuantizeLinear counted apart, `dyn-q`); int8 ops: QLinear*/ConvInteger/"
        "MatMulInteger/DynamicQuantizeMatMul/QGemm nodes there; fp32 conv: Conv/FusedConv (incl. NCHWc) there; "
        "transp.: Transpose/Reorder nodes there (layout changes).", "",
        "**Timings are one thread on a shared 2-core Xeon (two training runs on the other core and this one): "
        "absolute ms carry noise, compare ratios within one family (its variants were timed in interleaved "
        "rounds in one process).**", "",
        f"Variants: {'; '.join(f'`{k}` = {VARIANTS[k]}' for k in args.variants)}. All static variants: int8 "
        "per-channel weights with reduce_range (but g), uint8 activations (but f), after quant_pre_process. "
        "\"All ops\" = op_types_to_quantize=None (ORT's QLinear + QDQ registries: Conv, MatMul, Gemm, Add, Mul, "
        "Relu, Clip, Sigmoid, GlobalAveragePool, Concat, Softmax, Reshape, Transpose, ...; not HardSwish, "
        "HardSigmoid, Gelu, ReduceMean, Div).", "",
        f"Rule: the fastest static variant with mean cosine >= {MIN_COSINE} when it is faster than dynamic at b1, "
        "else dynamic; g (no reduce_range) is not a candidate: the shipped file must stay exact on AVX2 CPUs "
        "without VNNI, which reduce_range is for.", "",
    ]
    for f in fams:
        lines += [f"## {f['family']} (`{f['student']}`, {'conv' if f['conv_tower'] else 'ViT'} tower, "
                  f"{f['image_size']} px)", "",
                  "| variant | cos mean | cos min | cos FM | b1 ms | x fp32 | x dynamic | MB | Q/DQ left | dyn-q | "
                  "int8 ops | fp32 conv | transp. |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in f["rows"]:
            if "median_ms" not in r:
                lines.append(f"| {r['label']} | {r.get('error', '-')} |||||||||||| ")
                continue
            mark = "**" if r["variant"] == f["recommended"] else ""
            lines.append(
                f"| {mark}{r['label']}{mark} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['cos_fm']:.4f} | "
                f"{r['median_ms']:.2f} | {_cell(r.get('vs_fp32'), '{:.2f}')} | {_cell(r.get('vs_dynamic'), '{:.2f}')} | "
                f"{r['size_mb']:.2f} | {r['qdq']} | {r['dynamic_q']} | {r['int8_ops']} | {r['fp32_convs']} | "
                f"{r['transposes']} |")
        by = {r["variant"]: r for r in f["rows"] if "median_ms" in r}
        reading = []
        if "static_conv" in by and "static_all" in by:
            b, c = by["static_conv"], by["static_all"]
            reading.append(f"all ops vs Conv/MatMul/Gemm only: Q/DQ left {b['qdq']} -> {c['qdq']}, "
                           f"b1 {b['median_ms']:.2f} -> {c['median_ms']:.2f} ms ({b['median_ms'] / c['median_ms']:.2f}x), "
                           f"cosine {b['cos_mean']:.4f} -> {c['cos_mean']:.4f}")
        for k, name in (("static_all_pct", "percentile"), ("static_all_entropy", "entropy")):
            if k in by and "scales_compared" in by[k]:
                reading.append(f"{name} calibration changed {by[k]['scales_changed_vs_minmax']} of "
                               f"{by[k]['scales_compared']} activation ranges against min-max")
        lines += ["", *[f"- {x}" for x in reading], "", f"Recommended: **{f['recommended']}** ({f['why']}).", ""]
    lines += ["## Recommendation per family", "",
              "| family | recommended | why |", "|---|---|---|",
              *[f"| {f['family']} (`{f['student']}`) | {f['recommended']} | {f['why']} |" for f in fams], ""]
    if args.note:
        lines += ["## Notes", "", *[f"- {n}" for n in args.note], ""]
    return lines


def main(argv=None) -> None:
    ap = common.parser(__doc__, "int8_static_opsets.md", smoke=False)
    ap.add_argument("runs", nargs="?", default="/tmp/i8/full", help="folder of run folders (one per tower family)")
    ap.add_argument("--students", nargs="*", default=None, help="only these run folders (student names)")
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=30)
    ap.add_argument("--note", action="append", default=[], help="a Markdown note for the results file (repeatable)")
    ap.add_argument("--work", default=None, help="folder for the int8 files (default: a new temporary one)")
    ap.add_argument("--rewrite", action="store_true",
                    help="measure nothing: rewrite the Markdown from the JSON beside --out (e.g. with new --note texts)")
    args = common.parse(ap, argv)
    if args.rewrite:
        old = common.load_json(args.out)
        if not old:
            raise SystemExit(f"--rewrite: no JSON beside {args.out}")
        for k in ("runs", "calib", "eval", "warmup", "rounds", "per_round", "variants"):  # the measured run's settings
            setattr(args, k, old["settings"][k])
        args.argv, args.finished = old["argv"], old["finished"]
        common.write_results(args.out, report(args, old["families"], old["minutes"]),
                             data={**old, "notes": args.note}, env=old["environment"])
        return
    torch.set_num_threads(1)
    t0 = time.time()
    runs = sorted(p.parent.parent.parent for p in Path(args.runs).glob("*/export/onnx/image_encoder.onnx"))
    if args.students:
        runs = [r for r in runs if r.name in args.students]
    if not runs:
        raise SystemExit(f"no run folders with export/onnx/image_encoder.onnx in {args.runs}")
    order = list(FAMILIES)
    runs.sort(key=lambda r: order.index(r.name) if r.name in order else len(order))
    work = Path(args.work or tempfile.mkdtemp(prefix="int8_opsets_"))
    fams = []
    for run in runs:
        fams.append(family(run, args, work, t0))
        for r in fams[-1]["rows"]:
            print({k: r.get(k) for k in ("variant", "cos_mean", "median_ms", "size_mb", "qdq", "error")}, flush=True)
    minutes = (time.time() - t0) / 60
    args.finished = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    env = {**common.environment(), "ort_intra_op_threads": 1, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "load_average": os.getloadavg()}
    common.write_results(args.out, report(args, fams, minutes),
                         data={"command": shown_command(args.argv), "notes": args.note, "argv": args.argv,
                               "finished": args.finished,
                               "settings": {k: getattr(args, k) for k in ("runs", "calib", "eval", "warmup", "rounds",
                                                                          "per_round", "variants")}, "minutes": round(minutes, 2),
                               "work": str(work), "families": fams}, env=env)


if __name__ == "__main__":
    main()
