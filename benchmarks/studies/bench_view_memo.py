"""What the view memo saves: decoding, cropping and resizing the offline flagship's views, per batch.

    .venv/bin/python benchmarks/studies/bench_view_memo.py [--experiment offline_finetuned] [--batch 64]

Builds the experiment's real training set and eval sets (the pipeline's build_data), then loads
every training view in a seeded random order in batches (as the student's loop does, in its own
process: num_workers 0) and every image of the first classification eval set in chunks of 256, three
ways: without a memo, with a memo on its first pass (it fills), and with it on a later pass (every
view a hit). Records ms per batch, the memo's size, and that a hit is bit-identical to a fresh
decode. A study: the measurement behind view_memo_mb. Writes benchmarks/results/view_memo.{json,md}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402


def main(argv=None) -> None:
    ap = common.parser(__doc__, "view_memo.md", smoke=False)
    ap.add_argument("--experiment", default="offline_finetuned")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = common.parse(ap, argv)
    import torch

    from distill.data import ViewMemo, collate
    from distill.data_build import build_data

    torch.set_num_threads(args.threads)
    cfg = common.compose([f"+experiment={args.experiment}"])
    trainset, eval_sets, _ = build_data(cfg.data)
    ename, evalset = next(iter(eval_sets["classification"].items()))
    order = torch.randperm(len(trainset), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]

    def train_pass() -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        for b in batches:
            out = collate([trainset[j] for j in b])
        return 1000 * (time.perf_counter() - t0) / len(batches), out["image"]

    def eval_pass() -> tuple[float, torch.Tensor]:
        t0, n = time.perf_counter(), 0
        for chunk in evalset.chunks(256):
            n += 1
            last = chunk
        return 1000 * (time.perf_counter() - t0) / n, last

    rows, same = {}, True
    for label, pass_fn in (("training views", train_pass), (f"eval set {ename}", eval_pass)):
        trainset.memo = evalset.memo = None
        off_ms, ref = pass_fn()
        memo = ViewMemo(float(cfg.view_memo_mb))
        trainset.memo = evalset.memo = memo
        fill_ms, _ = pass_fn()
        hit_ms, got = pass_fn()
        same = same and torch.equal(ref, got)
        rows[label] = {"off_ms": off_ms, "fill_ms": fill_ms, "hit_ms": hit_ms, "memo": memo.stats()}
    unit = {"training views": f"batch of {args.batch}", f"eval set {ename}": "chunk of 256"}
    lines = [
        "# The view memo: decoded views kept as uint8",
        "",
        f"`{common.command(args.argv)}`: the experiment's "
        f"real training set ({len(trainset)} views at {trainset.spec.size} px, a seeded random order) and "
        f"eval set {ename} ({len(evalset)} images), loaded in one process (num_workers 0, as the flagship's "
        "student loop) without a memo, with a memo filling on its first pass, and on a later pass.",
        "",
        "| what | unit | no memo (ms) | memo, first pass (ms) | memo, later pass (ms) | later / none | memo size |",
        "|---|---|---|---|---|---|---|",
        *[f"| {k} | {unit[k]} | {r['off_ms']:.1f} | {r['fill_ms']:.1f} | {r['hit_ms']:.1f} | "
          f"{r['hit_ms'] / r['off_ms']:.3f} | {r['memo']['views']} views, {r['memo']['mb']:.0f} MB |"
          for k, r in rows.items()],
        "",
        f"Hits are bit-identical to a fresh decode: {same}. One run, one machine: the ratios are what to "
        "quote, not the milliseconds.",
    ]
    common.write_results(args.out, lines, data={"args": vars(args), "rows": rows, "bit_identical": same})
    print("\n".join(lines[:10]))


if __name__ == "__main__":
    main()
