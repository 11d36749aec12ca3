"""Does holding the view memo slow the student's training step? An A/B in separate processes.

    .venv/bin/python benchmarks/bench_step_memo_ab.py [--rounds 2] [--steps 25]

Each arm is a fresh process that builds the fine-tune flagship's student (`+experiment=offline_finetuned`:
ViT w192 d6 p32 at 160 px, distilled text tower) and its loss, and times the same synthetic training
step as the student loop (bf16 autocast, batch 64 + 192 text-only rows, AdamW), 10 warm-up steps then
``--steps`` timed, median. Arm "memo" first allocates what the flagship's memo holds (25,000 uint8
views of 3x160x160, 1.8 GB, as separate tensors); arm "none" does not. Arms alternate, ``--rounds``
times each, so a slow phase of the machine lands on both. Writes benchmarks/results/step_memo_ab.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results"


def arm(name: str, steps: int) -> float:
    """One process: ms per training step, median of ``steps`` after 10 warm-up steps."""
    import torch
    from bench_cpu_step import build, run_arm  # the flagship's student, loss and step, as the CPU step benchmark has them

    torch.set_num_threads(2)
    model, loss_fn = build()
    held = {i: torch.randint(0, 255, (3, 160, 160), dtype=torch.uint8) for i in range(25000)} if name == "memo" else {}
    ms = run_arm(model, loss_fn, "any", "bf16", steps, warmup=10)["step"]  # torch's own attention kernel, as measured
    del held
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm and print its figure
    args = ap.parse_args()
    if args.arm:
        print(json.dumps({"ms": arm(args.arm, args.steps)}))
        return
    from distill.bench import environment, environment_section

    runs = []
    for r in range(args.rounds):
        for name in ("none", "memo"):
            out = subprocess.run([sys.executable, __file__, "--arm", name, "--steps", str(args.steps)], cwd=REPO,
                                 capture_output=True, text=True, check=True)
            runs.append({"round": r, "arm": name, "ms": json.loads(out.stdout.strip().splitlines()[-1])["ms"]})
            print(runs[-1], flush=True)
    env = environment()
    med = {a: statistics.median(x["ms"] for x in runs if x["arm"] == a) for a in ("none", "memo")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "step_memo_ab.json").write_text(json.dumps({"args": vars(args), "environment": env, "runs": runs,
                                                       "median": med}, indent=2))
    lines = [
        "# Does holding the view memo slow the student's step?",
        "",
        f"`benchmarks/bench_step_memo_ab.py --rounds {args.rounds} --steps {args.steps}`: the fine-tune flagship's "
        "student step (bf16, batch 64 + 192 text rows), each arm a fresh process, arms alternating; \"memo\" "
        "holds 25,000 uint8 3x160x160 tensors (1.8 GB) as the flagship's memo does. ms per step, median of "
        f"{args.steps} steps after 10 warm-up steps.",
        "",
        "| round | none (ms) | memo (ms) |",
        "|---|---|---|",
        *[f"| {r} | {next(x['ms'] for x in runs if x['round'] == r and x['arm'] == 'none'):.1f} | "
          f"{next(x['ms'] for x in runs if x['round'] == r and x['arm'] == 'memo'):.1f} |" for r in range(args.rounds)],
        "",
        f"Median over rounds: none {med['none']:.1f} ms, memo {med['memo']:.1f} ms (memo / none "
        f"{med['memo'] / med['none']:.3f}). The rounds' spread is the machine's own; compare it with the "
        "difference between arms.",
        "",
        *environment_section(env),
    ]
    (OUT / "step_memo_ab.md").write_text("\n".join(lines))
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
