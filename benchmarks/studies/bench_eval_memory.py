"""Peak memory of evaluating the full Fashion-MNIST test set (10,000 images) with distill.evaluation.

Evaluation streams an eval set: images are decoded and encoded 256 at a time and only the (N, D)
embeddings are kept. This measures the peak resident memory (VmHWM, reset per measurement by
distill.bench.measure_peak_rss) of loading the set (load_eval_set: one readability scan) plus
evaluating it (zero-shot top-1/top-5 with bootstrap intervals) with a random-weight student at its
own image size: the w192 ViT at 160 px and the w384 ViT at 224 px (conf/student). Each measurement
runs in a fresh process. For comparison, the all-at-once path (``EvalSet.images``: one (N, 3, S, S)
float tensor, what evaluation held before) is measured on a 1,000-image subset; its pixels alone are
N x 3 x S x S x 4 bytes (6.0 GB for 10,000 images at 224 px).

    .venv/bin/python benchmarks/studies/bench_eval_memory.py [--threads 2] [--out benchmarks/results/eval_memory.md]

A study (streamed against all-at-once evaluation, the change it was measured for); it appends a section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402

STUDENTS = {160: "vit_w192_d6_p32_160", 224: "vit_w384_d6_p32"}
# (image size, images (None = all 10,000), mode)
CASES = [(160, 1000, "streamed"), (160, None, "streamed"), (224, 1000, "streamed"), (224, None, "streamed"),
         (224, 1000, "all_at_once")]


def _encoder(size: int):
    from omegaconf import OmegaConf
    import open_clip

    from distill.encoders import ClipEncoder
    from distill.students import build_student

    b = OmegaConf.to_container(OmegaConf.load(Path(common.config_dir()) / "student" / f"{STUDENTS[size]}.yaml").builder)
    model, cfg = build_student(512, b["vision"], b["text"])
    tok = open_clip.SimpleTokenizer(context_length=int(cfg["text_cfg"]["context_length"]))
    return ClipEncoder(model.eval(), tok, size)


def measure(size: int, limit: int | None, mode: str, threads: int) -> dict:
    """One case, in this process: -> {"peak_rss_mb", "delta_mb", "seconds", "images", "top1", ...}."""
    import torch

    from distill import datasets, evaluation
    from distill.data import EvalSet, load_eval_set

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = _encoder(size)
    out: dict = {}

    def body() -> None:
        t0 = time.perf_counter()
        es = load_eval_set("fashion-mnist/test", datasets.fashion_mnist("test", limit=limit, invert=True), size,
                           templates=["a photo of a {}."])
        if mode == "all_at_once":  # what evaluation held before: every image as one float tensor
            es = EvalSet(es.name, es.images, labels=es.labels, classnames=es.classnames, templates=es.templates)
        res = evaluation.evaluate(enc, {"classification": {"fm": es}}, image_batch=32, chunk_size=256)
        res = res["classification"]["fm"]
        out.update(images=len(es), seconds=round(time.perf_counter() - t0, 1), embed_dim=res.image_emb.shape[1],
                   **res.row(4))

    out.update(common.measure_peak_rss(body))
    return out


def _run_case(size: int, limit: int | None, mode: str, threads: int) -> dict:
    row = common.run_child(common.script_cmd(__file__, "--child", json.dumps([size, limit, mode, threads])))
    print(f"{mode} {size}px {row['images']} images: peak {row['peak_rss_mb']} MiB (+{row['delta_mb']}), "
          f"{row['seconds']} s", flush=True)
    return {"size": size, "mode": mode, "student": STUDENTS[size], **row}


def write_markdown(rows: list[dict], path: str, argv: list[str]) -> None:
    md = [f"## Evaluation memory, Fashion-MNIST test ({time.strftime('%Y-%m-%d')})\n",
          f"Command: `{common.command(argv)}`\n",
          "Peak RSS = the process's resident high-water mark while loading + evaluating (imports and the "
          "model are in the baseline); rise = peak minus resident size just before. Random-weight students, "
          "so top-1 is near chance: the interval is there to show it is computed, not a result. Pixels = what "
          "one (N, 3, S, S) float32 tensor of the set takes.\n",
          "| path | image size | student | images | peak RSS (MiB) | rise (MiB) | pixels all at once (MiB) "
          "| embeddings (MiB) | seconds | top1 [95% CI] (%) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pixels = r["images"] * 3 * r["size"] ** 2 * 4 / 2 ** 20
        emb = r["images"] * r["embed_dim"] * 4 / 2 ** 20
        ci = r.get("top1_ci95") or [None, None]
        md.append(f"| {r['mode']} | {r['size']} | {r['student']} | {r['images']:,} | {r['peak_rss_mb']} | "
                  f"{r['delta_mb']} | {pixels:,.0f} | {emb:.1f} | {r['seconds']} | "
                  f"{100 * r['top1']:.2f} [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}] |")
    runs = common.load_json(path).get("runs", []) + [{"argv": argv, "rows": rows}]
    common.write_results(path, md, data={"runs": runs}, append=True)


def main(argv=None) -> None:
    ap = common.parser(__doc__, "eval_memory.md", smoke=False)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = common.parse(ap, argv)
    if args.child:
        common.child_result(measure(*json.loads(args.child)))
        return
    rows = [_run_case(size, limit, mode, args.threads) for size, limit, mode in CASES]
    write_markdown(rows, args.out, args.argv)


if __name__ == "__main__":
    main()
