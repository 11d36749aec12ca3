"""What the ConSE teacher (conse.py) and its ONNX export (conse_onnx.py) share: the input
normalisation and the resize/crop, kept here so that neither module imports the other for them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MEAN, STD = 0.498, 0.502  # EfficientNet-Lite input normalisation, all channels


def resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) float [0, 1] -> (B, 3, S, S) on x's device, un-normalised: bicubic antialiased
    short-side resize to S (long side truncated like torchvision's resize), then centre crop with
    torchvision's rounding. Shared by the torch teacher and its ONNX export, so both see identical pixels."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"encode_image expects (B, 3, H, W) RGB, got {tuple(x.shape)}")
    s = int(size)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (h, w) != (s, s):
        if min(h, w) != s:
            scale = s / min(h, w)
            nh, nw = (s, max(s, int(w * scale))) if h <= w else (max(s, int(h * scale)), s)
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
            h, w = nh, nw
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        x = x[..., top:top + s, left:left + s]
    return x
