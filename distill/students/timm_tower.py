"""``kind: timm``: any timm model as the image tower, through open_clip's ``TimmModel``.

The open_clip folder records an ordinary open_clip timm ``vision_cfg`` (``timm_model_name``,
``timm_pool``, ``timm_proj``, ...), so ``open_clip.create_model("local-dir:DIR")`` rebuilds the
student. ``timm_model_kwargs`` (extra ``timm.create_model`` arguments) is recorded under the name
later open_clip releases read; open_clip 3.3 does not know it, so such a folder is rebuilt with
``distill.students.load_open_clip(DIR)``. The trunk is built with timm's ``exportable=True`` layers
and exported reparameterised (``timm.utils.model.reparameterize_model``) where it has
training-time branches (RepViT, FastViT, MobileOne...).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import open_clip
import timm
import torch
from open_clip.timm_model import TimmModel
from torch import nn

from distill.errors import UserError
from distill.students import pretrained as pre
from distill.students.base import StudentTower, register_tower

_PROJ = ("linear", "mlp", "none", "")
_POOLS = ("avg", "max", "avgmax", "catavgmax", "token", "map", "abs_attn", "rot_attn", "")
_DEFAULTS = {"image_size": 224, "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False, "timm_drop": 0.0,
             "timm_drop_path": None}


def open_clip_takes_kwargs() -> bool:
    """Whether the installed open_clip's vision config has ``timm_model_kwargs`` (releases after 3.3)."""
    return any(f.name == "timm_model_kwargs" for f in dataclasses.fields(open_clip.CLIPVisionCfg))


