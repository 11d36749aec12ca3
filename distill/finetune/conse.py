"""The packaged ConSE teacher as a fine-tuning subject: EfficientNet-Lite (backbone + ImageNet
classifier), MiniLM, and the 1000-row class-name table that joins them, in one trainable module.

Parts: image = the EfficientNet backbone; head = the classifier (``image._fc``), the class table and
the temperature (the ConSE counterpart of CLIP's projections); text = MiniLM. Where the backbone is
frozen (head, lock_image, LoRA or adapters on the text side only) its pooled features are memoised
by the view's pixels, so a fine-tune, its WiSE-FT sweep and the teacher cache built after it run the
backbone once per view instead of once per visit. On CPU those passes run through onnxruntime (the
frozen backbone exported once, parity-checked against torch), which runs EfficientNet's depthwise
convolutions faster than torch does (benchmarks/results/frozen_backbone.md). Where the text tower is
frozen, caption embeddings are memoised by string the same way.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import math
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.finetune.methods import Layout
from distill.teachers.base import freeze, hash_state_dict
from distill.teachers.conse import text_fingerprint
from distill.teachers.conse_common import MEAN, STD, resize_crop

log = logging.getLogger("distill")

CONSE = Layout(
    image=("image.",), text=("text.",),
    head=("image._fc.", "class_table", "logit_scale"),
    blocks={"image": "image._blocks.", "text": "text.encoder.layer."},
    # after each block's MLP: MiniLM's second feed-forward layer; EfficientNet's projection conv
    adapter_after={"image": "image._blocks.*._project_conv", "text": "text.encoder.layer.*.output.dense"},
    lora_keywords={
        # only 1x1 convolutions with groups=1 take LoRA: grouped (depthwise) ones cannot be merged
        "conv1x1": lambda n, m: isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1,
        "classifier": lambda n, m: n.endswith("._fc") and isinstance(m, nn.Linear),
    },
    lora_default={"image": ("conv1x1", "classifier"), "text": ("query", "value")},
)


def _plain_pointwise_convs(module: nn.Module) -> None:
    """Swap EfficientNet-Lite's 1x1 stride-1 ``Conv2dStaticSamePadding`` (zero padding: the same
    maths) for plain ``nn.Conv2d`` with the same weights: peft builds a LoRA conv by calling the
    base layer's class, whose constructor here demands an image size."""
    for name, child in list(module.named_children()):
        if (isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and child.kernel_size == (1, 1)
                and child.stride == (1, 1) and child.groups == 1):
            plain = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain)
        else:
            _plain_pointwise_convs(child)


def pooled_features(image: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised -> (B, 1280): EfficientNet's backbone and average pooling, no classifier."""
    return image._avg_pooling(image.extract_features(x)).flatten(1)


def checkpointed_pooled_features(image: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pooled_features`` with each MBConv block's activations recomputed in the backward pass:
    EfficientNet.extract_features step by step, since its package has no checkpointing switch."""
    from torch.utils.checkpoint import checkpoint

    x = image._swish(image._bn0(image._conv_stem(x)))
    rate, n = image._global_params.drop_connect_rate, len(image._blocks)
    for idx, block in enumerate(image._blocks):
        x = checkpoint(block, x, rate * float(idx) / n if rate else rate, use_reentrant=False)
    return image._avg_pooling(image._swish(image._bn1(image._conv_head(x)))).flatten(1)


class _Pooled(nn.Module):
    """``pooled_features`` as a module: the graph the memo's onnxruntime runner runs."""

    def __init__(self, image: nn.Module) -> None:
        super().__init__()
        self.image = image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.image, x)


def ort_backbone(image: nn.Module, size: int, tol: float = 1e-3) -> Any | None:
    """A callable (B, 3, S, S) normalised -> (B, 1280) running a frozen copy of ``image``'s backbone in
    onnxruntime, or None (with a warning) when the export fails or its features differ from torch's
    by more than ``tol`` (max abs, features reach ~5): the caller then stays on torch."""
    from distill import onnx_tools

    graph = _Pooled(copy.deepcopy(image).float().cpu()).eval()
    probe = torch.rand(2, 3, size, size)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (probe,), buf, dynamo=False, opset_version=17, input_names=["pixels"],
                              output_names=["pooled"], dynamic_axes={"pixels": {0: "batch"}, "pooled": {0: "batch"}})
        # no spinning: each run is followed by torch work (the head) on the same cores
        sess = onnx_tools.session(buf.getvalue(), threads=torch.get_num_threads(), spinning=False)
        with torch.no_grad():
            err = float((torch.from_numpy(sess.run(None, {"pixels": probe.numpy()})[0]) - graph(probe)).abs().max())
    except Exception as e:  # noqa: BLE001 - any export or load failure: torch computes the memo instead
        log.warning("frozen backbone stays on torch: onnxruntime export failed (%s: %s)", type(e).__name__,
                    str(e).splitlines()[0][:160] if str(e) else "")
        return None
    if err > tol:
        log.warning("frozen backbone stays on torch: onnxruntime features differ by %.2e (> %.0e)", err, tol)
        return None
    return lambda x: torch.from_numpy(sess.run(None, {"pixels": x.detach().float().cpu().contiguous().numpy()})[0])


