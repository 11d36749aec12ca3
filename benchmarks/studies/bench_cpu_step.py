"""What a student training step costs on a CPU, and the three choices the engine makes there.

    .venv/bin/python benchmarks/studies/bench_cpu_step.py [--rounds 4] [--steps 15]
    .venv/bin/python benchmarks/studies/bench_cpu_step.py --memo-ab [--rounds 2] [--steps 25]

A study, and it times its own step: the engine's loop (distill/engine) times a whole step, while
this splits forward and backward and runs arms the engine would not pick. The step is the student
half of distill.train.DistillTask.loss on synthetic inputs (no data loading, no teacher): the
fine-tune flagship's student (`+experiment=offline_finetuned`: ViT w192 d6 p32 at 160 px = 26
tokens, distilled text tower at 32 tokens) and its loss, batch 64 + 192 text-only rows, AdamW,
under the engine's own step context (distill.engine.precision.step_context: autocast and attention kernel).

1. The attention kernel (train.attention): "any" is torch's own choice (its CPU flash-attention
   kernel), "math" the math kernel, which is what train.attention=auto picks for bf16 on a CPU. Arms
   alternate within each round, in bf16 (the flagship's precision) and fp32 (precision=auto on a
   CPU), so a slow phase of the machine lands on both.
2. The optimizer: AdamW's per-parameter loop, foreach and fused (train.optimizer.fused) over the
   student's parameters, 20 steps each, in interleaved rounds.
3. Tokenizing the step's 256 texts with open_clip's Python BPE against the distillation task's
   memo of token rows (what it does for an indexed training set).

Writes benchmarks/results/cpu_step.{json,md}.

``--memo-ab``: does holding the view memo slow the step? Each arm is a fresh process timing the same
step (bf16, torch's own kernel), 10 warm-up steps then ``--steps`` timed, median; arm "memo" first
allocates what the flagship's memo holds (25,000 uint8 views of 3x160x160, 1.8 GB, as separate
tensors), arm "none" does not. Arms alternate, ``--rounds`` times each. Writes
benchmarks/results/step_memo_ab.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402

B, EXTRA, DIM = 64, 192, 384  # images, text-only rows and embedding width of the flagship's student step


def build():
    """The fine-tune flagship's student (open_clip CLIP, output dict) and its distillation loss, seeded."""
    import torch
    from hydra.utils import instantiate

    torch.manual_seed(0)
    cfg = common.compose(["+experiment=offline_finetuned"])
    model, _ = instantiate(cfg.student.builder, embed_dim=DIM, _convert_="all")
    model.output_dict = True
    loss_fn = instantiate(cfg.loss, student_dim=DIM, teacher_dim=DIM, _convert_="all")
    return model, loss_fn


def run_arm(model, loss_fn, attention: str, precision: str, steps: int, warmup: int = 3) -> dict[str, float]:
    """Median ms of forward (with the loss), backward and the whole step over ``steps`` steps after ``warmup``."""
    import torch

    from distill.engine.precision import step_context

    _, context = step_context(precision, attention, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    img, tok = torch.rand(B, 3, 160, 160, generator=g), torch.randint(1, 49000, (B + EXTRA, 32), generator=g)
    tok[:, -1] = 49407  # end-of-text last: argmax pooling reads the last position
    ti = torch.nn.functional.normalize(torch.randn(B, DIM, generator=g), dim=-1)
    tt = torch.nn.functional.normalize(torch.randn(B + EXTRA, DIM, generator=g), dim=-1)
    fwd, bwd, total = [], [], []
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        with context():
            out = {k: (v.float() if torch.is_tensor(v) else v) for k, v in model(image=img, text=tok).items()}
            st = out["text_features"]
            out["text_features"] = st[:B]
            losses = loss_fn(out, {"image_features": ti, "text_features": tt[:B], "logit_scale": 80.0}, has_pairs=True,
                             extra={"student_text": st[B:], "teacher_text": tt[B:]})
        t1 = time.perf_counter()
        sum(v for k, v in losses.items() if k.endswith("_loss")).backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if s >= warmup:
            fwd.append(t1 - t0), bwd.append(t2 - t1), total.append(t3 - t0)
    return {k: 1000 * statistics.median(v) for k, v in (("forward", fwd), ("backward", bwd), ("step", total))}


def optimizer_arms(model, rounds: int) -> dict[str, float]:
    """ms per AdamW step over the student's parameters (gradients random), median over interleaved rounds of 20."""
    import torch

    for p in model.parameters():
        p.grad = torch.randn_like(p)
    kinds = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, **kw) for name, kw in kinds.items()}
    timed = common.interleaved_times({name: opt.step for name, opt in opts.items()}, rounds=rounds, per_round=20,
                                     warmup=3, settle_s=0.0)
    model.zero_grad(set_to_none=True)
    return {k: statistics.median(statistics.fmean(r) for r in v) for k, v in timed.items()}


