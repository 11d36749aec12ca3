"""FLOP counts for CLIP towers and for any ONNX graph. Every figure here is FLOPs = 2 x MACs.

Two independent counts, meant to agree:

* ``vit_flops`` / ``text_flops`` / ``clip_flops``: analytic counts for open_clip's ViT and text
  transformer at batch 1. They count what open_clip's reference profiler counts
  (open_clip_train/profiler.py runs ``torch.utils.flop_counter.FlopCounterMode`` on CUDA, which
  counts matrix products only: conv, mm/addmm/bmm and scaled-dot-product attention): the
  patch-embedding conv, the QKV and output projections, attention QK^T and AV, the two MLP
  linears, and the final projection applied to the pooled token. LayerNorm, softmax, GELU,
  residual adds, biases and embedding look-ups are not counted (they are O(N*D), well under 1%).
  For open_clip ViT-B-32 this gives 8.82 GFLOPs image and 5.96 GFLOPs text, the figures in
  open_clip's docs/model_profile.csv.
* ``onnx_flops``: 2 x MACs summed over MatMul/Gemm/Conv (and their int8 forms) of an exported
  graph at batch 1. It is the generic count for any model and the cross-check of the analytic one.
* Image towers the analytic count does not model (timm towers: conv nets, hybrids) are counted by
  their student tower kind (``distill.students.base.count_image_flops``: ``FlopCounterMode`` on the
  export form, reparameterised, with timm's fused attention off so attention products show as
  matmuls); that count equals ``onnx_flops`` of the exported image file (tests/test_student_towers.py).

Why not ``FlopCounterMode`` on CPU: in eval + no_grad, ``nn.MultiheadAttention`` takes the fused
fast path (``aten::_native_multi_head_attention``), which the counter has no formula for, so about
a third of a ViT's FLOPs vanish; and CPU scaled-dot-product attention dispatches to a kernel the
counter does not register in torch 2.14, so attention FLOPs are never counted either. The
reference figures only come out right on CUDA with gradients on, hence the analytic count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

__all__ = ["vit_flops", "text_flops", "clip_flops", "model_cfg_from_module", "clip_model_stats", "onnx_flops",
           "onnx_params"]


def _transformer_macs(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    """MACs of ``layers`` pre-LN blocks over ``tokens`` tokens of ``width`` (batch 1)."""
    hidden = int(width * mlp_ratio)
    qkv = tokens * width * 3 * width  # (N, D) @ (D, 3D)
    attn = 2 * tokens * tokens * width  # QK^T (H, N, d) @ (H, d, N) and AV (H, N, N) @ (H, N, d); H*d = D
    out = tokens * width * width  # (N, D) @ (D, D)
    mlp = 2 * tokens * width * hidden  # (N, D) @ (D, 4D) and back
    return layers * (qkv + attn + out + mlp)


def vit_flops(width: int, layers: int, heads: int, patch_size: int, image_size: int, mlp_ratio: float = 4.0,
              output_dim: int = 512, class_token: bool = True) -> int:
    """FLOPs (2 x MACs) of one image through an open_clip VisionTransformer, batch 1.

    ``heads`` does not change the count (H heads of width D/H do the same work as one of width D);
    it is accepted so the signature mirrors the model config. Tokens = (image/patch)^2 (+1 class token).
    """
    del heads
    grid = image_size // patch_size
    patches = grid * grid
    tokens = patches + (1 if class_token else 0)
    conv = patches * width * 3 * patch_size * patch_size  # stride=kernel conv == (P, 3*p*p) @ (3*p*p, D)
    proj = width * output_dim  # pooled (1, D) @ (D, E)
    return 2 * (conv + _transformer_macs(tokens, width, layers, mlp_ratio) + proj)


def text_flops(width: int, layers: int, heads: int, context_length: int, mlp_ratio: float = 4.0,
               output_dim: int = 512) -> int:
    """FLOPs (2 x MACs) of one text through an open_clip TextTransformer, batch 1.

    All ``context_length`` positions are computed (the causal mask does not skip work); the
    projection is applied to the pooled end-of-text token only, as open_clip does.
    """
    del heads
    return 2 * (_transformer_macs(context_length, width, layers, mlp_ratio) + width * output_dim)


def clip_flops(model_cfg: Mapping[str, Any]) -> dict[str, int]:
    """{"image": FLOPs, "text": FLOPs} per sample from an open_clip model_cfg dict
    (``embed_dim``, ``vision_cfg``, ``text_cfg``; missing keys take open_clip's defaults).

    Only the standard ViT + text transformer is modelled; timm/HF towers and attentional pooling
    raise ValueError: count those with ``onnx_flops`` on the exported files.
    """
    import open_clip

    vision = {k: v for k, v in dict(model_cfg.get("vision_cfg", {})).items() if k != "timm_model_kwargs"}
    vcfg = open_clip.CLIPVisionCfg(**vision)
    embed_dim = int(model_cfg["embed_dim"])
    if vcfg.timm_model_name or vcfg.attentional_pool or not isinstance(vcfg.layers, int):
        raise ValueError("clip_flops models only open_clip's ViT image tower; use onnx_flops on the exported file")
    _text_cfg_flops(model_cfg)  # raises for towers it does not model
    image_size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
    patch = vcfg.patch_size if isinstance(vcfg.patch_size, int) else vcfg.patch_size[0]
    if not isinstance(vcfg.image_size, int) and vcfg.image_size[0] != vcfg.image_size[1]:
        raise ValueError("clip_flops assumes square images; use onnx_flops on the exported file")
    image = vit_flops(vcfg.width, vcfg.layers, max(1, vcfg.width // vcfg.head_width), patch, image_size,
                      vcfg.mlp_ratio, embed_dim)
    return {"image": int(image), "text": _text_cfg_flops(model_cfg)}


def _text_cfg_flops(model_cfg: Mapping[str, Any]) -> int:
    """The analytic text FLOPs of a model_cfg whose text tower is open_clip's transformer (ValueError otherwise)."""
    import open_clip

    tcfg = open_clip.CLIPTextCfg(**dict(model_cfg.get("text_cfg", {})))
    if getattr(tcfg, "hf_model_name", None):
        raise ValueError("clip_flops models only open_clip's text transformer; use onnx_flops on the exported file")
    return int(text_flops(tcfg.width, tcfg.layers, tcfg.heads, tcfg.context_length, tcfg.mlp_ratio,
                          int(model_cfg["embed_dim"])))


def model_cfg_from_module(model: Any) -> dict[str, Any] | None:
    """The ``clip_flops`` config of a loaded open_clip CLIP read off its modules, or None when a
    tower is not open_clip's ViT / text transformer (timm, HF, attentional pooling).

    ``local-dir:`` and ``hf-hub:`` models come without a named config (open_clip reads theirs from
    the folder), so the modules are the one source that every loading path shares.
    """
    visual = getattr(model, "visual", None)
    text = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower in .text
    conv, vt, tt = getattr(visual, "conv1", None), getattr(visual, "transformer", None), getattr(text, "transformer", None)
    if conv is None or vt is None or tt is None or getattr(visual, "attn_pool", None) is not None:
        return None
    try:
        def tower(t: Any) -> dict[str, Any]:
            block = t.resblocks[0]
            return {"width": int(t.width), "layers": len(t.resblocks), "heads": int(block.attn.num_heads),
                    "mlp_ratio": block.mlp.c_fc.out_features / t.width}

        v, w = tower(vt), tower(tt)
        size = visual.image_size
        size = size if isinstance(size, int) else (size[0] if size[0] == size[1] else None)
        if size is None:
            return None
        embed_dim = int(visual.output_dim)
    except (AttributeError, IndexError, TypeError):
        return None
    return {"embed_dim": embed_dim,
            "vision_cfg": {"width": v["width"], "layers": v["layers"], "head_width": v["width"] // v["heads"],
                           "mlp_ratio": v["mlp_ratio"], "patch_size": int(conv.kernel_size[0]), "image_size": int(size)},
            "text_cfg": {"width": w["width"], "layers": w["layers"], "heads": w["heads"], "mlp_ratio": w["mlp_ratio"],
                         "context_length": int(getattr(text, "context_length", 77))}}


def clip_model_stats(model: Any, model_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{"params": {"image", "text", "total"}, "flops": {"image", "text"}, "files": []} of an open_clip
    CLIP: params counted from its modules, FLOPs from ``model_cfg`` or else the config read off the
    modules. An image tower the analytic count does not model is counted by its student tower kind
    (distill.students: FlopCounterMode on the form it is exported in, reparameterised where the kind
    has training-time branches; its image params are that form's too). FLOPs are {} when neither can
    count a tower (count those on an ONNX export)."""
    def count(m: Any) -> int:
        return int(sum(p.numel() for p in m.parameters()))

    p = {"image": count(model.visual), "total": count(model)}
    p["text"] = p["total"] - p["image"]
    model_cfg = model_cfg or model_cfg_from_module(model)
    try:
        fl = clip_flops(model_cfg) if model_cfg is not None else {}
    except ValueError:
        fl = {}
        tower = _tower_of(model)
        if tower is not None:
            size = getattr(model.visual, "image_size", None) or (model_cfg or {}).get("vision_cfg", {}).get(
                "image_size")
            size = size[0] if isinstance(size, (tuple, list)) else size
            p["image"] = tower.image_params(model)
            p["total"] = p["image"] + p["text"]
            try:
                fl = {"image": tower.image_flops(model, int(size)),
                      "text": _text_cfg_flops(model_cfg) if model_cfg is not None else None}
            except ValueError:  # a text tower the analytic count does not model
                fl = {}
            if None in fl.values():
                fl = {}
    return {"params": p, "flops": fl, "files": []}


def _tower_of(model: Any) -> Any:
    """The student tower kind that owns ``model.visual`` (distill.students), or None."""
    from distill.students import tower_for

    return tower_for(model)


def onnx_params(path: str | Path) -> int:
    """Parameters of an ONNX graph: the element count of its float and integer initializers
    (weights of any precision; external data is not read, its dims are in the graph)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(math.prod(t.dims) for t in model.graph.initializer if len(t.dims) > 0))


# ----------------------------------------------------------------------------- ONNX graph count

# op type -> (index of input A, index of input B) for the matrix-product ops
_MATMUL_INPUTS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3),
                  "MatMulIntegerToFloat": (0, 1), "DynamicQuantizeMatMul": (0, 1), "FusedMatMul": (0, 1)}
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}