class ConSEModule(nn.Module):
    """image: EfficientNet -> softmax -> top-k classes, renormalised -> mix of their class-table
    rows; text: MiniLM, mean-pooled. ``forward`` returns open_clip's output dict."""

    def __init__(self, teacher: Any) -> None:
        super().__init__()
        self.image = copy.deepcopy(teacher.image_model).float()
        self.text = copy.deepcopy(teacher.text_model).float()
        self.class_table = nn.Parameter(teacher.class_embeddings.detach().float().clone())
        self.logit_scale = nn.Parameter(torch.tensor(math.log(float(teacher.logit_scale))))
        self.top_k, self.image_size, self.max_len = int(teacher.top_k), int(teacher.image_size), int(teacher._max_len)
        self.tokenizer = teacher._tokenizer
        self.memo: dict[bytes, torch.Tensor] | None = None  # pixels digest -> pooled backbone feature
        self.text_memo: dict[str, torch.Tensor] | None = None  # caption -> embedding, while MiniLM is frozen
        self.memo_runtime = "onnxruntime"  # what computes memo misses on CPU: onnxruntime | torch
        self._runner: Any = None  # a plain function (deepcopy shares it): the onnxruntime backbone
        _plain_pointwise_convs(self.image)
        self.image.to(memory_format=torch.channels_last)  # the swapped-in convs too: no layout conversions

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """``train.grad_checkpointing``: MiniLM through transformers' own switch, EfficientNet block by block."""
        self.grad_checkpointing = bool(enable)
        if hasattr(self.text, "activation_checkpointing_enable"):  # transformers >= 5 (the old names warn there)
            on, off, kwargs = (self.text.activation_checkpointing_enable, self.text.activation_checkpointing_disable,
                               {"activation_checkpointing_kwargs": {"use_reentrant": False}})
        else:
            on, off, kwargs = (self.text.gradient_checkpointing_enable, self.text.gradient_checkpointing_disable,
                               {"gradient_checkpointing_kwargs": {"use_reentrant": False}})
        if enable:
            on(**kwargs)
        else:
            off()

    def _backbone_frozen(self) -> bool:
        return not any(p.requires_grad for n, p in self.image.named_parameters() if not n.startswith("_fc."))

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpointed_pooled_features(self.image, x)
        return pooled_features(self.image, x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, 1280) pooled backbone features, memoised while the backbone is frozen."""
        if self.memo is None or not self._backbone_frozen():
            return self._pooled(x)
        keys = [hashlib.blake2b(row.detach().cpu().numpy().tobytes(), digest_size=16).digest() for row in x]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        if todo:
            run = self._frozen_pass(x)
            # each runtime's fastest batch on a small CPU (benchmarks/results/frozen_backbone.md)
            step = 4 if run == self._pooled else 16
            with torch.no_grad():
                fresh = torch.cat([run(x[todo[i:i + step]]) for i in range(0, len(todo), step)])
            for i, f in zip(todo, fresh):
                self.memo[keys[i]] = f.cpu()
        return torch.stack([self.memo[k] for k in keys]).to(x.device)

    def _frozen_pass(self, x: torch.Tensor) -> Any:
        """What computes memo misses: the onnxruntime backbone on CPU (built on first use), else torch."""
        if x.device.type != "cpu" or self.memo_runtime != "onnxruntime":
            return self._pooled
        if self._runner is None:
            self._runner = ort_backbone(self.image, self.image_size) or self._pooled
        return self._runner

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_crop(images.float(), self.image_size)
        x = ((x - MEAN) / STD).contiguous(memory_format=torch.channels_last)
        logits = self.image._fc(self.image._dropout(self.pooled(x)))
        top = logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)
        weights = top.values / top.values.sum(dim=-1, keepdim=True)
        return torch.einsum("bk,bkd->bd", weights, self.class_table[top.indices])

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if self.text_memo is None or any(p.requires_grad for p in self.text.parameters()):
            return self._encode_text(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in self.text_memo))
        if todo:
            with torch.no_grad():
                fresh = torch.cat([self._encode_text(todo[i:i + 64]) for i in range(0, len(todo), 64)])
            self.text_memo.update(zip(todo, fresh.cpu()))
        return torch.stack([self.text_memo[t] for t in texts]).to(self.class_table.device)

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        device = self.class_table.device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len,
                               return_tensors="pt").to(device)
        hidden = self.text(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)

    def forward(self, image: torch.Tensor | None = None, text: Sequence[str] | None = None) -> dict[str, Any]:
        return {"image_features": None if image is None else F.normalize(self.encode_image(image), dim=-1),
                "text_features": None if text is None else F.normalize(self.encode_text(text), dim=-1),
                "logit_scale": self.logit_scale.exp()}


class _Encoder:
    """A ConSEModule as an encoder for scoring ([0, 1] images, strings)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        return F.normalize(self.model.encode_image(images.to(dev)).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(list(texts)).float(), dim=-1)


