"""Patience: what a longer student training buys, retention against training steps (a curve) over seeds.

    .venv/bin/python benchmarks/bench_patience.py [--steps 550,1100,2200,4400] [--seeds 0]
        [--experiment offline_finetuned] [--work DIR] [-- extra overrides]
    .venv/bin/python benchmarks/bench_patience.py --smoke     # 2 and 4 steps of +experiment=smoke, one seed (seconds)

Distillation keeps improving with long schedules (Beyer et al. 2022, "Knowledge distillation: A good
teacher is patient and consistent"); this harness measures how far that holds for this recipe. Each
(steps, seed) point is one whole `python -m distill +experiment=EXPERIMENT train.steps=N` run in its own
process and folder, with every seed of the config set to S (`seed`, `train.seed`, `data.train.seed`
and, for an experiment with a fine-tune, `finetune.train.seed`). The learning-rate schedule is a cosine
over the whole run (warm-up, then decay to the end at step N), so a point at N steps is its own run
with its own schedule, not a checkpoint of a longer run: each point is what a user gets by asking for
N steps. Runs of one seed share one cache folder (`cache.dir=<work>/seed<S>.cache`), so the teacher
cache and the teacher's text table are built by the first and reused by the others (the fine-tuned
teacher is the same for a given seed; steps only change the student's training).

Per run, from its report.json: the student's (torch fp32) Fashion-MNIST top-1 and Tux Paint R@5
retention (both directions) in percent of the teacher in the same run, its agreement with the teacher
on the general held-out sets when the report has them (`summary.general`: image cosine, prompt top-1
and k-NN agreement; absent from older reports and from the smoke data), the student training's
minutes (`training.seconds`), the stage minutes from run.log, and the whole run's minutes. Per step
count: mean ± sd over seeds and, with two seeds or more, the t-based 95% interval of the mean.
Writes benchmarks/results/patience.{md,json,png} (or --out) after every run; a --work folder of an
earlier call is collected, not rerun, for the runs that finished (their report.json exists).

Cost: the student stage is most of a flagship run and grows linearly with steps; the rest (fine-tune,
cache, token table, export, bench) is about 9-12 minutes a run whatever N. 2200 steps of the flagship
are about 25 minutes on the 2-core Xeon (~20 on a 2-core EPYC), of which student training ~13 (~9.5),
so the default 550,1100,2200,4400 is about 15 + 18 + 25 + 38 min = ~1.6 h a seed on the Xeon (~1.3 h
on the EPYC), and three seeds a working day. The 4400-step point alone is past the flagship's
30-minute budget: it shows what a longer run buys, not a default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from pathlib import Path

import common

STUDENT = "student_torch_fp32"
# the smoke run: bench_students' tiny overrides, without its step count (the harness sets train.steps)
SMOKE = ["student.token_init=random", "export.mobile.enabled=false",
         "variants=[teacher_torch_fp32,student_torch_fp32,student_onnx_fp32,student_onnx_int8]", "bench.repeats=1",
         "bench.rounds=1", "bench.warmup=0", "bench.batch_sizes=[1]", "bench.settle_s=0.0", "++bench.ceilings=false"]
RETENTION = [("top1_retained", "Fashion-MNIST top-1 kept (%)"), ("i2t_r5_retained", "Tux i2t R@5 kept (%)"),
             ("t2i_r5_retained", "Tux t2i R@5 kept (%)")]
TIMES = [("train_minutes", "student training (min)"), ("run_minutes", "whole run (min)")]
GENERAL = [("image_cosine", "image cosine", 1.0), ("top1", "prompt top-1 agreement (%)", 100.0),
           ("knn", "k-NN agreement (%)", 100.0)]


def stage_minutes(run_dir: Path) -> dict[str, float]:
    """Minutes per pipeline stage, from the timestamps of run.log's "stage X" lines to the next one
    (the last, bench, ends at "report written"); {} without a run.log."""
    log = run_dir / "run.log"
    marks = []
    for line in (log.read_text().splitlines() if log.is_file() else []):
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO distill: (stage (\w+)|report written)", line)
        if m:
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            marks.append((m.group(3) or "end", t))
    return {name: (t1 - t0) / 60 for (name, t0), (_, t1) in zip(marks, marks[1:])}


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")


def run_figures(report: dict, run_dir: Path) -> dict:
    """One run's figures: retention in percent of the teacher, general agreement (keys
    ``general:<set>:<metric>``, when the report has them), minutes."""
    summ, training = report.get("summary", {}), report.get("training", {})
    acc = summ.get("accuracy_retained", {}).get(STUDENT, {})
    fm = next((k for k in acc if k.startswith("fashion")), next(iter(acc), None))
    out = {"top1_retained": 100 * _num(acc.get(fm)) if fm else float("nan")}
    r5 = summ.get("r5_retained", {}).get(STUDENT, {})
    tux = next((v for k, v in r5.items() if k.startswith("tuxpaint")), next(iter(r5.values()), {}))
    for d in ("i2t", "t2i"):
        out[f"{d}_r5_retained"] = 100 * _num(tux.get(d))
    for name, entry in ((summ.get("general") or {}).get(STUDENT) or {}).items():
        for metric, _, scale in GENERAL:
            out[f"general:{name}:{metric}"] = scale * _num(entry.get(metric))
    out["train_minutes"] = _num(training.get("seconds")) / 60
    out["run_minutes"] = _num(report.get("run_minutes", summ.get("run_minutes")))
    out["step_ms"] = _num(training.get("step_ms"))
    out["steps_done"] = training.get("steps")
    out["early_stopped"] = bool(training.get("early_stopped"))
    for name, minutes in stage_minutes(run_dir).items():
        out[f"stage_{name}_minutes"] = minutes
    out["cache_built"] = "teacher cache built:" in ((run_dir / "run.log").read_text()
                                                    if (run_dir / "run.log").is_file() else "")
    return out


def columns(runs: list[dict]) -> list[tuple[str, str]]:
    """(key, label) of the table's columns: retention, the general sets any run reported, then times."""
    general = []
    for r in runs:
        for k in r:
            if k.startswith("general:") and k not in (g for g, _ in general):
                _, name, metric = k.split(":", 2)
                general.append((k, f"{name} {next(lbl for m, lbl, _ in GENERAL if m == metric)}"))
    return [*RETENTION, *general, *TIMES]


