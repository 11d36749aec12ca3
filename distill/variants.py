"""Deployment variants, registered by name: each is an export step (what it writes into the run's
``export/`` folder) and an encoder that runs what it exported, with its role, runtime and
precision. ``variants:`` in the config lists the ones a run builds and measures; export_stage,
bench_stage and the report loop over that list, so a new format is one ``register`` call here
(into ``VARIANTS``, a distill.registry.Registry).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from distill.registry import Registry

log = logging.getLogger("distill")


@dataclass
class VariantContext:
    """What export steps and encoders share in one run; ``info`` becomes report["export"]."""

    cfg: Any  # the export config group
    student: torch.nn.Module
    model_cfg: dict[str, Any]
    export_dir: Path
    tokenizer: Callable[[list[str]], torch.Tensor]
    teacher: Any = None
    trainset: Any = None
    threads: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    built: dict[str, Any] = field(default_factory=dict)  # objects an export step made for its encoder
    done: set[str] = field(default_factory=set)

    @property
    def image_size(self) -> int:
        return int(self.model_cfg["vision_cfg"]["image_size"])

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    def require(self, name: str) -> None:
        """Run variant ``name``'s export step once (a variant built on another's files asks for it)."""
        if name not in self.done:
            VARIANTS[name].export(self)
            self.done.add(name)


@dataclass(frozen=True)
class VariantSpec:
    name: str
    role: str  # "teacher" | "student"
    runtime: str  # "torch" | "onnxruntime" | ...
    precision: str  # "fp32" | "int8" | ...
    doc: str
    export: Callable[[VariantContext], None]
    encoder: Callable[[VariantContext], Any]
    files: Callable[[VariantContext], list[str]] = lambda ctx: []
    reference: str | None = None  # the variant its agreement is measured against (None: the reference teacher)
    optional: bool = False  # an export failure marks the variant failed instead of stopping the run


VARIANTS: Registry[VariantSpec] = Registry("deployment variant")


def register(spec: VariantSpec) -> VariantSpec:
    """Register ``spec`` in ``VARIANTS``; its description says its role, runtime and precision."""
    if spec.role not in ("teacher", "student"):
        raise ValueError(f"variant {spec.name}: role must be 'teacher' or 'student', got {spec.role!r}")
    return VARIANTS.register(spec.name, spec, doc=f"{spec.role}, {spec.runtime} {spec.precision}: {spec.doc}")


def _nothing(ctx: VariantContext) -> None:
    """No files: the variant runs from memory."""


# ------------------------------------------------------------------------------------- teacher


def _teacher_onnx_export(ctx: VariantContext) -> None:
    if not hasattr(ctx.teacher, "export_onnx"):
        raise RuntimeError(f"{type(ctx.teacher).__name__} has no ONNX export")
    enc = ctx.teacher.export_onnx(str(ctx.export_dir / "teacher_onnx"), threads=ctx.threads)
    ctx.built["teacher_onnx_fp32"] = enc
    ctx.info["teacher_onnx"] = {"image": str(enc.image_onnx), "text": str(enc.text_onnx)}


register(VariantSpec("teacher_torch_fp32", "teacher", "torch", "fp32", "The teacher as built, in PyTorch (the reference).",
                     _nothing, lambda ctx: ctx.teacher))
register(VariantSpec("teacher_onnx_fp32", "teacher", "onnxruntime", "fp32",
                     "The teacher exported to ONNX fp32: what a user would deploy without distilling.",
                     _teacher_onnx_export, lambda ctx: ctx.built["teacher_onnx_fp32"],
                     files=lambda ctx: list(getattr(ctx.built["teacher_onnx_fp32"], "files", None)
                                            or ctx.built["teacher_onnx_fp32"].stats()["files"]),
                     reference="teacher_torch_fp32", optional=True))


def _int8_mode(ctx: VariantContext) -> dict[str, str]:
    """export.int8.mode as quantize_dynamic_onnx's keyword ("default": its own default)."""
    mode = ctx.cfg.int8.mode
    return {} if mode == "default" else {"mode": mode}


