"""WiSE-FT (Wortsman et al. 2022): interpolate zero-shot and fine-tuned weights, sweep α, score each
α in-domain (the validation split) and on a general set the fine-tune never saw, pick α by a rule,
and plot in-domain against general."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from distill.errors import UserError
from distill.finetune.methods import is_peft

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def check_alpha(alpha: float) -> float:
    if not 0.0 <= float(alpha) <= 1.0:
        raise UserError(f"finetune WiSE-FT alpha={alpha} must lie in [0, 1] (0: zero-shot weights, 1: fine-tuned)")
    return float(alpha)


def wise_ft(zero_shot: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """θ = (1 − α) θ0 + α θ1 for every floating tensor (others are taken from ``tuned``)."""
    alpha = check_alpha(alpha)
    if zero_shot.keys() != tuned.keys():
        missing = sorted(set(zero_shot) ^ set(tuned))[:3]
        raise UserError(f"WiSE-FT needs two checkpoints of one model; they differ in {missing}: tune from the same base")
    return {k: torch.lerp(zero_shot[k].float(), v.float(), alpha).to(v.dtype) if v.is_floating_point() else v
            for k, v in tuned.items()}


@contextlib.contextmanager
def at_alpha(model: torch.nn.Module, zero_shot: Mapping[str, torch.Tensor], alpha: float) -> Iterator[torch.nn.Module]:
    """The model at WiSE-FT ``alpha`` inside the block, restored after. LoRA models scale their
    adapter (peft's ``rescale_adapter_scale``: exactly θ0 + α ΔW); others interpolate the weights."""
    alpha = check_alpha(alpha)
    if is_peft(model):
        from peft.helpers import rescale_adapter_scale

        with rescale_adapter_scale(model, alpha):
            yield model
        return
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(wise_ft(zero_shot, tuned, alpha))
    try:
        yield model
    finally:
        model.load_state_dict(tuned)


def sweep(model: torch.nn.Module, zero_shot: Mapping[str, torch.Tensor],
          score: Callable[[torch.nn.Module], dict[str, float]],
          alphas: Sequence[float] = DEFAULT_ALPHAS) -> list[dict[str, float]]:
    """[{"alpha": α, **score(model at α)}] for every α (``score`` returns flat metrics)."""
    if not alphas:
        raise UserError("finetune.wise_ft.alphas is empty: give at least one α in [0, 1], e.g. [0, 0.5, 1]")
    rows = []
    for a in alphas:
        with at_alpha(model, zero_shot, a) as m:
            was = m.training
            m.eval()
            rows.append({"alpha": float(a), **score(m)})
            m.train(was)
    return rows


def choose(rows: Sequence[Mapping[str, float]], metric: str, mode: str = "max", fixed: float | None = None) -> float:
    """α* by the rule: ``fixed`` when given, else the α whose ``metric`` is best (ties: the smaller α,
    which stays closer to the zero-shot model)."""
    if fixed is not None:
        return check_alpha(fixed)
    if mode not in ("max", "min"):
        raise UserError(f"finetune.wise_ft.mode={mode!r}: use max or min")
    if not rows or metric not in rows[0]:
        have = sorted(k for k in (rows[0] if rows else {}) if k != "alpha")
        raise UserError(f"finetune.wise_ft.metric={metric!r} is not scored; scored metrics: {have}")
    sign = 1.0 if mode == "max" else -1.0
    best = max(rows, key=lambda r: (sign * r[metric], -r["alpha"]))
    return float(best["alpha"])


def plot(rows: Sequence[Mapping[str, float]], in_domain: str, general: str | None, chosen: float, path: Path) -> Path:
    """In-domain against general score for every α (α labelled at each point, α* ringed) as a PNG;
    with no general set, the in-domain score against α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    xs = [r[general] for r in rows] if general else [r["alpha"] for r in rows]
    ys = [r[in_domain] for r in rows]
    ax.plot(xs, ys, "o-", color="tab:blue")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"{r['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if r["alpha"] == chosen:
            ax.plot([x], [y], "o", markersize=12, markerfacecolor="none", color="tab:red", label=f"α* = {chosen:g}")
    ax.set_xlabel(general or "α")
    ax.set_ylabel(in_domain)
    ax.set_title("WiSE-FT: zero-shot (α=0) to fine-tuned (α=1)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scores_at(rows: Sequence[Mapping[str, float]], alpha: float) -> dict[str, Any]:
    return next((dict(r) for r in rows if abs(r["alpha"] - alpha) < 1e-9), {})
