"""Reinforced shards at scale, measured: companion build throughput with 1 and 2 torchrun ranks,
peak memory of the companion build and of streamed training at two data set sizes, and the
storage a companion costs per sample.

Parts (each measurement in a fresh process, so peak RSS is that run's alone):

* ``throughput``: ``distill.reinforce.build_companions`` with a ViT-B/32 teacher (open_clip, random
  weights: the same compute as the trained one, whose weights cannot be downloaded here) at 224 px,
  K views per sample, under ``torchrun --nproc_per_node=R`` with ``OMP_NUM_THREADS=1`` and one torch
  thread per rank, so R ranks use R cores. Images/s = views embedded / the slowest rank's build time.
* ``memory``: peak RSS (ru_maxrss) of (a) the companion build with the tiny teacher at 32 px and (b)
  training the tiny student for a fixed number of steps from the reinforced stream, on N1 and N2
  synthetic samples in shards of the same size, so only the number of shards changes.
* storage: companion bytes per sample and per view, from the files the memory part wrote.
* ``plan``: a planning table on paper from measured parts: the companion bytes per sample for a
  512-d teacher (a real companion tar written with K views), the decode + crop cost per image on one
  core of this CPU (512 px JPEGs), ViT-B/32's image FLOPs (distill.flops) and, with no GPU run in this
  project yet, a GPU's views/s derived from those FLOPs at a stated utilisation.

    .venv/bin/python benchmarks/bench_reinforce.py --part throughput --images 256 --views 2
    .venv/bin/python benchmarks/bench_reinforce.py --part memory --sizes 10000,200000
    .venv/bin/python benchmarks/bench_reinforce.py --part plan
    .venv/bin/python benchmarks/bench_reinforce.py --smoke     # every part with the tiny teacher, a few samples

Appends a Markdown section to benchmarks/results/reinforce.md (or --out) and the raw figures to
benchmarks/results/reinforce.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import common

TINY = dict(embed_dim=64, vision_cfg=dict(width=96, layers=2, head_width=48, patch_size=8, image_size=32),
            text_cfg=dict(width=64, layers=2, heads=2, context_length=32, vocab_size=49408))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rise_mib(base_kb: float) -> float:
    return (common.vm_kb("VmHWM") - base_kb) / 1024


def _teacher(kind: str):
    from distill.teachers.open_clip_teacher import OpenClipTeacher

    if kind == "vitb32":
        return OpenClipTeacher(model_name="ViT-B-32", pretrained=None, seed=0)
    return OpenClipTeacher(model_name=None, model_cfg=TINY, seed=0)


# ----------------------------------------------------------------------------- child processes


def child_build(args) -> None:
    """One rank of a companion build (under torchrun or alone); rank 0 prints the JSON result."""
    import torch

    from distill import distributed as dist_utils
    from distill import reinforce
    from distill.data import ViewSpec
    from distill.streaming import expand_urls

    torch.set_num_threads(1)
    dist_utils.setup_from_env()
    teacher = _teacher(args.teacher)
    spec = ViewSpec(size=args.size, views=args.views, augment=True, seed=0)
    urls = expand_urls(args.urls)
    dist_utils.barrier()
    base = common.reset_peak()
    t0 = time.perf_counter()
    out = reinforce.build_companions(teacher, urls, spec, root=args.root, batch_size=32)
    seconds = time.perf_counter() - t0  # build_companions ends in a barrier: the slowest rank's time
    peaks = dist_utils.all_gather_object((_peak_mib(), _rise_mib(base)))
    if dist_utils.rank() == 0:
            common.child_result({"seconds": seconds, "built": out["built"], "peak_rss_mib": max(p[0] for p in peaks),
                             "rise_mib": max(p[1] for p in peaks), "ranks": dist_utils.world_size()})
    dist_utils.cleanup()


def child_train(args) -> None:
    """Train the tiny student for --steps from the reinforced stream; print peak RSS and the stream state size."""
    import open_clip
    import torch

    from distill import reinforce
    from distill.compose import train_defaults
    from distill.data import ViewSpec
    from distill.data_build import TrainStream
    from distill.engine import EngineConfig, fit
    from distill.losses import DistillLoss
    from distill.streaming import StreamingShards
    from distill.students import build_student
    from distill.train import DistillTask

    torch.set_num_threads(1)
    teacher = _teacher("tiny")
    spec = ViewSpec(size=32, views=args.views, augment=True, seed=0)
    src = StreamingShards(args.urls, resampled=True, buffer=1000, seed=0, reinforced=True, teacher_root=args.root)
    src.teacher_fingerprint = reinforce.fingerprint(teacher.fingerprint, spec)
    student, model_cfg = build_student(**json.loads(args.student))
    tok = open_clip.SimpleTokenizer(context_length=int(model_cfg["text_cfg"]["context_length"]))
    cfg = EngineConfig.from_mapping(train_defaults(steps=args.steps, batch_size=32, ckpt_every=0, log_every=50,
                                                   progress=False, tensorboard=False, resume="never", eval_every=0,
                                                   num_workers=0, extra_texts=0))
    loss = DistillLoss(student_dim=int(model_cfg["embed_dim"]), teacher_dim=teacher.embed_dim)
    task = DistillTask(student, loss, None, tok, cfg, 32, teacher=teacher, stream=TrainStream(src, spec, []))
    base = common.reset_peak()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        fit(task, cfg, Path(run), torch.device("cpu"))
    state = json.dumps(task.loader.state_dict())
    common.child_result({"seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_mib(), "rise_mib": _rise_mib(base),
                         "state_bytes": len(state), "samples": task.loader.stats()["samples"],
                         "mismatch": task.loader.stats()["teacher_mismatch"]})


def _run(cmd: list[str]) -> dict:
    return common.run_child(cmd, env={"OMP_NUM_THREADS": "1"})  # one thread per rank: R ranks use R cores


def _torchrun(ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            __file__, *args]


# ----------------------------------------------------------------------------- parts


def part_throughput(images: int, views: int, per_shard: int, tmp: Path, teacher: str = "vitb32", size: int = 224,
                    rounds: int = 2) -> dict:
    shards = tmp / "tp"
    shards.mkdir()
    pattern = common.write_shards(shards, images, per_shard, 256)
    rows = {}
    for ranks in (1, 2) * rounds:  # interleaved: the machine's drift hits both
        root = tmp / f"comp-{ranks}-{time.monotonic_ns()}"
        res = _run(_torchrun(ranks, "--child", "build", "--teacher", teacher, "--size", str(size), "--views",
                             str(views), "--urls", pattern, "--root", str(root)))
        res["views_per_s"] = images * views / res["seconds"]
        rows.setdefault(ranks, []).append(res)
    best = {r: max(x["views_per_s"] for x in v) for r, v in rows.items()}
    return {"images": images, "views": views, "per_shard": per_shard, "teacher": teacher, "size": size, "runs": rows,
            "views_per_s": best, "speedup": best[2] / best[1]}


def part_memory(sizes: list[int], per_shard: int, views: int, steps: int, tmp: Path) -> dict:
    student = json.dumps({"embed_dim": 64, "vision": {"width": 64, "layers": 2, "heads": 2, "patch_size": 8,
                                                        "image_size": 32},
                          "text": {"width": 64, "layers": 2, "heads": 2, "context_length": 32}})
    out = {}
    for n in sizes:
        shards = tmp / f"m{n}"
        shards.mkdir()
        t0 = time.perf_counter()
        pattern = common.write_shards(shards, n, per_shard, 32)
        write_s = time.perf_counter() - t0
        root = tmp / f"m{n}-comp"
        build = _run(common.script_cmd(__file__, "--child", "build", "--teacher", "tiny", "--size", 32,
                                       "--views", views, "--urls", pattern, "--root", root))
        train = _run(common.script_cmd(__file__, "--child", "train", "--views", views, "--urls", pattern,
                                       "--root", root, "--steps", steps, "--student", student))
        comp = sorted(root.glob("*.teacher.tar"))
        data_bytes = sum(p.stat().st_size for p in shards.glob("*.tar"))
        comp_bytes = sum(p.stat().st_size for p in comp)
        out[n] = {"shards": len(comp), "write_shards_s": write_s, "build": build, "train": train,
                  "companion_bytes_per_sample": comp_bytes / n, "data_bytes_per_sample": data_bytes / n}
    return out


H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100 SXM datasheet, dense bf16 tensor-core peak
GPU_UTILISATION = (0.2, 0.4)  # an assumed range for batch-1024 ViT-B/32 inference; replace with a measured run
CORES_PER_GPU = 16  # e.g. an 8-GPU node with 128 cores for JPEG decoding
DATASETS = {"DataComp-12M": 12_800_000, "LAION-400M": 400_000_000}


def _companion_bytes(views: int, dim: int, n: int = 200) -> float:
    """Bytes per sample of a real companion tar (header, records, tar padding) with K views of D dims."""
    import io
    import tarfile

    import numpy as np

    from distill import reinforce

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, (name, data) in enumerate([(reinforce.HEADER, b"{}" * 200)] + [
                (f"{i:09d}.teacher", reinforce.encode_record(range(views), np.zeros((views, dim)), np.zeros(dim)))
                for i in range(n)]):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return len(buf.getvalue()) / n


def _decode_ms(views: int, n: int = 64) -> float:
    """ms per image on one core: decode a 512 px JPEG and build K augmented 224 px views."""
    import io

    import torch

    from distill.data import augmented_view
    from distill.imageio import load_rgb

    torch.set_num_threads(1)
    blobs = common.jpeg_blobs(8, 512)
    t0 = time.perf_counter()
    for i in range(n):
        img = load_rgb(io.BytesIO(blobs[i % len(blobs)]))
        for k in range(views):
            augmented_view(img, 224, i * 31 + k)
    return (time.perf_counter() - t0) * 1e3 / n


def part_plan(cpu_views_per_s: float | None) -> dict:
    import open_clip

    from distill.flops import clip_flops

    gflops = clip_flops(open_clip.get_model_config("ViT-B-32"))["image"] / 1e9
    plan = {"vitb32_image_gflops": gflops, "decode_ms": {str(k): _decode_ms(k) for k in (2, 10)},
            "bytes_per_sample": {str(k): _companion_bytes(k, 512) for k in (2, 10, 30)},
            "cpu_views_per_s_1core": cpu_views_per_s,
            "gpu_views_per_s": [u * H100_BF16_DENSE_TFLOPS * 1e12 / (gflops * 1e9) for u in GPU_UTILISATION]}
    return plan


def _plan_lines(plan: dict) -> list[str]:
    g_lo, g_hi = plan["gpu_views_per_s"]
    lines = ["### Planning table (on paper, from the measured parts above)\n",
             f"- ViT-B/32 image tower: {plan['vitb32_image_gflops']:.2f} GFLOPs per 224 px view (distill.flops, "
             f"multiply-adds x 2)."]
    if plan.get("cpu_views_per_s_1core"):
        lines.append(f"- Measured here: {plan['cpu_views_per_s_1core']:.1f} ViT-B/32 views/s per CPU core (throughput "
                     f"part, best 1-rank run).")
    lines += [f"- GPU views/s, **derived, not measured** (no GPU run of the teacher exists in this project): H100 "
              f"{H100_BF16_DENSE_TFLOPS} TFLOPS bf16 dense x {GPU_UTILISATION[0]:.0%}-{GPU_UTILISATION[1]:.0%} "
              f"utilisation / FLOPs per view = {g_lo:,.0f}-{g_hi:,.0f} views/s.",
              "- Decode + crop on one core of this CPU (512 px JPEG, K views of 224 px): "
              + ", ".join(f"K={k}: {ms:.1f} ms/image" for k, ms in plan["decode_ms"].items())
              + f"; a GPU is fed by {CORES_PER_GPU} such cores (assumed).",
              "- Companion bytes per sample (512-d fp16 rows, one caption row, seeds, tar header and padding): "
              + ", ".join(f"K={k}: {b:,.0f} B" for k, b in plan["bytes_per_sample"].items())
              + "; the embeddings alone are 1,024 B per view (fp16 x 512).", "",
              "| data set | samples | K | storage | CPU feed views/s per GPU | GPU views/s per GPU (derived) "
              "| hours on 8 GPUs | hours on 64 GPUs |", "|---|---|---|---|---|---|---|---|"]
    for name, n in DATASETS.items():
        for k in (2, 10):
            feed = CORES_PER_GPU * 1e3 / plan["decode_ms"][str(k)] * k
            per_gpu = [min(feed, g) for g in (g_lo, g_hi)]
            hours = {gpus: [n * k / (r * gpus) / 3600 for r in per_gpu] for gpus in (8, 64)}
            size = n * plan["bytes_per_sample"][str(k)]
            fmt = lambda h: f"{h:,.1f}" if h >= 1 else f"{h:.2f}"  # noqa: E731
            span = {gpus: fmt(min(h)) if fmt(min(h)) == fmt(max(h)) else f"{fmt(min(h))}-{fmt(max(h))}"
                    for gpus, h in hours.items()}
            lines.append(f"| {name} | {n / 1e6:,.1f} M | {k} | {size / 1e9:,.0f} GB | {feed:,.0f} | {g_lo:,.0f}-{g_hi:,.0f} "
                         f"| {span[8]} | {span[64]} |")
    lines += ["", "Hours = samples x K / (views/s per GPU x GPUs), where a GPU's rate is the lower of its derived "
              "tensor rate and its CPU feed: with these figures the JPEG decode and crop, not the teacher, set the "
              "pace, so more cores per GPU (or GPU JPEG decoding) buy time before faster GPUs do. Storage is the "
              "companions only; the data shards are unchanged. The caption embeddings (one text per sample) add "
              "well under a tenth of the image compute and are left out.\n"]
    return lines


def report_lines(res: dict, argv: list[str]) -> list[str]:
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} — reinforced shards\n", f"Command: `{common.command(argv)}`\n"]
    tp = res.get("throughput")
    if tp:
        who = {"vitb32": "ViT-B/32 (random weights, same compute)", "tiny": "the tiny teacher"}[tp.get("teacher", "vitb32")]
        lines += [f"### Companion build throughput: {who} at {tp.get('size', 224)} px, "
                  f"{tp['images']} images x {tp['views']} views, shards of {tp['per_shard']}, one thread per rank\n",
                  "| ranks | runs: views/s | best views/s | peak RSS per rank (MiB) |", "|---|---|---|---|"]
        for r in ("1", "2") if "1" in tp["runs"] else (1, 2):
            runs = tp["runs"][r]
            each = ", ".join(f"{x['views_per_s']:.1f}" for x in runs)
            lines.append(f"| {r} | {each} | "
                         f"{max(x['views_per_s'] for x in runs):.1f} | {max(x['peak_rss_mib'] for x in runs):.0f} |")
        verdict = "met" if tp["speedup"] >= 1.8 else "missed"
        lines += ["", f"2 ranks / 1 rank: **{tp['speedup']:.2f}x** (target >= 1.8x: {verdict}).\n"]
    mem = res.get("memory")
    if mem:
        lines += ["### Memory against data set size (tiny teacher and student, 32 px; only the number of shards grows)\n",
                  "Peak RSS of the process, and its rise over the RSS just before the work started (after the "
                  "imports and the models: VmHWM reset there), which is what could grow with the data.\n",
                  "| samples | shards | build peak / rise (MiB) | build s | train peak / rise (MiB) | train s "
                  "| stream state (bytes) | companion B/sample | data B/sample |", "|---|---|---|---|---|---|---|---|---|"]
        for n, m in mem.items():
            b, t = m["build"], m["train"]
            lines.append(f"| {int(n):,} | {m['shards']} | {b['peak_rss_mib']:.0f} / {b['rise_mib']:.1f} | {b['seconds']:.1f} "
                         f"| {t['peak_rss_mib']:.0f} / {t['rise_mib']:.1f} | {t['seconds']:.1f} | {t['state_bytes']} "
                         f"| {m['companion_bytes_per_sample']:.0f} | {m['data_bytes_per_sample']:.0f} |")
        keys = list(mem)
        if len(keys) >= 2:
            a, b = mem[keys[0]], mem[keys[-1]]
            g_build = b["build"]["peak_rss_mib"] / a["build"]["peak_rss_mib"] - 1
            g_train = b["train"]["peak_rss_mib"] / a["train"]["peak_rss_mib"] - 1
            ok = "met" if max(g_build, g_train) < 0.10 else "missed"
            rises = [f"{x[k]['rise_mib']:.1f} -> {y[k]['rise_mib']:.1f} MiB" for k in ("build", "train")
                     for x, y in [(a, b)]]
            lines += ["", f"Peak RSS growth from {int(keys[0]):,} to {int(keys[-1]):,} samples: build "
                      f"**{100 * g_build:+.1f}%**, training **{100 * g_train:+.1f}%** (target < 10%: {ok}); the rise "
                      f"over the pre-work RSS: build {rises[0]}, training {rises[1]}.\n"]
    if res.get("plan"):
        lines += _plan_lines(res["plan"])
    return lines


def main(argv=None) -> None:
    ap = common.parser(__doc__, "reinforce.md")
    ap.add_argument("--part", choices=["throughput", "memory", "plan", "all"], default="all")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--sizes", default="10000,200000")
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--throughput-teacher", choices=["vitb32", "tiny"], default="vitb32")
    ap.add_argument("--throughput-rounds", type=int, default=2, help="times each rank count builds, interleaved")
    ap.add_argument("--child", choices=["build", "train"], help=argparse.SUPPRESS)
    ap.add_argument("--teacher", default="tiny", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--urls", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    args = common.parse(ap, argv, smoke=dict(images=16, sizes="64,128", per_shard=32, steps=2,
                                             throughput_teacher="tiny", throughput_rounds=1))
    if args.child == "build":
        return child_build(args)
    if args.child == "train":
        return child_train(args)
    res = {}
    old = common.load_json(args.out)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        if args.part in ("throughput", "all"):
            size = 224 if args.throughput_teacher == "vitb32" else 32
            res["throughput"] = part_throughput(args.images, args.views, 32, Path(tmp), args.throughput_teacher, size,
                                                args.throughput_rounds)
        if args.part in ("memory", "all"):
            sizes = [int(s) for s in args.sizes.split(",")]
            res["memory"] = part_memory(sizes, args.per_shard, args.views, args.steps, Path(tmp))
        if args.part in ("plan", "all"):
            tp = res.get("throughput") or old.get("throughput")
            tp = tp if tp and tp.get("teacher", "vitb32") == "vitb32" else None  # the plan's rate is ViT-B/32's
            res["plan"] = part_plan(tp["views_per_s"]["1"] if tp and "1" in tp["views_per_s"] else
                                    tp["views_per_s"].get(1) if tp else None)
    res = json.loads(json.dumps(res))  # the keys as JSON has them ("1", not 1), as a later run reads them back
    lines = report_lines(res, args.argv)
    common.write_results(args.out, lines, data={**old, **res}, append=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
