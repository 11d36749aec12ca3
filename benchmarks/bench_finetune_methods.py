"""The fine-tune methods side by side on the packaged ConSE teacher: same data, same budget, 3 seeds.

    .venv/bin/python benchmarks/bench_finetune_methods.py [--seeds 0,1,2] [--methods full,adapter,...]
        [--steps 30] [--batch 32]
    .venv/bin/python benchmarks/bench_finetune_methods.py --smoke     # head, one seed, 2 steps on 30 images

Each (method, seed) runs in its own process (so its peak RSS is its own): the fine-tune stage on
Fashion-MNIST's training split captioned from its labels (no Tux Paint: Tux Paint val is the general
set the fine-tune never saw, so its change from zero-shot is forgetting), then the zero-shot and
fully tuned (α=1) teacher on 500 Fashion-MNIST test images (50 a class) and on Tux Paint val.
Columns: trainable %, peak RSS, time per step, in-domain top-1, forgetting. Writes
benchmarks/results/finetune_methods.{json,md}; rows of an earlier run with the same budget are kept.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import common

# text-only = lock_image (the image tower is locked), image-only = lock_text
# learning rates: the method files' (FLYP's 1e-5 for full, CLIP-LoRA's 2e-4) raised 10x where the short
# budget would leave a method where it started; the head and adapters train new or small weights at 1e-3
METHODS = {
    "full": ["finetune=full", "finetune.train.optimizer.lr=1e-4"],
    "lock_image (text only)": ["finetune=lock_image", "finetune.train.optimizer.lr=1e-4"],
    "lock_text (image only)": ["finetune=lock_text", "finetune.train.optimizer.lr=1e-4"],
    "lora": ["finetune=lora", "finetune.train.optimizer.lr=1e-3"],  # targets auto: query/value, 1x1 convs, classifier
    "adapter": ["finetune=adapter", "finetune.train.optimizer.lr=1e-3"],
    "head": ["finetune=head", "finetune.train.optimizer.lr=1e-3", "finetune.train.optimizer.weight_decay=0.0"],
}
FMNIST = "fashion-mnist/test/top1"
# 2: step_ms is the optimizer steps alone (the engine's figure) and stage_s is recorded; rows of schema 1
# timed the stage from its start, so they are not reused
SCHEMA = 2
GENERAL = ("tuxpaint/val/i2t_r5", "tuxpaint/val/t2i_r5")
# the data of rows written before the data sizes were options
DEFAULTS = {"train_per_class": 400, "eval_per_class": 50}


def child(method: str, seed: int, steps: int, batch: int, train_per_class: int, eval_per_class: int,
          out_dir: str) -> dict:
    import torch

    from distill import pipeline
    from distill.data_build import build_data
    from distill.finetune.stage import finetune_stage
    from distill.session import seed_everything

    overrides = ["+experiment=finetune_conse", *METHODS[method], f"seed={seed}", f"+finetune.train.seed={seed}",
                 f"finetune.train.steps={steps}", f"finetune.train.batch_size={batch}", "finetune.train.eval_every=0",
                 "finetune.train.ckpt_every=0", "+finetune.train.progress=false", "finetune.val_fraction=0.05",
                 "finetune.wise_ft.alphas=[0.0,1.0]", "finetune.wise_ft.alpha=1.0", "finetune.class_balanced=false",
                 f"data.train.sources=[{{_target_: distill.datasets.fashion_mnist, split: train, per_class: {train_per_class}, "
                 "invert: true, caption_templates: ['a picture of a {}.', 'an image of the {}.', "
                 "'a product photo of a {}.']}]",
                 f"++data.eval.classification.0.source.per_class={eval_per_class}"]
    cfg = common.compose(overrides)
    torch.set_num_threads(2)
    seed_everything(seed)
    teacher = pipeline.build_teacher(cfg.teacher, torch.device("cpu"))
    trainset, eval_sets, _ = build_data(cfg.data)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    _, ft = finetune_stage(cfg.finetune, teacher, trainset, eval_sets, Path(out_dir), torch.device("cpu"))
    zs, tuned = ft["chain"]["zero_shot"], ft["chain"]["fine_tuned"]
    return {"method": method, "seed": seed, "trainable_pct": ft["trainable_pct"], "step_ms": ft["step_ms"],
            "train_s": ft["seconds"], "stage_s": ft["stage_seconds"],
            "peak_rss_gb": ft["peak_rss_gb"], "rss_before_gb": round(rss0, 3),
            "zero_shot_top1": zs[FMNIST], "tuned_top1": tuned[FMNIST],
            "forgetting_r5_points": 100 * statistics.mean(tuned[k] - zs[k] for k in GENERAL),
            "steps": ft["steps"], "train_images": steps * batch}


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def write(rows: list[dict], args: argparse.Namespace, env: dict) -> None:
    lines = ["# Fine-tune methods on the ConSE teacher: same data, same budget",
             "", f"Measured {time.strftime('%Y-%m-%d')} by `{common.command(args.argv)}` "
             f"({args.steps} steps of {args.batch} images, seeds {args.seeds} requested: the seeds column says how many ran); mean ± sample standard deviation "
             f"over seeds. Training data: {10 * args.train_per_class:,} Fashion-MNIST training images "
             f"({args.train_per_class} a class, 2 views each) captioned from their labels; 5% carved out for "
             f"validation. In-domain: top-1 on {10 * args.eval_per_class} Fashion-MNIST test images "
             f"({args.eval_per_class} a class; after tuning this is supervised in-domain, not zero-shot). Forgetting: "
             "the change of Tux Paint val R@5 (mean of image->text and text->image) from the zero-shot teacher, "
             "in points; Tux Paint is never seen. Peak RSS is the process's (teacher, data and all). "
             "ms / step: the optimizer steps alone (batch loading, forward, backward, update), mean over the "
             "run's steps; for `head` it includes the frozen backbone's one pass over each new view. Stage s: "
             "the whole fine-tune stage (copying the teacher, reading the validation images, training, the "
             "WiSE-FT sweep and the chain evaluation). "
             "Learning rates: see METHODS in the script (10x the method files' for full and one tower, 1e-3 "
             "for LoRA, adapters and head). Each row ran alone on the machine; 2 torch threads.", "",
             "| method | trainable % | peak RSS (GB) | ms / step | stage s | in-domain top-1 (%) | forgetting (R@5 points) "
             "| seeds |",
             "|---|---|---|---|---|---|---|---|"]
    zs = [r["zero_shot_top1"] * 100 for r in rows]
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        lines.append(f"| {m} | {rs[0]['trainable_pct']:.3f} | {_mean_sd([r['peak_rss_gb'] for r in rs])} | "
                     f"{_mean_sd([r['step_ms'] for r in rs])} | {_mean_sd([r['stage_s'] for r in rs])} | "
                     f"{_mean_sd([100 * r['tuned_top1'] for r in rs])} | "
                     f"{_mean_sd([r['forgetting_r5_points'] for r in rs])} | {len(rs)} |")
    lines += ["", f"Zero-shot teacher on the same {10 * args.eval_per_class} images: {statistics.mean(zs):.2f}% top-1."]
    common.write_results(args.out, lines, data={"schema": SCHEMA, "args": vars(args), "rows": rows}, env=env)


def main(argv=None) -> None:
    ap = common.parser(__doc__, "finetune_methods.md")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-per-class", type=int, default=400, help="Fashion-MNIST training images per class")
    ap.add_argument("--eval-per-class", type=int, default=50, help="Fashion-MNIST test images per class")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = common.parse(ap, argv, smoke=dict(seeds="0", methods="head", steps=2, batch=8, train_per_class=3,
                                             eval_per_class=2))
    budget = ["--steps", args.steps, "--batch", args.batch, "--train-per-class", args.train_per_class,
              "--eval-per-class", args.eval_per_class]
    if args.child:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            common.child_result(child(args.child[0], int(args.child[1]), args.steps, args.batch, args.train_per_class,
                                      args.eval_per_class, tmp))
        return
    env = common.environment()
    # every method once before any method twice, so a cut-short run still compares them all; rows of
    # an earlier run with the same budget are kept and not run again
    old, rows = common.load_json(args.out), []
    same = ("steps", "batch", "train_per_class", "eval_per_class")
    if old.get("schema") == SCHEMA and all(old["args"].get(k, DEFAULTS.get(k)) == getattr(args, k) for k in same):
        rows = old["rows"]
    done = {(r["method"], str(r["seed"])) for r in rows}
    for seed in args.seeds.split(","):
        for method in args.methods.split(","):
            if (method, seed) in done:
                continue
            t0 = time.time()
            rows.append(common.run_child(common.script_cmd(__file__, "--child", method, seed, *budget)))
            print(f"{method} seed {seed}: {rows[-1]['tuned_top1']:.3f} top-1, {time.time() - t0:.0f}s", flush=True)
            write(rows, args, env)


if __name__ == "__main__":
    main()
