"""Shared fixtures: tiny models and in-memory image sources (synthetic data lives only in tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY_TEACHER_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(width=64, layers=1, head_width=32, patch_size=8, image_size=32),
    text_cfg=dict(width=32, layers=1, heads=2, context_length=16, vocab_size=49408),
)


class ArraySource:
    """An ImageSource over generated images; indices in ``broken`` raise like a corrupt file."""

    def __init__(self, n: int, captions: bool = True, labels: bool = False, broken: tuple[int, ...] = (),
                 name: str = "synthetic", seed: int = 0, size: int = 40):
        rng = np.random.default_rng(seed)
        self.images = [rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8) for _ in range(n)]
        self.captions = [f"a photo of thing number {i}" for i in range(n)] if captions else None
        self.labels = [i % 3 for i in range(n)] if labels else None
        self.classnames = ["cat", "dog", "bird"] if labels else None
        self.broken = set(broken)
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def key(self, i: int) -> str:
        return f"{self.name}/{i}"

    def open(self, i: int) -> Image.Image:
        if i in self.broken:
            raise OSError("image file is truncated")
        return Image.fromarray(self.images[i])


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def tiny_teacher():
    from distill.teachers.open_clip_teacher import OpenClipTeacher

    return OpenClipTeacher(model_name=None, model_cfg=TINY_TEACHER_CFG, seed=0)


@pytest.fixture
def conf_dir() -> str:
    return str(REPO / "conf")
