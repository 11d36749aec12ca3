"""Phone/NPU files of an edge bundle (distill.mobile.write_mobile_files): cost, sizes, CPU latency,
parity and NNAPI/CoreML coverage.

    .venv/bin/python benchmarks/bench_mobile.py --threads 2
    .venv/bin/python benchmarks/bench_mobile.py --smoke     # the tiny student in both roles, a few photos

Two students, **random init** (seed 0; sizes, latency, operator coverage and the numeric damage of
each format do not need trained weights, accuracy does):
- the offline experiment's student (conf/student/vit_w192_d6_p32_160.yaml, embed 384): how long
  write_mobile_files adds to an export, to decide whether export.mobile is on by default;
- the flagship shape (conf/student/vit_w384_d6_p32.yaml, embed 512): file sizes, batch-1 latency of
  every image-tower format under onnxruntime's CPU provider (interleaved rounds, medians), parity to
  fp32 and the share of nodes NNAPI / CoreML would take, at dynamic batch and with batch1=True.
Calibration: Tux Paint photos (Debian package tuxpaint-stamps-default), 64 (export.int8.calibration_images)
for the offline student and 32 for the flagship; parity on 32 *other* photos.
Writes benchmarks/results/mobile_files.md.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import common
import numpy as np
import open_clip
import torch
from PIL import Image

from distill import mobile
from distill.edge import preprocess_image
from distill.bundle import write_bundle
from distill.export import default_preprocess, export_onnx
from distill.onnx_tools import cosines, session
from distill.quantize import quantize_dynamic_onnx
from distill.students import build_student

STUDENTS = {  # (embed_dim, vision, text) as in the conf/student files
    "offline w192/d6/p32 160px": (384, {"width": 192, "layers": 6, "heads": 3, "patch_size": 32, "image_size": 160},
                                  {"width": 64, "layers": 3, "heads": 2, "context_length": 32}),
    "flagship w384/d6/p32 224px": (512, {"width": 384, "layers": 6, "heads": 6, "patch_size": 32, "image_size": 224},
                                   {"width": 256, "layers": 4, "heads": 4, "context_length": 77}),
    "tiny w64/d2/p8 32px": (64, {"width": 64, "layers": 2, "heads": 2, "patch_size": 8, "image_size": 32},
                            {"width": 32, "layers": 1, "heads": 2, "context_length": 32}),
}
OFFLINE, FLAGSHIP = "offline w192/d6/p32 160px", "flagship w384/d6/p32 224px"
LABELS = ["a photo of a dog.", "a photo of a cat.", "a photo of a car.", "a photo of an apple.", "a photo of a bus."]


def make_bundle(name: str, work: Path) -> tuple[Path, int]:
    """Export the student as the pipeline does (exporter auto, dynamic int8) and write its bundle."""
    embed, vision, text = STUDENTS[name]
    torch.manual_seed(0)
    model, _ = build_student(embed, vision, text)
    model.eval()
    size, ctx = vision["image_size"], text["context_length"]
    info = export_onnx(model, work / "onnx", image_size=size, context_length=ctx)
    int8 = quantize_dynamic_onnx(info["image"]["path"], work / "onnx" / "image_encoder.int8.onnx")
    with torch.no_grad():
        cls = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(LABELS, context_length=ctx)), dim=-1)
    b = write_bundle(work / "bundle", image_onnx=info["image"]["path"], image_int8_onnx=int8,
                     text_onnx=info["text"]["path"], class_embeddings=cls.numpy(), labels=LABELS,
                     preprocess=default_preprocess(size), context_length=ctx)
    return b, size


def load(files: list[str], size: int) -> np.ndarray:
    pre = default_preprocess(size)
    return np.stack([preprocess_image(Image.open(f), pre) for f in files])


def mb(path: Path) -> float:
    return round(path.stat().st_size / 2 ** 20, 2)


def latency(files: dict[str, Path], x: np.ndarray, threads: int, rounds: int, per_round: int) -> dict[str, float]:
    """Median ms per call at batch 1, interleaved rounds (a busy phase of the shared cores hits all alike)."""
    sess = {k: session(p, threads=threads) for k, p in files.items()}
    names = {k: s.get_inputs()[0].name for k, s in sess.items()}
    timed = common.interleaved_times({k: (lambda k=k: sess[k].run(None, {names[k]: x})) for k in sess},
                              rounds=rounds, per_round=per_round, warmup=3, settle_s=0.3)
    return {k: round(statistics.median([t for r in v for t in r]), 2) for k, v in timed.items()}


def flagship_rows(bundle: Path, b1: Path, held: np.ndarray, args) -> tuple[list[dict], dict]:
    """Image-tower formats at batch 1: size, median latency, min cosine to fp32 on the held-out photos."""
    m, m1 = bundle / "mobile", b1 / "mobile"
    files = {"fp32 .onnx (bundle)": bundle / "image_encoder.onnx",
             "dynamic int8 .onnx (bundle, CPU provider only)": bundle / "image_encoder.int8.onnx",
             "static QDQ int8 .onnx": m / "image_encoder.qdq_int8.onnx", "fp16 .onnx": m / "image_encoder.fp16.onnx",
             "fp32 .ort": m / "image_encoder.ort", "static QDQ int8 .ort": m / "image_encoder.qdq_int8.ort",
             "fp32 .ort, batch-1 shapes": m1 / "image_encoder.b1.ort",
             "static QDQ int8 .ort, batch-1 shapes": m1 / "image_encoder.b1.qdq_int8.ort"}
    ms = latency(files, held[:1], args.threads, args.rounds, args.per_round)
    ref = np.concatenate([session(files["fp32 .onnx (bundle)"]).run(None, {"pixels": held[i:i + 1]})[0]
                          for i in range(len(held))])
    rows = []
    for k, p in files.items():
        s = session(p)
        got = np.concatenate([s.run(None, {"pixels": held[i:i + 1]})[0] for i in range(len(held))])
        rows.append({"file": k, "name": p.name, "size_mb": mb(p), "median_ms": ms[k],
                     "vs_fp32": round(ms["fp32 .onnx (bundle)"] / ms[k], 2),
                     "min_cos_fp32": round(float(cosines(got, ref).min()), 5)})
    text = {"fp32 .onnx (bundle)": bundle / "text_encoder.onnx", "fp16 .onnx": m / "text_encoder.fp16.onnx",
            "fp32 .ort": m / "text_encoder.ort"}
    from distill.tokenizer_np import NumpyTokenizer

    tokens = NumpyTokenizer.from_dir(bundle / "tokenizer")(["a photo of a red double-decker bus."])
    tms = latency(text, tokens, args.threads, args.rounds, args.per_round)
    return rows, {k: {"name": p.name, "size_mb": mb(p), "median_ms": tms[k]} for k, p in text.items()}


def coverage_lines(res: dict, res1: dict) -> list[str]:
    lines = ["| file | NNAPI % nodes (partitions) | CoreML NeuralNetwork % | CoreML MLProgram % | NNAPI if batch fixed "
             "| ops NNAPI lacks |", "|---|---:|---:|---:|---:|---|"]
    for r in (res, res1):
        for f, eps in r["usability"].items():
            cell = [f"{v['supported_pct']} ({v['partitions']}, {v['suitability']})" for v in eps.values()]
            fixed = eps["NNAPI"].get("if_shapes_fixed")
            lines.append(f"| {f} | {' | '.join(cell)} | "
                         f"{'—' if fixed is None else str(fixed['supported_pct']) + ' (' + str(fixed['partitions']) + ')'} | "
                         f"{', '.join(o.split(':')[-1] for o in eps['NNAPI']['unsupported_ops'])} |")
    return lines


def _reading(rows: list[dict]) -> str:
    """What this run's latencies say, with the figures (the cores are shared: small gaps are noise)."""
    ms = {r["file"]: r["median_ms"] for r in rows}
    cos = {r["file"]: r["min_cos_fp32"] for r in rows}
    return "\n".join([
        f"- The .ort files hold the graph onnxruntime runs for the .onnx (cosine 1.0, same kernels): fp32 .ort "
        f"{ms['fp32 .ort']} ms vs .onnx {ms['fp32 .onnx (bundle)']} ms here, a gap of shared-core noise. What they "
        "buy is loading without the ONNX parser, i.e. a reduced build with only required_operators.config's kernels.",
        f"- fp16 is for GPU/NPU providers: on this CPU {ms['fp16 .onnx']} ms vs fp32 {ms['fp32 .onnx (bundle)']} ms "
        "(the CPU provider casts around the fp16 ops it lacks).",
        f"- Static QDQ int8: {ms['static QDQ int8 .onnx']} ms (.onnx) / {ms['static QDQ int8 .ort']} ms (.ort) vs dynamic "
        f"int8 {ms['dynamic int8 .onnx (bundle, CPU provider only)']} ms on this CPU; it is the int8 form NPU providers "
        f"take. Min cosine to fp32 on held-out photos {cos['static QDQ int8 .onnx']} (dynamic int8 "
        f"{cos['dynamic int8 .onnx (bundle, CPU provider only)']}), well above the {mobile.INT8_TOL} threshold."])


