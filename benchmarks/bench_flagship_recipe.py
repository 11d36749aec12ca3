"""A student recipe on the fine-tune flagship, with the tuned teacher of a finished run held fixed.

    .venv/bin/python benchmarks/bench_flagship_recipe.py NAME RUN_DIR CACHE_DIR [hydra overrides]

RUN_DIR is a finished ``+experiment=offline_finetuned`` run (e.g. a seed of bench_flagship_seeds.py)
and CACHE_DIR the DISTILL_CACHE_DIR it ran with. Its fine-tune checkpoints are copied into a fresh
folder, so the fine-tune stage resumes at its last step and rebuilds the same tuned teacher (same
weights, same fingerprint: the teacher cache and the token table are loaded, not rebuilt); then the
student is trained with the overrides and evaluated with torch on the experiment's evaluation sets
(all 10,000 Fashion-MNIST test images, Tux Paint val). Only the student stage differs between two
calls, so a recipe is compared at a tenth of a whole run's cost (no export, no latency bench). Use
the run's own seed overrides (seed=S train.seed=S finetune.train.seed=S data.train.seed=S) for S != 0.
Appends one JSON line to benchmarks/results/flagship_recipe.jsonl and rewrites flagship_recipe.md
(every line so far as a table; the baseline to compare with is the run's own report).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    name, run, cache_dir, overrides = argv[0], Path(argv[1]), argv[2], argv[3:]
    os.environ["DISTILL_CACHE_DIR"] = cache_dir
    from hydra import compose, initialize_config_dir

    from bench_offline_recipe import record  # the same JSON line and environment as the untuned recipe ablations

    from distill import pipeline
    from distill.encoders import ClipEncoder

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=offline_finetuned", "finetune.chain_eval=false",
                                                       "train.eval_every=0", *overrides])
    torch.set_num_threads(int(cfg.get("threads") or 2))
    out = Path("/tmp") / f"flagship_recipe_{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run / "finetune", out / "finetune", ignore=shutil.ignore_patterns("tensorboard"))
    dev = torch.device("cpu")
    t0 = time.time()
    pipeline.seed_everything(int(cfg.seed))
    p = pipeline.student_stages(cfg, pipeline.teacher_stages(cfg, out, dev), dev)  # the same code as pipeline.run
    teacher, student, model_cfg, tok, ft_info = p.teacher, p.student, p.model_cfg, p.tokenizer, p.ft_info
    t1 = time.time()
    pipeline.train_stage(cfg, teacher, student, model_cfg, tok, p.trainset, p.eval_sets, p.cache, out, dev)
    t2 = time.time()
    size = int(model_cfg["vision_cfg"]["image_size"])
    scores = pipeline.evaluate_encoder(ClipEncoder(student.eval(), tok, size, device=dev), p.eval_sets)
    res = {"name": name, "run": str(run), "overrides": overrides, "teacher_fingerprint": teacher.fingerprint,
           "alpha": ft_info.get("alpha") if ft_info else None, "setup_s": round(t1 - t0), "train_s": round(t2 - t1),
           "scores": {k: round(100 * v, 2) for k, v in scores.items() if k.endswith(("top1", "_r5"))}}
    lines = REPO / "benchmarks/results/flagship_recipe.jsonl"
    write_table(lines, record(res, lines))
    return 0


def write_table(lines: Path, env: dict) -> None:
    rows = [json.loads(x) for x in lines.read_text().splitlines() if x.strip()]
    cols = sorted({k for r in rows for k in r["scores"]})
    md = ["# Student recipes on the fine-tune flagship's tuned teacher",
          "", "`benchmarks/bench_flagship_recipe.py NAME RUN CACHE [overrides]`: the run's tuned teacher and teacher "
          "cache held fixed, only the student stage trained again (torch fp32 evaluation, all 10,000 Fashion-MNIST "
          "test images, Tux Paint val R@5; percent). One line per call, in order.", "",
          "| name | run | overrides | " + " | ".join(cols) + " | train s |", "|---|---|---|" + "---|" * (len(cols) + 1)]
    for r in rows:
        md.append(f"| {r['name']} | {r['run']} | {' '.join(r['overrides']) or '(none)'} | "
                  + " | ".join(f"{r['scores'].get(c, float('nan')):.2f}" for c in cols) + f" | {r['train_s']} |")
    md += ["", "## Environment", "", "```", *[f"{k}: {v}" for k, v in env.items()], "```", ""]
    lines.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
