"""Static (QDQ) against dynamic int8 image towers, per student tower family: zero-shot top-1, cosine to the
fp32 ONNX student, image latency and file size, and which int8 form to ship for each family.

    .venv/bin/python benchmarks/bench_int8_towers.py [--towers a,b,...] [--steps N] [--batch B] [--work DIR] [-- overrides]
    .venv/bin/python benchmarks/bench_int8_towers.py --smoke      # two tiny students, 2 steps

Dynamic int8 (`student_onnx_int8`, onnxruntime's quantize_dynamic) quantises only MatMul/Gemm of a conv
image tower (`distill.variants.int8_ops`: dynamic ConvInteger is slow and moves a pretrained conv tower
far from fp32), so for a conv tower it leaves the convolutions in fp32. Static QDQ int8
(`student_onnx_static_int8`) quantises MatMul/Gemm/Conv with activation ranges calibrated on
`export.int8.calibration_images` training views; both variants ship the same dynamic int8 text tower.

Each tower is one short `python -m distill +experiment=offline student=NAME` run in its own process and
folder, every tower with the same data, steps, batch and text tower (the flagship's width-64 text
transformer, so only the image tower differs), one thread throughout (`threads=1 bench.threads=1`,
OMP_NUM_THREADS=1), the four variants teacher_torch_fp32, student_onnx_fp32, student_onnx_int8 and
student_onnx_static_int8. All runs share one teacher cache folder. Per int8 form, from report.json:
Fashion-MNIST zero-shot top-1 with its 95% interval, its change against student_onnx_fp32 (points),
image cosine and top-1 agreement with student_onnx_fp32 ("agreement_own"), image b1 / b32 median latency
(the bench's interleaved rounds) and the image file's size.

Recommendation per family: static where it is at least --min-speedup (1.2x) faster than dynamic at
batch 1 and loses at most --max-extra-loss (0.5) points of top-1 more than dynamic; else dynamic.

A run that fails is recorded with its one-line reason and the next tower runs. Results are written after
every tower; --budget-min starts no new tower once that many minutes have passed (the rest are listed
as left out). --work keeps the run folders: a tower whose report.json is already there is read, not rerun.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

# the shipped ViT first, then the conv families from the cheapest training step to the dearest
TOWERS = ["vit_w192_d6_p32_160", "mobilenetv4_conv_small", "efficientvit_b0", "lcnet_100", "repvit_m0_9",
          "efficientnet_lite0_pretrained", "fastvit_t8"]
FAMILY = {"vit_w192_d6_p32_160": "ViT (open_clip)", "mobilenetv4_conv_small": "MobileNetV4", "efficientvit_b0":
          "EfficientViT", "lcnet_100": "PP-LCNet", "repvit_m0_9": "RepViT", "fastvit_t8": "FastViT",
          "efficientnet_lite0_pretrained": "EfficientNet-Lite (ImageNet start)", "efficientnet_lite0":
          "EfficientNet-Lite (random start)", "tiny": "tiny ViT (smoke)", "tiny_timm": "tiny timm (smoke)"}
DYN, STATIC, FP32 = "student_onnx_int8", "student_onnx_static_int8", "student_onnx_fp32"
VARIANTS = f"variants=[teacher_torch_fp32,{FP32},{DYN},{STATIC}]"
TEXT = ["student.builder.text.width=64", "student.builder.text.layers=3", "student.builder.text.heads=2",
        "student.builder.text.context_length=32"]  # the flagship's text tower, for every student
CHANCE = 10.0  # Fashion-MNIST's 10 classes: top-1 of a student that has learnt nothing
COSINE_CAUTION = 0.99  # a static form below this cosine to fp32 is flagged, whatever the top-1 says
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def base_overrides(args) -> list[str]:
    """The Hydra overrides every tower's run shares (the data, budget and bench of this comparison)."""
    common_ = ["threads=1", "bench.threads=1", "export.mobile.enabled=false", "++bench.ceilings=false",
               "train.progress=false", VARIANTS, f"train.steps={args.steps}", f"train.batch_size={args.batch}",
               f"bench.batch_sizes=[1,{args.big_batch}]"]
    if args.smoke:
        return ["+experiment=smoke", "student.token_init=random", *common_, "bench.repeats=1", "bench.rounds=1",
                "bench.warmup=0", "bench.settle_s=0.0", "export.int8.calibration_images=8"]
    return ["+experiment=offline", *TEXT, *common_, f"train.scheduler.warmup_steps={max(1, args.steps // 10)}",
            f"data.train.sources.0.per_class={args.fm_train}", f"data.train.sources.1.times={args.tux_times}",
            f"+data.eval.classification.0.source.per_class={args.fm_test}", "data.eval.general=null"]


