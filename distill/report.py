"""Teacher-vs-student report: summary ratios, targets, report.json / report.md / plots.

report.json, schema version 1 (accuracy-type numbers are fractions in [0, 1]; report.md prints
them as percent with 2 decimals; FLOPs are 2 x MACs per sample; latency in milliseconds)::

    {
      "schema_version": 1,
      "experiment": str,
      "created": ISO-8601 time,
      "environment": {cpu, cpu_flags, logical_cores, torch_threads, gpu, os, python, torch,
                      onnxruntime, onnx, open_clip, numpy, ...}          # distill.bench.environment
      "ceilings": {"torch_fp32_gflops", "ort_int8_gops", ...}            # optional, bench.matmul_ceiling
      "timing": {"threads", "batch_sizes", "warmup", "repeats", "rounds", "settle_s"}  # optional, how latency was taken
      "teacher": {"name": str, "embed_dim": int},
      "student": {"name": str, "model_cfg": {...open_clip model_cfg...}},
      "training": {...free-form metrics...},
      "export": {...free-form: files, parity...},
      "variants": {
        name: {                                                          # bench.measure_variants row
          "status": "ok" | "failed", "reason": str (failed only),
          "role": "teacher" | "student", "runtime": "torch" | "onnxruntime", "precision": "fp32" | "int8",
          "params": {"image", "text", "total"}, "flops": {"image", "text"}, "size_mb": float | null,
          "latency": {"image_b1_median_ms", "image_b1_p90_ms", "image_b32_median_ms", "image_b32_p90_ms",
                      "text_b1_median_ms", "text_b1_p90_ms"},
          "latency_rounds": {"image_b1": [median of each interleaved round], ...},
          "throughput_img_s": float,                                      # at the largest batch
          "achieved": {"image_b1_gflops_s", "image_b1_ceiling_share", ..., "ceiling": key},
          "zeroshot": {set: {"top1", "top1_ci95": [lo, hi], "top5"}},
          "retrieval": {set: {"i2t_r1", "i2t_r1_ci95": [lo, hi], ..., "t2i_r10", "t2i_r10_ci95": [lo, hi]}},
                       # *_ci95: percentile-bootstrap 95% interval over the test images (distill.evaluation)
          "agreement": {"reference": name, set: {"image_cosine", "top1"}},
          "agreement_own": same, against the variant's own reference (e.g. its fp32 form), optional
          "memory": {"peak_rss_mb", "delta_mb"}
        }
      },
      "summary": {...summarize(report)...},
      "targets": {name: {"target": float, "measured": float, "met": bool, "margin_pct": float,
                         "direction": ">=" | "<="}}
    }
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

SCHEMA_VERSION = 1
TEACHER_BASELINES = ("teacher_torch_fp32", "teacher_onnx_fp32")
# p90 / median above this marks a latency as unsteady in report.md: on a steady machine the two are
# close, so a wider spread means a busy one (benchmarks/results/config_choices.md, "Measurement").
LATENCY_SPREAD_WARN = 2.0

__all__ = ["SCHEMA_VERSION", "new_report", "summarize", "target", "write_report", "render_markdown", "load_report"]


def _timing_note(timing: Mapping[str, Any] | None) -> str:
    if not timing:
        return ""
    return (f"; {timing.get('repeats')} timed calls per shape in {timing.get('rounds', 1)} interleaved rounds "
            f"(every variant visited once a round, after a {timing.get('settle_s', 0)} s pause), "
            f"{timing.get('warmup')} warm-up calls per round, "
            f"{timing.get('threads')} threads")


def new_report(experiment: str, environment: Mapping[str, Any], teacher: Mapping[str, Any],
               student: Mapping[str, Any], variants: Mapping[str, Any], **sections: Any) -> dict[str, Any]:
    """Assemble a schema-1 report dict; ``sections`` may hold training, export, ceilings, timing, targets."""
    rep = {"schema_version": SCHEMA_VERSION, "experiment": experiment,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "environment": dict(environment), "teacher": dict(teacher), "student": dict(student),
           "training": {}, "export": {}, "variants": dict(variants)}
    rep.update(sections)
    return rep


def _ok(report: Mapping[str, Any]) -> dict[str, dict]:
    return {k: v for k, v in report.get("variants", {}).items() if v.get("status") == "ok"}


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def _reference_teacher(ok: Mapping[str, dict]) -> str | None:
    for name in TEACHER_BASELINES:
        if name in ok:
            return name
    return next((k for k, v in ok.items() if v.get("role") == "teacher"), None)


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
    """Ratios between variants of one run:

    - ``speedup_image_b1`` / ``speedup_text_b1``: {student: {teacher baseline: teacher ms / student ms}}
      against teacher_torch_fp32 and teacher_onnx_fp32 (whichever measured).
    - ``compression``: {student: {"params", "flops_image", "size"}} = teacher / student; params and
      FLOPs against the reference teacher, size against the teacher variant of the same runtime and
      precision class (fp32) when it has files, else the reference teacher.
    - ``accuracy_retained``: {student: {set: student top1 / teacher top1}};
      ``r5_retained``: {student: {set: {"i2t", "t2i"}}} the same for R@5.
    - ``int8_loss_points``: {runtime: {set: (fp32 top1 - int8 top1) * 100}} for the student.
    - ``general``: {variant: {general set: {"image_cosine", "top1", "knn", each with "_ci95"}}} against
      the agreement reference (the teacher), for every variant: ``general_summary``.
    - ``unsteady_latency``: [{variant, shape, median_ms, p90_ms, ratio}] where p90 / median is above
      ``LATENCY_SPREAD_WARN``: a stall while the box was busy, which makes that median suspect.
    """
    ok = _ok(report)
    ref = _reference_teacher(ok)
    students = {k: v for k, v in ok.items() if v.get("role") == "student"}
    out: dict[str, Any] = {"reference_teacher": ref, "speedup_image_b1": {}, "speedup_text_b1": {},
                           "compression": {}, "accuracy_retained": {}, "r5_retained": {}, "int8_loss_points": {}}
    baselines = [t for t in TEACHER_BASELINES if t in ok] or ([ref] if ref else [])
    for name, s in students.items():
        lat = s.get("latency", {})
        out["speedup_image_b1"][name] = {t: _ratio(ok[t]["latency"].get("image_b1_median_ms"),
                                                   lat.get("image_b1_median_ms")) for t in baselines}
        out["speedup_text_b1"][name] = {t: _ratio(ok[t]["latency"].get("text_b1_median_ms"),
                                                  lat.get("text_b1_median_ms")) for t in baselines}
        if ref is None:
            continue
        t = ok[ref]
        same_rt = next((k for k, v in ok.items() if v.get("role") == "teacher" and v.get("runtime") == s.get("runtime")
                        and v.get("precision") == "fp32" and v.get("size_mb")), ref)
        out["compression"][name] = {
            "params": _ratio(t.get("params", {}).get("total"), s.get("params", {}).get("total")),
            "flops_image": _ratio(t.get("flops", {}).get("image"), s.get("flops", {}).get("image")),
            "size": _ratio(ok[same_rt].get("size_mb"), s.get("size_mb")),
            "size_vs": same_rt,
        }
        out["accuracy_retained"][name] = {
            k: _ratio(v.get("top1"), t.get("zeroshot", {}).get(k, {}).get("top1"))
            for k, v in s.get("zeroshot", {}).items()}
        out["r5_retained"][name] = {
            k: {d: _ratio(v.get(f"{d}_r5"), t.get("retrieval", {}).get(k, {}).get(f"{d}_r5")) for d in ("i2t", "t2i")}
            for k, v in s.get("retrieval", {}).items()}
    for runtime in dict.fromkeys(v["runtime"] for v in students.values()):
        fp = next((v for v in students.values() if v["runtime"] == runtime and v["precision"] == "fp32"), None)
        q = next((v for v in students.values() if v["runtime"] == runtime and v["precision"] == "int8"), None)
        if fp and q:
            out["int8_loss_points"][runtime] = {
                k: round(100 * (fp["zeroshot"][k]["top1"] - q["zeroshot"][k]["top1"]), 2)
                for k in fp.get("zeroshot", {}) if k in q.get("zeroshot", {})}
    out["general"] = general_summary(ok)
    out["unsteady_latency"] = unsteady_latency(ok)
    if report.get("run_minutes") is not None:
        out["run_minutes"] = report["run_minutes"]
    if report.get("finetune"):
        # the α* model: the reference teacher, or the exported "student" when the fine-tune ran alone
        alone = report["finetune"].get("then") == "export" and "student_torch_fp32" in ok
        out["finetune"] = _finetune_summary(report["finetune"], ok.get("student_torch_fp32" if alone else ref or "", {}))
    return out


GENERAL_KEYS = ("image_cosine", "top1", "knn")


def general_summary(ok: Mapping[str, dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per variant and general set (data.eval.general), its agreement with the teacher: image cosine,
    top-1 agreement over the class prompts and k-NN agreement, with their intervals and the set's size."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, row in ok.items():
        agr = row.get("agreement") or {}
        for key, entry in agr.items():
            if not key.startswith("general/") or not isinstance(entry, Mapping):
                continue
            keep = {k: entry.get(k) for k in (*GENERAL_KEYS, *(f"{m}_ci95" for m in GENERAL_KEYS), "n", "knn_k")
                    if k in entry}
            out.setdefault(name, {})[key[len("general/"):]] = {**keep, "reference": agr.get("reference")}
    return out


def _general_lines(summ: Mapping[str, Any]) -> list[str]:
    general = summ.get("general") or {}
    if not general:
        return []
    sets = list(dict.fromkeys(s for per in general.values() for s in per))
    lines = ["", "## General (away from the training domains)", "",
             "Each variant against the teacher on held-out images no variant was trained on (data.eval.general): "
             "mean image-embedding cosine, top-1 agreement of the zero-shot argmax over the class prompts, and "
             "k-NN agreement (share of each image's nearest held-out neighbours that are the same); "
             "[95% bootstrap interval over the images].", ""]
    for name in sets:
        first = next(per[name] for per in general.values() if name in per)
        lines += [f"`{name}`: {first.get('n')} images, k = {first.get('knn_k')}, reference "
                  f"`{first.get('reference')}`.", ""]
        rows = []
        for variant, per in general.items():
            e = per.get(name)
            if e is None:
                continue
            rows.append([f"`{variant}`"] + [_frac_ci(e, k) for k in GENERAL_KEYS])
        lines += table(["variant", "image cosine", "prompt top-1 agreement (%)", "k-NN agreement (%)"], rows) + [""]
    return lines


def _frac_ci(entry: Mapping[str, Any], key: str) -> str:
    x, ci = entry.get(key), entry.get(f"{key}_ci95")
    if x is None:
        return "-"
    if key == "image_cosine":
        return fmt(x, 3) + (f" [{fmt(ci[0], 3)}, {fmt(ci[1], 3)}]" if ci else "")
    return pct(x) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")


def _finetune_summary(ft: Mapping[str, Any], teacher: Mapping[str, Any]) -> dict[str, Any]:
    """The tuned teacher (α*, as the bench measured it) against the zero-shot one: ``teacher_top1``
    and ``zero_shot_top1`` per classification set, ``change_points`` per metric of every set (on a
    set the fine-tune never saw, a negative change is forgetting)."""
    zs = (ft.get("chain") or {}).get("zero_shot", {})
    tuned = {f"{s}/top1": m["top1"] for s, m in teacher.get("zeroshot", {}).items()}
    tuned.update({f"{s}/{k}": m[k] for s, m in teacher.get("retrieval", {}).items() for k in ("i2t_r5", "t2i_r5")})
    return {"alpha": ft.get("alpha"),
            "teacher_top1": {k[:-5]: v for k, v in tuned.items() if k.endswith("/top1")},
            "zero_shot_top1": {k[:-5]: v for k, v in zs.items() if k.endswith("/top1")},
            "change_points": {k: round(100 * (v - zs[k]), 2) for k, v in tuned.items() if k in zs}}


def unsteady_latency(variants: Mapping[str, dict], threshold: float | None = None) -> list[dict[str, Any]]:
    """Latency shapes whose p90 exceeds ``threshold`` x their median (default LATENCY_SPREAD_WARN)."""
    threshold = LATENCY_SPREAD_WARN if threshold is None else threshold
    out = []
    for name, v in variants.items():
        lat = v.get("latency") or {}
        for key, med in lat.items():
            if not key.endswith("_median_ms"):
                continue
            p90 = lat.get(key[:-len("_median_ms")] + "_p90_ms")
            if med and p90 and p90 / med > threshold:
                out.append({"variant": name, "shape": key[:-len("_median_ms")], "median_ms": med, "p90_ms": p90,
                            "ratio": round(p90 / med, 2)})
    return out


def target(measured: float | None, *, at_least: float | None = None, at_most: float | None = None) -> dict[str, Any]:
    """One target row: {"target", "direction", "measured", "met", "margin_pct"}; margin_pct is how far
    past (+) or short of (-) the target the measurement is, in percent of the target."""
    if (at_least is None) == (at_most is None):
        raise ValueError("give exactly one of at_least / at_most")
    goal, direction = (at_least, ">=") if at_least is not None else (at_most, "<=")
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        return {"target": goal, "direction": direction, "measured": None, "met": False, "margin_pct": None}
    met = measured >= goal if direction == ">=" else measured <= goal
    # signed distance to the goal in percent of |goal|: linear, so it stays meaningful when the
    # measurement is zero or negative (an int8 "loss" of -0.6 points is 220% inside a 0.5 cap)
    diff = measured - goal if direction == ">=" else goal - measured
    margin = diff / abs(goal) * 100 if goal else None
    return {"target": goal, "direction": direction, "measured": round(float(measured), 4), "met": bool(met),
            "margin_pct": None if margin is None else round(margin, 1)}


# ----------------------------------------------------------------------------- Markdown

def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int) and abs(x) >= 10000:
        return f"{x:,}"
    return str(x)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _pct_ci(metrics: Mapping[str, Any], key: str) -> str:
    """A metric in percent with its 95% interval when the report has one: "41.20 [38.10, 44.00]"."""
    ci = metrics.get(f"{key}_ci95")
    return pct(metrics.get(key)) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _sets(ok: Mapping[str, dict], key: str) -> list[str]:
    seen: list[str] = []
    for v in ok.values():
        for s in v.get(key, {}):
            if s not in seen:
                seen.append(s)
    return seen


def _variant_rows(variants: Mapping[str, dict]) -> list[tuple[str, Any]]:
    """(row label, function(variant row) -> cell) for the main table."""
    ok = {k: v for k, v in variants.items() if v.get("status") == "ok"}
    bs = sorted({int(k.split("_")[1][1:]) for v in ok.values() for k in v.get("latency", {}) if k.startswith("image_b")})
    rows: list[tuple[str, Any]] = [
        ("role / runtime / precision", lambda v: f"{v.get('role')} / {v.get('runtime')} / {v.get('precision')}"),
        ("params total (M)", lambda v: fmt(v.get("params", {}).get("total") and v["params"]["total"] / 1e6)),
        ("params image (M)", lambda v: fmt(v.get("params", {}).get("image") and v["params"]["image"] / 1e6)),
        ("image GFLOPs (2 x MACs)", lambda v: fmt(v.get("flops", {}).get("image") and v["flops"]["image"] / 1e9)),
        ("text GFLOPs (2 x MACs)", lambda v: fmt(v.get("flops", {}).get("text") and v["flops"]["text"] / 1e9)),
        ("file size (MB)", lambda v: fmt(v.get("size_mb"))),
    ]
    for b in bs:
        rows.append((f"image b{b} median / p90 (ms)", lambda v, b=b: (
            f"{fmt(v.get('latency', {}).get(f'image_b{b}_median_ms'))} / "
            f"{fmt(v.get('latency', {}).get(f'image_b{b}_p90_ms'))}")))
    rows += [
        ("text b1 median / p90 (ms)", lambda v: f"{fmt(v.get('latency', {}).get('text_b1_median_ms'))} / "
                                                f"{fmt(v.get('latency', {}).get('text_b1_p90_ms'))}"),
        ("throughput (img/s, largest batch)", lambda v: fmt(v.get("throughput_img_s"), 1)),
    ]
    def achieved(v: dict, b: int) -> str:
        a = v.get("achieved", {})
        share = a.get(f"image_b{b}_ceiling_share")
        return fmt(a.get(f"image_b{b}_gflops_s"), 1) + (f" ({pct(share)}% of {a.get('ceiling')})" if share else "")

    for b in bs:
        if any(f"image_b{b}_gflops_s" in v.get("achieved", {}) for v in ok.values()):
            rows.append((f"achieved image GFLOP/s b{b} (share of ceiling)", lambda v, b=b: achieved(v, b)))
    for s in _sets(ok, "zeroshot"):
        rows.append((f"zero-shot {s} top1 / top5 (%)", lambda v, s=s: (
            f"{_pct_ci(v.get('zeroshot', {}).get(s, {}), 'top1')} / "
            f"{pct(v.get('zeroshot', {}).get(s, {}).get('top5'))}")))
    for s in _sets(ok, "retrieval"):
        for d in ("i2t", "t2i"):
            rows.append((f"{s} {d} R@1 / R@5 / R@10 (%)", lambda v, s=s, d=d: " / ".join(
                _pct_ci(v.get("retrieval", {}).get(s, {}), f"{d}_r{k}") for k in (1, 5, 10))))
    agr_sets = [k for v in ok.values() for k in v.get("agreement", {}) if isinstance(v["agreement"][k], dict)]
    ref_name = next((v["agreement"].get("reference") for v in ok.values() if "agreement" in v), None)
    for s in dict.fromkeys(agr_sets):
        rows.append((f"agreement {s} with `{ref_name}`: image cosine / top1 (%)", lambda v, s=s: (
            f"{fmt(v.get('agreement', {}).get(s, {}).get('image_cosine'), 4)} / "
            f"{pct(v.get('agreement', {}).get(s, {}).get('top1'))}")))
    own_sets = [k for v in ok.values() for k in v.get("agreement_own", {}) if isinstance(v["agreement_own"][k], dict)]
    for s in dict.fromkeys(own_sets):
        rows.append((f"agreement {s} with own reference: image cosine / top1 (%)", lambda v, s=s: (
            "-" if "agreement_own" not in v else
            f"{fmt(v['agreement_own'].get(s, {}).get('image_cosine'), 4)} / "
            f"{pct(v['agreement_own'].get(s, {}).get('top1'))} (vs `{v['agreement_own'].get('reference')}`)")))
    rows.append(("peak RSS rise while measured (MiB)", lambda v: fmt(v.get("memory", {}).get("delta_mb"), 1)))
    return rows


def _flat(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _ratio_rows(summ: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for tower in ("image", "text"):
        for s, d in summ.get(f"speedup_{tower}_b1", {}).items():
            rows += [[f"`{s}`", f"{tower} speed-up at batch 1 vs `{t}`", f"{fmt(x)}x"] for t, x in d.items()]
    for s, d in summ.get("compression", {}).items():
        rows.append([f"`{s}`", f"compression vs `{summ.get('reference_teacher')}`: params / image FLOPs",
                     f"{fmt(d.get('params'))}x / {fmt(d.get('flops_image'))}x"])
        rows.append([f"`{s}`", f"file size vs `{d.get('size_vs')}`", f"{fmt(d.get('size'))}x"])
    for s, d in summ.get("accuracy_retained", {}).items():
        for k, x in d.items():
            rows.append([f"`{s}`", f"zero-shot top1 retained on {k} (student / teacher)", pct(x) + "%"])
    for s, d in summ.get("r5_retained", {}).items():
        for k, x in d.items():
            rows.append([f"`{s}`", f"R@5 retained on {k} (i2t / t2i)", f"{pct(x.get('i2t'))}% / {pct(x.get('t2i'))}%"])
    for rt, d in summ.get("int8_loss_points", {}).items():
        for k, x in d.items():
            rows.append([f"student {rt}", f"int8 top1 loss on {k} (fp32 - int8)", f"{fmt(x)} points"])
    return rows


def _target_lines(targets: Mapping[str, Any]) -> list[str]:
    if not targets:
        return ["(no targets set)"]
    rows = []
    for name, t in targets.items():
        margin = t.get("margin_pct")
        how = "-" if margin is None else (f"{margin:+.1f}% past the target" if t.get("met")
                                         else f"{margin:+.1f}% short of the target")
        rows.append([name, f"{t.get('direction', '>=')} {fmt(t.get('target'))}", fmt(t.get("measured")),
                     "met" if t.get("met") else "MISSED", how])
    return table(["target", "wanted", "measured", "result", "by how much"], rows)


def _activation_note(teacher: Mapping[str, Any]) -> str:
    act = teacher.get("activation")
    if not act:
        return ""
    name = {"quick_gelu": "QuickGELU", "gelu": "GELU"}.get(act, act)
    why = teacher.get("activation_reason")
    return f" (activation {name}" + (f": {why})" if why else ")")


def render_markdown(report: Mapping[str, Any]) -> str:
    """report dict (schema 1, with summary) -> report.md text."""
    variants = report.get("variants", {})
    names = list(variants)
    ok_names = [n for n in names if variants[n].get("status") == "ok"]
    summ = report.get("summary") or summarize(report)
    lines = [f"# Teacher vs student: {report.get('experiment', '?')}", "",
             f"Created {report.get('created', '?')}. Teacher: `{report.get('teacher', {}).get('name', '?')}`"
             + _activation_note(report.get("teacher", {})) + "; "
             f"student: `{report.get('student', {}).get('name', '?')}`" + _start_note(report.get("student", {})) + ".", "",
             "Conventions: FLOPs = 2 x MACs, per sample. Accuracy and recall in percent, with "
             "[95% interval] where measured (percentile bootstrap over the test images). Latency in ms, "
             "median and p90 of repeated timed calls after warm-up, same inputs and threads for every variant"
             + _timing_note(report.get("timing")) + ".", ""]
    lines += ["## Environment", "", "```"]
    lines += [f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in report.get("environment", {}).items()]
    if report.get("ceilings"):
        lines += [f"ceiling {k}: {v}" for k, v in report["ceilings"].items()]
    lines += ["```", ""]
    lines += ["## Variants", ""]
    if ok_names:
        rows = [[label] + [fn(variants[n]) for n in ok_names] for label, fn in _variant_rows(variants)]
        lines += table(["metric"] + [f"`{n}`" for n in ok_names], rows)
    failed = [n for n in names if variants[n].get("status") != "ok"]
    if failed:
        lines += ["", "Failed variants:", ""] + [f"- `{n}`: {variants[n].get('reason', '?')}" for n in failed]
    unsteady = summ.get("unsteady_latency") or []
    if unsteady:
        lines += ["", f"**Warning: unsteady latency** (p90 above {LATENCY_SPREAD_WARN:g}x the median; the box was "
                  "probably busy, so compare these medians with care or rerun the bench):", ""]
        lines += [f"- `{u['variant']}` {u['shape']}: median {fmt(u['median_ms'])} ms, p90 {fmt(u['p90_ms'])} ms "
                  f"({fmt(u['ratio'])}x)" for u in unsteady]
    lines += ["", "## Ratios (within this run)", ""]
    rows = _ratio_rows(summ)
    lines += table(["variant", "ratio", "value"], rows) if rows else ["(no ratios: a baseline or student is missing)"]
    lines += _general_lines(summ)
    lines += ["", "## Targets", ""] + _target_lines(report.get("targets", {}))
    lines += _finetune_lines(report)
    lines += _skipped_lines(report)
    for section in ("training", "export"):
        if report.get(section):
            lines += ["", f"## {section.capitalize()}", ""]
            lines += table(["key", "value"], [[k, fmt(v, 4)] for k, v in _flat(report[section])])
    return "\n".join(lines) + "\n"


def skipped_inputs(report: Mapping[str, Any]) -> list[tuple[str, int, list[str]]]:
    """(where, how many, the first ones named) for every place a run skipped unreadable inputs."""
    training = report.get("training") or {}
    out = []
    cache = training.get("cache") or {}
    if cache.get("skipped"):
        out.append(("training images (teacher cache)", int(cache["skipped"]), list(cache.get("skipped_first") or [])))
    seen = training.get("skipped_inputs") or {}
    if seen.get("count"):
        out.append(("training images (read while training)", int(seen["count"]),
                    [f"{f['key']} ({f['reason']})" for f in seen.get("first", [])]))
    data = training.get("data") or {}
    for name, count in (data.get("eval_skipped") or {}).items():
        if count:
            first = (data.get("eval_skipped_first") or {}).get(name, [])
            out.append((f"eval set {name}", int(count), [f"{f['key']} ({f['reason']})" for f in first]))
    return out


def _skipped_lines(report: Mapping[str, Any]) -> list[str]:
    rows = skipped_inputs(report)
    if not rows:
        return []
    lines = ["", "## Skipped inputs", ""]
    for where, count, first in rows:
        more = f", and {count - len(first)} more" if count > len(first) else ""
        lines.append(f"- {where}: {count} unreadable, skipped: {'; '.join(first) or '(not named)'}{more}")
    return lines


def _start_note(student: Mapping[str, Any]) -> str:
    """Where the student's image tower started, said plainly when it shares weights with the teacher."""
    start = student.get("pretrained_start")
    if not start:
        return " (random start)" if student else ""
    note = f" (image tower started from `{Path(str(start.get('file', '?'))).name}`"
    if start.get("inherits_from"):
        note += f", which is {start['inherits_from']}: it shares weights with the teacher"
    return note + ")"


