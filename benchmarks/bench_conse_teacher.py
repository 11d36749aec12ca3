"""The packaged offline ConSE teacher (EfficientNet-Lite + all-MiniLM-L6-v2): accuracy, speed, size.

    .venv/bin/python benchmarks/bench_conse_teacher.py --threads 2
    .venv/bin/python benchmarks/bench_conse_teacher.py --smoke     # a few images, seconds

Measured:

* zero-shot top-1/top-5 on the Fashion-MNIST test split (``--per-class N`` keeps the first N test
  images of each class, class-balanced; 0 = all 10,000), once as stored (light-on-black) and once
  inverted (dark-on-white, like a product photo); prompt template "a photo of a {}." with the
  dataset's class names. Images are materialised at their 28 px and upsampled by the teacher's own
  preprocessing (bicubic, antialias) to its input size: the Teacher-protocol path.
* retrieval R@1/5/10 both ways on Tux Paint (distill.datasets.tuxpaint): the ``val`` split and
  ``all`` pairs, one caption per image, eval transform (bicubic short side + centre crop).
  Pessimistic ties (distill.metrics): a caption that is textually identical to another image's
  caption ties with it, so duplicated captions cap R@1.
* a top_k ablation from the same forward passes (ImageNet probabilities computed once, the ConSE
  mix redone for each k), on inverted Fashion-MNIST and Tux Paint all.
* images/s at batch 32 (uniform random 224 px images, so no resize) on ``--threads`` torch
  threads, with the teacher's default CPU micro-batching (chunks of 4) and, for comparison, one
  forward of the whole batch, encode_text latency at batch 1, teacher load time, params and FLOPs (teacher.stats()).

The 2 cores here are shared with other jobs; the load average around the timing is recorded.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import datetime

import common
import torch
import torch.nn.functional as F

from distill.data import load_eval_set
from distill.datasets import fashion_mnist, tuxpaint
from distill.metrics import retrieval_recall, zero_shot_accuracy, zero_shot_classifier
from distill.teachers.conse import ConSETeacher

TEMPLATES = ["a photo of a {}."]
TOP_KS = (1, 3, 5, 10, 20, 50)


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def probs_in_batches(teacher: ConSETeacher, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([teacher.class_probs(images[i:i + batch]) for i in range(0, len(images), batch)])


def mix(teacher: ConSETeacher, probs: torch.Tensor, k: int) -> torch.Tensor:
    """The ConSE image embedding from precomputed ImageNet probabilities (as encode_image)."""
    top = probs.topk(k, dim=-1)
    w = top.values / top.values.sum(-1, keepdim=True)
    return F.normalize(torch.einsum("bk,bkd->bd", w, teacher.class_embeddings[top.indices]), dim=-1)


def main() -> None:
    ap = common.parser(__doc__, "conse_teacher.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", default="lite0")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=0, help="Fashion-MNIST test images per class; 0 = all 10k")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tux-limit", type=int, default=0, help="the first N Tux Paint pairs only; 0 = all 538")
    args = common.parse(ap, smoke=dict(per_class=1, batch=4, repeats=1, tux_limit=48))
    torch.set_num_threads(args.threads)
    t_start = time.time()

    t0 = time.perf_counter()
    teacher = ConSETeacher(variant=args.variant, top_k=args.top_k)
    load_s = time.perf_counter() - t0
    stats = teacher.stats()
    print(f"teacher {teacher.name} loaded in {load_s:.1f} s; {stats}", flush=True)

    # ---------------------------------------------------------------- Fashion-MNIST zero-shot
    per_class = args.per_class or None
    zs, zs_k, per_cls, pred_hist = {}, {}, {}, {}
    n_fm = 0
    for invert in (False, True):
        src = fashion_mnist("test", per_class=per_class, invert=invert)
        es = load_eval_set(src.name, src, 28, TEMPLATES)  # 28 px as stored; the teacher upsamples
        n_fm = len(es.images)
        t0 = time.perf_counter()
        probs = probs_in_batches(teacher, es.images, args.batch)
        enc_s = time.perf_counter() - t0
        clf = zero_shot_classifier(teacher.encode_text, es.classnames, es.templates)  # (10, 384)
        emb = mix(teacher, probs, teacher.top_k)
        key = "inverted" if invert else "as stored"
        zs[key] = zero_shot_accuracy(emb, clf, es.labels)
        zs[key]["encode_img_s"] = n_fm / enc_s
        pred = (emb @ clf.T).argmax(-1)
        per_cls[key] = [float((pred[es.labels == c] == c).float().mean()) for c in range(len(es.classnames))]
        pred_hist[key] = Counter(es.classnames[int(p)] for p in pred)
        zs_k[key] = {k: zero_shot_accuracy(mix(teacher, probs, k), clf, es.labels)["top1"] for k in TOP_KS}
        print(f"fashion-mnist {key}: {zs[key]}  ({n_fm} images, {n_fm / enc_s:.1f} img/s)", flush=True)
    classnames = es.classnames

    # ---------------------------------------------------------------- Tux Paint retrieval
    src_all, src_val = tuxpaint("all", limit=args.tux_limit or None), tuxpaint("val")
    es_all = load_eval_set(src_all.name, src_all, teacher.image_size)
    val_keys = {src_val.key(i) for i in range(len(src_val))}
    val_idx = torch.tensor([i for i, k in enumerate(es_all.keys) if k in val_keys])
    probs_tux = probs_in_batches(teacher, es_all.images, args.batch)
    img_all = mix(teacher, probs_tux, teacher.top_k)
    txt_all = teacher.encode_text(es_all.captions)
    rt = {"val": retrieval_recall(img_all[val_idx], txt_all[val_idx]), "all": retrieval_recall(img_all, txt_all)}
    rt_k = {k: retrieval_recall(mix(teacher, probs_tux, k), txt_all) for k in TOP_KS}
    caps = Counter(es_all.captions)
    dup = sum(c for c in caps.values() if c > 1)
    n_tux, n_val = len(es_all.images), len(val_idx)
    print(f"tuxpaint: {rt}", flush=True)

    # sanity: the mix from precomputed probabilities is what encode_image returns
    check = float((teacher.encode_image(es_all.images[:8]) - img_all[:8]).abs().max())
    assert check < 1e-4, check

    # ---------------------------------------------------------------- speed
    x = torch.rand(args.batch, 3, teacher.image_size, teacher.image_size, generator=torch.Generator().manual_seed(0))
    load_before = os.getloadavg()
    t_img = common.time_fn(lambda: teacher.encode_image(x), warmup=2, repeats=args.repeats)
    chunk, teacher.image_chunk = teacher.image_chunk, None
    t_img_whole = common.time_fn(lambda: teacher.encode_image(x), warmup=1, repeats=max(3, args.repeats // 2))
    teacher.image_chunk = chunk
    t_img1 = common.time_fn(lambda: teacher.encode_image(x[:1]), warmup=3, repeats=3 * args.repeats)
    t_txt = common.time_fn(lambda: teacher.encode_text(["a photo of a small dog sitting on the grass."]), warmup=3,
                    repeats=3 * args.repeats)
    load_after = os.getloadavg()
    ips = args.batch / (t_img["median_ms"] / 1e3)
    ips_best = args.batch / (t_img["min_ms"] / 1e3)
    print(f"encode_image b{args.batch}: {t_img} -> {ips:.1f} img/s; b1 {t_img1}; text b1 {t_txt}", flush=True)

    # ---------------------------------------------------------------- report
    fm_desc = (f"{per_class} per class, the first of each class in file order = {n_fm} images" if per_class
               else f"all {n_fm} test images")
    L = [f"# ConSE teacher ({teacher.name}): zero-shot, retrieval, speed", "",
         f"Command: `{common.command(args.argv)}`  ",
         f"Run took {time.time() - t_start:.0f} s on {datetime.now():%Y-%m-%d %H:%M}.", "",
         f"Teacher: `ConSETeacher(variant={args.variant!r}, top_k={teacher.top_k}, prompt={teacher.prompt!r}, "
         f"classnames='imagenet')`, fingerprint `{teacher.fingerprint}`, input {teacher.image_size} px, "
         f"{teacher.embed_dim}-d. Loaded in {load_s:.1f} s (most of it embedding the 1000 ImageNet class prompts). "
         "Image embedding = top-k ImageNet probabilities of EfficientNet-Lite, renormalised, weighting the "
         "all-MiniLM-L6-v2 embeddings of the class prompts (ConSE); text embedding = MiniLM mean pooling.", "",
         "## Size and cost", "",
         "| tower | params | GFLOPs / sample (2 x MACs) |", "|---|---:|---:|",
         f"| image (EfficientNet-{args.variant}, {teacher.image_size} px) | {stats['params']['image']:,} | "
         f"{stats['flops']['image'] / 1e9:.3f} |",
         f"| text (MiniLM-L6-H384, {stats['text_tokens']} tokens) | {stats['params']['text']:,} | "
         f"{stats['flops']['text'] / 1e9:.3f} |",
         f"| total | {stats['params']['total']:,} | |", "",
         "Image FLOPs by `FlopCounterMode` (convolutions + classifier); the ConSE mix (k x 384 multiply-adds) is "
         "left out. Text FLOPs: linear layers by `FlopCounterMode` plus attention QK^T/AV added analytically "
         "(CPU SDPA is not counted by the counter in this torch). The unused BERT pooler is dropped.", "",
         f"## Zero-shot on Fashion-MNIST test ({fm_desc}; chance 10%)", "",
         f"Prompt template `{TEMPLATES[0]}`, class names {', '.join(classnames)}. 28 px grey images as RGB, "
         f"upsampled to {teacher.image_size} px by the teacher.", "",
         "| images | top-1 % | top-5 % | img/s of the pass (wall clock, incl. the 28 px upsampling) |",
         "|---|---:|---:|---:|"]
    for key, r in zs.items():
        L.append(f"| {key} | {pct(r['top1'])} | {pct(r['top5'])} | {r['encode_img_s']:.1f} |")
    L += ["", "The img/s column is the whole encoding pass and moves with whatever else runs on the 2 cores; "
          "the Speed section below is the controlled figure.", "",
          "Per-class top-1 % and how often each class is predicted:", "",
          "| class | top-1 as stored | top-1 inverted | predicted (as stored) | predicted (inverted) |",
          "|---|---:|---:|---:|---:|"]
    for c, name in enumerate(classnames):
        L.append(f"| {name} | {pct(per_cls['as stored'][c])} | {pct(per_cls['inverted'][c])} | "
                 f"{pred_hist['as stored'][name]} | {pred_hist['inverted'][name]} |")
    L += ["", f"## Retrieval on Tux Paint (one caption per image; chance R@1 = 1/N)", "",
          "| split | N | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for split, n in (("val", n_val), ("all", n_tux)):
        r = rt[split]
        L.append(f"| {split} | {n} | " + " | ".join(pct(r[f"{d}_r{k}"]) for d in ("i2t", "t2i") for k in (1, 5, 10))
                 + " |")
    L += ["", f"{dup} of the {n_tux} captions are shared with at least one other image (e.g. "
          f"{', '.join(repr(c) for c, n in caps.most_common(3))}); with pessimistic ties those cannot be "
          "retrieved at R@1 image->text.", "",
          f"## top_k ablation (same forward passes; default top_k = {args.top_k})", "",
          "| top_k | FMNIST inverted top-1 % | FMNIST as stored top-1 % | Tux all i2t R@1 | Tux all t2i R@1 | "
          "Tux all t2i R@5 |", "|---:|---:|---:|---:|---:|---:|"]
    for k in TOP_KS:
        L.append(f"| {k} | {pct(zs_k['inverted'][k])} | {pct(zs_k['as stored'][k])} | {pct(rt_k[k]['i2t_r1'])} | "
                 f"{pct(rt_k[k]['t2i_r1'])} | {pct(rt_k[k]['t2i_r5'])} |")
    L += ["", f"## Speed ({args.threads} torch threads, CPU)", "",
          "| what | median ms | p90 ms | min ms |", "|---|---:|---:|---:|",
          f"| encode_image batch {args.batch} ({teacher.image_size} px) | {t_img['median_ms']} | {t_img['p90_ms']} | "
          f"{t_img['min_ms']} |",
          f"| same, one forward of the whole batch (image_chunk=None) | {t_img_whole['median_ms']} | "
          f"{t_img_whole['p90_ms']} | {t_img_whole['min_ms']} |",
          f"| encode_image batch 1 | {t_img1['median_ms']} | {t_img1['p90_ms']} | {t_img1['min_ms']} |",
          f"| encode_text batch 1 | {t_txt['median_ms']} | {t_txt['p90_ms']} | {t_txt['min_ms']} |", "",
          f"**{ips:.1f} images/s** at batch {args.batch} (median; {ips_best:.1f} from the fastest call; "
          f"{args.batch / (t_img_whole['median_ms'] / 1e3):.1f} as one forward). "
          f"Load average (1/5/15 min) before timing {', '.join(f'{v:.2f}' for v in load_before)}, after "
          f"{', '.join(f'{v:.2f}' for v in load_after)} on {os.cpu_count()} cores (this benchmark's own threads "
          "count about 2): other jobs share this machine, so treat absolute times as noisy.", ""]
    raw = {"zeroshot": zs, "zeroshot_topk": zs_k, "retrieval": rt, "retrieval_topk": rt_k, "stats": stats,
           "images_per_s": ips,
           "latency": {"image_b": t_img, "image_b_whole": t_img_whole, "image_b1": t_img1, "text_b1": t_txt},
           "load_s": load_s, "fashion_mnist_images": n_fm, "tuxpaint_images": {"all": n_tux, "val": n_val}}
    L += ["<details><summary>raw numbers</summary>", "", "```json", json.dumps(raw, indent=1, default=str), "```",
          "", "</details>"]
    common.write_results(args.out, L, data=json.loads(json.dumps(raw, default=str)))


if __name__ == "__main__":
    main()
