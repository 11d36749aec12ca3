"""Loader throughput and memory: the streaming WebDataset source vs the indexed one, on the same shards.

Writes synthetic WebDataset shards (JPEG image + .txt caption per sample) at two data set sizes and
reads them with each loader alone (no model): ``distill.streaming.StreamLoader`` over
``StreamingShards`` (one-epoch mode, endless, shuffle buffer 1000) and a DataLoader with a seeded
random sampler over ``distill.datasets.WebDatasetShards`` (indexed: every tar member listed at
start-up, images read by seeking). Both decode each image to RGB (distill.imageio.load_rgb) and
hand out uint8 (B, 3, S, S) tensors. Each measurement runs in a fresh process and reports start-up
(building the source: the index for the indexed one), time to the first batch, images/s after it,
the source's pickled size (what every DataLoader worker receives), the streaming state's JSON size
(what a checkpoint stores), the resident-memory rise from building the source, the main process's
peak RSS (and its rise over the post-import baseline: VmHWM is reset first) and the largest worker's
private resident memory (USS, /proc/<pid>/smaps_rollup) at the end of the run.

The images are a few distinct JPEGs repeated (the loader's work per image does not depend on the
pixels). The shards are freshly written, so they are read from the page cache: this measures the
loader's CPU-side cost, not a disk or a network.

    .venv/bin/python benchmarks/bench_streaming_loader.py --sizes 10000,100000 --images 8000 --workers 0,2
    .venv/bin/python benchmarks/bench_streaming_loader.py --smoke     # 200 items, no workers, seconds

Appends a Markdown section to benchmarks/results/streaming_loader.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common


# ----------------------------------------------------------------------------- one measurement (child process)


def _tensor(img):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _sample_tensor(sample):
    return _tensor(sample.image)


def _stack(items):
    import torch

    return torch.stack(items)


class _Indexed:
    """A map-style dataset over WebDatasetShards: item i -> its decoded image as a uint8 tensor."""

    def __init__(self, src) -> None:
        self.src = src

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int):
        return _tensor(self.src.open(i))


def _children() -> list[int]:
    """This process's child processes (the DataLoader workers), from /proc."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def _private_kb(pid: int) -> int:
    """A process's private resident memory (USS): what a forked worker holds beyond the pages it shares."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))


def _build(kind: str, pattern: str, batch: int, workers: int):
    """(the source, an endless batch iterator, the StreamLoader or None)."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    if kind == "streaming":
        from distill.streaming import StreamingShards, StreamLoader

        src = StreamingShards(pattern, epochs=None, buffer=1000, seed=0)
        loader = StreamLoader(src, batch_size=batch, num_workers=workers, transform=_sample_tensor, collate=_stack)
        return src, iter(loader), loader
    from distill.datasets import WebDatasetShards

    src = WebDatasetShards(pattern)
    ds = _Indexed(src)
    sampler = RandomSampler(ds, replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=_stack)
    return src, iter(loader), None


def measure(kind: str, pattern: str, images: int, batch: int, workers: int) -> dict:
    """Start-up, first batch, steady images/s and memory of one loader, in this (fresh) process."""
    import pickle

    import distill.datasets  # noqa: F401  (imports are in the baseline, not in the source's rise)
    import distill.streaming  # noqa: F401

    base_kb = common.reset_peak()  # the peak below belongs to the loader, not to the imports
    t0 = time.perf_counter()
    src, it, loader = _build(kind, pattern, batch, workers)
    t1 = time.perf_counter()
    rise_kb = common.vm_kb("VmRSS") - base_kb
    pickled = len(pickle.dumps(src))
    first = next(it)
    t2 = time.perf_counter()
    seen = 0
    while seen < images:
        seen += len(next(it))
    t3 = time.perf_counter()
    state = len(json.dumps(loader.state_dict())) if loader is not None else None
    worker_kb = max((_private_kb(pid) for pid in _children()), default=None)
    peak_kb = common.vm_kb("VmHWM")
    return {"loader": kind, "items": len(src) if kind == "indexed" else None, "workers": workers,
            "startup_s": round(t1 - t0, 3), "first_batch_s": round(t2 - t1, 3),
            "images_per_s": round(seen / (t3 - t2), 1), "measured_images": seen, "batch": int(first.shape[0]),
            "source_rise_mb": round(rise_kb / 1024, 1), "pickled_source_kb": round(pickled / 1024, 1),
            "state_json_bytes": state, "peak_rss_main_mb": round(peak_kb / 1024, 1),
            "peak_rise_main_mb": round((peak_kb - base_kb) / 1024, 1),
            "worker_private_mb": round(worker_kb / 1024, 1) if worker_kb is not None else None}


