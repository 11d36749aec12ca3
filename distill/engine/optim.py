"""Parameter groups, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from hydra.utils import instantiate

from distill.errors import UserError


# learning-rate groups a task's ``tower_of`` may name: the towers, and for fine-tuning the LoRA or
# adapter weights and the head (projections, temperature, class table)
LR_GROUPS = ("text", "image", "adapter", "head")


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """open_clip's rule: no weight decay on ndim < 2 (norms, biases, vectors) or 'bn'/'ln'/'bias'/'logit_scale' names."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(modules: list[torch.nn.Module], weight_decay: float, lr: float | None = None,
                 lr_scale: Mapping[str, float] | None = None,
                 tower_of: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """AdamW groups: [decay, no_decay], then one group per tower whose ``lr_scale`` is not 1.

    ``tower_of(name)`` names the group a parameter belongs to (one of ``LR_GROUPS`` or ""); a group in
    ``lr_scale`` gets ``lr`` x scale in groups of its own; the rest stays at ``lr``. The schedule
    scales every group alike.
    """
    given = dict(lr_scale or {})
    unknown = sorted(set(given) - set(LR_GROUPS))
    if unknown:
        raise UserError(f"train.lr_scale has unknown key(s) {unknown}: use {', '.join(LR_GROUPS)}")
    scales = {k: float(v) for k, v in given.items() if float(v) != 1.0}
    if scales and lr is None:
        raise UserError("train.lr_scale needs train.optimizer.lr: the scale multiplies it")
    tower_of = tower_of or (lambda name: "")
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {("", True): [], ("", False): []}
    for m in modules:
        for n, p in m.named_parameters():
            if p.requires_grad:
                tower = tower_of(n)
                groups.setdefault((tower if tower in scales else "", not no_decay(n, p)), []).append(p)
    out = []
    for (tower, decays), params in groups.items():
        if tower and not params:
            continue
        g: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if tower:
            g.update(lr=lr * scales[tower], tower=tower)
        out.append(g)
    return out


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    min_lr_ratio: float = 0.0, warmup_fraction: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base LR, then cosine decay to ``min_lr_ratio`` x base at ``total_steps``.
    ``warmup_fraction`` (of ``total_steps``), when given, replaces ``warmup_steps``."""
    if warmup_fraction is not None:
        if not 0.0 <= float(warmup_fraction) < 1.0:
            raise UserError(f"scheduler.warmup_fraction={warmup_fraction} must lie in [0, 1), e.g. 0.1")
        warmup_steps = round(float(warmup_fraction) * total_steps)

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def build(optimizer_cfg: Mapping[str, Any], scheduler_cfg: Mapping[str, Any], modules: list[torch.nn.Module],
          steps: int, lr_scale: Mapping[str, float] | None = None,
          tower_of: Callable[[str], str] | None = None) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer over ``modules``' trainable parameters and its schedule, from Hydra partials;
    the partial's weight_decay applies to matrices only (``no_decay``)."""
    make_opt = instantiate(optimizer_cfg)
    keywords = getattr(make_opt, "keywords", {})
    groups = param_groups(modules, float(keywords.get("weight_decay", 0.0)), lr=keywords.get("lr"),
                          lr_scale=lr_scale, tower_of=tower_of)
    optimizer = make_opt(groups)
    return optimizer, instantiate(scheduler_cfg)(optimizer, total_steps=steps)
