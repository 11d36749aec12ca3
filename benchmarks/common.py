"""What every benchmark shares: the repository's paths, its Hydra config, one argument parser (with
``--smoke`` and ``--out``), a child-process runner, the timing helpers of distill.bench, and a results
writer that ends every Markdown file with the same environment block.

A harness in benchmarks/ imports this as ``import common`` (a script's own folder is on sys.path);
a study in benchmarks/studies/ puts benchmarks/ on sys.path first.

Smoke mode: ``--smoke`` runs a harness's whole path at tiny sizes (no meaningful figures) and, unless
``--out`` is given, writes into a fresh temporary folder, so tests/test_benchmarks_smoke.py can run
every harness without touching benchmarks/results.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the checkout's distill, whether or not the package is installed

from distill.bench import (  # noqa: E402  (re-exported: benchmarks time with the product's helpers)
    environment,
    environment_section,
    interleaved_times,
    measure_peak_rss,
    peak_rss_mb,
    summarise_times,
    time_fn,
    time_samples,
)
from distill.compose import compose, config_dir  # noqa: E402  (the config python -m distill composes)

__all__ = ["BENCH", "REPO", "RESULTS", "environment", "environment_section", "interleaved_times", "measure_peak_rss",
           "peak_rss_mb", "summarise_times", "time_fn", "time_samples", "config_dir", "compose", "parser", "parse",
           "scratch", "command", "script_cmd", "run_child", "child_result", "run_logged", "write_results", "load_json",
           "append_jsonl", "mean_ci", "vm_kb", "reset_peak", "stamp_photos", "jpeg_blobs", "write_shards"]


# ----------------------------------------------------------------------------- command line

def parser(doc: str | None, out: str, smoke: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser described by the docstring's first paragraph, with ``--out`` (default
    ``benchmarks/results/<out>``) and, for a harness, ``--smoke`` (results in a temporary folder)."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if smoke:
        ap.add_argument("--smoke", action="store_true",
                        help="tiny sizes, seconds: checks the harness runs; results go to a temporary folder unless --out")
    else:
        ap.set_defaults(smoke=False)  # a study has no smoke mode: it is run in full when it is run
    ap.add_argument("--out", default=None, help=f"Markdown results file, JSON beside it (default: results/{out})")
    ap.bench_out = out  # type: ignore[attr-defined]
    return ap


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None = None,
          smoke: Mapping[str, Any] | None = None) -> argparse.Namespace:
    """Parse ``argv``; under ``--smoke`` the ``smoke`` values become the defaults (flags given still win).
    Fills ``args.out`` and records ``args.argv`` (for the command line a result file quotes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.smoke and smoke:
        ap.set_defaults(**smoke)
        args = ap.parse_args(argv)
    if args.out is None:
        folder = Path(tempfile.mkdtemp(prefix="bench_smoke_")) if args.smoke else RESULTS
        args.out = str(folder / ap.bench_out)  # type: ignore[attr-defined]
    args.argv = argv
    return args


def scratch(args: argparse.Namespace, prefix: str) -> Path:
    """A folder for a run's working files: a new temporary one, or beside the results under ``--smoke``
    (so a test's temporary folder holds everything a smoke run wrote)."""
    if args.smoke:
        path = Path(args.out).parent / prefix.rstrip("_")
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix=prefix))


def command(argv: Sequence[str] | None = None, script: str | os.PathLike | None = None) -> str:
    """The command line that reproduces this run, relative to the repository."""
    path = Path(script or sys.argv[0]).resolve()
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return ".venv/bin/python " + shlex.join([str(rel), *(sys.argv[1:] if argv is None else argv)])


# ----------------------------------------------------------------------------- child processes

_RESULT = "RESULT "


def script_cmd(script: str | os.PathLike, *args: Any) -> list[str]:
    """``python script args...`` with this interpreter."""
    return [sys.executable, str(script), *(str(a) for a in args)]


def child_result(obj: Any) -> None:
    """Print a child's result where ``run_child`` looks for it."""
    print(_RESULT + json.dumps(obj, default=str), flush=True)


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    return {**os.environ, **{k: str(v) for k, v in (extra or {}).items()}}


def run_child(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | os.PathLike = REPO) -> Any:
    """Run ``cmd`` in a fresh process (its own peak memory and thread pools) and return what it passed
    to ``child_result``; a failed child ends the benchmark with the tail of its stderr."""
    r = subprocess.run(list(cmd), cwd=cwd, env=_env(env), capture_output=True, text=True)
    line = next((x for x in reversed(r.stdout.splitlines()) if x.startswith(_RESULT)), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"child process failed (exit {r.returncode}): {shlex.join(list(cmd)[:8])} ...\n"
                         f"{r.stderr[-3000:]}")
    return json.loads(line[len(_RESULT):])


