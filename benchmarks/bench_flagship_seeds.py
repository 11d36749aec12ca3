"""The fine-tune -> distill -> ship flagship (`+experiment=offline_finetuned`) over several seeds.

    .venv/bin/python benchmarks/bench_flagship_seeds.py [--seeds 0,1,2] [--work DIR] [--name N] [-- extra overrides]

Each seed is one whole `python -m distill +experiment=offline_finetuned` run in its own process
and folder, with every seed of the config set to S: the student's initialisation (`seed`), both
trainings' batch order (`train.seed`, `finetune.train.seed`) and the augmented views
(`data.train.seed`; the teacher cache is built anew for each seed). The validation split is carved
by a hash of the image keys, the same for every seed. Every seed starts from an empty cache of its
own (DISTILL_CACHE_DIR=<work>/seed<S>.cache), as on a fresh machine: the BPE token table, keyed by
the text tower alone, would otherwise be reused by the later seeds.
Writes benchmarks/results/<name>.{json,md} (default flagship_seeds) after every seed: mean ± sd over seeds and a
t-based 95% interval of the mean, per figure, next to each seed's own figures and targets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
FM, TUX = "fashion-mnist/test", "tuxpaint/val"
# two-sided 95% Student-t quantiles by degrees of freedom (n - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


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
    tr = report.get("training", {})
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


def stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return {"mean": float("nan"), "sd": float("nan"), "ci95": [float("nan")] * 2, "n": 0}
    m = statistics.mean(xs)
    if len(xs) < 2:
        return {"mean": m, "sd": float("nan"), "ci95": [float("nan")] * 2, "n": 1}
    sd = statistics.stdev(xs)
    h = T95.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))
    return {"mean": m, "sd": sd, "ci95": [m - h, m + h], "n": len(xs)}


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
    from distill.bench import environment_section

    OUT.mkdir(parents=True, exist_ok=True)
    agg = {k: stats([r["figures"][k] for r in rows]) for k, _, _ in ROWS}
    (OUT / f"{args.name}.json").write_text(json.dumps(
        {"args": vars(args), "environment": env, "rows": rows, "aggregate": agg}, indent=2))
    seeds = [r["seed"] for r in rows]
    f = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"  # noqa: E731
    lines = [
        "# The fine-tune -> distill -> ship flagship over seeds",
        "",
        f"`benchmarks/bench_flagship_seeds.py --seeds {args.seeds} --name {args.name}"
        + (f" -- {' '.join(args.overrides)}" if args.overrides else "") + "`: each seed one whole "
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
        missed = [f"{k} ({t['measured']:.3f} vs {t['direction']} {t['target']})" for k, t in r["targets"].items() if not t["met"]]
        lines.append(f"- seed {r['seed']}: {len(r['targets']) - len(missed)} of {len(r['targets'])} met"
                     + (f"; missed: {', '.join(missed)}" if missed else "") + (f" ({r['note']})" if r.get("note") else ""))
    lines += ["", *environment_section(env)]
    (OUT / f"{args.name}.md").write_text("\n".join(lines))


def run_seed(seed: int, work: Path, extra: list[str]) -> dict:
    out = work / f"seed{seed}"
    cmd = [sys.executable, "-m", "distill", "+experiment=offline_finetuned", f"seed={seed}", f"train.seed={seed}",
           f"+finetune.train.seed={seed}", f"data.train.seed={seed}", f"out_dir={out}", "train.progress=false", *extra]
    t0 = time.perf_counter()
    if not (out / "report.json").is_file():  # --work of an earlier call: a finished seed is collected, not rerun
        with open(work / f"seed{seed}.log", "w") as log:
            env = {**os.environ, "DISTILL_CACHE_DIR": str(work / f"seed{seed}.cache")}
            rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            raise SystemExit(f"seed {seed} failed (exit {rc}): see {work / f'seed{seed}.log'}")
    report = json.loads((out / "report.json").read_text())
    return {"seed": seed, "wall_minutes": (time.perf_counter() - t0) / 60, "out": str(out),
            "figures": figures(report, out), "targets": report.get("targets", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", default=None, help="folder for the runs and their logs (default: a temporary one)")
    ap.add_argument("--note", default="", help="seed=text notes, comma-separated (e.g. '2=shared the machine with CI')")
    ap.add_argument("--name", default="flagship_seeds", help="file name of the results, in benchmarks/results")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from distill.bench import environment

    env = environment()
    work = Path(args.work or tempfile.mkdtemp(prefix="flagship_seeds_"))
    work.mkdir(parents=True, exist_ok=True)
    notes = dict(n.split("=", 1) for n in args.note.split(",") if "=" in n)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(run_seed(seed, work, list(args.overrides)))
        rows[-1]["note"] = notes.get(str(seed), "")
        write(rows, args, env)  # after every seed: a stopped run keeps what it measured
        print(json.dumps({"seed": seed, **rows[-1]["figures"]}), flush=True)


if __name__ == "__main__":
    main()
