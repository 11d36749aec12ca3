"""Training-step throughput with a cached vs an online teacher.

ViT-B/32 open_clip teacher (random init: throughput does not depend on the weights) ->
ViT w384/d6/h6/p32 224 px student with a distilled text tower (width 256, depth 4), trained on
real Tux Paint images. Measures images/s, the step-time split (data / teacher / student fwd+bwd
/ optimizer), peak memory, and on CUDA the share of the GPU's dense bf16 peak used.

    .venv/bin/python benchmarks/bench_train_throughput.py --device cpu --steps 6 --batch-size 32
    .venv/bin/python benchmarks/bench_train_throughput.py --device cuda --steps 60 --batch-size 256
    .venv/bin/python benchmarks/bench_train_throughput.py --device cpu --modes cache --precision fp32,bf16,fp32,bf16
    .venv/bin/python benchmarks/bench_train_throughput.py --smoke     # tiny teacher and student, seconds

--precision takes a list (train.precision values, measured in the order given: repeat them to
interleave); bf16 on a CPU needs native bf16 (AVX-512 BF16 or AMX), otherwise that row is fp32.

Appends a Markdown section to benchmarks/results/train_throughput.md (or --out).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import common
import open_clip
import torch

from distill import datasets, flops
from distill.cache import build_or_load
from distill.compose import train_defaults
from distill.data import TrainSet, ViewSpec, build_corpus
from distill.losses import DistillLoss
from distill.students import build_student
from distill.teachers.open_clip_teacher import OpenClipTeacher
from distill.train import train

# (teacher, student vision, student text, image size): the design card's, and a tiny pair for the smoke run
MODELS = {
    "design": ("ViT-B-32", dict(width=384, layers=6, heads=6, patch_size=32, image_size=224),
               dict(mode="distilled", width=256, layers=4, heads=4, context_length=77), 224),
    "tiny": (None, dict(width=64, layers=2, heads=2, patch_size=8, image_size=32),
             dict(mode="distilled", width=32, layers=1, heads=2, context_length=32), 32),
}
TINY_TEACHER = dict(embed_dim=64, vision_cfg=dict(width=96, layers=2, head_width=48, patch_size=8, image_size=32),
                    text_cfg=dict(width=64, layers=2, heads=2, context_length=32, vocab_size=49408))

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}


def gpu_peak(name: str) -> float | None:
    for k, v in BF16_PEAK_TFLOPS.items():
        if k.lower() in name.lower():
            return v
    return None


def main() -> None:
    ap = common.parser(__doc__, "train_throughput.md")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--modes", default="cache,online", help="teacher targets: cache, online or both")
    ap.add_argument("--precision", default="auto", help="comma list of train.precision values")
    ap.add_argument("--models", choices=list(MODELS), default="design", help="teacher and student sizes")
    args = common.parse(ap, smoke=dict(device="cpu", steps=2, batch_size=4, images=8, workers=0, models="tiny"))
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(2)

    t_name, vision, text, size = MODELS[args.models]
    teacher = (OpenClipTeacher(t_name, pretrained=None, device=dev) if t_name else
               OpenClipTeacher(model_name=None, model_cfg=TINY_TEACHER, seed=0, device=dev))
    dim = teacher.embed_dim
    full = len(datasets.tuxpaint("train"))
    src = datasets.tuxpaint("train", limit=args.images)
    n = len(src)
    ds = TrainSet([src], ViewSpec(size=size, views=max(1, args.images // full), augment=True),
                  corpus=build_corpus(templates=["a photo of a {}."]))
    s_flops = flops.clip_flops(build_student(dim, vision, text)[1])
    t_flops = flops.clip_flops(teacher.model_cfg)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = build_or_load(teacher, ds, Path(tmp) / "cache", batch_size=64, device=dev, num_workers=args.workers)
        cache_s = time.perf_counter() - t0
        runs = [(m, p) for p in args.precision.split(",") for m in args.modes.split(",")]
        for i, (mode, precision) in enumerate(runs):
            torch.manual_seed(0)
            student, model_cfg = build_student(dim, vision, text)
            loss = DistillLoss(weights={"feature_mse": 1.0, "contrastive_kd": 1.0}, temperature_mode="fixed",
                               temperature=0.02, student_dim=dim, teacher_dim=dim)
            cfg = train_defaults(steps=args.steps, batch_size=args.batch_size, num_workers=args.workers, seed=0,
                           optimizer={"lr": 1e-4}, scheduler={"warmup_steps": 1},
                           log_every=1, eval_every=0, ckpt_every=0, resume="never", tensorboard=False, progress=True,
                           compile=args.compile, precision=precision)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            # one warm-up step is excluded: run steps+1, then time from the per-step split
            tok = open_clip.SimpleTokenizer(context_length=int(model_cfg["text_cfg"]["context_length"]))
            res = train(student=student, loss_fn=loss, dataset=ds, tokenizer=tok, cfg=cfg,
                        out_dir=Path(tmp) / f"{i}_{mode}", device=dev, cache=cache if mode == "cache" else None,
                        teacher=teacher if mode == "online" else None, image_size=size)
            lines = [json.loads(l) for l in (Path(tmp) / f"{i}_{mode}" / "metrics.jsonl").read_text().splitlines()]
            ips = sorted(l["images_per_s"] for l in lines[1:]) or [res["images_per_s"]]
            med = ips[len(ips) // 2]
            per_img = 3 * (s_flops["image"] + s_flops["text"]) + (
                (t_flops["image"] + t_flops["text"]) if mode == "online" else 0)
            row = {"mode": mode, "precision": res["precision"],
                   "images_per_s_median": round(med, 1), "step_time_split_ms": res["step_time_split_ms"],
                   "achieved_tflops": round(med * per_img / 1e12, 2)}
            if dev.type == "cuda":
                row["peak_memory_gb"] = res.get("peak_memory_gb")
                peak = gpu_peak(torch.cuda.get_device_name(dev))
                if peak:
                    row["share_of_bf16_peak_pct"] = round(100 * row["achieved_tflops"] / peak, 1)
            rows.append(row)
    md = [f"## Training throughput, {args.device}, batch {args.batch_size}, {args.steps} steps "
          f"({time.strftime('%Y-%m-%d')})\n",
          f"Command: `{common.command(args.argv)}`\n",
          f"Cache build: {n} images x views = {len(ds)} items in {cache_s:.1f} s.\n",
          "| targets | precision | images/s (median step) | step split ms (load/data/teacher/student/optim) | achieved TFLOP/s | peak mem GB | % bf16 peak |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r["step_time_split_ms"]
        md.append(f"| {r['mode']} | {r['precision']} | {r['images_per_s_median']} | {sp.get('load', '-')}/{sp['data']}/{sp['teacher']}/{sp['student']}/{sp['optim']} "
                  f"| {r['achieved_tflops']} | {r.get('peak_memory_gb', '-')} | {r.get('share_of_bf16_peak_pct', '-')} |")

    def median_ips(mode: str, precision: str) -> float | None:
        v = [r["images_per_s_median"] for r in rows if r["mode"] == mode and r["precision"] == precision]
        return statistics.median(v) if v else None

    for precision in dict.fromkeys(r["precision"] for r in rows):
        cached, online = median_ips("cache", precision), median_ips("online", precision)
        if cached and online:
            speedup = cached / online
            md.append(f"\nCached / online speed-up ({precision}): **{speedup:.2f}x** (target >= 2.5x: "
                      f"{'met' if speedup >= 2.5 else f'missed by {2.5 - speedup:.2f}x'}).")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        fp32, bf16 = median_ips(mode, "fp32"), median_ips(mode, "bf16")
        if fp32 and bf16:
            md.append(f"\nbf16 / fp32 images/s ({mode}, median of each precision's runs): **{bf16 / fp32:.2f}x**.")
    md.append(f"\nFLOPs per trained image: student fwd+bwd = 3 x forward "
              f"({3 * (s_flops['image'] + s_flops['text']) / 1e9:.2f} GFLOPs), teacher forward "
              f"{(t_flops['image'] + t_flops['text']) / 1e9:.2f} GFLOPs (FLOPs = 2 x MACs).")
    runs = common.load_json(args.out).get("runs", []) + [{"args": vars(args), "cache_s": cache_s, "rows": rows}]
    common.write_results(args.out, md, data={"runs": runs}, append=True)
    print("\n".join(md))


if __name__ == "__main__":
    main()