def tokenizer_arms(rounds: int) -> dict[str, float]:
    """ms to tokenize one step's 64 captions + 192 corpus texts: open_clip's tokenizer, and the memo's lookup."""
    import open_clip
    import torch

    tok = open_clip.SimpleTokenizer(context_length=32)
    texts = [f"a picture of a {w}." for w in ("t-shirt", "trouser", "pullover", "dress")] * 16 + \
        [f"an image of the word{i}." for i in range(EXTRA)]
    rows = {t: r for r, t in zip(tok(texts), texts)}
    timed = common.interleaved_times({"tokenizer": lambda: tok(texts),
                                      "memo": lambda: torch.stack([rows[x] for x in texts])},
                                     rounds=rounds, per_round=10, warmup=1, settle_s=0.0)
    return {k: statistics.median(statistics.fmean(r) for r in v) for k, v in timed.items()}


def memo_arm(name: str, steps: int) -> float:
    """One process: ms per training step, median of ``steps`` after 10 warm-up steps."""
    import torch

    torch.set_num_threads(2)
    model, loss_fn = build()
    held = {i: torch.randint(0, 255, (3, 160, 160), dtype=torch.uint8) for i in range(25000)} if name == "memo" else {}
    ms = run_arm(model, loss_fn, "any", "bf16", steps, warmup=10)["step"]  # torch's own attention kernel, as measured
    del held
    return ms


def memo_ab(args: argparse.Namespace) -> None:
    runs = []
    for r in range(args.rounds):
        for name in ("none", "memo"):
            ms = common.run_child(common.script_cmd(__file__, "--memo-arm", name, "--steps", args.steps))["ms"]
            runs.append({"round": r, "arm": name, "ms": ms})
            print(runs[-1], flush=True)
    med = {a: statistics.median(x["ms"] for x in runs if x["arm"] == a) for a in ("none", "memo")}
    lines = [
        "# Does holding the view memo slow the student's step?",
        "",
        f"`{common.command(args.argv)}`: the fine-tune flagship's "
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
    ]
    common.write_results(args.out, lines, data={"args": vars(args), "runs": runs, "median": med})
    print("\n".join(lines[:12]))


