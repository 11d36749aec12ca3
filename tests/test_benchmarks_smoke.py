"""Every harness in benchmarks/ runs in its smoke mode (``--smoke``: tiny sizes) and writes its results
file with real numbers; studies (benchmarks/studies/) are one-off and only checked to stand alone."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import REPO

BENCH = REPO / "benchmarks"


def _web_page_missing() -> bool:
    from tests.test_web_page import chromium_binary

    return chromium_binary() is None


# harness -> (a figure its JSON must hold: finite and > 0, needs Chromium)
HARNESSES: dict[str, tuple[Callable[[dict[str, Any]], Any], bool]] = {
    "conse_teacher": (lambda d: d["images_per_s"], False),
    "cpu_teacher_vs_student": (lambda d: d["summary"]["speedup_image_b1"]["student_onnx_int8"]["teacher_torch_fp32"],
                               False),
    "finetune_methods": (lambda d: d["rows"][0]["step_ms"], False),
    "flagship_seeds": (lambda d: d["rows"][0]["figures"]["minutes"], False),
    "mobile": (lambda d: d["image_formats"][0]["median_ms"], False),
    "patience": (lambda d: d["rows"][-1]["run_minutes"]["mean"] * d["rows"][-1]["steps"], False),
    "int8_towers": (lambda d: d["rows"]["tiny_timm"]["static"]["b1_ms"], False),
    "reinforce": (lambda d: d["throughput"]["speedup"] * d["memory"]["128"]["train"]["peak_rss_mib"], False),
    "runtimes": (lambda d: d["variants"]["student_onnx_fp32"]["latency"]["image_b1_median_ms"], False),
    "streaming_loader": (lambda d: d["runs"][-1]["rows"][0]["images_per_s"], False),
    "students": (lambda d: d["rows"]["tiny_timm"]["int8_b1_ms"]["mean"] * d["runs"]["tiny"][0]["params_m"], False),
    "train_throughput": (lambda d: d["runs"][-1]["rows"][0]["images_per_s_median"], False),
    "two_paths": (lambda d: d["rows"][0]["B"]["minutes"], False),
    "web_runtime": (lambda d: d["browser_over_native_int8_image_b1"]["1"], True),
}
FAST = {"streaming_loader"}  # the rest take from half a minute to a few on 2 shared cores


def test_every_harness_has_a_smoke_test():
    assert sorted(p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py")) == sorted(HARNESSES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in HARNESSES])
def test_harness_smoke_run_writes_real_numbers(name, tmp_path):
    figure, needs_browser = HARNESSES[name]
    if needs_browser and _web_page_missing():
        pytest.skip("headless Chromium not found (apt-get install chromium-headless-shell)")
    out = tmp_path / f"{name}.md"
    started = time.time_ns()
    r = subprocess.run([sys.executable, str(BENCH / f"bench_{name}.py"), "--smoke", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    md = out.read_text()
    assert "## Environment" in md and f".venv/bin/python benchmarks/bench_{name}.py --smoke" in md, md[:500]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["environment"]["torch"]
    value = figure(data)
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, value)
    touched = [p for p in (BENCH / "results").iterdir() if p.is_file() and p.stat().st_mtime_ns >= started]
    assert not [p.name for p in touched if "--smoke" in p.read_text(errors="replace")]  # nothing of it in results/


def _script_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(BENCH.glob("bench_*.py")) + sorted((BENCH / "studies").glob("bench_*.py")),
                         ids=lambda p: str(p.relative_to(BENCH)))
def test_no_benchmark_imports_another_script(path):
    """Shared pieces live in benchmarks/common.py or in the product, not in another benchmark."""
    others = {p.stem for p in BENCH.rglob("bench_*.py")}
    bad = {m for m in _script_imports(path) if m.split(".")[-1] in others or m.startswith("benchmarks.")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((BENCH / "studies").glob("bench_*.py")), ids=lambda p: p.name)
def test_a_study_runs_as_a_script(path):
    """Each study still starts as ``python benchmarks/studies/x.py`` (its argument parser answers)."""
    r = subprocess.run([sys.executable, str(path), "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-3000:]