class ConSESubject:
    """The ConSE teacher's parts as one ``ConSEModule`` (texts go in as strings: MiniLM tokenizes inside)."""

    layout: Layout = CONSE

    def features(self, model: nn.Module, images: torch.Tensor | None, texts: Sequence[str] | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        out = model(image=images, text=None if texts is None else list(texts))
        return out["image_features"], out["text_features"], out["logit_scale"]

    def encoder(self, model: nn.Module) -> _Encoder:
        return _Encoder(model)


def tuned_conse(teacher: Any, module: ConSEModule, method: str, alpha: float) -> Any:
    """A copy of the ConSE teacher running the tuned parts; its fingerprint covers them, the method
    and α. The backbone memo travels with it (``image_memo``) until the pipeline releases it."""
    t = copy.copy(teacher)
    t.image_model = freeze(module.image.to(teacher.device, memory_format=torch.channels_last))
    t.text_model = freeze(module.text.to(teacher.device))
    t.class_embeddings = module.class_table.detach().to(teacher.device).clone()
    t.logit_scale = float(module.logit_scale.detach().exp())
    t.fingerprint = hash_state_dict({k: v for k, v in module.state_dict().items() if v.dim() > 0}, extra=[
        "finetuned", f"base={teacher.fingerprint}", f"method={method}", f"alpha={alpha}"])
    t.text_fingerprint = text_fingerprint(t.text_model, t._max_len)
    t.name = f"{teacher.name} + {method} (WiSE-FT α={alpha:g})"
    t._stats = None
    return t


class MemoisedTeacher:
    """The tuned ConSE teacher whose ``encode_image`` reuses the backbone features the fine-tune
    memoised: for the teacher cache, which embeds the same views again. ``release()`` drops the
    memo and returns the plain teacher, so the bench times and evaluates real forwards."""

    def __init__(self, teacher: Any, module: ConSEModule) -> None:
        self._teacher, self._module = teacher, module.eval()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._teacher, name)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self._module.parameters()).device
        return F.normalize(self._module.encode_image(images.to(dev)).float(), dim=-1).to(self._teacher.device)

    def release(self) -> Any:
        self._module.memo = self._module.text_memo = None
        self._module._runner = None
        return self._teacher