def run_logged(cmd: Sequence[str], log: str | os.PathLike, env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike = REPO) -> None:
    """Run ``cmd`` with stdout and stderr into ``log``; a failed run ends the benchmark, naming the log."""
    with open(log, "w") as f:
        rc = subprocess.call(list(cmd), cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=_env(env))
    if rc != 0:
        raise SystemExit(f"{shlex.join(list(cmd)[:6])} ... failed (exit {rc}): see {log}")


# ----------------------------------------------------------------------------- results

def write_results(out: str | os.PathLike, lines: Iterable[str], data: Mapping[str, Any] | None = None,
                  env: Mapping[str, Any] | None = None, append: bool = False) -> Path:
    """Write the Markdown ``lines`` to ``out`` followed by the environment block (as a new section at the
    end of the file when ``append``), and ``data`` with the environment as JSON beside it (``.json``)."""
    env = dict(environment() if env is None else env)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([*lines, "", *environment_section(env)])
    if append and out.exists() and out.stat().st_size:
        with out.open("a") as f:
            f.write("\n" + text)
    else:
        out.write_text(text)
    if data is not None:
        payload = {"environment": env, **{k: v for k, v in data.items() if k != "environment"}}
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {out}", flush=True)
    return out


def load_json(out: str | os.PathLike) -> dict[str, Any]:
    """The JSON an earlier run wrote beside ``out`` ({} when there is none)."""
    path = Path(out).with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> dict[str, Any]:
    """Add the environment's main fields to ``record`` under "env", print it as one JSON line and append
    that line to ``path``; returns the whole environment."""
    env = environment()
    record["env"] = {k: env.get(k) for k in ("cpu", "cpu_flags", "torch_threads", "torch", "onnxruntime")}
    print(json.dumps(record), flush=True)
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")
    return env


# ----------------------------------------------------------------------------- memory

def vm_kb(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak() -> int:
    """Reset this process's resident high-water mark (VmHWM) and return VmRSS in KiB, so a peak read
    later belongs to the work after this call, not to the imports before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return vm_kb("VmRSS")


# ----------------------------------------------------------------------------- data

def stamp_photos(n: int, folders: Sequence[str] = ("animals", "food", "vehicles")) -> list[str]:
    """``n`` real photos (PNG) from the tuxpaint-stamps-default Debian package, spread evenly over the
    sorted list of the given stamp folders, so the choice is stable."""
    from distill.datasets import package_files

    keep = tuple(f"/stamps/{f}/" for f in folders)
    pngs = sorted(p for p in package_files("tuxpaint-stamps-default")
                  if p.endswith(".png") and any(k in p for k in keep) and Path(p).is_file())
    return pngs[::max(1, len(pngs) // n)][:n]


def jpeg_blobs(n: int, px: int) -> list[bytes]:
    """``n`` distinct px x px JPEGs (a gradient plus seeded noise, about what a small photo compresses to)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, px, dtype=np.float32)
    out = []
    for _ in range(n):
        base = ramp[None, :, None] + ramp[:, None, None] * rng.uniform(0.2, 1.0, 3)[None, None, :]
        img = np.clip(base * 0.6 + rng.normal(0, 12, (px, px, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(folder: str | os.PathLike, items: int, per_shard: int, px: int) -> str:
    """Synthetic WebDataset shards: ``items`` samples (JPEG + .txt caption) in shards of ``per_shard``;
    -> the brace pattern of the shards."""
    folder = Path(folder)
    blobs = jpeg_blobs(32, px)
    n_shards = (items + per_shard - 1) // per_shard
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tf:
            for i in range(s * per_shard, min(items, (s + 1) * per_shard)):
                for name, data in ((f"{i:09d}.jpg", blobs[i % len(blobs)]),
                                   (f"{i:09d}.txt", f"a photo of thing {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(folder / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


# ----------------------------------------------------------------------------- over seeds

# two-sided 95% Student-t quantiles by degrees of freedom (n - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(xs: Iterable[float | None]) -> dict[str, Any]:
    """Mean, sd and the t-based 95% interval of the mean over seeds (NaN and None left out)."""
    import math
    import statistics

    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return {"mean": float("nan"), "sd": float("nan"), "ci95": [float("nan")] * 2, "n": 0}
    m = statistics.mean(xs)
    if len(xs) < 2:
        return {"mean": m, "sd": float("nan"), "ci95": [float("nan")] * 2, "n": 1}
    sd = statistics.stdev(xs)
    h = T95.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))
    return {"mean": m, "sd": sd, "ci95": [m - h, m + h], "n": len(xs)}