def main(argv=None) -> None:
    ap = common.parser(__doc__, "cpu_step.md", smoke=False)
    ap.add_argument("--rounds", type=int, default=None, help="default 4 (2 with --memo-ab)")
    ap.add_argument("--steps", type=int, default=None, help="default 15 (25 with --memo-ab)")
    ap.add_argument("--memo-ab", action="store_true", help="the view-memo A/B instead (results/step_memo_ab.md)")
    ap.add_argument("--memo-arm", choices=["none", "memo"], help=argparse.SUPPRESS)
    args = common.parse(ap, argv)
    if args.memo_ab and not any(a == "--out" or a.startswith("--out=") for a in args.argv):
        args.out = str(Path(args.out).with_name("step_memo_ab.md"))
    args.rounds = args.rounds or (2 if args.memo_ab else 4)
    args.steps = args.steps or (25 if args.memo_ab or args.memo_arm else 15)
    if args.memo_arm:
        common.child_result({"ms": memo_arm(args.memo_arm, args.steps)})
        return
    if args.memo_ab:
        memo_ab(args)
        return
    import torch

    from distill.engine.precision import cpu_has_native_bf16

    torch.set_num_threads(2)
    model, loss_fn = build()
    precisions = ["bf16", "fp32"] if cpu_has_native_bf16() else ["fp32"]
    runs = []
    for r in range(args.rounds):
        for precision in precisions:
            for kernel in (("any", "math") if r % 2 == 0 else ("math", "any")):
                runs.append({"round": r, "precision": precision, "kernel": kernel,
                             **run_arm(model, loss_fn, kernel, precision, args.steps)})
                print(runs[-1], flush=True)
    med = {p: {k: {m: statistics.median(x[m] for x in runs if x["precision"] == p and x["kernel"] == k)
                   for m in ("forward", "backward", "step")} for k in ("any", "math")} for p in precisions}
    opt = optimizer_arms(model, args.rounds)
    tok = tokenizer_arms(args.rounds)
    print(opt, tok, flush=True)
    lines = [
        "# A student training step on a CPU",
        "",
        "## 1. The attention kernel (`train.attention`)",
        "",
        f"`{common.command(args.argv)}`: the fine-tune "
        "flagship's student (ViT w192 d6 p32 at 160 px, 26 tokens; text tower at 32 tokens), one synthetic "
        "training step of batch 64 + 192 text-only rows with its loss and AdamW. \"any\" lets torch choose (its "
        "CPU flash-attention kernel); \"math\" is `sdpa_kernel([SDPBackend.MATH])`, what `train.attention=auto` "
        f"picks for a bf16 step on a CPU. ms, median of {args.steps} steps after 3 warm-up steps, then the median over "
        f"{args.rounds} rounds; the arms alternate within each round.",
        "",
        "| precision | kernel | forward + loss (ms) | backward (ms) | whole step (ms) |",
        "|---|---|---|---|---|",
        *[f"| {p} | {k} | {med[p][k]['forward']:.1f} | {med[p][k]['backward']:.1f} | {med[p][k]['step']:.1f} |"
          for p in precisions for k in ("any", "math")],
        "",
        *[f"- {p}: math / any, whole step: {med[p]['math']['step'] / med[p]['any']['step']:.2f}; backward: "
          f"{med[p]['math']['backward'] / med[p]['any']['backward']:.2f}." for p in precisions],
        "",
        "Per round (whole step, ms):",
        "",
        "| round | precision | any | math |",
        "|---|---|---|---|",
        *[f"| {r} | {p} | {next(x['step'] for x in runs if x['round'] == r and x['precision'] == p and x['kernel'] == 'any'):.1f} | "
          f"{next(x['step'] for x in runs if x['round'] == r and x['precision'] == p and x['kernel'] == 'math'):.1f} |"
          for r in range(args.rounds) for p in precisions],
        "",
        "Why: torch's CPU flash-attention kernel works in blocks sized for long sequences; on 26-32 tokens "
        "its bf16 backward costs more than the math kernel's plain matmuls and softmax. In fp32 neither "
        "kernel wins by more than the rounds' spread, so `auto` leaves fp32 steps, and CUDA, to torch. Both "
        "compute the same attention (tests/test_train.py checks the losses agree).",
        "",
        "## 2. The optimizer (`train.optimizer.fused`)",
        "",
        f"AdamW over the student's {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, ms per step, "
        f"median of {args.rounds} interleaved rounds of 20 steps:",
        "",
        "| loop | foreach | fused |",
        "|---|---|---|",
        f"| {opt['loop']:.1f} | {opt['foreach']:.1f} | {opt['fused']:.1f} |",
        "",
        "## 3. Tokenizing a step's texts",
        "",
        f"64 captions + 192 corpus texts, context 32, ms, median of {args.rounds} rounds of 10: open_clip's "
        f"tokenizer {tok['tokenizer']:.1f}, the distillation task's memo of token rows {tok['memo']:.2f}.",
    ]
    common.write_results(args.out, lines, data={"args": vars(args), "runs": runs, "median": med, "optimizer": opt,
                                                "tokenize": tok})
    print("\n".join(lines[:16]))


if __name__ == "__main__":
    main()
