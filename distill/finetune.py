"""Domain fine-tuning of an open_clip dual encoder before distillation: a second task of the
training engine (distill/engine), beside distillation (distill/train.py).

This first slice holds the parts every method shares: which parameters train (``select_trainable``:
full, one tower with its last layers optionally unlocked, or the projections only), the CLIP
contrastive loss on pairs with FLYP-style masking of same-label negatives, WiSE-FT weight
interpolation, and ``FineTuneTask``. LoRA and adapters (peft), the ``finetune`` config group and the
pipeline stage come next (issue: domain fine-tuning).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from distill import distributed as dist_utils
from distill.data import TrainSet
from distill.encoders import normalize_images, resize_to
from distill.engine import EngineConfig
from distill.engine.checkpoint import unwrap
from distill.errors import UserError
from distill.students import TEXT_PARAM_PREFIXES, tower_of

METHODS = ("full", "lock_image", "lock_text", "head")
HEAD_PARAMS = ("visual.proj", "text_projection", "logit_scale")  # CLIP's projections and temperature


def _block_index(name: str, prefix: str) -> int | None:
    """The resblock number of a parameter under ``prefix`` (e.g. "visual.transformer.resblocks."), else None."""
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def select_trainable(model: torch.nn.Module, method: str, unlocked_layers: int = 0) -> dict[str, int]:
    """Set ``requires_grad`` for ``method`` and return {"trainable", "total"} parameter counts.

    full: everything; lock_image / lock_text: the other tower, the projections and the logit scale
    train, and the locked tower's last ``unlocked_layers`` transformer blocks (open_clip's
    --lock-image-unlocked-groups / --lock-text-unlocked-layers); head: the projections and the
    logit scale only. A locked tower is put in eval mode by ``FineTuneTask`` (norm statistics frozen).
    """
    if method not in METHODS:
        raise UserError(f"finetune.method={method!r} is unknown: use one of {list(METHODS)}")
    n_img = len(unwrap(model).visual.transformer.resblocks)
    n_txt = len(unwrap(model).transformer.resblocks)
    for name, p in model.named_parameters():
        is_text = name.startswith(TEXT_PARAM_PREFIXES)
        is_image = name.startswith("visual.")
        head = name in HEAD_PARAMS
        if method == "full":
            train = True
        elif method == "head":
            train = head
        elif method == "lock_image":
            block = _block_index(name, "visual.transformer.resblocks.")
            train = head or not is_image or (block is not None and block >= n_img - unlocked_layers)
        else:  # lock_text
            block = _block_index(name, "transformer.resblocks.")
            train = head or not is_text or (block is not None and block >= n_txt - unlocked_layers)
        p.requires_grad_(train)
    counts = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total": sum(p.numel() for p in model.parameters())}
    if counts["trainable"] == 0:
        raise UserError(f"finetune.method={method} leaves nothing trainable in this model: pick another method")
    return counts


def clip_contrastive(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     labels: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """½ [CE(s I Tᵀ, y) + CE(s T Iᵀ, y)] on L2-normalised (B, D) features. With ``labels`` (captions
    made from class names), other pairs of the same class are not negatives (FLYP): their logits are
    masked out, so the loss does not push apart images and texts that say the same thing."""
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    logits = logit_scale.float() * image @ text.T  # (B, B)
    target = torch.arange(len(image), device=image.device)
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        logits = logits.masked_fill(same & ~torch.eye(len(image), dtype=torch.bool, device=image.device), float("-inf"))
    return 0.5 * (F.cross_entropy(logits, target, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits.T, target, label_smoothing=label_smoothing))


def wise_ft(zero_shot: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: θ = (1 − α) θ0 + α θ1 for every floating tensor (others are taken from ``tuned``)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise UserError(f"finetune.wise_ft alpha={alpha} must lie in [0, 1] (0: zero-shot weights, 1: fine-tuned)")
    if zero_shot.keys() != tuned.keys():
        missing = sorted(set(zero_shot) ^ set(tuned))[:3]
        raise UserError(f"WiSE-FT needs two checkpoints of one model; they differ in {missing}: tune from the same base")
    return {k: torch.lerp(zero_shot[k].float(), v.float(), float(alpha)).to(v.dtype) if v.is_floating_point() else v
            for k, v in tuned.items()}


class FineTuneTask:
    """Contrastive fine-tuning of an open_clip CLIP on captioned views (distill.data.TrainSet)."""

    name = "model"

    def __init__(self, model: torch.nn.Module, dataset: TrainSet, tokenizer: Callable[[list[str]], torch.Tensor],
                 cfg: EngineConfig, method: str = "full", unlocked_layers: int = 0,
                 mask_same_label: bool = False, label_smoothing: float = 0.0, image_size: int | None = None) -> None:
        self.model, self.dataset, self.tokenizer, self.cfg = model, dataset, tokenizer, cfg
        self.method, self.mask_same_label, self.label_smoothing = method, mask_same_label, float(label_smoothing)
        self.image_size = image_size or dataset.spec.size
        self.params = select_trainable(model, method, unlocked_layers)
        self.samples_per_step = int(cfg.batch_size) * int(cfg.grad_accum) * dist_utils.world_size()
        self.max_log_scale = math.log(float(cfg.max_logit_scale))
        self.seen = 0
        self.forward: torch.nn.Module = model

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}

    tower_of = staticmethod(tower_of)

    def prepare(self, device: torch.device, model: torch.nn.Module) -> None:
        self.device, self.forward = device, model
        unwrap(self.model).output_dict = True
        locked = {"lock_image": unwrap(self.model).visual, "head": unwrap(self.model)}.get(self.method)
        if locked is not None:
            locked.eval()  # frozen towers keep their norm statistics and dropout off

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        from distill.train import view_batches

        return view_batches(self.dataset, self.cfg, start_step, self.device)

    def loss(self, batch: Mapping[str, Any], step: int, micro: int, autocast: Callable) -> dict[str, torch.Tensor] | None:
        if not len(batch["index"]) or not bool(batch["pair_mask"].all()):
            return None  # contrastive fine-tuning needs a caption for every image
        images = batch["image"].to(self.device, non_blocking=True)
        tokens = self.tokenizer([self.dataset.texts[k] for k in batch["text_index"].tolist()]).to(self.device)
        labels = batch["text_index"].to(self.device) if self.mask_same_label else None  # same caption text = same class
        with autocast():
            out = self.forward(image=normalize_images(resize_to(images, self.image_size)), text=tokens)
        self.seen += len(batch["index"])
        return {"contrastive_loss": clip_contrastive(out["image_features"], out["text_features"], out["logit_scale"],
                                                     labels, self.label_smoothing)}

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        with torch.no_grad():  # CLIP's clamp: a drifting temperature is a known failure sign
            unwrap(self.model).logit_scale.clamp_(0, self.max_log_scale)

    def stats(self) -> dict[str, Any]:
        return {"images_seen": self.seen, "trainable_params": self.params["trainable"],
                "total_params": self.params["total"], "method": self.method}
