"""Run folders: which folder a command writes into, and whether a checkpoint may be resumed.

A run folder holds ``run_state.json``: its status (``running`` until the report is written, then
``finished``) and the run's *identity*, the config keys that change the model or the data. With
``train.resume=auto`` and Hydra's default time-stamped folder, a command continues the newest
unfinished sibling run whose identity matches; a finished run is never continued, so rerunning a
finished command starts a new run. Resuming a checkpoint whose identity differs stops with one
line that names the differing keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distill.errors import UserError

log = logging.getLogger(__name__)

RUN_STATE = "run_state.json"
# Sections of the config that decide what is trained on what.
IDENTITY_SECTIONS = ("teacher", "finetune", "student", "data", "loss", "train", "seed")
# train.* (and the fine-tune's own train.*) keys that steer a run without changing its result
# (logging, checkpoint cadence, workers). finetune.train.eval_every is not among them: it picks the
# steps early stopping can stop at.
_CONTROL = ("resume", "stop_after_steps", "progress", "tensorboard", "log_every", "ckpt_every",
            "keep_checkpoints", "num_workers", "find_unused_parameters")
RUN_CONTROL_KEYS = frozenset({f"train.{k}" for k in (*_CONTROL, "eval_every")}
                             | {f"finetune.train.{k}" for k in _CONTROL})
# where a run's engine stages keep their checkpoints: the student's, and the fine-tune's before it
CHECKPOINT_DIRS = ("checkpoints", "finetune/checkpoints")


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = node


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The config's model- and data-deciding keys, flattened: {"train.optimizer.lr": 5e-4, ...}."""
    out: dict[str, Any] = {}
    for section in IDENTITY_SECTIONS:
        if section in cfg:
            node = cfg[section]
            _flatten(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node,
                     section, out)
    return {k: v for k, v in sorted(out.items()) if k not in RUN_CONTROL_KEYS}


def fingerprint(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, or that only one side has."""
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RUN_STATE).read_text())
    except (OSError, ValueError):
        return None


def write_state(run_dir: Path, status: str, ident: dict[str, Any]) -> None:
    """Atomically record the run's status and identity."""
    tmp = run_dir / (RUN_STATE + ".tmp")
    tmp.write_text(json.dumps({"status": status, "fingerprint": fingerprint(ident), "identity": ident},
                              indent=1, default=str))
    os.replace(tmp, run_dir / RUN_STATE)


def _latest_files(run_dir: Path) -> list[Path]:
    return [f for f in (run_dir / d / "latest.json" for d in CHECKPOINT_DIRS) if f.exists()]


def has_checkpoint(run_dir: Path) -> bool:
    """A checkpoint of any stage: a run killed while fine-tuning is as resumable as one killed while distilling."""
    return bool(_latest_files(run_dir))


def check_resumable(run_dir: Path, ident: dict[str, Any]) -> None:
    """Stop with one line when ``run_dir``'s checkpoints were trained under a different identity."""
    state = read_state(run_dir)
    if state is None or "identity" not in state or not has_checkpoint(run_dir):
        return
    diff = differing_keys(state["identity"], ident)
    if diff:
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise UserError(f"cannot resume {run_dir}: its checkpoint was trained with a different config "
                        f"({shown}); rerun with the same settings, or pass train.resume=never to start over")


def find_unfinished(parent: Path, ident: dict[str, Any], exclude: Path) -> Path | None:
    """The newest unfinished run folder under ``parent`` with a checkpoint and the same identity."""
    fp = fingerprint(ident)
    candidates = []
    for d in parent.iterdir() if parent.is_dir() else []:
        if d.resolve() == exclude.resolve() or not has_checkpoint(d):
            continue
        state = read_state(d)
        if state is None or state.get("status") != "running":
            continue
        if state.get("fingerprint") == fp:
            candidates.append(d)
        else:
            log.info("not resuming %s: its config differs in %s", d,
                     ", ".join(differing_keys(state.get("identity", {}), ident)[:8]))
    return max(candidates, key=lambda d: max(f.stat().st_mtime for f in _latest_files(d)), default=None)


def _only_hydra_files(run_dir: Path) -> bool:
    """True when a folder holds nothing but what Hydra writes at start (.hydra/ and its job log)."""
    return all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir())


def select_run_dir(cfg: DictConfig, out: Path, pinned: bool) -> Path:
    """The folder this run writes into: ``out``, or with ``train.resume=auto`` and an unpinned,
    fresh ``out``, the newest unfinished sibling run of the same identity (whose checkpoint the
    training stage then continues). Checks that a resumed checkpoint matches the config."""
    ident = identity(cfg)
    resume = str(cfg.train.get("resume", "auto"))
    if resume == "auto" and not pinned and not has_checkpoint(out):
        found = find_unfinished(out.parent, ident, exclude=out)
        if found is not None:
            print(f"resuming the unfinished run {found}")
            log.info("resuming the unfinished run %s", found)
            if _only_hydra_files(out):
                shutil.rmtree(out, ignore_errors=True)
            out = found
    if resume == "auto":
        check_resumable(out, ident)
    elif resume != "never":
        target = Path(resume)
        run_dir = target.parent.parent if (target / "state.pt").exists() else \
            target.parent if target.name == "checkpoints" else target
        check_resumable(run_dir, ident)
    write_state(out, "running", ident)
    return out


def mark_finished(run_dir: Path, cfg: DictConfig) -> None:
    write_state(run_dir, "finished", identity(cfg))
