"""The Teacher protocol every teacher implements, and ``TEACHERS``, the registry of teacher classes.

A teacher is a frozen dual encoder that maps images and texts into one L2-normalised space.
Teachers take *texts as strings* (each teacher owns its tokenizer) and *images as float RGB in
[0, 1]*, shape (B, 3, H, W), un-normalised: each teacher resizes and normalises internally, so
the same augmented view can be fed to the teacher and (normalised its own way) to the student.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch

from distill.registry import Registry

# name = the class name a conf/teacher/*.yaml ``_target_`` ends with; each module of this package registers its own
TEACHERS: Registry = Registry("teacher", discover="distill.teachers")


@runtime_checkable
class Teacher(Protocol):
    """Every hook the pipeline calls on a teacher; a new teacher implements all of them."""

    name: str  # what the report calls it
    embed_dim: int  # D, size of the shared embedding space
    image_size: int  # side of the square input the image encoder expects
    logit_scale: float  # exp(logit_scale), e.g. 100.0 for CLIP
    fingerprint: str  # stable hex digest of architecture + weights (+ config that changes outputs)
    # optional: text_fingerprint, the digest of what encode_text alone depends on (text-only caches)
    model: torch.nn.Module | None  # the open_clip CLIP (weight inheritance, a shared text tower); None otherwise
    activation: str | None  # "gelu" | "quick_gelu" for transformer teachers, None where it does not apply

    def stats(self) -> dict:
        """{"params": {"image", "text", "total"}, "flops": {"image", "text"} per sample (2 x MACs),
        "files": [what ships]}; an empty dict for a figure the teacher cannot count."""
        ...

    def export_onnx(self, out_dir: str, threads: int | None = None):
        """The teacher as ONNX fp32 files in ``out_dir``, returned as an OnnxDualEncoder (the
        teacher_onnx_fp32 variant); raises when the teacher cannot be exported."""
        ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> (B, D) float32, L2-normalised, on CPU or images.device."""
        ...

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """B strings -> (B, D) float32, L2-normalised."""
        ...


def hash_state_dict(state: dict[str, torch.Tensor], extra: Iterable[str] = ()) -> str:
    """Stable sha256 over parameter names, shapes, dtypes and bytes (+ extra strings). 16 hex chars."""
    h = hashlib.sha256()
    for s in extra:
        h.update(s.encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Freeze once: no gradients, eval mode, so a teacher can never be trained by accident."""
    module.requires_grad_(False)
    module.eval()
    return module
