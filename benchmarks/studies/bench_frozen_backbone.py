"""What computes the ConSE fine-tune's backbone memo: torch or onnxruntime, per image.

    .venv/bin/python benchmarks/studies/bench_frozen_backbone.py [--threads 2] [--images 64] [--rounds 5]

Where the EfficientNet backbone is frozen (finetune=head, lock_image, text-side LoRA/adapters),
`distill.finetune.conse.ConSEModule` runs it once per view and memoises the pooled feature; those
first passes are most of the fine-tune's time and all of the teacher cache's image side. This times
the memo's miss path both ways on the same uniform-random 224 px batch, in chunks of 4 (the memo's
chunk) and of 16, interleaved over rounds (median of rounds), and the largest difference between the
two runtimes' features. A study: the A/B that chose onnxruntime for the memo. Writes
benchmarks/results/frozen_backbone.{json,md}.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402


def main(argv=None) -> None:
    ap = common.parser(__doc__, "frozen_backbone.md", smoke=False)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = common.parse(ap, argv)
    import time

    import torch

    from distill.finetune.conse import ConSEModule, ort_backbone
    from distill.teachers.conse import ConSETeacher

    torch.set_num_threads(args.threads)
    m = ConSEModule(ConSETeacher()).eval()
    t0 = time.perf_counter()
    ort = ort_backbone(m.image, m.image_size)
    build_s = time.perf_counter() - t0
    if ort is None:
        raise SystemExit("onnxruntime backbone could not be built: see the warning above")
    x = torch.rand(args.images, 3, m.image_size, m.image_size).contiguous(memory_format=torch.channels_last)
    runs = {"torch": m._pooled, "onnxruntime": ort}
    calls = {f"{k} chunk {c}": (lambda fn=fn, c=c: [fn(x[i:i + c]) for i in range(0, len(x), c)])
             for c in (4, 16) for k, fn in runs.items()}
    with torch.no_grad():
        diff = float((ort(x[:8]) - m._pooled(x[:8])).abs().max())
        for fn in runs.values():
            fn(x[:4])  # warm-up
        timed = common.interleaved_times(calls, rounds=args.rounds, per_round=1, warmup=0, settle_s=0.0)
    times = {k: [r[0] / len(x) for r in v] for k, v in timed.items()}  # ms per image, one pass over the batch a round
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "# The ConSE fine-tune's frozen-backbone memo: torch or onnxruntime",
        "",
        f"`{common.command(args.argv)}`: EfficientNet-Lite0 pixels -> pooled 1280-d features (what the memo stores), "
        f"{args.images} uniform-random 224 px images, ms per image, median of {args.rounds} interleaved rounds.",
        "",
        "| runtime, chunk | ms / image (median) | rounds |",
        "|---|---|---|",
        *[f"| {k} | {med[k]:.2f} | {', '.join(f'{t:.2f}' for t in times[k])} |" for k in times],
        "",
        f"onnxruntime / torch at the memo's chunk of 4: {med['torch chunk 4'] / med['onnxruntime chunk 4']:.2f}x faster. "
        f"Building the onnxruntime backbone (legacy export to memory + session + parity probe): {build_s:.1f} s. "
        f"Largest |onnxruntime - torch| over 8 images' features: {diff:.1e} (features reach ~5; the memo "
        "refuses onnxruntime above 1e-3 and stays on torch).",
    ]
    common.write_results(args.out, lines, data={"args": vars(args), "ms_per_image": times, "median": med,
                                                "build_s": build_s, "max_abs_diff": diff})
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