def aggregate(runs: list[dict], cols: list[tuple[str, str]]) -> list[dict]:
    """Per step count (ascending): the seeds and each column's mean, sd and 95% interval of the mean."""
    out = []
    for steps in sorted({r["steps"] for r in runs}):
        rs = [r for r in runs if r["steps"] == steps]
        out.append({"steps": steps, "seeds": [r["seed"] for r in rs],
                    **{k: common.mean_ci(r.get(k) for r in rs) for k, _ in cols}})
    return out


def plot(rows: list[dict], cols: list[tuple[str, str]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    general = [(k, lbl) for k, lbl in cols if k.startswith("general:") and not k.endswith(":image_cosine")]
    fig, axes = plt.subplots(1, 2 if general else 1, figsize=(11 if general else 6.5, 4.5), squeeze=False)
    steps = [r["steps"] for r in rows]

    def curve(ax, key, label, i):
        ys = [r[key]["mean"] for r in rows]
        lo = [y - r[key]["ci95"][0] if r[key]["n"] > 1 else 0.0 for y, r in zip(ys, rows)]
        hi = [r[key]["ci95"][1] - y if r[key]["n"] > 1 else 0.0 for y, r in zip(ys, rows)]
        ax.errorbar(steps, ys, yerr=[lo, hi], fmt="o-", capsize=3, color=f"C{i}", label=label)

    for i, (k, lbl) in enumerate(RETENTION):
        curve(axes[0][0], k, lbl.replace(" (%)", ""), i)
    axes[0][0].set_ylabel("student / teacher in the same run (%)")
    axes[0][0].set_title(title)
    if general:
        for i, (k, lbl) in enumerate(general):
            curve(axes[0][1], k, lbl.replace(" (%)", ""), i + 3)
        axes[0][1].set_ylabel("agreement with the teacher (%)")
        axes[0][1].set_title("Away from the training domains (data.eval.general)")
    ticks = [f"{s}\n{r['train_minutes']['mean']:.1f} min" if not math.isnan(r["train_minutes"]["mean"]) else str(s)
             for s, r in zip(steps, rows)]
    for ax in axes[0]:
        if len(steps) > 1 and min(steps) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(steps, ticks, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("student training steps (and minutes of student training)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def cell(s: dict) -> str:
    if math.isnan(s["mean"]):
        return "-"
    if s["n"] < 2:
        return f"{s['mean']:.2f}"
    return f"{s['mean']:.2f} ± {s['sd']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"


def write(args: argparse.Namespace, runs: list[dict], env: dict) -> None:
    cols = columns(runs)
    rows = aggregate(runs, cols)
    png = Path(args.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, cols, png, f"Patience: {args.experiment}, retention against steps")
    n_seeds = len({r["seed"] for r in runs})
    lines = ["# Patience: retention against student training steps", "",
             f"`{common.command(args.argv)}`: each (steps, seed) one whole `python -m distill "
             f"+experiment={args.experiment} train.steps=N` run with every seed of the config set to S; the "
             "learning-rate schedule is a cosine over each run, so every point is its own run, not a checkpoint "
             "of a longer one. Retention is the student's (torch fp32) figure in percent of the teacher's in the "
             f"same run. {'Mean ± sd over seeds [t-based 95% interval of the mean]' if n_seeds > 1 else 'One seed'}; "
             f"the curve: `{png.name}`"
             + (" (bars: the 95% interval of the mean)." if n_seeds > 1 else "."), "",
             "| steps | seeds | " + " | ".join(label for _, label in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {','.join(map(str, r['seeds']))} | " + " | ".join(cell(r[k]) for k, _ in cols)
                     + " |")
    lines += ["", "Per run (stage minutes from run.log; `cache built`: the run built the teacher cache, "
              "the others of its seed reused it):", "",
              "| steps | seed | " + " | ".join(label for _, label in RETENTION)
              + " | step (ms) | training (min) | whole run (min) | cache built | early stopped |",
              "|---" * (len(RETENTION) + 7) + "|"]
    f = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"  # noqa: E731
    for r in sorted(runs, key=lambda r: (r["steps"], r["seed"])):
        lines.append(f"| {r['steps']} | {r['seed']} | " + " | ".join(f(r[k]) for k, _ in RETENTION)
                     + f" | {f(r['step_ms'])} | {f(r['train_minutes'])} | {f(r['run_minutes'])} | "
                     f"{'yes' if r['cache_built'] else 'no'} | {'yes' if r['early_stopped'] else 'no'} |")
    common.write_results(args.out, lines, {"args": vars(args), "columns": cols, "rows": rows, "runs": runs}, env=env)


def main(argv=None) -> None:
    ap = common.parser(__doc__, "patience.md")
    ap.add_argument("--steps", default="550,1100,2200,4400", help="student training steps (train.steps), comma list")
    ap.add_argument("--seeds", default="0", help="comma list")
    ap.add_argument("--experiment", default="offline_finetuned", help="+experiment= of every run (smoke: smoke)")
    ap.add_argument("--work", default=None, help="folder for the runs and their logs (default: a temporary one)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = common.parse(ap, argv, smoke={"steps": "2,4", "seeds": "0", "experiment": "smoke"})
    steps, seeds = [int(s) for s in args.steps.split(",")], [int(s) for s in args.seeds.split(",")]
    base = [f"+experiment={args.experiment}", *(SMOKE if args.smoke else [])]
    # the fine-tune's batch order too, when the experiment (or an override) has a fine-tune
    tuned = str(common.compose([*base, *args.overrides]).get("finetune", {}).get("method", "none")) != "none"
    env = common.environment()
    work = Path(args.work) if args.work else common.scratch(args, "bench_patience_")
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    for seed in seeds:
        for n in steps:
            out = work / f"steps{n}.seed{seed}"
            cmd = [sys.executable, "-m", "distill", *base, f"train.steps={n}", f"seed={seed}", f"train.seed={seed}",
                   f"data.train.seed={seed}", *([f"++finetune.train.seed={seed}"] if tuned else []),
                   f"out_dir={out}", f"cache.dir={work / f'seed{seed}.cache'}", "train.progress=false", *args.overrides]
            if not (out / "report.json").is_file():  # --work of an earlier call: a finished run is collected
                common.run_logged(cmd, work / f"steps{n}.seed{seed}.log")
            report = json.loads((out / "report.json").read_text())
            runs.append({"steps": n, "seed": seed, "out": str(out), **run_figures(report, out)})
            write(args, runs, env)  # after every run: a stopped series keeps what it measured
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "out"}), flush=True)


if __name__ == "__main__":
    main()
