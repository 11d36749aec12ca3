"""ONNX graph variants of the w384/d6/p32 student's image tower, dynamic int8, timed interleaved.

    .venv/bin/python benchmarks/studies/bench_onnx_export_variants.py --threads 2 --rounds 6

Variants: opset 20 with the patch embedding as a Conv and torch's own decomposition of
nn.MultiheadAttention (``export.patch_embed=conv export.attention=native``, the first export);
the patch embedding as reshape + MatMul (``patch_embed=matmul``, distill.export.PatchMatMul: int8
ConvInteger is slow in ORT, a MatMul becomes DynamicQuantizeMatMul); self-attention as plain
MatMul/Softmax (``attention=matmul``, distill.export.MatMulAttention: ~13 nodes a layer instead of
~45); and opset 23, where the exporter writes SDPA as one ONNX ``Attention`` node (kept in float by
distill.quantize; needs ``attention=native``). Batch 1, random weights, medians over all rounds.
A study: the A/B behind export.patch_embed and export.attention. Writes
benchmarks/results/onnx_export_variants.md.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402
import torch  # noqa: E402

from distill.export import export_onnx  # noqa: E402
from distill.onnx_tools import session  # noqa: E402
from distill.quantize import quantize_dynamic_onnx  # noqa: E402
from distill.students import build_student  # noqa: E402


def main(argv=None) -> int:
    ap = common.parser(__doc__, "onnx_export_variants.md", smoke=False)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=20)
    args = common.parse(ap, argv)
    import onnx

    torch.manual_seed(0)
    model, _ = build_student(512, {"width": 384, "layers": 6, "heads": 6, "patch_size": 32, "image_size": 224},
                             {"width": 256, "layers": 4, "heads": 4, "context_length": 77})
    model.eval()
    work = Path(tempfile.mkdtemp(prefix="onnx_variants_"))
    files = {}
    for name, patch, attention, opset in (
            ("opset20", "conv", "native", 20), ("opset23", "conv", "native", 23),
            ("opset20_patch_matmul", "matmul", "native", 20), ("opset23_patch_matmul", "matmul", "native", 23),
            ("opset20_patch_matmul_attention_matmul", "matmul", "matmul", 20)):
        info = export_onnx(model, work / name, image_size=224, context_length=77, towers=("image",), opset=opset,
                           patch_embed=patch, attention=attention)
        files[name] = quantize_dynamic_onnx(info["image"]["path"], work / name / "image_encoder.int8.onnx")
    sessions = {name: session(path, threads=args.threads) for name, path in files.items()}
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    ref = sessions["opset20"].run(None, {"pixels": x})[0]
    timed = common.interleaved_times({n: (lambda s=s: s.run(None, {"pixels": x})) for n, s in sessions.items()},
                              rounds=args.rounds, per_round=args.per_round, warmup=5, settle_s=0.5)
    times = {n: [t for rnd in rounds for t in rnd] for n, rounds in timed.items()}
    names = list(sessions)
    base = statistics.median(times["opset20"])
    lines = ["# ONNX export variants of the student image tower (dynamic int8, batch 1)", "",
             f"Command: `{common.command(args.argv)}`, {time.strftime('%Y-%m-%d')}. "
             f"{args.threads} threads. Student ViT w384/d6/h6/p32 at 224 px, random weights, "
             f"int8 mode = the project default. {args.rounds} interleaved rounds x {args.per_round} calls.", "",
             "| variant | int8 nodes (all / Transpose / Attention / ConvInteger / MatMulInteger) | median ms | speed-up vs opset 20 | max abs diff vs opset 20 |",
             "|---|---|---:|---:|---:|"]
    for n in names:
        ops = [nd.op_type for nd in onnx.load(str(files[n])).graph.node]
        diff = float(np.abs(sessions[n].run(None, {"pixels": x})[0] - ref).max())
        med = statistics.median(times[n])
        lines.append(f"| {n} | {len(ops)} / {ops.count('Transpose')} / {ops.count('Attention')} / {ops.count('ConvInteger')} / "
                     f"{ops.count('MatMulInteger')} | "
                     f"{med:.3f} | {base / med:.3f}x | {diff:.2e} |")
    common.write_results(args.out, lines, data={"args": vars(args), "ms": times})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
