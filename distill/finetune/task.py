"""Fine-tuning as a task of the training engine (distill/engine), beside distillation
(distill/train.py): the losses (CLIP contrastive with FLYP-style masking, or cross-entropy over
class prompts, optional label smoothing and an L2 pull towards the initial weights) and
``FineTuneTask``, which runs any dual encoder a ``Subject`` describes."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill import distributed as dist_utils
from distill.data import TrainSet
from distill.engine import EngineConfig
from distill.engine.checkpoint import unwrap
from distill.errors import UserError
from distill.finetune.methods import Layout, count_params


class Subject(Protocol):
    """A trainable dual encoder as the fine-tune sees it."""

    layout: Layout

    def features(self, model: nn.Module, images: torch.Tensor | None, texts: Sequence[str] | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(image features, text features, logit scale) of [0, 1] images and strings through ``model``."""

    def encoder(self, model: nn.Module) -> Any:
        """``model`` as an encoder (encode_image / encode_text, L2-normalised) for scoring."""


def clip_contrastive(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     labels: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """½ [CE(s I Tᵀ, y) + CE(s T Iᵀ, y)] on L2-normalised (B, D) features. With ``labels`` (captions
    made from class names), other pairs of the same class are not negatives (FLYP): their logits are
    masked out, so the loss does not push apart images and texts that say the same thing.

    Under torch.distributed every rank's rows meet the features of the whole global batch (gathered
    with their gradients, as open_clip's gather_with_grad + local_loss), so ranks of B images train
    exactly like one process of world x B, not like world separate B x B problems."""
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    all_image = dist_utils.gather_features(image, with_grad=True)  # (N, D); the local rows in one process
    all_text = dist_utils.gather_features(text, with_grad=True)
    target = torch.arange(len(image), device=image.device) + dist_utils.rank() * len(image)  # own pair's column
    i2t, t2i = logit_scale.float() * image @ all_text.T, logit_scale.float() * text @ all_image.T  # (B, N)
    if labels is not None:
        all_labels = dist_utils.gather_features(labels[:, None], with_grad=False)[:, 0]
        own = torch.arange(len(all_image), device=image.device)[None, :] == target[:, None]
        same = (labels[:, None] == all_labels[None, :]) & ~own
        i2t, t2i = i2t.masked_fill(same, float("-inf")), t2i.masked_fill(same, float("-inf"))
    return 0.5 * (F.cross_entropy(i2t, target, label_smoothing=label_smoothing)
                  + F.cross_entropy(t2i, target, label_smoothing=label_smoothing))


def prompt_cross_entropy(image: torch.Tensor, class_text: torch.Tensor, logit_scale: torch.Tensor,
                         labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CE(s I Cᵀ, y): each image against the (C, D) class-prompt features, as zero-shot classifies."""
    image, class_text = F.normalize(image.float(), dim=-1), F.normalize(class_text.float(), dim=-1)
    return F.cross_entropy(logit_scale.float() * image @ class_text.T, labels, label_smoothing=label_smoothing)


class FineTuneTask:
    """Fine-tuning of ``model`` (a ``subject``'s module, possibly peft-wrapped) on captioned views.

    ``item_labels``: a class id per training image (-1: none), from the sources' labels or, without
    them, the caption; it masks same-label negatives and is the target of ``loss="prompt_ce"``
    (``class_texts``: one prompt per class id). ``weights``: per training item, 0 to leave it out
    (the validation split, uncaptioned images), >1 to repeat it (class-balanced sampling).
    """

    name = "model"

    def __init__(self, model: nn.Module, subject: Subject, dataset: TrainSet, cfg: EngineConfig, *,
                 item_labels: Sequence[int] | None = None, weights: Sequence[int] | None = None,
                 loss: str = "contrastive", class_texts: Sequence[str] = (), mask_same_label: bool = False,
                 label_smoothing: float = 0.0, l2_pull: float = 0.0, method: str = "full") -> None:
        if loss not in ("contrastive", "prompt_ce"):
            raise UserError(f"finetune.loss={loss!r} is unknown: use contrastive or prompt_ce")
        self.model, self.subject, self.dataset, self.cfg = model, subject, dataset, cfg
        self.item_labels = torch.tensor(list(item_labels)) if item_labels is not None else None
        self.weights, self.loss_kind, self.class_texts = weights, loss, list(class_texts)
        self.mask_same_label, self.label_smoothing, self.l2_pull = mask_same_label, float(label_smoothing), float(l2_pull)
        self.method, self.params = method, count_params(model)
        self.samples_per_step = int(cfg.batch_size) * int(cfg.grad_accum) * dist_utils.world_size()
        self.max_log_scale = math.log(float(cfg.max_logit_scale))
        self.seen, self.logit_scales = 0, []
        self.forward: nn.Module = model
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if l2_pull else {}

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def tower_of(self, name: str) -> str:
        return self.subject.layout.group(name)

    def prepare(self, device: torch.device, model: nn.Module) -> None:
        self.device, self.forward = device, model
        self.anchor = {n: v.to(device) for n, v in self.anchor.items()}
        # frozen parts run in eval mode: batch-norm statistics stay, dropout is off
        self.frozen = [m for m in unwrap(self.model).modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       or (any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters()))]

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        from distill.train import view_batches

        return view_batches(self.dataset, self.cfg, start_step, self.device, valid=self.weights)

    def _labels(self, index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        if self.item_labels is None:
            return text_index  # same caption text = same class
        return self.item_labels[index // self.dataset.spec.views]

    def loss(self, batch: Mapping[str, Any], step: int, micro: int, autocast: Callable) -> dict[str, torch.Tensor] | None:
        if not len(batch["index"]) or not bool(batch["pair_mask"].all()):
            return None  # every image needs its caption (uncaptioned items are weighted out)
        for m in self.frozen:
            m.eval()
        images = batch["image"].to(self.device, non_blocking=True)
        labels = self._labels(batch["index"], batch["text_index"]).to(self.device)
        with autocast():
            if self.loss_kind == "prompt_ce":
                keep = labels >= 0
                if not bool(keep.any()):
                    return None
                img, cls, scale = self.subject.features(self.forward, images[keep], self.class_texts)
                out = {"prompt_ce_loss": prompt_cross_entropy(img, cls, scale, labels[keep], self.label_smoothing)}
            else:
                texts = [self.dataset.texts[k] for k in batch["text_index"].tolist()]
                img, txt, scale = self.subject.features(self.forward, images, texts)
                out = {"contrastive_loss": clip_contrastive(img, txt, scale, labels if self.mask_same_label else None,
                                                            self.label_smoothing)}
        if self.anchor:
            params = dict(unwrap(self.model).named_parameters())
            out["l2_pull_loss"] = self.l2_pull * sum(((params[n] - a) ** 2).sum() for n, a in self.anchor.items())
        self.seen += len(batch["index"])
        out["logit_scale"] = scale.detach().float()  # logged every step: its drift is a known failure sign
        return out

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        with torch.no_grad():  # CLIP's clamp, on every rank: a drifting temperature is a known failure sign
            for name, p in unwrap(self.model).named_parameters():
                if name.endswith("logit_scale"):
                    p.clamp_(0, self.max_log_scale)
                    self.logit_scales.append(float(p.exp()))

    def stats(self) -> dict[str, Any]:
        return {"images_seen": self.seen, "trainable_params": self.params["trainable"],
                "total_params": self.params["total"], "method": self.method,
                "logit_scale_final": self.logit_scales[-1] if self.logit_scales else None,
                "logit_scale_max": max(self.logit_scales) if self.logit_scales else None}