def _fm_key(variant: dict) -> str | None:
    zs = variant.get("zeroshot") or {}
    return next((k for k in zs if k.startswith("fashion")), next(iter(zs), None))


def _mb(path: str | None) -> float | None:
    return round(os.path.getsize(path) / 1e6, 3) if path and os.path.exists(path) else None


def form_figures(report: dict, name: str, fp32_top1: float | None) -> dict[str, Any]:
    """One student variant's figures, or its status and reason when it failed."""
    v = report["variants"].get(name)
    if v is None:
        return {"status": "missing", "reason": "not in report.json"}
    if v.get("status") != "ok":
        return {"status": v.get("status", "?"), "reason": v.get("reason", "?")}
    fm = _fm_key(v)
    zs = v["zeroshot"][fm]
    own = (v.get("agreement_own") or {}).get(fm, {})
    lat = v["latency"]
    exp = report.get("export", {})
    image = {FP32: (exp.get("onnx") or {}).get("image", {}).get("path"),
             DYN: (exp.get("onnx_int8") or {}).get("image"), STATIC: exp.get("onnx_image_static_int8")}[name]
    big = max(int(k[len("image_b"):-len("_median_ms")]) for k in lat if re.fullmatch(r"image_b\d+_median_ms", k))
    return {"status": "ok", "eval_set": fm, "top1": 100 * zs["top1"], "top1_ci95": [100 * x for x in zs["top1_ci95"]],
            "delta_points": None if fp32_top1 is None else 100 * zs["top1"] - fp32_top1,
            "cosine": own.get("image_cosine"), "top1_agreement": None if own.get("top1") is None else 100 * own["top1"],
            "b1_ms": lat["image_b1_median_ms"], "big_batch": big, "bbig_ms": lat[f"image_b{big}_median_ms"],
            "files_mb": v.get("size_mb"), "image_mb": _mb(image)}


def tower_figures(report: dict) -> dict[str, Any]:
    v = report["variants"]
    teacher = v.get("teacher_torch_fp32", {})
    fp = form_figures(report, FP32, None)
    fp32_top1 = fp.get("top1")
    out = {"teacher_top1": 100 * teacher["zeroshot"][_fm_key(teacher)]["top1"] if teacher.get("status") == "ok" else None,
           "fp32": fp, "dynamic": form_figures(report, DYN, fp32_top1), "static": form_figures(report, STATIC, fp32_top1),
           "run_minutes": report.get("run_minutes"), "tower_kind": (report.get("student") or {}).get("name")}
    return out


def recommend(t: dict, min_speedup: float, max_extra_loss: float) -> tuple[str, str]:
    """-> (method, why) by the rule: static where >= min_speedup faster at b1 and at most max_extra_loss
    points of top-1 lost beyond dynamic's; else dynamic."""
    d, s = t["dynamic"], t["static"]
    if d.get("status") != "ok" and s.get("status") != "ok":
        return "-", "both int8 forms failed"
    if s.get("status") != "ok":
        return "dynamic", "static failed"
    if d.get("status") != "ok":
        return "static", "dynamic failed"
    speed = d["b1_ms"] / s["b1_ms"]
    extra = d["top1"] - s["top1"]  # points static loses beyond dynamic (same images, same fp32 student)
    half = (s["top1_ci95"][1] - s["top1_ci95"][0]) / 2
    noise = "within" if abs(extra) <= half else "outside"
    fp = t["fp32"]
    chance = fp.get("status") == "ok" and fp["top1_ci95"][0] <= CHANCE
    if speed >= min_speedup and extra <= max_extra_loss:
        caution = s.get("cosine") is not None and s["cosine"] < COSINE_CAUTION
        return "static", (f"{speed:.2f}x faster at b1, {extra:+.2f} points vs dynamic"
                          + ("; fp32 not above chance, so the top-1 test is empty" if chance else "")
                          + (f"; **caution: static cosine {s['cosine']:.4f} < {COSINE_CAUTION}**" if caution else ""))
    why = []
    if speed < min_speedup:
        why.append(f"only {speed:.2f}x at b1 (< {min_speedup}x)")
    if extra > max_extra_loss:
        why.append(f"loses {extra:.2f} points more than dynamic (> {max_extra_loss}; {noise} the ±{half:.1f} interval)")
    return "dynamic", "; ".join(why)


