"""The fine-tune -> distill -> ship flagship (`+experiment=offline_finetuned`) over several seeds.

    .venv/bin/python benchmarks/bench_flagship_seeds.py [--seeds 0,1,2] [--work DIR] [--name N] [-- extra overrides]
    .venv/bin/python benchmarks/bench_flagship_seeds.py --smoke     # one seed at a tiny budget (about a minute)

Each seed is one whole `python -m distill +experiment=offline_finetuned` run in its own process
and folder, with every seed of the config set to S: the student's initialisation (`seed`), both
trainings' batch order (`train.seed`, `finetune.train.seed`) and the augmented views
(`data.train.seed`; the teacher cache is built anew for each seed). The validation split is carved
by a hash of the image keys, the same for every seed. Every seed starts from an empty cache of its
own (DISTILL_CACHE_DIR=<work>/seed<S>.cache), as on a fresh machine: the BPE token table, keyed by
the text tower alone, would otherwise be reused by the later seeds.
Writes benchmarks/results/<name>.{json,md} (default flagship_seeds; or --out) after every seed: mean ± sd over seeds and a
t-based 95% interval of the mean, per figure, next to each seed's own figures and targets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
import time
from pathlib import Path

import common

FM, TUX = "fashion-mnist/test", "tuxpaint/val"
# the smoke run: 30 Fashion-MNIST and 12 Tux Paint training images, 20 test images, a few steps of each training
SMOKE_OVERRIDES = [
    "data.train.sources=[{_target_: distill.datasets.fashion_mnist, split: train, per_class: 3, invert: true, "
    "caption_templates: ['a picture of a {}.']}, {_target_: distill.datasets.tuxpaint, split: train, limit: 12}]",
    "++data.eval.classification.0.source.per_class=2", "++data.eval.retrieval.0.source.limit=16",
    "data.train.corpus.imagenet_classes=false", "data.train.corpus.words.limit=20", "finetune.train.steps=3",
    "finetune.train.batch_size=8", "finetune.train.eval_every=0", "finetune.val_fraction=0.2",
    "finetune.wise_ft.alphas=[0.0,1.0]", "+finetune.train.progress=false", "student.token_init=random",
    "train.steps=2", "train.batch_size=8", "train.extra_texts=8", "export.mobile.enabled=false",
    "variants=[teacher_torch_fp32,student_torch_fp32,student_onnx_fp32,student_onnx_int8]", "bench.repeats=1",
    "bench.rounds=1", "bench.warmup=0", "bench.batch_sizes=[1]", "bench.settle_s=0.0", "++bench.ceilings=false"]


def stage_minutes(run_dir: Path) -> dict[str, float]:
    """Minutes per pipeline stage, from the timestamps of run.log's "stage X" lines to the next one
    (the last, bench, ends at "report written")."""
    marks = []
    for line in (run_dir / "run.log").read_text().splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO distill: (stage (\w+)|report written)", line)
        if m:
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            marks.append((m.group(3) or "end", t))
    return {name: (t1 - t0) / 60 for (name, t0), (_, t1) in zip(marks, marks[1:])}


def figures(report: dict, run_dir: Path) -> dict:
    """The flagship's figures of one run, in percent (minutes for times)."""
    v, ft, summ = report["variants"], report["finetune"], report["summary"]
    ref, st, q = v["teacher_torch_fp32"], v["student_torch_fp32"], v["student_onnx_int8"]
    chain = ft.get("chain") or {}
    out = {
        "teacher_zero_shot_top1": 100 * chain.get("zero_shot", {}).get(f"{FM}/top1", float("nan")),
        "alpha": ft["alpha"],
        "teacher_top1": 100 * ref["zeroshot"][FM]["top1"],
        "student_top1": 100 * st["zeroshot"][FM]["top1"],
        "student_int8_top1": 100 * q["zeroshot"][FM]["top1"],
        "top1_retained": 100 * summ["accuracy_retained"]["student_torch_fp32"][FM],
        "int8_loss_points": summ["int8_loss_points"]["onnxruntime"][FM],
        "minutes": report.get("run_minutes"),
        "finetune_train_minutes": ft["seconds"] / 60,
    }
    stages = stage_minutes(run_dir)
    for name in ("finetune", "cache", "student", "train", "export", "bench"):
        out[f"{name}_minutes"] = stages.get(name, float("nan"))
    for d in ("i2t", "t2i"):
        out[f"teacher_{d}_r5"] = 100 * ref["retrieval"][TUX][f"{d}_r5"]
        out[f"student_{d}_r5"] = 100 * st["retrieval"][TUX][f"{d}_r5"]
        out[f"{d}_r5_retained"] = 100 * summ["r5_retained"]["student_torch_fp32"][TUX][d]
    out["teacher_zero_shot_i2t_r5"] = 100 * chain.get("zero_shot", {}).get(f"{TUX}/i2t_r5", float("nan"))
    return out


