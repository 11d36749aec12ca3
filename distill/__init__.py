"""clip-distill: knowledge distillation for CLIP, from teacher to a shippable edge student."""

__version__ = "0.1.0"
