"""What a run sets up before its first stage: the device, the seeds, the run folder and its log."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from distill.errors import UserError

# the torch exporter's IR passes log every deduplicated initializer at INFO: hundreds of lines
NOISY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export")


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present (the local rank's GPU under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available: use device=auto or device=cpu")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_out_dir(cfg: DictConfig, out_dir: str | os.PathLike | None) -> tuple[Path, bool]:
    """The run folder and whether the user pinned it (``out_dir``, ``hydra.run.dir=...``); an
    unpinned folder is Hydra's time-stamped default, which ``train.resume=auto`` may swap for an
    unfinished sibling run (distill.runs)."""
    pinned = True
    if out_dir is None:
        out_dir = cfg.get("out_dir")
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        out_dir = hc.runtime.output_dir
        pinned = any(o.split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in hc.overrides.hydra)
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path, pinned


def setup_logging(out_dir: Path) -> None:
    """INFO to ``run.log`` in the run folder, unless Hydra already logs into that folder."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    target = (out_dir / "run.log").resolve()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().parent == target.parent
           for h in root.handlers):
        return
    fh = logging.FileHandler(target)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(fh)


def command_line() -> list[str]:
    """The overrides this run was started with (empty when called without Hydra, as tests do)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # no Hydra context: no command line to record
        return []