ROWS = [  # (key, label, target as text)
    ("teacher_zero_shot_top1", "teacher zero-shot, Fashion-MNIST top-1 (%)", ""),
    ("teacher_top1", "teacher tuned at α*, Fashion-MNIST top-1 (%)", ">= 80"),
    ("student_top1", "student, Fashion-MNIST top-1 (%)", ""),
    ("top1_retained", "student / teacher top-1 (%)", ">= 95"),
    ("student_int8_top1", "student int8 (ONNX), Fashion-MNIST top-1 (%)", ""),
    ("int8_loss_points", "int8 loss (points)", "<= 0.5"),
    ("teacher_zero_shot_i2t_r5", "teacher zero-shot, Tux Paint i2t R@5 (%)", ""),
    ("teacher_i2t_r5", "teacher tuned, Tux Paint i2t R@5 (%)", ""),
    ("student_i2t_r5", "student, Tux Paint i2t R@5 (%)", ""),
    ("i2t_r5_retained", "student / teacher i2t R@5 (%)", ">= 90"),
    ("teacher_t2i_r5", "teacher tuned, Tux Paint t2i R@5 (%)", ""),
    ("student_t2i_r5", "student, Tux Paint t2i R@5 (%)", ""),
    ("t2i_r5_retained", "student / teacher t2i R@5 (%)", ">= 90"),
    ("minutes", "whole run (min)", "<= 30"),
    ("finetune_minutes", "stage fine-tune: training, WiSE-FT sweep, chain evaluation on all test images (min)", ""),
    ("finetune_train_minutes", "of which the fine-tune's training (min)", ""),
    ("cache_minutes", "stage teacher cache (min)", ""),
    ("student_minutes", "stage student: the BPE token table from the teacher (min)", ""),
    ("train_minutes", "stage student training (min)", ""),
    ("export_minutes", "stage export (min)", ""),
    ("bench_minutes", "stage bench: 6 variants on all test images, latency rounds (min)", ""),
]


def write(rows: list[dict], args: argparse.Namespace, env: dict) -> None:
    agg = {k: common.mean_ci([r["figures"][k] for r in rows]) for k, _, _ in ROWS}
    seeds = [r["seed"] for r in rows]
    f = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"  # noqa: E731
    lines = [
        "# The fine-tune -> distill -> ship flagship over seeds",
        "",
        f"`{common.command(args.argv)}`: each seed one whole "
        "`python -m distill +experiment=offline_finetuned` run with `seed`, `train.seed`, `finetune.train.seed` and "
        "`data.train.seed` all set to S (init, both trainings' batch order, the augmented views), alone on the "
        "machine unless noted. "
        f"Seeds {seeds}; mean ± sd over seeds and the t-based 95% interval of the mean. All 10,000 "
        "Fashion-MNIST test images (top-1 after tuning is supervised in-domain, not zero-shot); Tux Paint val, "
        "108 pairs. Every seed starts from an empty cache of its own, as on a fresh machine.",
        "",
        "| figure | target | mean ± sd | 95% interval of the mean | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|---|---|" + "---|" * len(seeds),
    ]
    for k, label, tgt in ROWS:
        a = agg[k]
        lines.append(f"| {label} | {tgt or '-'} | {f(a['mean'])} ± {f(a['sd'])} | [{f(a['ci95'][0])}, {f(a['ci95'][1])}] | "
                     + " | ".join(f(r["figures"][k]) for r in rows) + " |")
    lines += ["", f"WiSE-FT α* per seed: {[r['figures']['alpha'] for r in rows]}.", "",
              "Targets per seed (report.json `targets`):", ""]
    for r in rows:
        missed = [f"{k} ({'not measured' if t['measured'] is None else format(t['measured'], '.3f')} vs "
                  f"{t['direction']} {t['target']})" for k, t in r["targets"].items() if not t["met"]]
        lines.append(f"- seed {r['seed']}: {len(r['targets']) - len(missed)} of {len(r['targets'])} met"
                     + (f"; missed: {', '.join(missed)}" if missed else "") + (f" ({r['note']})" if r.get("note") else ""))
    common.write_results(args.out, lines, data={"args": vars(args), "rows": rows, "aggregate": agg}, env=env)


def run_seed(seed: int, work: Path, extra: list[str]) -> dict:
    out = work / f"seed{seed}"
    cmd = [sys.executable, "-m", "distill", "+experiment=offline_finetuned", f"seed={seed}", f"train.seed={seed}",
           f"+finetune.train.seed={seed}", f"data.train.seed={seed}", f"out_dir={out}", "train.progress=false", *extra]
    t0 = time.perf_counter()
    if not (out / "report.json").is_file():  # --work of an earlier call: a finished seed is collected, not rerun
        common.run_logged(cmd, work / f"seed{seed}.log", env={"DISTILL_CACHE_DIR": str(work / f"seed{seed}.cache")})
    report = json.loads((out / "report.json").read_text())
    return {"seed": seed, "wall_minutes": (time.perf_counter() - t0) / 60, "out": str(out),
            "figures": figures(report, out), "targets": report.get("targets", {})}


def main(argv=None) -> None:
    ap = common.parser(__doc__, "flagship_seeds.md")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", default=None, help="folder for the runs and their logs (default: a temporary one)")
    ap.add_argument("--note", default="", help="seed=text notes, comma-separated (e.g. '2=shared the machine with CI')")
    ap.add_argument("--name", default=None, help="results file name in benchmarks/results (instead of --out)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = common.parse(ap, argv, smoke=dict(seeds="0"))
    if args.name and not any(a == "--out" or a.startswith("--out=") for a in args.argv):
        args.out = str(common.RESULTS / f"{args.name}.md")
    extra = [*(SMOKE_OVERRIDES if args.smoke else []), *args.overrides]
    env = common.environment()
    work = Path(args.work) if args.work else common.scratch(args, "flagship_seeds_")
    work.mkdir(parents=True, exist_ok=True)
    notes = dict(n.split("=", 1) for n in args.note.split(",") if "=" in n)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(run_seed(seed, work, extra))
        rows[-1]["note"] = notes.get(str(seed), "")
        write(rows, args, env)  # after every seed: a stopped run keeps what it measured
        print(json.dumps({"seed": seed, **rows[-1]["figures"]}), flush=True)


if __name__ == "__main__":
    main()