def _fix_dynamic_inputs(model: Any, input_shapes: Mapping[str, tuple[int, ...]] | None) -> None:
    """Give every graph input a concrete shape: named overrides, else each symbolic dim -> 1."""
    init_names = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in init_names]
    unknown = sorted(set(input_shapes or {}) - set(names))
    if unknown:
        raise ValueError(f"input_shapes names {unknown}, but the graph inputs are {names}")
    for inp in model.graph.input:
        if inp.name in init_names or not inp.type.HasField("tensor_type"):
            continue
        dims = inp.type.tensor_type.shape.dim
        if input_shapes and inp.name in input_shapes:
            want = tuple(input_shapes[inp.name])
            if len(want) != len(dims):
                raise ValueError(f"input {inp.name!r} has rank {len(dims)}, override has {len(want)}")
            for d, v in zip(dims, want):
                d.Clear()
                d.dim_value = int(v)
            continue
        for d in dims:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1


def _shape_map(model: Any) -> dict[str, tuple[int, ...] | None]:
    shapes: dict[str, tuple[int, ...] | None] = {}
    for t in model.graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
        else:
            shapes.setdefault(vi.name, None)
    for node in model.graph.node:  # Constant nodes carry weights in some exports
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in a.t.dims)
    return shapes


def _operands(model: Any) -> list[str]:
    names = []
    for node in model.graph.node:
        if node.op_type in _MATMUL_INPUTS:
            names += [node.input[i] for i in _MATMUL_INPUTS[node.op_type]]
        elif node.op_type == "Gemm":
            names += list(node.input[:2])
        elif node.op_type in _CONV_WEIGHT:
            names += [node.input[_CONV_WEIGHT[node.op_type]], node.output[0]]
    return names


