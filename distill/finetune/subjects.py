"""What the fine-tune trains, per model family: an open_clip CLIP (an open_clip teacher, or a
student this project exported) through its own forward, tokenizer and normalisation."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from distill.encoders import ClipEncoder, normalize_images, resize_to
from distill.finetune.methods import OPEN_CLIP, Layout, layout_for


class OpenClipSubject:
    """An open_clip CLIP: images resized to ``image_size`` and normalised by ``mean``/``std``,
    texts through ``tokenizer``; the model may be wrapped by peft (its forward passes through)."""

    layout: Layout = OPEN_CLIP

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], image_size: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.tokenizer, self.image_size = tokenizer, int(image_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    @classmethod
    def of_teacher(cls, teacher: Any) -> "OpenClipSubject":
        subject = cls(teacher.tokenizer, teacher.image_size, teacher.mean.flatten().tolist(),
                      teacher.std.flatten().tolist())
        subject.layout = layout_for(teacher.model)  # a shipped student's image tower need not be a ViT
        return subject

    def features(self, model: nn.Module, images: torch.Tensor | None, texts: Sequence[str] | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        device = next(model.parameters()).device
        kwargs: dict[str, torch.Tensor] = {}
        if images is not None:
            kwargs["image"] = normalize_images(resize_to(images.to(device), self.image_size), self.mean, self.std)
        if texts is not None:
            kwargs["text"] = self.tokenizer(list(texts)).to(device)
        out = model(**kwargs)
        if not isinstance(out, dict):  # a model built without output_dict
            out = dict(zip(("image_features", "text_features", "logit_scale"), out))
        return out.get("image_features"), out.get("text_features"), out["logit_scale"]

    def encoder(self, model: nn.Module) -> ClipEncoder:
        device = next(model.parameters()).device
        return ClipEncoder(model, self.tokenizer, self.image_size, self.mean, self.std, device=device)
