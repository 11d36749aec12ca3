"""Atomic checkpoints that carry everything an exact resume needs: each module's weights
(safetensors), optimizer, scheduler, RNG states, the step and the loop's own state."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.errors import UserError


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def rng_state() -> dict[str, Any]:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: Mapping[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_weights(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in unwrap(module).state_dict().items()}, str(path))


def find_checkpoint(resume: str | None, ckpt_root: Path) -> Path | None:
    """``auto``: this run's latest checkpoint if any; a path: that checkpoint folder or a run's
    ``checkpoints`` folder / run folder (its latest); None/"never": start fresh."""
    if not resume or resume == "never":
        return None
    roots = [ckpt_root] if resume == "auto" else [Path(resume), Path(resume) / "checkpoints"]
    for r in roots:
        if (r / "state.pt").exists():
            return r
        if (r / "latest.json").exists():
            return r / json.loads((r / "latest.json").read_text())["path"]
    if resume == "auto":
        return None
    raise UserError(f"train.resume={resume}: no checkpoint found there; pass a run folder, its checkpoints "
                    f"folder, or train.resume=auto")


class Checkpointer:
    """``root/step_XXXXXXX/`` folders: ``<name>.safetensors`` per module (empty state dicts are
    skipped) and ``state.pt``; written to a temp folder and renamed, then ``latest.json`` points
    at it; the oldest beyond ``keep`` are removed."""

    def __init__(self, root: Path, modules: Mapping[str, torch.nn.Module], keep: int = 2) -> None:
        self.root, self.modules, self.keep = Path(root), dict(modules), int(keep)

    def save(self, step: int, optimizer: torch.optim.Optimizer, scheduler: Any, extra: Mapping[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final, tmp = self.root / f"step_{step:07d}", self.root / f".tmp_step_{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, module in self.modules.items():
            if unwrap(module).state_dict():
                save_weights(module, tmp / f"{name}.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "step": step, **extra}, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = self.root / "latest.json.tmp"
        latest_tmp.write_text(json.dumps({"step": step, "path": final.name}))
        os.replace(latest_tmp, self.root / "latest.json")
        olds = sorted(p for p in self.root.glob("step_*") if p != final)
        for p in olds[: max(0, len(olds) - (self.keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def restore(self, path: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
                device: torch.device) -> dict[str, Any]:
        """Load weights, optimizer, scheduler and RNG states from ``path``; return ``state.pt``."""
        for name, module in self.modules.items():
            f = path / f"{name}.safetensors"
            if f.exists():
                unwrap(module).load_state_dict(load_file(str(f), device=str(device)))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return state