def _teacher_onnx_int8_export(ctx: VariantContext) -> None:
    ctx.require("teacher_onnx_fp32")
    fp32 = ctx.built["teacher_onnx_fp32"]
    if not hasattr(fp32, "quantized"):
        raise RuntimeError(f"{type(fp32).__name__} has no int8 form")
    enc = fp32.quantized(ctx.export_dir / "teacher_onnx_int8", threads=ctx.threads, **_int8_mode(ctx))
    ctx.built["teacher_onnx_int8"] = enc
    ctx.info["teacher_onnx_int8"] = {"image": str(enc.image_onnx), "text": str(enc.text_onnx),
                                     "parity_min_cosine": _parity(fp32, enc)}


def _parity(ref: Any, enc: Any) -> dict[str, float]:
    """Min cosine of ``enc`` to ``ref`` on fixed random images and a few texts (the bench then
    measures agreement on the evaluation sets)."""
    images = torch.rand(4, 3, ref.image_size, ref.image_size, generator=torch.Generator().manual_seed(0))
    texts = ["a photo of a dog.", "a red shoe", "an x-ray of a chest", "a picture of a t-shirt."]
    cos = lambda a, b: float((torch.as_tensor(a) * torch.as_tensor(b)).sum(-1).min())  # noqa: E731
    return {"image": round(cos(ref.encode_image(images), enc.encode_image(images)), 5),
            "text": round(cos(ref.encode_text(texts), enc.encode_text(texts)), 5)}


register(VariantSpec("teacher_onnx_int8", "teacher", "onnxruntime", "int8",
                     "The teacher's ONNX files as onnxruntime dynamic int8 (export.int8.mode): a tuned teacher shipped "
                     "without distilling.", _teacher_onnx_int8_export, lambda ctx: ctx.built["teacher_onnx_int8"],
                     files=lambda ctx: [ctx.info["teacher_onnx_int8"]["image"], ctx.info["teacher_onnx_int8"]["text"]],
                     reference="teacher_onnx_fp32", optional=True))


# ------------------------------------------------------------------------------------- student


def _student_encoder(model: torch.nn.Module, ctx: VariantContext) -> Any:
    from distill.encoders import ClipEncoder

    return ClipEncoder(model, ctx.tokenizer, ctx.image_size)


def _open_clip_export(ctx: VariantContext) -> None:
    from distill.export import save_open_clip_dir

    extra = [k for k in ctx.student.state_dict() if ".adapter." in k]
    if extra:  # open_clip's strict load would refuse the folder: write none rather than one that fails later
        ctx.info["open_clip_dir"] = None
        ctx.info["open_clip_skipped"] = (
            f"bottleneck adapters ({len(extra)} tensors such as {extra[0]}) are no open_clip layer, so no "
            f"open_clip folder was written; the ONNX files carry the adapters (or fine-tune with LoRA, which merges)")
        log.warning("open_clip folder: %s", ctx.info["open_clip_skipped"])
        return
    ctx.info["open_clip_dir"] = str(save_open_clip_dir(ctx.student, ctx.model_cfg, ctx.export_dir / "open_clip"))


def _onnx_export(ctx: VariantContext) -> None:
    from distill.export import export_onnx

    cfg = ctx.cfg
    ctx.info["onnx"] = export_onnx(ctx.student, ctx.export_dir / "onnx", image_size=ctx.image_size,
                                   context_length=ctx.context_length, opset=int(cfg.opset),
                                   parity_tol=float(cfg.parity_min_cosine), patch_embed=str(cfg.patch_embed),
                                   attention=str(cfg.attention))


