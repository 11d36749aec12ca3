"""Compare runs side by side.

    python -m distill.compare A/report.json B/report.json ... [-o compare.md] [--plot compare.png]

One column per run, rows = key metrics per variant. A missing or malformed report prints one
line and exits 2. Latencies are only comparable between runs on the same machine and threads;
the table shows CPU and threads per run and warns when they differ.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from distill.errors import UserError
from distill.report import pct, accuracy_key, fmt, table, load_report

__all__ = ["compare_markdown", "plot_compare", "main"]

_ROWS = [
    ("image b1 median (ms)", lambda v: fmt(v.get("latency", {}).get("image_b1_median_ms"))),
    ("image b32 median (ms)", lambda v: fmt(v.get("latency", {}).get("image_b32_median_ms"))),
    ("text b1 median (ms)", lambda v: fmt(v.get("latency", {}).get("text_b1_median_ms"))),
    ("throughput (img/s)", lambda v: fmt(v.get("throughput_img_s"), 1)),
    ("params total (M)", lambda v: fmt(v.get("params", {}).get("total") and v["params"]["total"] / 1e6)),
    ("image GFLOPs (2 x MACs)", lambda v: fmt(v.get("flops", {}).get("image") and v["flops"]["image"] / 1e9)),
    ("size (MB)", lambda v: fmt(v.get("size_mb"))),
]


def _labels(paths: Sequence[str | Path], reports: Sequence[Mapping[str, Any]]) -> list[str]:
    labels = [str(r.get("experiment") or Path(p).parent.name or p) for p, r in zip(paths, reports)]
    if len(set(labels)) < len(labels):  # same experiment run twice: tell them apart by folder
        labels = [f"{lab} ({Path(p).parent})" for lab, p in zip(labels, paths)]
    return labels


def compare_markdown(paths: Sequence[str | Path], reports: Sequence[Mapping[str, Any]]) -> str:
    """Side-by-side Markdown: one column per run; rows grouped by variant."""
    labels = _labels(paths, reports)
    header = ["variant", "metric"] + [f"`{lab}`" for lab in labels]
    rows: list[list[str]] = []
    env_keys = ("cpu", "torch_threads", "onnxruntime", "torch", "created")
    for key in env_keys:
        vals = [str(r.get("environment", {}).get(key, r.get(key, "-"))) for r in reports]
        rows.append(["(run)", key] + vals)
    variant_names: list[str] = []
    for r in reports:
        variant_names += [n for n in r["variants"] if n not in variant_names]
    for name in variant_names:
        metric_rows = list(_ROWS)
        sets: list[str] = []
        for r in reports:
            for s in r["variants"].get(name, {}).get("zeroshot", {}):
                if s not in sets:
                    sets.append(s)
        for s in sets:
            metric_rows.append((f"zero-shot {s} top1 (%)", lambda v, s=s: pct(v.get("zeroshot", {}).get(s, {}).get("top1"))))
        rsets: list[str] = []
        for r in reports:
            for s in r["variants"].get(name, {}).get("retrieval", {}):
                if s not in rsets:
                    rsets.append(s)
        for s in rsets:
            metric_rows.append((f"{s} i2t / t2i R@1 (%)", lambda v, s=s: (
                f"{pct(v.get('retrieval', {}).get(s, {}).get('i2t_r1'))} / "
                f"{pct(v.get('retrieval', {}).get(s, {}).get('t2i_r1'))}")))
        for label, fn in metric_rows:
            cells = []
            for r in reports:
                v = r["variants"].get(name)
                if v is None:
                    cells.append("-")
                elif v.get("status") != "ok":
                    cells.append("failed" if label == metric_rows[0][0] else "")
                else:
                    cells.append(fn(v))
            rows.append([f"`{name}`", label] + cells)
    lines = ["# Run comparison", ""]
    cpus = {str(r.get("environment", {}).get("cpu")) for r in reports}
    threads = {str(r.get("environment", {}).get("torch_threads")) for r in reports}
    if len(cpus) > 1 or len(threads) > 1:
        lines += ["**Warning:** the runs were measured on different CPUs or thread counts; compare their "
                  "latencies only through within-run ratios.", ""]
    lines += ["Accuracy in percent; FLOPs = 2 x MACs; latency = median ms.", ""]
    lines += table(header, rows)
    return "\n".join(lines) + "\n"


def plot_compare(labels: Sequence[str], reports: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Accuracy vs batch-1 image latency, one colour per run, one point per ok variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    cmap = plt.get_cmap("tab10")
    ylabel = "accuracy (%)"
    any_pt = False
    for i, (lab, r) in enumerate(zip(labels, reports)):
        xs, ys = [], []
        for name, v in r["variants"].items():
            acc = accuracy_key(v) if v.get("status") == "ok" else None
            ms = v.get("latency", {}).get("image_b1_median_ms") if acc else None
            if acc and ms and not math.isnan(acc[1]):
                xs.append(ms)
                ys.append(acc[1])
                ylabel = acc[0]
                ax.annotate(name, (ms, acc[1]), textcoords="offset points", xytext=(3, 3), fontsize=6)
        if xs:
            any_pt = True
            ax.scatter(xs, ys, color=cmap(i % 10), label=lab, s=40)
    if any_pt:
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("image encoder latency, batch 1, median (ms, log)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distill.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="report.json files of finished runs")
    ap.add_argument("-o", "--output", help="write the Markdown table here (default: stdout)")
    ap.add_argument("--plot", help="write an accuracy-vs-latency PNG here")
    args = ap.parse_args(argv)
    try:
        reports = [load_report(p) for p in args.reports]
        text = compare_markdown(args.reports, reports)
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
        if args.plot:
            plot_compare(_labels(args.reports, reports), reports, args.plot)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
