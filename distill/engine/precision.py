"""Which autocast and which attention kernel a step runs under."""

from __future__ import annotations

import logging
from contextlib import ExitStack, nullcontext
from typing import Callable, ContextManager

import torch

from distill.errors import UserError

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16")
ATTENTIONS = ("auto", "math", "any")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: absent from some builds
        return False


def choose(precision: str, device: torch.device) -> tuple[str, Callable[[], ContextManager]]:
    """("bf16" | "fp32", a factory of the step's autocast context). auto is bf16 on CUDA and fp32
    elsewhere; bf16 on a CPU needs native bf16 (else fp32, with a warning): without it there is
    no bf16 kernel to gain from."""
    if precision not in PRECISIONS:
        raise UserError(f"train.precision={precision!r} is not known: use auto, fp32 or bf16")
    use_bf16 = device.type == "cuda" and precision in ("auto", "bf16")
    if precision == "bf16" and device.type == "cpu":
        use_bf16 = cpu_has_native_bf16()
        if not use_bf16:
            log.warning("train.precision=bf16: this CPU has no native bf16 (AVX-512 BF16 or AMX); training in fp32")
    elif precision == "bf16" and device.type != "cuda":
        log.warning("train.precision=bf16 needs CUDA or a CPU; training in fp32 on %s", device.type)
    if use_bf16:
        return "bf16", lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return "fp32", nullcontext


def attention_kernel(attention: str, device: torch.device, precision_name: str) -> Callable[[], ContextManager]:
    """A factory of the context that picks scaled_dot_product_attention's kernel for a training step.

    auto is the math kernel for a bf16 step on a CPU and torch's own choice elsewhere: torch's CPU
    flash-attention backward is built for long sequences, and on a student's 26-32 tokens in bf16
    it is the slower one by far; in fp32 neither wins (benchmarks/results/cpu_step.md). Both
    compute the same attention."""
    if attention not in ATTENTIONS:
        raise UserError(f"train.attention={attention!r} is not known: use auto, math or any")
    if attention == "math" or (attention == "auto" and device.type == "cpu" and precision_name == "bf16"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return lambda: sdpa_kernel([SDPBackend.MATH])
    return nullcontext


def step_context(precision_name: str, attention: str, device: torch.device) -> tuple[str, Callable[[], ContextManager]]:
    """("bf16" | "fp32", a factory of the step's context: its autocast and its attention kernel)."""
    name, autocast = choose(precision_name, device)
    kernel = attention_kernel(attention, device, name)

    def context() -> ContextManager:
        stack = ExitStack()
        stack.enter_context(kernel())
        stack.enter_context(autocast())
        return stack

    return name, context