def main(argv=None) -> int:
    ap = common.parser(__doc__, "mobile_files.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--photos", type=int, default=96, help="Tux Paint photos picked, evenly spread")
    ap.add_argument("--calibration", type=int, default=64, help="calibration views for the first student")
    ap.add_argument("--held", type=int, default=32, help="the second student's calibration and held-out photos, each")
    ap.add_argument("--students", nargs=2, default=[OFFLINE, FLAGSHIP], choices=list(STUDENTS),
                    metavar=("COST", "FORMATS"), help="the student whose cost is measured, the one whose formats are")
    args = common.parse(ap, argv, smoke=dict(rounds=1, per_round=2, photos=32, calibration=16, held=16,
                                             students=["tiny w64/d2/p8 32px"] * 2))
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pics = common.stamp_photos(args.photos)
    work = common.scratch(args, "bench_mobile_")
    cost = {}
    # the first student: what export.mobile adds to a run, at the pipeline's calibration size
    b, size = make_bundle(args.students[0], work / "offline")
    before = sum(p.stat().st_size for p in b.rglob("*") if p.is_file())
    x = load(pics, size)
    c = args.calibration
    t = time.perf_counter()
    res_off = mobile.write_mobile_files(b, calibration=[x[i:i + 1] for i in range(c)], check_images=x[c:c + 16],
                                        threads=args.threads)
    cost["offline"] = {"seconds": round(time.perf_counter() - t, 1), "bundle_mb_before": round(before / 2 ** 20, 1),
                       "mobile_mb": round(sum(res_off["files"].values()) / 2 ** 20, 1)}
    print(f"[{time.time() - t0:.0f}s] {args.students[0]}: {cost['offline']}", flush=True)
    # the second student: dynamic batch, then batch-1 files in a copy of the bundle
    b, size = make_bundle(args.students[1], work / "flagship")
    h = args.held
    x = load(pics[:2 * h], size)
    calib, held = [x[i:i + 4] for i in range(0, h, 4)], x[h:2 * h]
    b1 = Path(shutil.copytree(b, work / "flagship" / "bundle_b1"))
    t = time.perf_counter()
    res = mobile.write_mobile_files(b, calibration=calib, check_images=held, threads=args.threads)
    cost["flagship"] = {"seconds": round(time.perf_counter() - t, 1)}
    t = time.perf_counter()
    res1 = mobile.write_mobile_files(b1, calibration=calib, check_images=held, batch1=True, threads=args.threads)
    cost["flagship_batch1"] = {"seconds": round(time.perf_counter() - t, 1)}
    print(f"[{time.time() - t0:.0f}s] {args.students[1]} mobile files written", flush=True)
    rows, text = flagship_rows(b, b1, held, args)
    print(f"[{time.time() - t0:.0f}s] timed", flush=True)
    write_report(args, t0, cost, rows, text, res, res1, res_off)
    shutil.rmtree(work)  # several hundred MB of models
    return 0