def run_child(kind: str, pattern: str, images: int, batch: int, workers: int) -> dict:
    return common.run_child(common.script_cmd(__file__, "--child", json.dumps([kind, pattern, images, batch, workers])))


# ----------------------------------------------------------------------------- report


def render(rows: list[dict], args, shard_mb: dict[int, float], elapsed: float) -> list[str]:
    date = time.strftime("%Y-%m-%d")
    lines = [f"## Streaming vs indexed WebDataset loader, cpu ({date})", "",
             f"Command: `{common.command(args.argv)}`", "",
             f"Data: synthetic shards of {args.per_shard} samples ({args.px}x{args.px} JPEG, about "
             f"{args.jpeg_kb:.1f} KB, + .txt caption); sizes {', '.join(f'{n:,} items ({shard_mb[n]:.0f} MB)' for n in shard_mb)}; "
             f"read from the page cache. Loader alone: decode to RGB + uint8 (B, 3, {args.px}, {args.px}) tensors, "
             f"batch {args.batch}; {args.images:,} images timed after the first batch; one fresh process per row.", "",
             "| items | loader | workers | start-up s | first batch s | images/s | source rise MiB | pickled source KiB "
             "| state JSON bytes | peak RSS main MiB (rise) | worker private MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']:,} | {r['loader']} | {r['workers']} | {r['startup_s']} | {r['first_batch_s']} | "
                     f"{r['images_per_s']:,} | {r['source_rise_mb']} | {r['pickled_source_kb']:,} | "
                     f"{r['state_json_bytes'] if r['state_json_bytes'] is not None else '-'} | "
                     f"{r['peak_rss_main_mb']} ({r['peak_rise_main_mb']}) | "
                     f"{r['worker_private_mb'] if r['worker_private_mb'] is not None else '-'} |")
    lines += ["", f"Total wall time {elapsed:.0f} s (including writing the shards).", ""]
    return lines


def main(argv=None) -> None:
    ap = common.parser(__doc__, "streaming_loader.md")
    ap.add_argument("--sizes", default="10000,100000", help="data set sizes in items (comma-separated)")
    ap.add_argument("--images", type=int, default=8000, help="images timed per row, after the first batch")
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts (comma-separated)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = common.parse(ap, argv, smoke=dict(sizes="200", images=128, workers="0", per_shard=100))
    if args.child:
        common.child_result(measure(*json.loads(args.child)))
        return
    t0 = time.time()
    env = {**common.environment(), "webdataset": _version("webdataset"), "pillow": _version("pillow")}
    args.jpeg_kb = sum(map(len, common.jpeg_blobs(32, args.px))) / 32 / 1024
    rows, shard_mb = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            folder = Path(tmp) / str(size)
            folder.mkdir()
            pattern = common.write_shards(folder, size, args.per_shard, args.px)
            shard_mb[size] = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
            for workers in (int(w) for w in args.workers.split(",")):
                for kind in ("indexed", "streaming"):
                    r = {"size": size, **run_child(kind, pattern, args.images, args.batch, workers)}
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    lines = render(rows, args, shard_mb, time.time() - t0)
    runs = common.load_json(args.out).get("runs", []) + [{"args": vars(args), "rows": rows}]
    common.write_results(args.out, lines, data={"runs": runs}, env=env, append=True)
    print("\n".join(lines))


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


if __name__ == "__main__":
    main()
