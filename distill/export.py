"""Export a student for shipping: open_clip local-dir checkpoint and self-checked ONNX.

- ``save_open_clip_dir``: open_clip_config.json + open_clip_model.safetensors, loadable with
  ``open_clip.create_model_and_transforms('local-dir:' + dir)`` bit-exactly.
- ``export_onnx``: image_encoder.onnx ("pixels" (B,3,S,S) normalised -> "embedding" (B,D)) and
  text_encoder.onnx ("tokens" (B,L) int64 -> "embedding" (B,D)), both L2-normalised, dynamic
  batch. Each file checks itself (onnx.checker, then onnxruntime vs PyTorch on fresh random
  inputs at batch 1 and 3, timm utils/onnx.py style) and raises ExportCheckError on failure.
The edge bundle built from these files is written by ``distill.bundle``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from distill import preprocess as preprocess_spec
from distill.errors import ExportCheckError, UserError
from distill.onnx_tools import check_file

log = logging.getLogger(__name__)

_TWO_GB = 2 ** 31 - 2 ** 24  # protobuf's 2 GiB limit, with headroom for the graph itself


def default_preprocess(size: int, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                       std: Sequence[float] = OPENAI_DATASET_STD) -> dict[str, Any]:
    """The project's eval preprocessing spec (``distill.preprocess.default_spec``): an open_clip
    preprocess_cfg dict plus the ``rgb`` conversion rules (open_clip ignores keys it does not know);
    also the bundle's preprocess.json."""
    return preprocess_spec.default_spec(size, mean, std)


