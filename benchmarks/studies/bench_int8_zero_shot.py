"""int8 modes judged by zero-shot top-1 of a *trained* student (issue: choose the default by
measured accuracy and latency, not by cosine on random weights).

Takes a finished run folder (default: the latest outputs/offline/*), quantises its fp32 image
encoder with every ORT dynamic mode and static QDQ (calibrated on training-split images), and
measures Fashion-MNIST test zero-shot top-1/top-5 with the run's own fp32 text encoder for the
class embeddings, plus batch-1 latency on 2 threads, timed in interleaved rounds (distill.bench.
interleaved_times) so that a slow phase of a shared machine does not land on one variant.
Writes benchmarks/results/int8_zero_shot.md. A study: the comparison behind export.int8.mode's default.

    .venv/bin/python benchmarks/studies/bench_int8_zero_shot.py --run outputs/offline/<time>
"""

from __future__ import annotations

import glob
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402

from distill import bench, datasets, metrics, quantize  # noqa: E402
from distill.data import load_eval_set  # noqa: E402
from distill.encoders import normalize_images  # noqa: E402
from distill.teachers.onnx_teacher import OnnxTeacher  # noqa: E402


def main(argv=None) -> None:
    ap = common.parser(__doc__, "int8_zero_shot.md", smoke=False)
    ap.add_argument("--run", default=None, help="a run folder with export/onnx (default: latest outputs/offline/*)")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=25)
    a = common.parse(ap, argv)
    run = Path(a.run or sorted(glob.glob(str(common.REPO / "outputs/offline/*")))[-1])
    onnx_dir = run / "export" / "onnx"
    img_fp32, txt_fp32 = onnx_dir / "image_encoder.onnx", onnx_dir / "text_encoder.onnx"
    tok_dir = run / "export" / "bundle" / "tokenizer"
    base = OnnxTeacher(image_onnx=img_fp32, text_onnx=txt_fp32, tokenizer_dir=tok_dir if tok_dir.is_dir() else None,
                       threads=a.threads)
    es = load_eval_set("fashion-mnist/test", datasets.fashion_mnist("test", per_class=a.per_class, invert=True),
                       base.image_size, templates=["a photo of a {}."])
    clf = metrics.zero_shot_classifier(base.encode_text, es.classnames, es.templates)
    calib_src = datasets.fashion_mnist("train", per_class=8, invert=True)
    calib = [normalize_images(x[None]).numpy()
             for x in load_eval_set("calib", calib_src, base.image_size).images]
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"fp32": img_fp32}
        for mode in quantize.DYNAMIC_MODES:
            variants[f"dynamic {mode}"] = quantize.quantize_dynamic_onnx(img_fp32, Path(tmp) / f"{mode}.onnx", mode=mode)
        variants["static QDQ"] = quantize.quantize_static_onnx(img_fp32, Path(tmp) / "static.onnx", calib)
        x1 = es.images[:1]
        encoders = {}
        for name, path in variants.items():
            enc = OnnxTeacher(image_onnx=path, text_onnx=txt_fp32, tokenizer_dir=tok_dir if tok_dir.is_dir() else None,
                              threads=a.threads)
            acc = metrics.zero_shot_accuracy(enc.encode_image(es.images), clf, es.labels, ks=(1, 5))
            encoders[name] = enc
            rows.append({"variant": name, "top1": round(100 * acc["top1"], 2), "top5": round(100 * acc["top5"], 2),
                         "size_mb": round(bench.file_size_mb([path]), 2)})
        timed = common.interleaved_times({name: (lambda e=enc: e.encode_image(x1)) for name, enc in encoders.items()},
                                        rounds=a.rounds, per_round=a.per_round, warmup=5, settle_s=0.2)
        round_medians = {name: [statistics.median(t) for t in rounds] for name, rounds in timed.items()}
        for r in rows:
            r["b1_median_ms"] = round(statistics.median(round_medians[r["variant"]]), 3)
            # speed-up per round (same machine phase), then the median over rounds
            r["speedup"] = statistics.median(f / v for f, v in zip(round_medians["fp32"], round_medians[r["variant"]]))
    fp = rows[0]
    lines = [
        "# int8 modes on a trained student: zero-shot top-1 and latency",
        "",
        f"Command: `{common.command(a.argv)}` ({time.time() - t0:.0f} s, {time.strftime('%Y-%m-%d')})",
        "",
        f"Student: the offline experiment's image encoder ({img_fp32}), Fashion-MNIST test, {len(es.images)} images "
        f"({a.per_class} a class, inverted), prompt `a photo of a {{}}.` embedded by the run's fp32 text encoder. "
        f"Static QDQ calibrated on {len(calib)} Fashion-MNIST *training* images. Batch-1 latency: {a.rounds} interleaved "
        f"rounds, each variant {a.per_round} calls after 5 warm-ups a round; median of the round medians; speed-up = "
        f"median over rounds of fp32 / variant within the round. {a.threads} ORT threads.",
        "",
        "| variant | top-1 % | top-5 % | top-1 change (points) | b1 median ms | speed-up vs fp32 | size MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['top1'] - fp['top1']:+.2f} | "
                     f"{r['b1_median_ms']:.3f} | {r['speedup']:.2f}x | {r['size_mb']:.2f} |")
    lines += ["", f"Code default: `{quantize.DEFAULT_DYNAMIC_MODE}`."]
    common.write_results(a.out, lines, data={"run": str(run), "rows": rows})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
