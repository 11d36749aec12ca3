"""Adapters that give a trainable open_clip student the Teacher protocol's encoder interface.

The benchmark and the zero-shot evaluation measure anything with ``encode_image((B,3,H,W) [0,1])``
and ``encode_text(list[str])``; this wraps an open_clip CLIP (fp32 or torch int8) that way.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


def normalize_images(images: torch.Tensor, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                     std: Sequence[float] = OPENAI_DATASET_STD) -> torch.Tensor:
    """(B, 3, H, W) [0, 1] -> mean/std normalised, same shape."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic antialiased resize to (size, size) when needed."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp_(0, 1)


class ClipEncoder:
    """An open_clip CLIP (or its torch-int8 copy) as an encoder: [0,1] images and strings in."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], image_size: int,
                 mean: Sequence[float] = OPENAI_DATASET_MEAN, std: Sequence[float] = OPENAI_DATASET_STD,
                 device: str | torch.device = "cpu") -> None:
        self.model, self.tokenizer, self.image_size = model, tokenizer, image_size
        self.mean, self.std, self.device = tuple(mean), tuple(std), torch.device(device)
        self.embed_dim = int(getattr(model, "text_projection").shape[1]) if getattr(model, "text_projection", None) \
            is not None else None

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) [0, 1] -> (B, D) L2-normalised float32."""
        x = normalize_images(resize_to(images.to(self.device, torch.float32), self.image_size), self.mean, self.std)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """B strings -> (B, D) L2-normalised float32."""
        return F.normalize(self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float(), dim=-1)