def _failure_reason(log: Path) -> str:
    """The last exception line of a failed run's log."""
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    err = [x for x in lines if re.match(r"^[\w.]*(Error|Exception)\b|^error:", x)]
    return (err[-1] if err else (lines[-1] if lines else "no output"))[:300]


def run_tower(args, name: str, work: Path, cache: Path) -> dict[str, Any]:
    out = work / name
    report = out / "report.json"
    cmd = [sys.executable, "-m", "distill", *base_overrides(args), f"student={name}", f"out_dir={out}",
           *args.overrides]
    reused = report.exists()
    if not reused:
        log = work / f"{name}.log"
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.call(cmd, cwd=common.REPO, stdout=f, stderr=subprocess.STDOUT,
                                 env={**os.environ, **ONE_THREAD, "DISTILL_CACHE_DIR": str(cache)})
        wall = time.time() - t0
        (work / f"{name}.wall_s").write_text(f"{wall:.1f}\n")
        if rc != 0 or not report.exists():
            return {"status": "failed", "reason": f"exit {rc}: {_failure_reason(log)}", "wall_s": round(wall, 1),
                    "log": str(log)}
    else:  # read, not rerun: the wall time the run took, when the harness recorded it
        kept = work / f"{name}.wall_s"
        wall = float(kept.read_text()) if kept.exists() else None
    rep = json.loads(report.read_text())
    return {"status": "ok", "wall_s": None if wall is None else round(wall, 1), "report": str(report),
            "reused": reused, **tower_figures(rep)}


