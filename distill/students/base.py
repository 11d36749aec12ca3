"""The image-tower contract: what every kind of student image tower provides, and the registry of kinds.

A student is always an ``open_clip.model.CLIP``; only its image tower differs by kind
(``student.builder.vision.kind``: ``vit`` by default, ``timm``, ``efficientnet_lite``). A kind is
one ``StudentTower`` subclass in one file of this package, registered with ``@register_tower``
into ``distill.registry.STUDENT_TOWERS``, plus a YAML in conf/student/. It answers:

* ``vision_cfg(vision)``: student.builder.vision -> the open_clip ``vision_cfg`` recorded in the
  open_clip folder (``open_clip_config.json``), so ``open_clip.create_model("local-dir:...")``
  rebuilds the model; ``create(model_cfg)`` builds the CLIP from it.
* ``init_weights(model, vision)``: a pretrained start from a local file (``vision.pretrained``).
* ``check(vision, cfg)``: config problems, one line each, found before any expensive stage.
* ``owns(visual)``: whether a built image tower is of this kind (dispatch for the rest).
* ``image_flops(model, image_size)`` / ``image_params(model)``: FLOPs of one image (2 x MACs, batch
  1) and parameters of the image tower in its export form (``count_image_flops``: FlopCounterMode).
  The ViT kind returns None: distill.flops counts it analytically, since its attention escapes the
  counter on CPU. distill.flops.clip_model_stats asks the kind for the rest.
* ``layout(model)``: where the image tower's parts are for fine-tuning (its prefixes, head names,
  blocks, adapter sites, LoRA keywords), which distill.finetune.methods.layout_for joins with the
  shared text tower's into a ``Layout``; None keeps open_clip's ViT layout.
* ``export_form(model)``: the model as it is exported (a reparameterised copy where the tower has
  training-time branches); the ONNX parity check compares it with the model as trained.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import open_clip
import torch

from distill.registry import STUDENT_TOWERS

__all__ = ["STUDENT_TOWERS", "StudentTower", "register_tower", "tower_kind", "tower_for", "count_image_flops"]


def count_image_flops(visual: torch.nn.Module, image_size: int) -> int:
    """FLOPs (2 x MACs) of one image through an image tower (``model.visual``), batch 1, counted by
    ``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products, distill.flops' convention.

    Modules with timm's ``fused_attn`` run on a copy with it off: the counter has no CPU formula for
    fused scaled-dot-product attention and would drop the attention products.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if any(getattr(m, "fused_attn", False) for m in visual.modules()):
        visual = copy.deepcopy(visual)
        for m in visual.modules():
            if getattr(m, "fused_attn", False):
                m.fused_attn = False
    was_training = visual.training
    visual.eval()  # BatchNorm cannot take the statistics of one image (and would change its running ones)
    try:
        param = next(visual.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            visual(torch.zeros(1, 3, int(image_size), int(image_size), dtype=dtype, device=device))
    finally:
        visual.train(was_training)
    return int(counter.get_total_flops())


class StudentTower:
    """One kind of student image tower (subclass it, set ``kind`` and ``keys``, decorate with ``@register_tower``)."""

    kind: str = ""
    keys: tuple[str, ...] = ()  # student.builder.vision keys this kind accepts (besides ``kind``)

    def vision_cfg(self, vision: Mapping[str, Any]) -> dict[str, Any]:
        """student.builder.vision -> open_clip's vision_cfg; UserError (one line) for a shape that cannot work."""
        raise NotImplementedError

    def check(self, vision: Mapping[str, Any], cfg: Any = None) -> list[str]:
        """Config problems of student.builder.vision (and ``cfg``, the whole config, when given), one line each."""
        return []

    def create(self, model_cfg: Mapping[str, Any]) -> open_clip.model.CLIP:
        """The CLIP with random weights from a model_cfg this kind wrote."""
        return open_clip.model.CLIP(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in model_cfg.items()})

    def init_weights(self, model: open_clip.model.CLIP, vision: Mapping[str, Any]) -> dict[str, Any] | None:
        """Load ``vision.pretrained`` (a local file) into the image tower; None when there is nothing to load."""
        return None

    def owns(self, visual: torch.nn.Module) -> bool:
        """Whether a built open_clip image tower (``model.visual``) is of this kind."""
        return False

    def image_flops(self, model: torch.nn.Module, image_size: int) -> int | None:
        """FLOPs (2 x MACs) of one image through ``model``'s image tower as exported, batch 1."""
        return count_image_flops(self.export_form(model).visual, image_size)

    def image_params(self, model: torch.nn.Module) -> int:
        """Parameters of the image tower as exported."""
        return int(sum(p.numel() for p in self.export_form(model).visual.parameters()))

    def layout(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """The image tower's fine-tune layout: {"image": parameter prefixes, "head": names (or prefixes
        ending in '.') of its projection, "blocks": prefix of its numbered blocks, "adapter_after": a
        module-name pattern or predicate(name, module), "lora_keywords": {keyword: predicate(name,
        module)}, "lora_default": the keywords of LoRA ``auto``}; None: open_clip's ViT layout."""
        return None

    def export_form(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` as it is exported; the default is the model itself."""
        return model


def register_tower(cls: type[StudentTower]) -> type[StudentTower]:
    """Class decorator: register one instance of a StudentTower subclass under its ``kind``."""
    STUDENT_TOWERS.register(cls.kind, cls(), doc=cls.__doc__)
    return cls


def tower_kind(kind: str) -> StudentTower:
    """The registered tower of ``kind``; an unknown kind is one UserError line naming the closest."""
    return STUDENT_TOWERS.get(str(kind), where="student.builder.vision.kind")


def tower_for(model: torch.nn.Module) -> StudentTower | None:
    """The registered kind that owns ``model.visual`` (a built CLIP, a student or an open_clip teacher),
    else None (ModifiedResNet, HF towers...)."""
    visual = getattr(model, "visual", None)
    if visual is None:
        return None
    for tower in STUDENT_TOWERS.values():
        if tower.owns(visual):
            return tower
    return None