def _chain_cells(flat: Mapping[str, Any], cols: list[str]) -> list[str]:
    return [pct(flat.get(c)) for c in cols]


def _variant_flat(v: Mapping[str, Any] | None) -> dict[str, float]:
    """A bench row's metrics in the flat form of the fine-tune's chain ("<set>/top1", "<set>/i2t_r5")."""
    v = v or {}
    out = {f"{s}/{k}": x for s, m in v.get("zeroshot", {}).items() for k, x in m.items()}
    out.update({f"{s}/{k}": x for s, m in v.get("retrieval", {}).items() for k, x in m.items()})
    return out


def _best_step_words(ft: Mapping[str, Any]) -> str:
    """Which evaluated weights the fine-tune handed on: the best, when it was not the last."""
    best = ft.get("best_step")
    if best is None:
        return ""
    how = "stopped early; " if ft.get("early_stopped") else ""
    return (f"best validation at step {best} ({how}its weights are the tuned model); " if ft.get("restored_best")
            else f"best validation at step {best}, the last; ")


def _finetune_lines(report: Mapping[str, Any]) -> list[str]:
    """The fine-tune: what trained and its cost, the WiSE-FT sweep, and one table down the chain
    zero-shot -> fine-tuned -> α* -> student -> student int8."""
    ft = report.get("finetune")
    if not ft:
        return []
    lines = ["", "## Fine-tune", "",
             f"Method `{ft['method']}` ({ft['loss']} loss): {ft['trainable_params']:,} of {ft['total_params']:,} "
             f"parameters train ({fmt(ft['trainable_pct'], 3)}%); {ft['steps']} steps in {fmt(ft['seconds'], 1)} s "
             f"({fmt(ft['step_ms'], 1)} ms a step); the whole stage, with the WiSE-FT sweep and the chain "
             f"evaluation, {fmt(ft.get('stage_seconds'), 1)} s; process peak RSS {fmt(ft['peak_rss_gb'])} GB; "
             f"{_best_step_words(ft)}WiSE-FT α* = {ft['alpha']:g} by {ft['wise_ft']['rule'].get('metric')} on "
             f"{ft['val_images']} validation images carved from the training data. Plot: `{ft['wise_ft']['plot']}`.", ""]
    sweep = ft["wise_ft"]["sweep"]
    keys = [k for k in sweep[0] if k == "val/top1" or k.endswith(("/top1", "_r5"))]
    lines += table(["α"] + keys, [[f"{r['alpha']:g}" + (" *" if r["alpha"] == ft["alpha"] else "")]
                                   + [pct(r.get(k)) for k in keys] for r in sweep])
    chain = ft.get("chain") or {}
    if chain:
        cols = [c for c in chain.get("zero_shot", {}) if c.endswith(("/top1", "_r5"))]
        variants = report.get("variants", {})
        alone = ft.get("then") == "export"  # the tuned model itself was exported and measured as the "student"
        rows = [["teacher zero-shot (α=0)"] + _chain_cells(chain["zero_shot"], cols),
                ["teacher fine-tuned (α=1)"] + _chain_cells(chain["fine_tuned"], cols),
                [f"teacher WiSE-FT α*={ft['alpha']:g}"] + _chain_cells(_variant_flat(
                    variants.get("student_torch_fp32" if alone and "student_torch_fp32" in variants
                                 else "teacher_torch_fp32")), cols)]
        if not alone:
            rows.append(["student distilled from it"] + _chain_cells(_variant_flat(variants.get("student_torch_fp32")), cols))
        # a tuned teacher exported alone that is no open_clip model (ConSE) has the teacher variants only
        int8 = "teacher_onnx_int8" if alone and "student_onnx_int8" not in variants else "student_onnx_int8"
        rows.append([("tuned model" if alone else "student") + " int8 (ONNX)"]
                    + _chain_cells(_variant_flat(variants.get(int8)), cols))
        lines += ["", "Down the chain (percent; the change from zero-shot on a set the fine-tune never saw is its "
                  "forgetting):", ""] + table(["model"] + cols, rows)
    return lines