def main() -> None:
    ap = common.parser(__doc__, "int8_towers.md")
    ap.add_argument("--towers", default=",".join(TOWERS))
    ap.add_argument("--steps", type=int, default=100, help="train.steps of every tower's run")
    ap.add_argument("--batch", type=int, default=16, help="train.batch_size of every tower's run")
    ap.add_argument("--big-batch", type=int, default=32, help="the larger batch the bench times (besides 1)")
    ap.add_argument("--fm-train", type=int, default=50, help="Fashion-MNIST training images per class")
    ap.add_argument("--tux-times", type=int, default=1, help="times the Tux Paint training photos repeat")
    ap.add_argument("--fm-test", type=int, default=100, help="Fashion-MNIST test images per class (zero-shot)")
    ap.add_argument("--min-speedup", type=float, default=1.2)
    ap.add_argument("--max-extra-loss", type=float, default=0.5)
    ap.add_argument("--budget-min", type=float, default=None, help="start no new tower after this many minutes")
    ap.add_argument("--work", default=None, help="folder for the runs and their logs (default: a temporary one)")
    ap.add_argument("--read-only", action="store_true",
                    help="only read the runs already in --work (a tower without one is listed as left out)")
    ap.add_argument("--note", default=None, help="a line of context for the results file (e.g. what else ran on the machine)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = common.parse(ap, smoke={"towers": "tiny,tiny_timm", "steps": 2, "batch": 8, "big_batch": 4})
    import torch

    torch.set_num_threads(1)  # the environment block records the one thread every run used
    work = Path(args.work) if args.work else common.scratch(args, "bench_int8_towers_")
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "teacher.cache"
    towers = args.towers.split(",")
    started = time.time()
    rows: dict[str, dict] = {}
    for name in towers:
        if args.budget_min is not None and (time.time() - started) / 60 > args.budget_min:
            rows[name] = {"status": "left out", "reason": f"time budget ({args.budget_min:g} min) spent"}
            continue
        if args.read_only and not (work / name / "report.json").exists():
            rows[name] = {"status": "left out", "reason": f"no run in {work} (not run for time)"}
            continue
        print(f"[{(time.time() - started) / 60:5.1f} min] {name}", flush=True)
        rows[name] = run_tower(args, name, work, cache)
        if rows[name]["status"] == "ok":
            rows[name]["recommend"], rows[name]["why"] = recommend(rows[name], args.min_speedup, args.max_extra_loss)
        print(f"  -> {rows[name]['status']} {rows[name].get('recommend', rows[name].get('reason', ''))} "
              f"({rows[name].get('wall_s')} s)", flush=True)
        rows[name]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        write(args, rows, towers, time.time() - started)
    write(args, rows, towers, time.time() - started)  # the towers left out, too


def _f(x: Any, nd: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def _pair(t: dict, key: str, nd: int = 2, signed: bool = False) -> str:
    """"dynamic / static" of one figure, a failed form as its status."""
    return " / ".join(_f(t[f].get(key), nd, signed) if t[f].get("status") == "ok" else t[f].get("status", "?")
                      for f in ("dynamic", "static"))


def reading(done: dict[str, dict]) -> list[str]:
    """What the table says, from its own figures."""
    both = {n: r for n, r in done.items() if r["dynamic"].get("status") == r["static"].get("status") == "ok"}
    if not both:
        return []
    out = ["", "Reading (from the figures above):", ""]
    for method in ("static", "dynamic"):
        names = [n for n, r in done.items() if r.get("recommend") == method]
        out.append(f"- {method}: {', '.join(f'`{n}`' for n in names) or 'none'}")
    chance = [n for n, r in both.items() if r["fp32"].get("status") == "ok" and r["fp32"]["top1_ci95"][0] <= CHANCE]
    if chance:
        out.append(f"- fp32 top-1 is not above chance (its interval reaches {CHANCE:g}% or less) for {len(chance)} of "
                   f"{len(both)} towers "
                   f"({', '.join(f'`{n}`' for n in chance)}): at this budget the students have learnt no "
                   "classes, so a top-1 change there counts near-tied predictions that flip rather than accuracy "
                   "lost, and the cosine and top-1 agreement with fp32 are the accuracy-side evidence.")
    for f in ("dynamic", "static"):
        cs = [r[f]["cosine"] for r in both.values() if r[f].get("cosine") is not None]
        if cs:
            worst = min(both, key=lambda n: both[n][f].get("cosine") if both[n][f].get("cosine") is not None else 2)
            out.append(f"- {f} cosine to fp32: {min(cs):.4f} to {max(cs):.4f} (lowest: `{worst}`)")
    low = [n for n, r in both.items() if r["static"].get("cosine") is not None and r["static"]["cosine"] < COSINE_CAUTION]
    if low:
        out.append(f"- static cosine below {COSINE_CAUTION}: " + ", ".join(
            f"`{n}` {both[n]['static']['cosine']:.4f} (top-1 agreement {_f(both[n]['static'].get('top1_agreement'), 1)}%)"
            for n in low) + ": min-max calibration moves these embeddings far from fp32, which a trained "
                            "student's top-1 would have to confirm before shipping static there")
    sp = {n: r["dynamic"]["b1_ms"] / r["static"]["b1_ms"] for n, r in both.items()}
    out.append("- static over dynamic at b1: " + ", ".join(f"`{n}` {v:.2f}x" for n, v in sp.items())
               + "; at the larger batch: " + ", ".join(
                   f"`{n}` {r['dynamic']['bbig_ms'] / r['static']['bbig_ms']:.2f}x" for n, r in both.items()))
    return out


def write(args, rows: dict[str, dict], towers: list[str], elapsed_s: float) -> None:
    cmd = common.command(args.argv)
    done = {n: r for n, r in rows.items() if r["status"] == "ok"}
    runs_s = sum(r.get("wall_s") or 0 for r in rows.values())
    big = next((r["fp32"].get("big_batch") for r in done.values() if r["fp32"].get("status") == "ok"), args.big_batch)
    lines = ["# Static (QDQ) vs dynamic int8 image towers, per student tower family", "",
             f"`{cmd}`: {runs_s / 60:.1f} min of runs"
             + (" (some read back from --work, not rerun)" if any(r.get("reused") for r in done.values()) else "")
             + ". Each tower: one "
             f"`python -m distill {shlex.join(base_overrides(args))} student=NAME` run "
             f"({args.steps} steps of batch {args.batch}; "
             + ("the smoke data" if args.smoke else
                f"Fashion-MNIST {args.fm_train} training images a class, Tux Paint training photos x{args.tux_times}; "
                f"zero-shot on {args.fm_test * 10} Fashion-MNIST test images, {args.fm_test} a class")
             + "), the same data, steps and text tower for every tower, one thread.", "",
             f"**These students are short-budget ones** ({args.steps} steps of {args.batch} images, random-start "
             "image towers except the ImageNet-started Lite0): their top-1 is far below a finished run's, so the "
             "top-1 change says little beyond its interval; the cosine to the fp32 ONNX student measures the "
             "numeric damage of each int8 form, which does not need a good model.", "",
             *([f"Note: {args.note}", ""] if args.note else []),
             f"Rule: **static** where it is at least {args.min_speedup}x faster than dynamic at batch 1 and loses at "
             f"most {args.max_extra_loss} points of top-1 more than dynamic; else **dynamic**. Each cell is "
             "dynamic / static. Top-1 change: against student_onnx_fp32 in the same run (points); cosine and "
             "agreement: against student_onnx_fp32 on the same test images; latency: image tower, median of the "
             "bench's interleaved rounds, one thread; size: the image tower's file.", "",
             f"| family (student) | fp32 top-1 [95% CI] | top-1 change (pts) | cosine | top-1 agreement (%) | "
             f"b1 ms (fp32: x) | b{big} ms | image MB | static b1 speed-up | recommended |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in towers:
        r = rows.get(name)
        fam = f"{FAMILY.get(name, name)} (`{name}`)"
        if r is None:
            lines.append(f"| {fam} | not run yet |" + " |" * 8)
            continue
        if r["status"] != "ok":
            lines.append(f"| {fam} | {r['status']}: {r.get('reason', '')} |" + " |" * 8)
            continue
        fp = r["fp32"]
        fp_cell = f"{_f(fp.get('top1'))} [{_f(fp['top1_ci95'][0], 1)}, {_f(fp['top1_ci95'][1], 1)}]" \
            if fp.get("status") == "ok" else fp.get("status", "?")
        sp = (r["dynamic"]["b1_ms"] / r["static"]["b1_ms"]
              if r["dynamic"].get("status") == r["static"].get("status") == "ok" else None)
        lines.append(f"| {fam} | {fp_cell} | {_pair(r, 'delta_points', signed=True)} | {_pair(r, 'cosine', 4)} | "
                     f"{_pair(r, 'top1_agreement', 1)} | {_pair(r, 'b1_ms')} ({_f(fp.get('b1_ms'))}) | "
                     f"{_pair(r, 'bbig_ms', 1)} | {_pair(r, 'image_mb')} | {_f(sp)}x | "
                     f"**{r['recommend']}** ({r['why']}) |")
    failed = [(n, f, r[f]) for n, r in done.items() for f in ("dynamic", "static") if r[f].get("status") != "ok"]
    left = [n for n in towers if rows.get(n, {}).get("status") not in ("ok",)]
    lines += reading(done)
    lines += ["", "Per run: the teacher's top-1 (torch fp32) and the run's minutes:", ""]
    lines += [f"- `{n}`: teacher {_f(r.get('teacher_top1'))}, fp32 ONNX student {_f(r['fp32'].get('top1'))}, "
              f"{_f(r.get('run_minutes'), 1)} min" for n, r in done.items()]
    if failed:
        lines += ["", "Failed int8 forms:", ""] + [f"- `{n}` {f}: {x.get('reason', '?')}" for n, f, x in failed]
    if left:
        lines += ["", "Not measured: " + ", ".join(f"`{n}` ({rows.get(n, {}).get('status', 'not run yet')}"
                                                   f"{': ' + rows[n]['reason'] if n in rows and rows[n].get('reason') else ''})"
                                                   for n in left)]
    data = {"args": {k: v for k, v in vars(args).items()}, "overrides": base_overrides(args), "threads": 1,
            "elapsed_min": round(elapsed_s / 60, 2), "runs_min": round(runs_s / 60, 2), "rows": rows,
            "recommendation": {n: r.get("recommend") for n, r in done.items()}}
    common.write_results(args.out, lines, data)


if __name__ == "__main__":
    main()