def plain(obj: Any) -> Any:
    """OmegaConf containers / tuples -> JSON-able dicts and lists."""
    if hasattr(obj, "items"):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        return [plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- open_clip folder

def save_open_clip_dir(model: torch.nn.Module, model_cfg: Mapping[str, Any], out_dir: str | Path,
                       preprocess_cfg: Mapping[str, Any] | None = None) -> Path:
    """Write open_clip_config.json ({"model_cfg", "preprocess_cfg"}) and open_clip_model.safetensors.

    ``open_clip.create_model_and_transforms('local-dir:' + str(out_dir))`` rebuilds the model from
    model_cfg and loads these weights (open_clip factory.py, local-dir schema).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = plain(model_cfg)
    size = cfg["vision_cfg"].get("image_size", 224)
    pre = dict(default_preprocess(size if isinstance(size, int) else size[0]))
    pre.update(plain(preprocess_cfg or {}))
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}, indent=2))
    # clone: safetensors refuses tensors that share storage; the reload is strict, so keep every key
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"), metadata={"format": "pt", "producer": "clip-distill"})
    return out


# ---------------------------------------------------------------------------- ONNX towers

class ImageTower(torch.nn.Module):
    """(B, 3, S, S) normalised pixels -> (B, D) L2-normalised image embedding."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels), dim=-1)


class PatchMatMul(torch.nn.Module):
    """A ViT patch embedding (Conv2d with kernel = stride = p, no padding) as patchify + MatMul.

    Same output, layout (B, D, H/p, W/p) included, so it drops into open_clip's VisionTransformer
    as ``conv1``. Exported, it is a Reshape/Transpose and one MatMul, which ORT's dynamic int8 turns
    into DynamicQuantizeMatMul; a Conv becomes ConvInteger, which is slower
    (benchmarks/results/onnx_export_variants.md), with identical outputs.
    """

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.p = int(conv.kernel_size[0])
        self.weight = torch.nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).T.contiguous())
        self.bias = None if conv.bias is None else torch.nn.Parameter(conv.bias.detach().clone())

    @staticmethod
    def applies_to(conv: Any) -> bool:
        return (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size[0] == conv.kernel_size[1]
                and tuple(conv.stride) == tuple(conv.kernel_size) and tuple(conv.padding) == (0, 0)
                and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.p
        gh, gw = h // p, w // p
        x = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        y = x @ self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(1, 2).reshape(b, -1, gh, gw)


class MatMulAttention(torch.nn.Module):
    """An ``nn.MultiheadAttention`` used as self-attention, written as plain MatMul/Softmax.

    Same weights (read from the wrapped module at call time), same outputs up to float rounding;
    it drops into open_clip's ResidualAttentionBlock as ``attn`` (called ``attn(q, k, v,
    need_weights=False, attn_mask=...)``, returns ``(out, None)``). Exported, it is about a third of
    the nodes of torch's decomposition of nn.MultiheadAttention (one packed QKV projection, few
    Transposes), which onnxruntime runs faster (benchmarks/results/onnx_export_variants.md).
    Cross-attention (key is not query) goes to the wrapped module unchanged.
    """

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    @staticmethod
    def applies_to(mha: Any) -> bool:
        return (isinstance(mha, torch.nn.MultiheadAttention) and mha._qkv_same_embed_dim
                and mha.in_proj_weight is not None and mha.bias_k is None and not mha.add_zero_attn)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        m = self.mha
        if key is not query or value is not query or need_weights or kwargs.get("key_padding_mask") is not None:
            return m(query, key, value, need_weights=need_weights, attn_mask=attn_mask, **kwargs)
        x = query if m.batch_first else query.transpose(0, 1)
        n, e, h = x.shape[1], m.embed_dim, m.num_heads
        d = e // h
        # reshape with -1 for the batch (token count n is static): constant shapes, no Shape/Gather chain
        q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).reshape(-1, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q * d ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            a = a + attn_mask.to(a.dtype) if attn_mask.dtype != torch.bool else a.masked_fill(attn_mask, float("-inf"))
        out = m.out_proj((a.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, e))
        return (out if m.batch_first else out.transpose(0, 1)), None


@contextlib.contextmanager
def _export_forms(model: torch.nn.Module, kind: str, patch_embed: str, attention: str):
    """While inside, ``model`` (an open_clip CLIP) has the export-friendly forms of its ``kind``
    tower: the ViT patch embedding as a PatchMatMul (``patch_embed="matmul"``) and the
    transformer blocks' self-attention as MatMulAttention (``attention="matmul"``). Everything is
    put back on exit, so the caller's model is unchanged and nothing is copied."""
    undo: list[tuple[Any, str, Any]] = []

    def swap(owner: Any, name: str, new: torch.nn.Module) -> None:
        undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    tower = getattr(model, "visual", None) if kind == "image" else model
    try:
        if kind == "image" and patch_embed == "matmul" and PatchMatMul.applies_to(getattr(tower, "conv1", None)):
            swap(tower, "conv1", PatchMatMul(tower.conv1))
        if attention == "matmul":
            for block in getattr(getattr(tower, "transformer", None), "resblocks", ()):
                if MatMulAttention.applies_to(getattr(block, "attn", None)):
                    swap(block, "attn", MatMulAttention(block.attn))
        yield
    finally:
        for owner, name, old in reversed(undo):
            setattr(owner, name, old)


class TextTower(torch.nn.Module):
    """(B, L) int64 token ids -> (B, D) L2-normalised text embedding."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens), dim=-1)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _rename_output(graph: Any, name: str) -> None:
    """Name the graph's single output ``name`` (onnx_ir graph of a dynamo ONNXProgram).

    Done here rather than with ``output_names=``: in torch 2.14 that rename collides with the
    value aten.embedding produces (also called "embedding") in the text tower and leaves two
    values with one name, which onnx.checker rejects (not SSA).
    """
    for node in graph:
        for v in node.outputs:
            if v.name == name:
                v.name = f"{name}_internal"
    (out,) = graph.outputs
    out.name = name


def _export_one(tower: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, opset: int,
                exporter: str) -> str:
    """Export one tower; returns the exporter used ("dynamo" or "legacy")."""
    external = _param_bytes(tower) >= _TWO_GB  # embed the weights whenever protobuf allows it
    if exporter in ("auto", "dynamo"):
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            # example batch 2: export specialises a dimension whose example size is 1
            with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(tower, (example,), None, dynamo=True, opset_version=opset,
                                            input_names=[input_name], dynamic_shapes={input_name: {0: batch}},
                                            verbose=False)
                _rename_output(program.model.graph, "embedding")
                program.save(str(path), external_data=external)
            return "dynamo"
        except Exception as e:  # noqa: BLE001 - any exporter failure: fall back, then the check decides
            if exporter == "dynamo":
                raise ExportCheckError(f"{path.name}: dynamo ONNX export failed ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0][:160] if str(e) else ''}); try exporter='legacy'") from e
            log.warning("dynamo export of %s failed (%s: %s); falling back to the legacy exporter", path.name,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    # Legacy TorchScript exporter: fails on nn.MultiheadAttention's fused fast path
    # (aten::_native_multi_head_attention) under no_grad unless the fast path is disabled.
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(tower, (example,), str(path), dynamo=False, opset_version=min(opset, 20),
                              input_names=[input_name], output_names=["embedding"],
                              dynamic_axes={input_name: {0: "batch"}, "embedding": {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)
    return "legacy"


def onnx_opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")))


def random_inputs(kind: str, batch: int, *, image_size: int = 224, context_length: int = 77,
                  vocab_size: int = 49408, seed: int = 0) -> np.ndarray:
    """Fresh check inputs: "image" -> (B,3,S,S) float32 N(0,1); "text" -> (B,L) int64 sot, ids, eot, zeros."""
    rng = np.random.default_rng(seed)
    if kind == "image":
        return rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    tokens = np.zeros((batch, context_length), dtype=np.int64)
    sot, eot = vocab_size - 2, vocab_size - 1
    for i in range(batch):
        n = int(rng.integers(1, context_length - 1))  # eot position varies: argmax pooling is exercised
        tokens[i, 0] = sot
        tokens[i, 1:n] = rng.integers(1, sot, n - 1)
        tokens[i, n] = eot
    return tokens


def check_onnx_file(path: str | Path, reference: Callable[[torch.Tensor], torch.Tensor], kind: str, *,
                    image_size: int = 224, context_length: int = 77, vocab_size: int = 49408,
                    parity_tol: float = 0.9999, batches: Sequence[int] = (1, 3), seed: int = 1234,
                    exporter: str = "dynamo") -> dict[str, float]:
    """onnx.checker, then onnxruntime vs ``reference`` (the PyTorch tower) on fresh random inputs
    (``distill.onnx_tools.check_file``).

    Returns {"min_cosine", "max_abs_err"} over all rows of all batches; raises ExportCheckError
    (one line: file, what was measured, what to try) when a check fails.
    """
    inputs = [(random_inputs(kind, b, image_size=image_size, context_length=context_length, vocab_size=vocab_size,
                             seed=seed + k),) for k, b in enumerate(batches)]

    def torch_reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return reference(torch.from_numpy(x)).float().numpy()

    other = "legacy" if exporter == "dynamo" else "dynamo"
    return check_file(path, inputs, torch_reference, tol=parity_tol,
                      hint=f"{exporter} exporter: try exporter='{other}' or another opset, "
                           f"or check the model for ops ORT lacks")


def export_onnx(model: torch.nn.Module, out_dir: str | Path, *, image_size: int, context_length: int,
                opset: int = 20, parity_tol: float = 0.9999, exporter: str = "auto",
                towers: Sequence[str] = ("image", "text"), patch_embed: str = "matmul",
                attention: str = "matmul") -> dict[str, dict[str, Any]]:
    """Export both towers to ONNX with a dynamic batch axis and check each file against PyTorch.

    image_encoder.onnx: "pixels" (B, 3, S, S) float32 normalised -> "embedding" (B, D), L2-normalised.
    text_encoder.onnx: "tokens" (B, L) int64 -> "embedding" (B, D), L2-normalised.
    exporter: "auto" (dynamo, legacy if dynamo raises), "dynamo" or "legacy".
    patch_embed: "matmul" writes a ViT's patch embedding as patchify + MatMul (``PatchMatMul``,
    faster once int8), "conv" as the model has it; attention: "matmul" writes the transformer blocks'
    self-attention as MatMul/Softmax (``MatMulAttention``, fewer nodes, faster), "native" as torch
    decomposes nn.MultiheadAttention (at opset 23 that is one ONNX Attention node). The image tower
    is exported in its kind's export form (distill.students.export_form: timm towers with
    training-time branches reparameterised, on a copy). The parity check runs against the model as given.
    Returns {"image": {"path", "opset", "exporter", "min_cosine", "max_abs_err"}, "text": {...}}.
    """
    from distill.students import export_form  # here: distill.students imports timm, which export's users may not need

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    deployed = export_form(model).cpu().eval()
    vocab = int(getattr(model, "vocab_size", 0) or model.token_embedding.num_embeddings)
    if patch_embed not in ("matmul", "conv"):
        raise UserError(f"export.patch_embed={patch_embed!r} is unknown: use matmul or conv")
    if attention not in ("matmul", "native"):
        raise UserError(f"export.attention={attention!r} is unknown: use matmul or native")
    specs = {
        "image": (ImageTower, "pixels", torch.from_numpy(random_inputs("image", 2, image_size=image_size))),
        "text": (TextTower, "tokens",
                 torch.from_numpy(random_inputs("text", 2, context_length=context_length, vocab_size=vocab))),
    }
    info: dict[str, dict[str, Any]] = {}
    for kind in towers:
        wrap, input_name, example = specs[kind]
        path = out / f"{kind}_encoder.onnx"
        with _export_forms(deployed, kind, patch_embed, attention):
            used = _export_one(wrap(deployed).eval(), example, path, input_name, opset, exporter)
        parity = check_onnx_file(path, wrap(model).eval(), kind, image_size=image_size, context_length=context_length,
                                 vocab_size=vocab, parity_tol=parity_tol, exporter=used)
        info[kind] = {"path": str(path), "opset": onnx_opset(path), "exporter": used,
                      "min_cosine": round(parity["min_cosine"], 8), "max_abs_err": float(f"{parity['max_abs_err']:.3e}")}
        log.info("exported %s (%s, opset %d): min cosine %.7f, max abs err %.2e", path.name, used,
                 info[kind]["opset"], parity["min_cosine"], parity["max_abs_err"])
    return info
