"""Write tests/data/smoke_pin.json: what +experiment=smoke computes at its fixed seed.

tests/test_pipeline.py::test_smoke_metrics_match_the_pin compares every smoke run with this file,
so a refactor that changes what the pipeline computes fails there. Rerun this tool only when a
change is *meant* to alter the numbers, and say so in the commit message:

    .venv/bin/python tools/pin_smoke.py [--from-run outputs/smoke/<run>]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIN = REPO / "tests" / "data" / "smoke_pin.json"


def _points(metrics: dict) -> dict:
    """The metrics without their bootstrap intervals ("*_ci95"): the pin holds the figures themselves."""
    return {k: _points(v) if isinstance(v, dict) else v for k, v in metrics.items() if not k.endswith("_ci95")}


def pin_of(run_dir: Path) -> dict:
    """The deterministic part of a smoke run: per-step losses, and each variant's accuracy, recall
    and agreement with the teacher (no timings, sizes or paths)."""
    report = json.loads((run_dir / "report.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [{k: v for k, v in rec.items() if k == "step" or k.endswith("loss")} for rec in steps
              if "loss" in rec]
    variants = {name: {k: _points(v[k]) for k in ("zeroshot", "retrieval", "agreement") if k in v}
                for name, v in report["variants"].items() if v.get("status") == "ok"}
    return {"steps": report["training"]["steps"], "losses": losses, "variants": variants}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", type=Path, help="an existing smoke run folder instead of a fresh run")
    args = ap.parse_args(argv)
    run_dir = args.from_run
    if run_dir is None:
        import tempfile

        from hydra import compose, initialize_config_dir

        from distill.pipeline import run

        tmp = Path(tempfile.mkdtemp(prefix="pin_smoke_"))
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["+experiment=smoke", f"out_dir={tmp / 'run'}",
                                                            f"cache.dir={tmp / 'cache'}"])
        run(cfg)
        run_dir = tmp / "run"
    PIN.parent.mkdir(parents=True, exist_ok=True)
    PIN.write_text(json.dumps(pin_of(run_dir), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PIN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
