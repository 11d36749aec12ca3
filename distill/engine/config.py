"""The engine's settings, typed. Every default lives in conf/train/default.yaml and nowhere else:
``EngineConfig.from_mapping`` takes a complete train config (what Hydra composes) and refuses a
missing or unknown key, so a default can never be written twice."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from distill.errors import UserError

DEFAULTS_FILE = "train/default.yaml"  # where the stages that call the engine read its defaults (distill.compose)


@dataclass(frozen=True)
class EngineConfig:
    """conf/train/default.yaml, typed; the comments there say what each key does."""

    steps: int
    batch_size: int
    grad_accum: int
    optimizer: Mapping[str, Any]  # a Hydra partial of the optimizer class
    lr_scale: Mapping[str, float]
    scheduler: Mapping[str, Any]  # a Hydra partial of the schedule, called with total_steps
    clip_grad: float
    max_logit_scale: float
    precision: str
    attention: str
    grad_checkpointing: bool
    compile: bool
    find_unused_parameters: bool
    num_workers: int
    seed: int
    log_every: int
    eval_every: int
    ckpt_every: int
    keep_checkpoints: int
    resume: str | None
    resample_corpus_texts: bool
    extra_texts: int
    stop_after_steps: int | None
    early_stop: Mapping[str, Any]
    tensorboard: bool
    progress: bool

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - set(cfg)), sorted(set(cfg) - names)
        if missing or unknown:
            raise UserError(f"train config: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
                            f"conf/{DEFAULTS_FILE} declares every key: compose from it (train=default)")
        return cls(**{k: cfg[k] for k in names})

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