def write_report(args, t0: float, cost: dict, rows: list[dict], text: dict, res: dict, res1: dict, res_off: dict) -> None:
    env = {**common.environment(), "ort_intra_op_threads": args.threads}
    first, second = args.students
    flags = set(env.get("cpu_flags") or [])
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags)
    domains = sorted({d for r in (res, res1) for ops in r["ort_ops"].values() for d in ops})
    contrib = sorted({o for r in (res, res1) for ops in r["ort_ops"].values() for o in ops.get("com.microsoft", [])})
    lines = [
        "# Phone/NPU files of the edge bundle (distill/mobile.py)", "",
        f"Command: `{common.command(args.argv)}`, {time.strftime('%Y-%m-%d %H:%M')}, {time.time() - t0:.0f} s in all.  ",
        f"CPU: {env.get('cpu')} ({isa or 'no AVX2'}; {env.get('usable_cores')} usable cores), {args.threads} ORT "
        f"intra-op threads, onnxruntime {env.get('onnxruntime')}, torch {env.get('torch')}, onnx {env.get('onnx')}.  ",
        "Students at **random init** (seed 0): sizes, latency, operator coverage and the numeric damage of each "
        "format are measured; accuracy is not. The 2 cores are shared with other jobs: medians over interleaved "
        "rounds, ratios within this run.", "",
        "## Cost of `export.mobile.enabled=true`", "",
        "| student | write_mobile_files s | bundle MB before | mobile/ MB |", "|---|---:|---:|---:|",
        f"| {first}, {args.calibration} calibration views | {cost['offline']['seconds']} | "
        f"{cost['offline']['bundle_mb_before']} | {cost['offline']['mobile_mb']} |",
        f"| {second}, dynamic batch | {cost['flagship']['seconds']} | | "
        f"{round(sum(res['files'].values()) / 2 ** 20, 1)} |",
        f"| {second}, batch1=true | {cost['flagship_batch1']['seconds']} | | {round(sum(res1['files'].values()) / 2 ** 20, 1)} |",
        "", f"## {second}: image tower at batch 1 (CPU provider)", "",
        f"{args.rounds} interleaved rounds x {args.per_round} calls each; cosine: min over {args.held} held-out Tux "
        f"Paint photos to the fp32 .onnx (static QDQ calibrated on {args.held} other photos).", "",
        "| format | file | MB | median ms | speed-up vs fp32 | min cosine to fp32 |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['file']} | {r['name']} | {r['size_mb']} | {r['median_ms']} | {r['vs_fp32']}x | {r['min_cos_fp32']} |"
              for r in rows]
    lines += ["", "Text tower, one prompt:", "", "| format | file | MB | median ms |", "|---|---|---:|---:|"]
    lines += [f"| {k} | {v['name']} | {v['size_mb']} | {v['median_ms']} |" for k, v in text.items()]
    lines += ["", "## Parity checks write_mobile_files ran (min cosine, threshold)", "",
              "| student | file | against | min cosine | threshold | rows |", "|---|---|---|---:|---:|---:|"]
    for who, r in (("offline", res_off), ("flagship", res), ("flagship b1", res1)):
        lines += [f"| {who} | {k} | {v['against']} | {v['min_cosine']} | {v['tol']} | {v['rows']} |"
                  for k, v in r["parity"].items()]
    lines += ["", "## Nodes NNAPI and CoreML would take (onnxruntime's usability checker)", "",
              "Per file: % of nodes (partitions, ORT's verdict). The last column: NNAPI if the dynamic batch were "
              "fixed (the checker's own second pass).", ""] + coverage_lines(res, res1)
    lines += ["", "## Reading", "",
              f"- Cost: {cost['offline']['seconds']} s for {first}; its mobile/ folder is "
              f"{cost['offline']['mobile_mb']} MB next to a {cost['offline']['bundle_mb_before']} MB bundle. Static "
              "int8 cannot calibrate on a training stream, so a streamed run's bundle goes without that file.",
              "- NPUs need batch1=true: at dynamic batch NNAPI and CoreML take almost nothing (every shape is dynamic); "
              "with batch-1 shapes they take most nodes, yet in many partitions (each op they lack splits the graph), "
              "which onnxruntime's checker judges slower than the CPU. The ops they lack are in the last column.",
              _reading(rows),
              "", "## Operators in the .ort files", "",
              f"Domains: {', '.join(domains)}. com.microsoft ops: {', '.join(contrib)} (contrib kernels of every CPU "
              f"build, ARM included). x86-only domains ({', '.join(mobile.X86_ONLY_DOMAINS)}): none — each .ort is read "
              "op by op from its flatbuffer and write_mobile_files refuses one that has them. Reduced-build config "
              f"(`{res['required_operators']['file']}`): " + "; ".join(
                  f"{d}: {', '.join(o)}" for d, o in res["required_operators"]["ops"].items())]
    data = {"cost": cost, "image_formats": rows, "text_formats": text,
            "parity": {"first": res_off["parity"], "second": res["parity"], "second_b1": res1["parity"]}}
    common.write_results(args.out, lines, data=json.loads(json.dumps(data, default=str)), env=env)
    print("\n".join(lines[:60]))


if __name__ == "__main__":
    sys.exit(main())