def _shapes_by_running(model: Any, known: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Fallback when static inference gives up (e.g. Reshape to a computed shape in graphs from the
    legacy exporter): run the graph once in onnxruntime on zero inputs and read the shapes."""
    import numpy as np
    import onnx

    from distill.onnx_tools import session

    missing = sorted({n for n in _operands(model) if known.get(n) is None})
    m = onnx.ModelProto()
    m.CopyFrom(model)
    outputs = {o.name for o in m.graph.output}
    for name in missing:
        if name not in outputs:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = session(m.SerializeToString())
    feeds = {}
    for inp in sess.get_inputs():
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(
            next(i for i in m.graph.input if i.name == inp.name).type.tensor_type.elem_type))
        feeds[inp.name] = np.zeros([d if isinstance(d, int) else 1 for d in inp.shape], dtype=dtype)
    names = [o.name for o in sess.get_outputs()]
    return {n: tuple(v.shape) for n, v in zip(names, sess.run(names, feeds)) if n in missing}


def _matmul_macs(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """MACs of numpy-style matmul (A @ B) with broadcasting of the leading dims."""
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    m, k = a2[-2], a2[-1]
    n = b2[-1]
    batch_a, batch_b = a2[:-2], b2[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a = (1,) * (width - len(batch_a)) + batch_a
    batch_b = (1,) * (width - len(batch_b)) + batch_b
    batch = math.prod(max(x, y) for x, y in zip(batch_a, batch_b))
    return batch * m * k * n


def onnx_flops(path: str | Path, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
               by_op: bool = False) -> int | dict[str, int]:
    """FLOPs (2 x MACs) of one forward pass of an ONNX graph, counting MatMul, Gemm and Conv
    (and MatMulInteger / QLinearMatMul / ConvInteger / QLinearConv for int8 graphs).

    Symbolic input dims (the batch axis) are fixed to 1 unless ``input_shapes`` names a shape,
    then onnx shape inference (with data propagation) gives every product's operand shapes; where
    it gives up, the graph is run once in onnxruntime on zero inputs to read the missing shapes.
    Elementwise ops, softmax and normalisation are not counted (as in ``clip_flops``). Ops inside
    If/Loop subgraphs are not visited. ``by_op=True`` returns {op_type: FLOPs} instead.
    Raises ValueError when an operand's shape cannot be inferred.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    _fix_dynamic_inputs(model, input_shapes)
    del model.graph.value_info[:]  # stale symbolic shapes from the exporter; re-infer at batch 1
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = _shape_map(model)
    if any(shapes.get(n) is None for n in _operands(model)):
        shapes.update(_shapes_by_running(model, shapes))

    def shape(name: str, node: Any) -> tuple[int, ...]:
        s = shapes.get(name)
        if s is None:
            raise ValueError(f"onnx_flops: cannot infer the shape of {name!r} (input of {node.op_type} "
                             f"node {node.name!r}); pass input_shapes for the graph inputs")
        return s

    counts: dict[str, int] = {}
    for node in model.graph.node:
        op = node.op_type
        macs = 0
        if op in _MATMUL_INPUTS:
            ia, ib = _MATMUL_INPUTS[op]
            macs = _matmul_macs(shape(node.input[ia], node), shape(node.input[ib], node))
        elif op == "Gemm":
            attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
            a, b = shape(node.input[0], node), shape(node.input[1], node)
            m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
            n = b[0] if attrs.get("transB", 0) else b[1]
            macs = m * k * n
        elif op in _CONV_WEIGHT:
            w = shape(node.input[_CONV_WEIGHT[op]], node)  # (Cout, Cin/groups, *kernel)
            y = shape(node.output[0], node)  # (N, Cout, *spatial)
            macs = math.prod(y) * math.prod(w[1:])
        else:
            continue
        counts[op] = counts.get(op, 0) + 2 * int(macs)
    return counts if by_op else int(sum(counts.values()))
