"""Measure every deployment variant the same way: latency, throughput, accuracy, agreement, size.

Conventions: warm up, synchronise, time with ``time.perf_counter``, repeat, report
median and p90 as a flat dict of rounded numbers, and record what it ran on (``environment``).
Accuracy-type numbers are fractions in [0, 1] (distill/metrics.py); FLOPs are 2 x MACs
(distill/flops.py). No function here asserts a timing: these are measurements, not tests.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from distill import evaluation

log = logging.getLogger(__name__)

__all__ = ["environment", "time_fn", "peak_rss_mb", "measure_peak_rss", "count_params", "file_size_mb",
           "matmul_ceiling", "Variant", "measure_variants"]

_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "neon", "asimd")


# ----------------------------------------------------------------------------- environment

def _cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, [f for f in _FLAGS if f in flags]


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def environment() -> dict[str, Any]:
    """What a measurement ran on: CPU model and ISA flags, cores, threads, library versions, GPU, OS."""
    cpu, flags = _cpu_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "open_clip": _version("open_clip_torch"),
        "numpy": _version("numpy"),
    }


# ----------------------------------------------------------------------------- timing and memory

def environment_section(env: dict[str, Any]) -> list[str]:
    """The "## Environment" block every benchmark's Markdown ends with: one ``key: value`` line each."""
    return ["## Environment", "", "```", *[f"{k}: {v}" for k, v in env.items()], "```", ""]


