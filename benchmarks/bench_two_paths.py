"""The two paths a user weighs, on the same data and step budget, 3 seeds:

  A. fine-tune the small student directly: distil a generic student from the zero-shot ConSE teacher,
     then fine-tune that student on the domain pairs (full fine-tune + WiSE-FT);
  B. distil from a fine-tuned teacher: fine-tune ConSE on the same pairs (head + WiSE-FT), then
     distil the student from the tuned teacher (the `offline_finetuned` flagship's chain).

    .venv/bin/python benchmarks/bench_two_paths.py [--seeds 0,1,2] [--distill-steps 500]
        [--tune-steps 200] [--per-class 100]
    .venv/bin/python benchmarks/bench_two_paths.py --smoke     # one seed, 2 steps of everything, few images

Both paths see the same training set (the offline data: Fashion-MNIST train captioned from its
labels + Tux Paint train), the same distillation steps, and the same fine-tune steps and batch; only
what is fine-tuned differs (the 6.7M student, or the 27M teacher's head). The budget is smaller than
the flagship's (2200 distillation steps, 400 fine-tune steps) so that 3 seeds fit on 2 cores; both
paths' wall time is reported. Evaluation: Fashion-MNIST test (``--per-class`` images a class, top-1,
in-domain) and Tux Paint val (R@5 both ways; its train captions are in the training set).
Writes benchmarks/results/two_paths.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import common

FMNIST = "fashion-mnist/test/top1"
R5 = ("tuxpaint/val/i2t_r5", "tuxpaint/val/t2i_r5")
# the smoke run's few images and texts (with --train-per-class): seconds of each stage
SMOKE_OVERRIDES = ["++data.train.sources.1.source.limit=12", "++data.eval.retrieval.0.source.limit=16",
                   "data.train.corpus.imagenet_classes=false", "data.train.corpus.words.limit=20",
                   "student.token_init=random", "finetune.wise_ft.alphas=[0.0,1.0]", "train.batch_size=8",
                   "train.extra_texts=8", "finetune.train.batch_size=8"]


def _scores(metrics: dict) -> dict:
    return {"top1": 100 * metrics[FMNIST], "r5": 100 * statistics.mean(metrics[k] for k in R5)}


def _distil(cfg, teacher, trainset, eval_sets, out: Path) -> tuple[dict, object, dict]:
    """(scores, student, model_cfg): the cache of ``teacher``'s embeddings, then the distillation."""
    import torch

    from distill import pipeline
    from distill.encoders import ClipEncoder
    from distill.evaluation import evaluate_encoder
    from distill.session import seed_everything
    from distill.train import train_stage

    cpu = torch.device("cpu")
    cache = pipeline.cache_stage(cfg.cache, teacher, trainset, cpu)
    teacher = teacher.release() if hasattr(teacher, "release") else teacher
    seed_everything(int(cfg.seed))
    student, model_cfg = pipeline.build_student_stage(cfg.student, teacher, cache_dir=cfg.cache.dir)
    tok = pipeline.student_tokenizer(model_cfg)
    train_stage(cfg, teacher, student, model_cfg, tok, trainset, eval_sets, cache, out, cpu)
    enc = ClipEncoder(student.eval(), tok, int(model_cfg["vision_cfg"]["image_size"]), device=cpu)
    return _scores(evaluate_encoder(enc, eval_sets)), student, model_cfg


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict:
    import torch

    from distill import pipeline
    from distill.data_build import build_data
    from distill.evaluation import evaluate_encoder
    from distill.export import save_open_clip_dir
    from distill.finetune.stage import finetune_stage
    from distill.session import seed_everything

    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    base = ["+experiment=offline_finetuned", f"seed={seed}", f"+finetune.train.seed={seed}",
            f"train.steps={args.distill_steps}", "train.ckpt_every=0", "train.progress=false",
            f"finetune.train.steps={args.tune_steps}", "finetune.train.eval_every=50", "finetune.train.ckpt_every=0",
            "+finetune.train.progress=false", f"cache.dir={work / 'cache'}",
            f"++data.eval.classification.0.source.per_class={args.per_class}",
            *([f"data.train.sources.0.per_class={args.train_per_class}", "data.train.sources.1.times=1"]
              if args.train_per_class else []), *(SMOKE_OVERRIDES if args.smoke else [])]
    cfg = common.compose(base)
    seed_everything(seed)
    zero_shot = pipeline.build_teacher(cfg.teacher, cpu)
    trainset, eval_sets, _ = build_data(cfg.data)
    row: dict = {"seed": seed, "teacher_zero_shot": _scores(evaluate_encoder(zero_shot, eval_sets))}

    # B: fine-tune the teacher (head), then distil from it
    t0 = time.perf_counter()
    tuned, ft = finetune_stage(cfg.finetune, zero_shot, trainset, eval_sets, work / f"B{seed}", cpu)
    row["teacher_tuned"] = {**_scores(evaluate_encoder(tuned, eval_sets)), "alpha": ft["alpha"]}
    t1 = time.perf_counter()
    row["B"], _, _ = _distil(cfg, tuned, trainset, eval_sets, work / f"B{seed}")
    row["B"]["minutes"] = (time.perf_counter() - t0) / 60
    row["B"]["finetune_minutes"] = (t1 - t0) / 60

    # A: distil a generic student from the zero-shot teacher, then fine-tune the student (full)
    t0 = time.perf_counter()
    generic, student, model_cfg = _distil(cfg, zero_shot, trainset, eval_sets, work / f"A{seed}")
    row["A_generic"] = generic
    folder = save_open_clip_dir(student, model_cfg, work / f"A{seed}" / "open_clip")
    t1 = time.perf_counter()
    scfg = common.compose([*base, "finetune=full", "teacher=openclip", f"teacher.model_name=local-dir:{folder}",
                     "teacher.pretrained=null", f"finetune.train.optimizer.lr={args.student_lr}",
                     "finetune.train.optimizer.weight_decay=0.1"])
    student_teacher = pipeline.build_teacher(scfg.teacher, cpu)
    tuned_student, sft = finetune_stage(scfg.finetune, student_teacher, trainset, eval_sets, work / f"A{seed}ft", cpu)
    row["A"] = {**_scores(evaluate_encoder(tuned_student, eval_sets)), "alpha": sft["alpha"],
                "minutes": (time.perf_counter() - t0) / 60, "finetune_minutes": (time.perf_counter() - t1) / 60}
    return row


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def write(rows: list[dict], args: argparse.Namespace, env: dict) -> None:
    col = lambda path, key: [r[path][key] for r in rows]  # noqa: E731
    lines = [
        "# Fine-tune the student, or distil from a fine-tuned teacher?",
        "",
        f"`{common.command(args.argv)}`. Seeds {args.seeds}; mean ± sd over "
        "seeds (each seed reruns the whole chain: fine-tunes, distillations, draws). Same training set for every "
        f"step (Fashion-MNIST train captioned from labels + Tux Paint train), {args.distill_steps} distillation "
        f"steps x 64 and {args.tune_steps} fine-tune steps x 64 on both paths.",
        "",
        "- **A** = distil a generic student from the zero-shot teacher, then fully fine-tune the student "
        f"(lr {args.student_lr}, FLYP same-label masking) and pick WiSE-FT α on a validation split of the training data.",
        "- **B** = fine-tune the teacher (ConSE head: classifier + class table + temperature) with WiSE-FT, then "
        "distil the student from the tuned teacher (the `offline_finetuned` chain at a smaller budget).",
        "",
        f"In-domain: Fashion-MNIST test top-1 on {10 * args.per_class} images ({args.per_class} a class). "
        "Tux Paint val: mean of image->text and text->image R@5 (its train captions are in the training set).",
        "",
        "| model | Fashion-MNIST top-1 (%) | Tux Paint R@5 (%) | wall time (min) |",
        "|---|---|---|---|",
        f"| teacher zero-shot | {_ms(col('teacher_zero_shot', 'top1'))} | {_ms(col('teacher_zero_shot', 'r5'))} | - |",
        f"| teacher fine-tuned (α* {sorted({r['teacher_tuned']['alpha'] for r in rows})}) | "
        f"{_ms(col('teacher_tuned', 'top1'))} | {_ms(col('teacher_tuned', 'r5'))} | "
        f"{_ms(col('B', 'finetune_minutes'))} |",
        f"| **B**: student distilled from the tuned teacher | **{_ms(col('B', 'top1'))}** | **{_ms(col('B', 'r5'))}** | "
        f"{_ms(col('B', 'minutes'))} (whole path) |",
        f"| generic student (distilled from the zero-shot teacher) | {_ms(col('A_generic', 'top1'))} | "
        f"{_ms(col('A_generic', 'r5'))} | - |",
        f"| **A**: generic student fine-tuned (α* {sorted({r['A']['alpha'] for r in rows})}) | **{_ms(col('A', 'top1'))}** | "
        f"**{_ms(col('A', 'r5'))}** | {_ms(col('A', 'minutes'))} (whole path; its fine-tune "
        f"{_ms(col('A', 'finetune_minutes'))}) |",
        "",
        "Per seed (top-1 / R@5):",
        "",
        "| seed | teacher tuned | B | generic | A |",
        "|---|---|---|---|---|",
        *[f"| {r['seed']} | {r['teacher_tuned']['top1']:.1f} / {r['teacher_tuned']['r5']:.1f} | "
          f"{r['B']['top1']:.1f} / {r['B']['r5']:.1f} | {r['A_generic']['top1']:.1f} / {r['A_generic']['r5']:.1f} | "
          f"{r['A']['top1']:.1f} / {r['A']['r5']:.1f} |" for r in rows],
    ]
    common.write_results(args.out, lines, data={"args": vars(args), "rows": rows}, env=env)


def main(argv=None) -> None:
    ap = common.parser(__doc__, "two_paths.md")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--distill-steps", type=int, default=500)
    ap.add_argument("--tune-steps", type=int, default=200)
    ap.add_argument("--student-lr", type=float, default=1e-4)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--train-per-class", type=int, default=0,
                    help="a smaller training set for a quick check of the script (0: the offline data as configured)")
    ap.add_argument("--work", default=None, help="folder for caches and runs (default: a temporary one)")
    args = common.parse(ap, argv, smoke=dict(seeds="0", distill_steps=2, tune_steps=2, per_class=2,
                                             train_per_class=3))
    env = common.environment()
    work = Path(args.work) if args.work else common.scratch(args, "two_paths_")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(run_seed(seed, args, work))
        write(rows, args, env)  # after every seed: a stopped run keeps what it measured
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