def int8_ops(ctx: VariantContext, tower: str) -> dict[str, Any]:
    """A conv image tower (timm, EfficientNet-Lite) quantises only MatMul/Gemm: ORT's dynamic ConvInteger
    is slower than fp32 Conv and moves a pretrained conv tower's embedding far from fp32."""
    from distill.students import tower_for

    kind = getattr(tower_for(ctx.student), "kind", "vit") if ctx.student is not None else "vit"
    return {"op_types": ("MatMul", "Gemm")} if tower == "image" and kind != "vit" else {}


def _onnx_int8_export(ctx: VariantContext) -> None:
    from distill.quantize import quantize_dynamic_onnx

    ctx.require("student_onnx_fp32")
    ctx.info["onnx_int8"] = {t: str(quantize_dynamic_onnx(ctx.info["onnx"][t]["path"],
                                                          ctx.export_dir / "onnx" / f"{t}_encoder.int8.onnx",
                                                          **_int8_mode(ctx), **int8_ops(ctx, t)))
                             for t in ("image", "text")}


def _onnx_static_int8_export(ctx: VariantContext) -> None:
    from distill.encoders import normalize_images
    from distill.quantize import quantize_static_onnx

    ctx.require("student_onnx_int8")  # the text tower ships as dynamic int8
    n = int(ctx.cfg.int8.calibration_images)
    data = ctx.trainset.unmixed() if hasattr(ctx.trainset, "unmixed") else ctx.trainset  # views as deployed: unmixed
    idx = list(range(0, len(data), max(1, len(data) // n)))[:n]
    views = [v for v in (data.load_view(j) for j in idx) if v is not None]
    calib = [normalize_images(v[None]).numpy() for v in views]
    ops = ctx.cfg.int8.get("static_op_types", "default")
    ctx.info["onnx_image_static_int8"] = str(quantize_static_onnx(
        ctx.info["onnx"]["image"]["path"], ctx.export_dir / "onnx" / "image_encoder.static_int8.onnx", calib,
        **({} if ops == "default" else {"op_types": ops if ops == "all" else tuple(ops)}),
        fp32_first_convs=int(ctx.cfg.int8.get("static_fp32_first_convs", 0))))


def _onnx_encoder(image: str, text: str, ctx: VariantContext) -> Any:
    from distill.export import default_preprocess
    from distill.teachers.onnx_teacher import OnnxDualEncoder

    return OnnxDualEncoder(image_onnx=image, text_onnx=text, preprocess=default_preprocess(ctx.image_size),
                           threads=ctx.threads)


def _onnx_files(ctx: VariantContext) -> list[str]:
    return [ctx.info["onnx"]["image"]["path"], ctx.info["onnx"]["text"]["path"]]


register(VariantSpec("student_torch_fp32", "student", "torch", "fp32",
                     "The student in PyTorch, saved as an open_clip local-dir checkpoint.",
                     _open_clip_export, lambda ctx: _student_encoder(ctx.student, ctx),
                     files=lambda ctx: [str(Path(ctx.info["open_clip_dir"]) / "open_clip_model.safetensors")]
                     if ctx.info.get("open_clip_dir") else []))
register(VariantSpec("student_torch_int8", "student", "torch", "int8",
                     "torch.ao dynamic int8 of the student's Linear layers, in memory (not exportable).",
                     _nothing, lambda ctx: _student_encoder(_torch_int8(ctx.student), ctx),
                     reference="student_torch_fp32"))
register(VariantSpec("student_onnx_fp32", "student", "onnxruntime", "fp32",
                     "Both towers as ONNX fp32, checked against PyTorch on export (parity_min_cosine).",
                     _onnx_export, lambda ctx: _onnx_encoder(*_onnx_files(ctx), ctx), files=_onnx_files,
                     reference="student_torch_fp32"))
register(VariantSpec("student_onnx_int8", "student", "onnxruntime", "int8",
                     "onnxruntime dynamic int8 of both ONNX towers (export.int8.mode).",
                     _onnx_int8_export,
                     lambda ctx: _onnx_encoder(ctx.info["onnx_int8"]["image"], ctx.info["onnx_int8"]["text"], ctx),
                     files=lambda ctx: [ctx.info["onnx_int8"]["image"], ctx.info["onnx_int8"]["text"]],
                     reference="student_onnx_fp32"))
register(VariantSpec("student_onnx_static_int8", "student", "onnxruntime", "int8",
                     "Static (QDQ) int8 image tower calibrated on training views, dynamic int8 text tower.",
                     _onnx_static_int8_export,
                     lambda ctx: _onnx_encoder(ctx.info["onnx_image_static_int8"], ctx.info["onnx_int8"]["text"], ctx),
                     files=lambda ctx: [ctx.info["onnx_image_static_int8"], ctx.info["onnx_int8"]["text"]],
                     reference="student_onnx_fp32"))


# ------------------------------------------------------------------------------------ openvino


def _openvino_spec(name: str, onnx_variant: str, doc: str) -> VariantSpec:
    """``onnx_variant``'s files run on OpenVINO's CPU runtime (distill.openvino_encoder), measured
    against the ONNX fp32 student. Optional: a file OpenVINO cannot run fails this variant only."""
    base = VARIANTS[onnx_variant]

    def export(ctx: VariantContext) -> None:
        from distill.export import default_preprocess
        from distill.openvino_encoder import OpenVinoDualEncoder

        ctx.require(onnx_variant)
        image, text = base.files(ctx)
        # compiled here so that a file OpenVINO cannot run fails the export with OpenVINO's reason
        ctx.built[name] = OpenVinoDualEncoder(image_onnx=image, text_onnx=text, threads=ctx.threads,
                                              preprocess=default_preprocess(ctx.image_size))
        ctx.info[name] = {"openvino": ctx.built[name].openvino_version, "files": [image, text]}

    return VariantSpec(name, "student", "openvino", base.precision, doc, export, lambda ctx: ctx.built[name],
                       files=base.files, reference="student_onnx_fp32", optional=True)


register(_openvino_spec("student_openvino_fp32", "student_onnx_fp32",
                        "student_onnx_fp32's two ONNX files on OpenVINO's CPU runtime, in f32 (pip install openvino)."))
register(_openvino_spec("student_openvino_static_int8", "student_onnx_static_int8",
                        "student_onnx_static_int8's files on OpenVINO's CPU runtime: the static QDQ int8 image tower "
                        "and the dynamic int8 text tower, which OpenVINO runs as is (pip install openvino)."))


def _torch_int8(student: torch.nn.Module) -> torch.nn.Module:
    from distill.quantize import torch_dynamic_int8

    return torch_dynamic_int8(copy.deepcopy(student))


__all__ = ["VARIANTS", "VariantContext", "VariantSpec", "register"]


# ---------------------------------------------------------------------------- the export stage
def export_stage(cfg: Any, variants: list[str], student: torch.nn.Module, model_cfg: dict[str, Any],
                 out_dir: Path, eval_sets: Mapping[str, Any], trainset: Any, tokenizer,
                 teacher: Any = None, threads: int | None = None) -> tuple[dict[str, Any], VariantContext]:
    """The open_clip folder, each configured variant's export step (distill.variants), then the
    edge bundle from what they wrote. Returns report["export"] and the context the bench reuses."""
    ctx = VariantContext(cfg=cfg, student=student.cpu().eval() if student is not None else None, model_cfg=model_cfg,
                         export_dir=out_dir / "export", tokenizer=tokenizer, teacher=teacher, trainset=trainset,
                         threads=threads)
    if cfg.open_clip and student is not None:
        ctx.require("student_torch_fp32")
    failed: dict[str, str] = {}
    for name in variants:
        try:
            ctx.require(name)
        except Exception as e:
            if not VARIANTS[name].optional:
                raise
            log.warning("variant %s: export failed: %s", name, e)  # reported failed; the rest still run
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ctx.built["failed"] = failed
    from distill import bundle

    bundle.write_run_bundle(cfg, ctx, eval_sets, trainset, threads)
    return ctx.info, ctx