# ----------------------------------------------------------------------------- plots

def accuracy_key(v: Mapping[str, Any]) -> tuple[str, float] | None:
    """The accuracy a plot shows: top1 of the first zero-shot set, else mean R@1 of the first retrieval set."""
    for s, m in v.get("zeroshot", {}).items():
        return f"zero-shot top1 on {s} (%)", 100 * m["top1"]
    for s, m in v.get("retrieval", {}).items():
        return f"mean R@1 on {s} (%)", 100 * (m["i2t_r1"] + m["t2i_r1"]) / 2
    return None


def plot_accuracy_vs_latency(variants: Mapping[str, dict], path: str | Path, title: str = "") -> Path:
    """One point per ok variant: image latency at batch 1 (log x) vs accuracy; Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = []
    for name, v in variants.items():
        acc = accuracy_key(v) if v.get("status") == "ok" else None
        ms = v.get("latency", {}).get("image_b1_median_ms") if acc else None
        if acc and ms:
            pts.append((ms, acc[1], name, v.get("role"), acc[0]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for ms, acc, name, role, _ in pts:
        ax.scatter(ms, acc, marker="s" if role == "teacher" else "o", s=50,
                   color="tab:red" if role == "teacher" else "tab:blue")
        ax.annotate(name, (ms, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front, best = [], -math.inf
    for ms, acc, *_ in sorted(pts):
        if acc > best:
            front.append((ms, acc))
            best = acc
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="gray", linewidth=1, label="Pareto front")
        ax.legend(fontsize=7)
    if pts:
        ax.set_xscale("log")
    ax.set_xlabel("image encoder latency, batch 1, median (ms, log)")
    ax.set_ylabel(pts[0][4] if pts else "accuracy (%)")
    ax.set_title(title or "accuracy vs latency (red squares: teacher)", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_latency(variants: Mapping[str, dict], path: str | Path, title: str = "") -> Path:
    """Horizontal bars: image latency at batch 1 (median, p90 whisker) per ok variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, v["latency"]["image_b1_median_ms"], v["latency"].get("image_b1_p90_ms"), v.get("role"))
            for n, v in variants.items() if v.get("status") == "ok" and "image_b1_median_ms" in v.get("latency", {})]
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(2, len(rows)) + 1))
    for i, (n, med, p90, role) in enumerate(rows):
        ax.barh(i, med, color="tab:red" if role == "teacher" else "tab:blue")
        if p90:
            ax.plot([med, p90], [i, i], color="black", linewidth=1)
        ax.text(med, i, f" {med:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("image encoder latency, batch 1 (ms; bar = median, line to p90)")
    ax.set_title(title or "latency per variant", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- files

def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, accuracy_vs_latency.png and latency.png into ``out_dir``.

    Fills ``report["summary"]`` (summarize) and ``schema_version`` when missing. -> {kind: path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.setdefault("schema_version", SCHEMA_VERSION)
    report.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    report.setdefault("targets", {})
    report["summary"] = summarize(report)
    paths = {"json": out / "report.json", "md": out / "report.md",
             "accuracy_vs_latency": out / "accuracy_vs_latency.png", "latency": out / "latency.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    paths["md"].write_text(render_markdown(report))
    plot_accuracy_vs_latency(report.get("variants", {}), paths["accuracy_vs_latency"], report.get("experiment", ""))
    plot_latency(report.get("variants", {}), paths["latency"], report.get("experiment", ""))
    return paths


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and check a report.json; raises UserError (one line) when missing or malformed."""
    from distill.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such report; pass the report.json of a finished run")
    try:
        rep = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{p}: not valid JSON ({' '.join(str(err).split())}); re-run the benchmark to rewrite it")
    if not isinstance(rep, dict) or rep.get("schema_version") != SCHEMA_VERSION:
        got = rep.get("schema_version") if isinstance(rep, dict) else type(rep).__name__
        raise UserError(f"{p}: schema_version {got!r}, expected {SCHEMA_VERSION}; this is not a clip-distill "
                        f"report or was written by another version")
    if not isinstance(rep.get("variants"), dict):
        raise UserError(f"{p}: has no 'variants' table; re-run the benchmark to rewrite it")
    return rep


def evaluate_targets(report: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, Any]:
    """Targets from conf (bench.targets): {summary key: {at_least: x} | {at_most: x}} -> met/missed.

    The keys name entries of ``report["summary"]`` (nested keys joined by '.'); a target whose
    figure is missing is reported as not met, never silently dropped.
    """
    out = {}
    for key, spec in targets.items():
        val: Any = report["summary"]
        for part in key.split("."):
            val = val.get(part) if isinstance(val, dict) else None
        out[key] = target(val if isinstance(val, (int, float)) else None, **spec)
    return out


def report_stage(cfg: Any, teacher: Any, model_cfg: dict[str, Any], measured: dict[str, Any],
                 train_metrics: dict[str, Any], export_info: dict[str, Any], out: Path,
                 finetune: dict[str, Any] | None = None, started: float | None = None,
                 student_start: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report stage: report.json / report.md (and plots) in the run folder ``out``, with the summary
    and the targets (``cfg.bench.targets``); ``measured`` is the bench stage's output."""
    import time

    from omegaconf import OmegaConf

    from distill.bench import environment
    from distill.session import command_line

    t = {"name": teacher.name, "embed_dim": teacher.embed_dim, "fingerprint": teacher.fingerprint}
    if teacher.activation:
        t.update(activation=teacher.activation, activation_reason=getattr(teacher, "activation_reason", None))
    report = new_report(
        cfg.experiment_name, environment(), teacher=t, student={"name": cfg.student.name, "model_cfg": model_cfg,
                                                            **({"pretrained_start": plain_start(student_start)}
                                                               if student_start else {})},
        variants=measured["variants"], training=train_metrics, export=export_info, ceilings=measured["ceilings"],
        timing=measured["timing"], command="python -m distill " + " ".join(command_line()))
    if finetune is not None:
        report["finetune"] = finetune
    if started is not None:  # this invocation's wall time, every stage included (a reused teacher cache shortens it)
        report["run_minutes"] = round((time.perf_counter() - started) / 60, 2)
    report["summary"] = summarize(report)
    report["targets"] = evaluate_targets(report, OmegaConf.to_container(cfg.bench.targets, resolve=True) if cfg.bench.get("targets") else {})
    write_report(report, out)
    return report


def plain_start(start: Mapping[str, Any]) -> dict[str, Any]:
    """A pretrained start's report as JSON: the file, what loaded, and what it shares with the teacher."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in start.items()}