def _auto_sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_samples(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20,
                 sync: Callable[[], None] | None = None) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed with perf_counter; -> the
    timed calls in ms, in call order.

    ``sync`` runs before each clock read (default: ``torch.cuda.synchronize`` when CUDA is in use)
    so that asynchronous GPU work is inside the interval.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    sync = sync or _auto_sync
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved_times(calls: Mapping[str, Callable[[], Any]], *, rounds: int, per_round: int, warmup: int = 3,
                      settle_s: float = 0.5) -> dict[str, list[list[float]]]:
    """Time several callables in interleaved rounds; -> {name: one list of timed calls (ms) per round}.

    Each round visits every callable once, in an order rotated by one per round (none always runs
    first after a switch): a ``settle_s`` pause (the previous one's spinning thread pool goes idle),
    ``warmup`` untimed calls, then ``per_round`` timed calls (``time_samples``). A slow phase of a
    shared machine then spreads over every callable instead of landing on one. ``measure_variants``
    does the same per shape, with failure handling per variant.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    names = list(calls)
    out: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % max(1, len(names))
        for n in names[shift:] + names[:shift]:
            if settle_s > 0:
                time.sleep(settle_s)
            out[n].append(time_samples(calls[n], warmup=warmup, repeats=per_round))
    return out


def summarise_times(times: Sequence[float]) -> dict[str, float]:
    """{"median_ms", "p90_ms" (nearest rank), "mean_ms", "min_ms", "repeats"} of timed calls in ms."""
    if not times:
        raise ValueError("no timed calls to summarise")
    times = sorted(times)
    p90 = times[max(0, math.ceil(0.9 * len(times)) - 1)]  # nearest-rank percentile
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(p90, 3),
            "mean_ms": round(statistics.fmean(times), 3), "min_ms": round(times[0], 3), "repeats": len(times)}


def time_fn(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20,
            sync: Callable[[], None] | None = None) -> dict[str, float]:
    """``summarise_times(time_samples(...))``: warm-up, then ``repeats`` timed calls, summarised."""
    return summarise_times(time_samples(fn, warmup=warmup, repeats=repeats, sync=sync))


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started, MiB (getrusage; Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_peak_rss(fn: Callable[[], Any]) -> dict[str, float | None]:
    """Run ``fn`` and return {"peak_rss_mb", "delta_mb"}: the process's resident peak while it ran
    and how far that peak rose above the resident size just before.

    On Linux the kernel's high-water mark is reset first (write "5" to /proc/self/clear_refs), so
    the peak belongs to this call and variants measured one after another get their own figure
    (everything already loaded, e.g. other variants' weights, is in the baseline). Where that
    reset is unavailable, both fields fall back to the process-wide ``peak_rss_mb`` / None.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kb("VmRSS")
    except OSError:
        base = None
    fn()
    hwm = _proc_status_kb("VmHWM") if base is not None else None
    if base is None or hwm is None:
        return {"peak_rss_mb": peak_rss_mb(), "delta_mb": None}
    return {"peak_rss_mb": round(hwm / 1024, 1), "delta_mb": round(max(0, hwm - base) / 1024, 1)}


# ----------------------------------------------------------------------------- size

def count_params(module: torch.nn.Module) -> int:
    """Number of parameter elements (int8 packed weights of torch dynamic-quantised Linear layers are
    not ``Parameter``s; count those on the fp32 model)."""
    return int(sum(p.numel() for p in module.parameters()))


def file_size_mb(paths: str | Path | Iterable[str | Path]) -> float:
    """Total size in MB (10^6 bytes) of the files, including ONNX external-data files they reference."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; pass the exported files")
        seen.add(p.resolve())
        if p.suffix == ".onnx":
            from distill.onnx_tools import external_data

            seen.update((p.parent / loc).resolve() for loc in external_data(p))
    return round(sum(q.stat().st_size for q in seen if q.is_file()) / 1e6, 3)


# ----------------------------------------------------------------------------- GEMM ceilings

def _ort_matmul_session(kind: str, n: int, threads: int):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from distill.onnx_tools import session

    rng = np.random.default_rng(0)
    if kind == "int8":  # what ORT dynamic quantisation runs: uint8 activations x int8 weights -> int32
        w = numpy_helper.from_array(rng.integers(-64, 64, (n, n), dtype=np.int8), "W")
        node = helper.make_node("MatMulInteger", ["A", "W"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
        feed = rng.integers(0, 255, (n, n), dtype=np.uint8)
    else:
        w = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "W")
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
        feed = rng.standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph([node], "ceiling", [helper.make_tensor_value_info("A", a_type, [n, n])],
                              [helper.make_tensor_value_info("Y", y_type, [n, n])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = session(model.SerializeToString(), threads=threads)
    return lambda: sess.run(None, {"A": feed})


def matmul_ceiling(threads: int, n: int = 1024, repeats: int = 10) -> dict[str, float]:
    """Measured (n x n) @ (n x n) GEMM throughput on ``threads`` CPU threads, per runtime:
    {"torch_fp32_gflops", "torch_int8_gops", "ort_fp32_gflops", "ort_int8_gops", plus the aliases
    "fp32_gflops" (= torch) and "int8_gops" (= ORT)}. Counts 2 x n^3 operations per product.

    A model's achieved rate divided by its runtime's ceiling says how much of the machine the
    runtime uses. Ceilings are large square products; the thin (tokens x width) products of a
    batch-1 transformer cannot reach them.
    """
    ops = 2.0 * n ** 3
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, float] = {}
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = time_fn(lambda: a @ b, warmup=2, repeats=repeats)
        out["torch_fp32_gflops"] = round(ops / t["median_ms"] / 1e6, 1)
        try:  # fbgemm/onednn dynamic int8 linear: what torch.ao quantize_dynamic runs (deprecated API)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qlin = torch.ao.nn.quantized.dynamic.Linear(n, n)
                qlin.set_weight_bias(torch.quantize_per_tensor(torch.randn(n, n), 0.05, 0, torch.qint8), None)
            t = time_fn(lambda: qlin(a), warmup=2, repeats=repeats)
            out["torch_int8_gops"] = round(ops / t["median_ms"] / 1e6, 1)
        except Exception:  # no quantized engine on this build
            out["torch_int8_gops"] = None
        for kind in ("fp32", "int8"):
            run = _ort_matmul_session(kind, n, threads)
            t = time_fn(run, warmup=2, repeats=repeats)
            out[f"ort_{kind}_{'gflops' if kind == 'fp32' else 'gops'}"] = round(ops / t["median_ms"] / 1e6, 1)
    finally:
        torch.set_num_threads(prev)
    out["fp32_gflops"] = out["torch_fp32_gflops"]
    out["int8_gops"] = out["ort_int8_gops"]
    return out


def _ceiling_key(runtime: str, precision: str) -> str:
    rt = "ort" if runtime == "onnxruntime" else runtime
    return f"{rt}_{precision}_{'gflops' if precision == 'fp32' else 'gops'}"


# ----------------------------------------------------------------------------- variants

@dataclass
class Variant:
    """One deployable form of a model.

    ``encoder`` follows the Teacher duck type (distill/teachers/base.py): ``encode_image((B,3,H,W)
    float [0,1]) -> (B,D)`` L2-normalised, ``encode_text(list[str]) -> (B,D)``, ``image_size``.
    ORT encoders must be built with ``intra_op_num_threads`` equal to the ``threads`` given to
    ``measure_variants`` (torch threads are set there).
    """

    name: str
    role: str  # "teacher" | "student"
    runtime: str  # "torch" | "onnxruntime"
    precision: str  # "fp32" | "int8"
    encoder: Any
    params: dict[str, int] = field(default_factory=dict)  # {"image", "text", "total"}
    flops: dict[str, int] = field(default_factory=dict)  # {"image", "text"} per sample, 2 x MACs
    files: list[str] = field(default_factory=list)  # what ships, for size_mb

    def __post_init__(self) -> None:
        if self.role not in ("teacher", "student"):
            raise ValueError(f"variant {self.name}: role must be 'teacher' or 'student', got {self.role!r}")


def _timed_calls(enc: Any, batch_sizes: Sequence[int], timing_images: dict,
                 text: list[str]) -> dict[str, Callable[[], Any]]:
    """The calls a variant is timed on: {"image_b{B}": encode a batch of B, "text_b1": one caption}."""
    calls: dict[str, Callable[[], Any]] = {}
    for b in batch_sizes:
        x = timing_images[(b, int(enc.image_size))]
        calls[f"image_b{b}"] = lambda x=x: enc.encode_image(x)
    calls["text_b1"] = lambda: enc.encode_text(text)
    return calls


def _accuracy_and_memory(v: Variant, eval_sets: Mapping[str, Any], calls: Mapping[str, Callable[[], Any]]
                         ) -> tuple[dict, dict]:
    """-> (row without timing, evaluation results kept for agreement). Peak memory covers the eval
    (distill.evaluation, streamed) and one call of every timed shape (the largest batch is usually the peak)."""
    row: dict[str, Any] = {"status": "ok", "role": v.role, "runtime": v.runtime, "precision": v.precision,
                           "params": dict(v.params), "flops": dict(v.flops),
                           "size_mb": file_size_mb(v.files) if v.files else None}
    kept: dict[str, dict] = {}

    def body() -> None:
        for call in calls.values():
            call()
        kept.update(evaluation.evaluate(v.encoder, eval_sets, image_batch=32, text_batch=256, general=True))
        row["zeroshot"] = {name: r.row() for name, r in kept["classification"].items()}
        row["retrieval"] = {name: r.row() for name, r in kept["retrieval"].items()}

    row["memory"] = measure_peak_rss(body)
    return row, kept


def _timing_fields(v: Variant, samples: Mapping[str, list[float]], round_medians: Mapping[str, list[float]],
                   batch_sizes: Sequence[int], ceilings: Mapping[str, float] | None) -> dict[str, Any]:
    """Latency (median/p90 over every timed call of every round), throughput, achieved GFLOP/s."""
    lat: dict[str, float] = {}
    for key, times in samples.items():
        t = summarise_times(times)
        lat[f"{key}_median_ms"], lat[f"{key}_p90_ms"] = t["median_ms"], t["p90_ms"]
    out: dict[str, Any] = {"latency": lat,
                           "latency_rounds": {k: [round(m, 3) for m in ms] for k, ms in round_medians.items()}}
    bmax = max(batch_sizes)
    out["throughput_img_s"] = round(bmax / (lat[f"image_b{bmax}_median_ms"] / 1e3), 2)
    if v.flops.get("image"):
        key = _ceiling_key(v.runtime, v.precision)
        ach: dict[str, float | None] = {}
        for b in batch_sizes:
            rate = v.flops["image"] * b / (lat[f"image_b{b}_median_ms"] / 1e3) / 1e9
            ach[f"image_b{b}_gflops_s"] = round(rate, 2)
            ceil = (ceilings or {}).get(key)
            ach[f"image_b{b}_ceiling_share"] = round(rate / ceil, 4) if ceil else None
        ach["ceiling"] = key if ceilings and ceilings.get(key) else None
        out["achieved"] = ach
    return out


def _one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {msg}"[:300]


def _failed(v: Variant, err: BaseException) -> dict[str, Any]:
    return {"status": "failed", "reason": _one_line(err), "role": v.role, "runtime": v.runtime,
            "precision": v.precision}


def measure_variants(variants: Sequence[Variant], eval_sets: Mapping[str, Any], *,
                     batch_sizes: Sequence[int] = (1, 32), threads: int, reference: str,
                     warmup: int = 3, repeats: int = 20, rounds: int = 3, settle_s: float = 0.5,
                     ceilings: Mapping[str, float] | None = None,
                     own_reference: Mapping[str, str] | None = None, seed: int = 0) -> dict[str, dict]:
    """Measure each variant the same way; -> {variant name: report row} (schema in distill/report.py).

    eval_sets: {"classification": {name: EvalSet or {"images": (N,3,H,W) [0,1], "labels": (N,),
    "classnames", "templates"}}, "retrieval": {name: EvalSet or {"images": (N,3,H,W), "captions": N
    strings, or N lists of strings, or M strings plus "image_for_text": M ints}}} (distill.evaluation;
    an EvalSet is streamed chunk by chunk, a tensor is sliced).

    Every variant sees the same timing inputs (seeded uniform images at its ``image_size``, one
    fixed caption), the same eval images and ``threads`` torch threads. Per variant: zero-shot
    top1/top5, retrieval R@1/5/10 both ways, with bootstrap 95% intervals for top1 and R@K stored next
    to them ("top1_ci95": [lo, hi]), and peak memory (one variant at a time); then encode_image
    latency at each batch size and encode_text latency at batch 1, throughput at the largest batch and
    achieved GFLOP/s (with the share of ``ceilings`` from ``matmul_ceiling`` when given).

    Timing is interleaved: ``rounds`` rounds, each visiting every variant (in an order rotated by one
    per round) for ``warmup`` untimed and ceil(repeats / rounds) timed calls per shape; median and
    p90 are over all timed calls of all rounds, and each round's median is kept under
    "latency_rounds". On a small shared machine a background burst lasts seconds: timed in one block,
    it lands on one variant and flips a ratio; interleaved, it is spread over all of them. Each visit
    starts with a ``settle_s`` pause, so that the previous variant's spinning thread pool (torch's
    OpenMP workers, ORT's intra-op threads) parks before the next variant is timed.

    Agreement with the ``reference`` variant: mean cosine of image embeddings on the eval images
    (when the embedding sizes match) and top-1 zero-shot agreement. ``own_reference`` maps a variant
    to a second reference, typically its own fp32 form ({"student_onnx_int8": "student_onnx_fp32"}),
    reported the same way under "agreement_own": that is the figure that judges a quantisation. A
    variant that raises becomes {"status": "failed", "reason": one line}; the others still run.
    """
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    if reference not in names:
        raise ValueError(f"reference {reference!r} is not one of the variants {names}")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    sizes = sorted({int(getattr(v.encoder, "image_size", 224)) for v in variants})
    timing_images = {(b, s): torch.rand(b, 3, s, s, generator=gen) for s in sizes for b in batch_sizes}
    text = ["a photo of a small dog sitting on the grass."]
    rows: dict[str, dict] = {}
    kept: dict[str, dict] = {}
    calls: dict[str, dict[str, Callable[[], Any]]] = {}
    for v in variants:
        try:
            calls[v.name] = _timed_calls(v.encoder, batch_sizes, timing_images, text)
            rows[v.name], kept[v.name] = _accuracy_and_memory(v, eval_sets, calls[v.name])
        except Exception as err:  # one broken variant must not hide the others
            rows[v.name] = _failed(v, err)
    _time_interleaved(variants, rows, calls, rounds=rounds, per_round=math.ceil(repeats / rounds), warmup=warmup,
                      settle_s=settle_s, batch_sizes=batch_sizes, ceilings=ceilings)
    for name, row in rows.items():
        if row["status"] != "ok":
            continue
        row["agreement"] = _agreement(kept, name, reference)
        if own_reference and name in own_reference:
            row["agreement_own"] = _agreement(kept, name, own_reference[name])
    return rows


def _time_interleaved(variants: Sequence[Variant], rows: dict[str, dict], calls: Mapping[str, dict], *, rounds: int,
                      per_round: int, warmup: int, settle_s: float, batch_sizes: Sequence[int],
                      ceilings: Mapping[str, float] | None) -> None:
    """Time every working variant in ``rounds`` rotated rounds and add the timing fields to its row;
    a variant that raises while timed becomes a failed row."""
    timed = [v for v in variants if rows[v.name]["status"] == "ok"]
    samples = {v.name: {k: [] for k in calls[v.name]} for v in timed}
    round_medians = {v.name: {k: [] for k in calls[v.name]} for v in timed}
    for r in range(rounds):
        shift = r % max(1, len(timed))
        for v in timed[shift:] + timed[:shift]:  # rotated: no variant always runs first after a switch
            if rows[v.name]["status"] != "ok":
                continue
            try:
                if settle_s > 0:
                    time.sleep(settle_s)
                for key, call in calls[v.name].items():
                    times = time_samples(call, warmup=warmup, repeats=per_round)
                    samples[v.name][key] += times
                    round_medians[v.name][key].append(statistics.median(times))
            except Exception as err:
                rows[v.name] = _failed(v, err)
    for v in timed:
        if rows[v.name]["status"] == "ok":
            rows[v.name].update(_timing_fields(v, samples[v.name], round_medians[v.name], batch_sizes, ceilings))


def _agreement(kept: Mapping[str, dict], name: str, reference: str) -> dict[str, Any]:
    """{"reference": name, set: {"image_cosine", "top1"}} of variant ``name`` against ``reference``."""
    ref = kept.get(reference)
    if ref is None:
        return {"reference": reference, "note": "reference variant failed or is not measured"}
    agr: dict[str, Any] = {"reference": reference}
    for set_name, entry in evaluation.agreement(kept[name], ref).items():
        agr[set_name] = {k: _rounded(x) for k, x in entry.items()}
    return agr


def _rounded(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 6)
    return [_rounded(y) for y in x] if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------- the bench stage
class Unbuildable:
    """Stands in for a variant whose encoder could not be built, so the bench reports it failed."""

    image_size = 0

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(self.reason)

    encode_text = encode_image


def bench_variants(cfg: Any, variants: Sequence[str], ctx: Any, eval_sets: Mapping[str, Any],
                   teacher: Any) -> dict[str, Any]:
    """Build each configured variant's encoder (distill.variants, from the export stage's ``ctx``) and
    measure them all the same way; ``cfg`` is the bench config. Returns report["variants"] and the
    ceilings and timing settings the report records."""
    from distill import flops
    from distill.validate import REFERENCE_VARIANT
    from distill.variants import VARIANTS

    threads = int(cfg.threads)
    torch.set_num_threads(threads)
    stats = {"teacher": teacher.stats(),
             "student": flops.clip_model_stats(ctx.student, ctx.model_cfg) if ctx.student is not None else {}}
    onnx_teacher = ctx.built.get("teacher_onnx_fp32")
    if not stats["teacher"]["flops"] and onnx_teacher is not None:  # towers the analytic count cannot model
        log.info("teacher FLOPs counted on its ONNX export: the analytic count does not model its towers")
        stats["teacher"] = {**stats["teacher"], "flops": onnx_teacher.stats()["flops"]}
    rows = []
    for name in variants:
        spec = VARIANTS[name]
        try:
            if name in ctx.built["failed"]:
                raise RuntimeError(ctx.built["failed"][name])
            enc, files = spec.encoder(ctx), spec.files(ctx)
        except Exception as e:  # a variant that cannot be built is reported failed; the rest still run
            log.warning("variant %s failed to build: %s", name, e)
            enc, files = Unbuildable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"), []
        st = stats[spec.role]
        rows.append(Variant(name=name, role=spec.role, runtime=spec.runtime, precision=spec.precision,
                            encoder=enc, params=st["params"], flops=st["flops"],
                            files=files or list(st.get("files", []))))
    ceilings = matmul_ceiling(threads) if cfg.get("ceilings", True) else None
    timing = {"threads": threads, "batch_sizes": list(cfg.batch_sizes), "warmup": int(cfg.warmup),
              "repeats": int(cfg.repeats), "rounds": int(cfg.rounds), "settle_s": float(cfg.settle_s)}
    measured = measure_variants(
        rows, eval_sets, batch_sizes=tuple(cfg.batch_sizes), threads=threads, reference=REFERENCE_VARIANT,
        warmup=timing["warmup"], repeats=timing["repeats"], rounds=timing["rounds"], settle_s=timing["settle_s"],
        ceilings=ceilings, own_reference={n: VARIANTS[n].reference for n in variants if VARIANTS[n].reference in variants})
    return {"variants": measured, "ceilings": ceilings, "timing": timing}