class _TimmWithKwargs:
    """The timm module as open_clip's TimmModel sees it, with extra ``create_model`` arguments added
    (TimmModel passes only its own); open_clip's own arguments win over the extras."""

    def __init__(self, kwargs: Mapping[str, Any]) -> None:
        self._kwargs = dict(kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(timm, name)

    def create_model(self, model_name: str, **kw: Any) -> nn.Module:
        return timm.create_model(model_name, **{**self._kwargs, **kw})


@contextlib.contextmanager
def timm_build(kwargs: Mapping[str, Any] | None = None) -> Iterator[None]:
    """While inside, open_clip builds timm trunks with timm's exportable layers (no custom autograd
    activations, no export-hostile padding) and with ``kwargs`` passed to ``timm.create_model``."""
    import open_clip.timm_model as otm

    real = otm.timm
    with timm.layers.set_layer_config(exportable=True):
        if kwargs and not open_clip_takes_kwargs():
            otm.timm = _TimmWithKwargs(kwargs)
        try:
            yield
        finally:
            otm.timm = real


def _base_name(name: str) -> str:
    return str(name).split(".", 1)[0]  # "mobilenetv4_conv_small.e2400_r224_in1k" -> the architecture


def unknown_model_line(name: Any, where: str = "student.builder.vision.timm_model_name") -> str | None:
    """One line naming the closest timm models when ``name`` is not one, else None."""
    known = timm.list_models()
    if _base_name(name) in known:
        return None
    close = difflib.get_close_matches(_base_name(name), known, n=5, cutoff=0.5)
    return (f"{where}={name!r} is not a timm model; closest: {', '.join(close) if close else 'none'} "
            f"(python -c \"import timm; print(timm.list_models('*{_base_name(name)[:6]}*'))\" lists more)")


def _has_reparam(module: nn.Module) -> bool:
    return any(hasattr(m, a) for m in module.modules() for a in ("fuse", "reparameterize", "switch_to_deploy"))


def block_names(trunk: nn.Module) -> list[str]:
    """Names (inside the trunk) of a timm model's residual blocks, whatever its stage layout:
    ``blocks.<stage>.<i>`` (EfficientNet / MobileNet family), ``stages.<s>.blocks.<i>`` (RepViT, FastViT,
    EfficientViT, ConvNeXt), ``blocks.<i>`` (ViT)."""
    names: list[str] = []
    stages, blocks = getattr(trunk, "stages", None), getattr(trunk, "blocks", None)
    if isinstance(stages, nn.Module):
        for s, stage in stages.named_children():
            inner = getattr(stage, "blocks", None)
            if isinstance(inner, nn.Module):
                names += [f"stages.{s}.blocks.{b}" for b, _ in inner.named_children()]
            elif isinstance(stage, nn.Sequential):
                names += [f"stages.{s}.{b}" for b, _ in stage.named_children()]
    elif isinstance(blocks, nn.Module):
        for s, stage in blocks.named_children():
            if isinstance(stage, nn.Sequential):
                names += [f"blocks.{s}.{b}" for b, _ in stage.named_children()]
            else:
                names.append(f"blocks.{s}")
    return names


def classifier_names(trunk: nn.Module) -> tuple[str, ...]:
    """The trunk's classifier module names (timm's pretrained_cfg "classifier")."""
    names = (getattr(trunk, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _is_pointwise(name: str, module: nn.Module) -> bool:
    """A 1x1, ungrouped convolution outside squeeze-excite gates (those are a few channels wide)."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1
            and ".se." not in f".{name}.")


@register_tower
class TimmTower(StudentTower):
    """Any timm model through open_clip's TimmModel; a pretrained start from a local file.

    Keys: timm_model_name, image_size, timm_pool, timm_proj, timm_proj_bias, timm_drop, timm_drop_path,
    timm_model_kwargs, pretrained.
    """

    kind = "timm"
    keys = ("timm_model_name", "image_size", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
            "timm_drop_path", "timm_model_kwargs", "pretrained")
    derived: tuple[str, ...] = ()  # keys timm_vision adds from this kind's own (not the user's to set)

    # ------------------------------------------------------------------ config
    def timm_vision(self, vision: Mapping[str, Any]) -> dict[str, Any]:
        """student.builder.vision in this tower's terms (subclasses map their own keys onto timm's)."""
        return {k: v for k, v in vision.items() if k != "kind"}

    def _static_problems(self, vision: Mapping[str, Any]) -> list[str]:
        """Problems found without building anything."""
        out = []
        unknown = sorted(set(vision) - set(self.keys) - set(self.derived) - {"kind"})
        if unknown:
            out.append(f"student.builder.vision has unknown keys {unknown} for kind={self.kind}: "
                       f"use {', '.join(self.keys)}")
        name = vision.get("timm_model_name")
        if not name:
            return out + [f"student.builder.vision.timm_model_name is required for kind={self.kind}: e.g. "
                          f"timm_model_name=mobilenetv4_conv_small"]
        line = unknown_model_line(name)
        if line:
            return out + [line]
        proj = vision.get("timm_proj", _DEFAULTS["timm_proj"])
        if (proj or "") not in _PROJ:
            out.append(f"student.builder.vision.timm_proj={proj!r} is not known: use linear, mlp, '' (the timm "
                       f"classifier becomes the projection) or none (features passed through)")
        pool = vision.get("timm_pool", _DEFAULTS["timm_pool"])
        if (pool or "") not in _POOLS:
            out.append(f"student.builder.vision.timm_pool={pool!r} is not known: use one of {[p for p in _POOLS if p]}")
        size = vision.get("image_size", _DEFAULTS["image_size"])
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            out.append(f"student.builder.vision.image_size={size!r} must be a positive integer")
            return out
        kwargs = dict(vision.get("timm_model_kwargs") or {})
        pcfg = timm.models.get_pretrained_cfg(_base_name(name))
        if pcfg is not None and pcfg.fixed_input_size and "img_size" not in kwargs and pcfg.input_size[-1] != size:
            out.append(f"student.builder.vision.image_size={size}: timm's {name} takes only {pcfg.input_size[-1]} px "
                       f"images: set image_size={pcfg.input_size[-1]} or timm_model_kwargs.img_size={size}")
        return out

    def _probe(self, vision: Mapping[str, Any]) -> nn.Module:
        """The bare timm trunk, on the meta device (shapes without memory) when the model allows it."""
        kwargs = dict(vision.get("timm_model_kwargs") or {})
        with timm.layers.set_layer_config(exportable=True):
            try:
                with torch.device("meta"):
                    return timm.create_model(vision["timm_model_name"], pretrained=False, **kwargs)
            except (NotImplementedError, RuntimeError):  # an __init__ that computes on real tensors
                return timm.create_model(vision["timm_model_name"], pretrained=False, **kwargs)

    def _head_problem(self, trunk: nn.Module, vision: Mapping[str, Any]) -> str | None:
        proj = vision.get("timm_proj", _DEFAULTS["timm_proj"]) or ""
        hidden = getattr(trunk, "head_hidden_size", None)
        if proj in ("linear", "mlp") and vision.get("timm_pool", "avg") not in ("abs_attn", "rot_attn") \
                and hidden and hidden != trunk.num_features:
            return (f"student.builder.vision.timm_proj={proj}: timm's {vision['timm_model_name']} widens its pooled "
                    f"features {trunk.num_features} -> {hidden} before the classifier, which open_clip's TimmModel "
                    f"does not size its projection for: set timm_proj='' (the timm classifier becomes the projection)")
        return None

    def check(self, vision: Mapping[str, Any], cfg: Any = None) -> list[str]:
        vision = self.timm_vision(vision)
        out = self._static_problems(vision)
        init = None if cfg is None else _select(cfg, "student.init")
        if init == "inherit":
            out.append(f"student.init=inherit copies an open_clip ViT teacher into a ViT student; a {self.kind} tower "
                       f"cannot inherit: use student.init=random (and student.builder.vision.pretrained=FILE)")
        if out:
            return out
        try:
            trunk = self._probe(vision)
        except Exception as e:  # noqa: BLE001 - any timm failure on these arguments is the config's
            return [f"timm.create_model({vision['timm_model_name']!r}, **student.builder.vision.timm_model_kwargs) "
                    f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"]
        line = self._head_problem(trunk, vision)
        if line:
            out.append(line)
        if pre.wanted(vision.get("pretrained")):
            try:
                path, state = self.read_pretrained(vision, trunk)
                pre.fit(trunk, state, path, self.what(vision), head=self._head_of(trunk))
            except UserError as e:
                out.append(str(e))
        return out

    def vision_cfg(self, vision: Mapping[str, Any]) -> dict[str, Any]:
        vision = self.timm_vision(vision)
        problems = self._static_problems(vision)
        if problems:
            raise UserError(problems[0])
        return self._open_clip_cfg(vision)

    @staticmethod
    def _open_clip_cfg(vision: Mapping[str, Any]) -> dict[str, Any]:
        v = {**_DEFAULTS, **vision}
        cfg = {"timm_model_name": str(v["timm_model_name"]), "timm_model_pretrained": False,
               "image_size": int(v["image_size"]), "timm_pool": v["timm_pool"] or "",
               "timm_proj": v["timm_proj"] or "", "timm_proj_bias": bool(v["timm_proj_bias"]),
               "timm_drop": float(v["timm_drop"]),
               "timm_drop_path": None if v["timm_drop_path"] is None else float(v["timm_drop_path"])}
        kwargs = dict(v.get("timm_model_kwargs") or {})
        if kwargs:
            cfg["timm_model_kwargs"] = kwargs
        return cfg

    # ------------------------------------------------------------------ build
    def create(self, model_cfg: Mapping[str, Any]) -> open_clip.model.CLIP:
        cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in model_cfg.items()}
        kwargs = dict(cfg["vision_cfg"].get("timm_model_kwargs") or {})
        if not open_clip_takes_kwargs():
            cfg["vision_cfg"].pop("timm_model_kwargs", None)
        with timm_build(kwargs):
            model = open_clip.model.CLIP(**cfg)
        vcfg, trunk = model_cfg["vision_cfg"], model.visual.trunk
        line = self._head_problem(trunk, vcfg)
        if line:
            raise UserError(line)
        if (vcfg.get("timm_proj") or "") == "none":
            width = getattr(trunk, "head_hidden_size", None) or trunk.num_features
            if width != int(model_cfg["embed_dim"]):
                raise UserError(f"student.builder.vision.timm_proj=none passes {vcfg['timm_model_name']}'s {width} "
                                f"features through, but embed_dim={model_cfg['embed_dim']}: set student.embed_dim="
                                f"{width} or timm_proj=linear")
        return model

    def what(self, vision: Mapping[str, Any]) -> str:
        return f"timm {vision['timm_model_name']}"

    def _head_of(self, trunk: nn.Module):
        names = classifier_names(trunk)
        return lambda key: any(key == n or key.startswith(n + ".") for n in names)

    def read_pretrained(self, vision: Mapping[str, Any], trunk: nn.Module) -> tuple[Path, dict[str, torch.Tensor]]:
        """(the local file, its tensors in the trunk's names): timm's own checkpoint filter for the model
        maps original-repository layouts onto timm's where the model has one."""
        name = vision["timm_model_name"]
        path = pre.local_file(vision.get("pretrained"), f"{_base_name(name)}.safetensors",
                              fix=f"timm's weights for {name}, saved on a machine with network access")
        state = pre.read_state(path)
        filt = getattr(sys.modules.get(type(trunk).__module__), "checkpoint_filter_fn", None)
        if filt is not None:
            try:
                state = dict(filt(dict(state), trunk))
            except Exception:  # noqa: BLE001 - a filter for another layout: the file is taken as it is
                pass
        return path, state

    def init_weights(self, model: open_clip.model.CLIP, vision: Mapping[str, Any]) -> dict[str, Any] | None:
        vision = self.timm_vision(vision)
        if not pre.wanted(vision.get("pretrained")):
            return None
        trunk = model.visual.trunk
        path, state = self.read_pretrained(vision, trunk)
        return pre.load_into(trunk, state, path, self.what(vision), head=self._head_of(trunk))

    # ------------------------------------------------------------------ built model
    def owns(self, visual: nn.Module) -> bool:
        return isinstance(visual, TimmModel)

    def export_form(self, model: nn.Module) -> nn.Module:
        """A copy with the image trunk reparameterised (timm's reparameterize_model: conv+BN fusion,
        RepVGG-style branches merged) when the trunk has such layers, else ``model`` itself."""
        if not _has_reparam(model.visual):
            return model
        from timm.utils.model import reparameterize_model

        deployed = copy.deepcopy(model).eval()
        reparameterize_model(deployed.visual, inplace=True)
        return deployed

    def layout(self, model: nn.Module) -> dict[str, Any]:
        """Image tower ``visual.``; head: open_clip's projection and the timm classifier when it serves as
        one; blocks: the trunk's stages; adapters after every residual block (conv or transformer); LoRA
        ``auto``: the 1x1 convolutions and linear layers (linear alone in a trunk without 1x1 convs)."""
        trunk = model.visual.trunk
        modules = dict(trunk.named_modules())
        head = ["visual.head."] + [f"visual.trunk.{n}." for n in classifier_names(trunk)
                                   if n in modules and any(True for _ in modules[n].parameters())]
        stages = "stages" if isinstance(getattr(trunk, "stages", None), nn.Module) else "blocks"
        sites = {f"visual.trunk.{n}" for n in block_names(trunk)}
        pointwise = any(_is_pointwise(n, m) for n, m in model.visual.named_modules())
        return {"image": ("visual.",), "head": tuple(head), "blocks": f"visual.trunk.{stages}.",
                "adapter_after": lambda name, module: name in sites,
                "lora_keywords": {"conv1x1": _is_pointwise,
                                  "linear": lambda name, module: isinstance(module, nn.Linear)},
                "lora_default": ("conv1x1", "linear") if pointwise else ("linear",)}


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None) if OmegaConf.is_config(cfg) else None
