"""A student recipe on the fine-tune flagship, with the tuned teacher of a finished run held fixed.

    .venv/bin/python benchmarks/studies/bench_flagship_recipe.py NAME RUN_DIR CACHE_DIR [hydra overrides]

RUN_DIR is a finished ``+experiment=offline_finetuned`` run (e.g. a seed of bench_flagship_seeds.py)
and CACHE_DIR the DISTILL_CACHE_DIR it ran with. Its fine-tune checkpoints are copied into a fresh
folder, so the fine-tune stage resumes at its last step and rebuilds the same tuned teacher (same
weights, same fingerprint: the teacher cache and the token table are loaded, not rebuilt); then the
student is trained with the overrides and evaluated with torch on the experiment's evaluation sets
(all 10,000 Fashion-MNIST test images, Tux Paint val). Only the student stage differs between two
calls, so a recipe is compared at a tenth of a whole run's cost (no export, no latency bench). Use
the run's own seed overrides (seed=S train.seed=S finetune.train.seed=S data.train.seed=S) for S != 0.
Appends one JSON line to benchmarks/results/flagship_recipe.jsonl and rewrites flagship_recipe.md
(every line so far as a table; the baseline to compare with is the run's own report). A study: a
screen of one recipe change at a time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402


def main(argv=None) -> int:
    ap = common.parser(__doc__, "flagship_recipe.md", smoke=False)
    ap.add_argument("name")
    ap.add_argument("run", type=Path, help="a finished +experiment=offline_finetuned run folder")
    ap.add_argument("cache_dir", help="the DISTILL_CACHE_DIR it ran with")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the student stage")
    args = common.parse(ap, argv)
    name, run, overrides = args.name, args.run, args.overrides
    os.environ["DISTILL_CACHE_DIR"] = args.cache_dir
    import torch

    from distill import pipeline
    from distill.encoders import ClipEncoder
    from distill.evaluation import evaluate_encoder
    from distill.session import seed_everything
    from distill.train import train_stage

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = common.compose(["+experiment=offline_finetuned", "finetune.chain_eval=false", "train.eval_every=0", *overrides])
    torch.set_num_threads(int(cfg.get("threads") or 2))
    out = Path(tempfile.gettempdir()) / f"flagship_recipe_{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run / "finetune", out / "finetune", ignore=shutil.ignore_patterns("tensorboard"))
    dev = torch.device("cpu")
    t0 = time.time()
    seed_everything(int(cfg.seed))
    p = pipeline.student_stages(cfg, pipeline.teacher_stages(cfg, out, dev), dev)  # the same code as pipeline.run
    teacher, student, model_cfg, tok, ft_info = p.teacher, p.student, p.model_cfg, p.tokenizer, p.ft_info
    t1 = time.time()
    train_stage(cfg, teacher, student, model_cfg, tok, p.trainset, p.eval_sets, p.cache, out, dev)
    t2 = time.time()
    size = int(model_cfg["vision_cfg"]["image_size"])
    scores = evaluate_encoder(ClipEncoder(student.eval(), tok, size, device=dev), p.eval_sets)
    res = {"name": name, "run": str(run), "overrides": overrides, "teacher_fingerprint": teacher.fingerprint,
           "alpha": ft_info.get("alpha") if ft_info else None, "setup_s": round(t1 - t0), "train_s": round(t2 - t1),
           "scores": {k: round(100 * v, 2) for k, v in scores.items() if k.endswith(("top1", "_r5"))}}
    lines = Path(args.out).with_suffix(".jsonl")
    write_table(lines, common.append_jsonl(lines, res))
    return 0


def write_table(lines: Path, env: dict) -> None:
    rows = [json.loads(x) for x in lines.read_text().splitlines() if x.strip()]
    cols = sorted({k for r in rows for k in r["scores"]})
    md = ["# Student recipes on the fine-tune flagship's tuned teacher",
          "", "`benchmarks/studies/bench_flagship_recipe.py NAME RUN CACHE [overrides]`: the run's tuned teacher and teacher "
          "cache held fixed, only the student stage trained again (torch fp32 evaluation, all 10,000 Fashion-MNIST "
          "test images, Tux Paint val R@5; percent). One line per call, in order.", "",
          "| name | run | overrides | " + " | ".join(cols) + " | train s |", "|---|---|---|" + "---|" * (len(cols) + 1)]
    for r in rows:
        md.append(f"| {r['name']} | {r['run']} | {' '.join(r['overrides']) or '(none)'} | "
                  + " | ".join(f"{r['scores'].get(c, float('nan')):.2f}" for c in cols) + f" | {r['train_s']} |")
    common.write_results(lines.with_suffix(".md"), md, env=env)


if __name__ == "__main__":
    sys.exit(main())
