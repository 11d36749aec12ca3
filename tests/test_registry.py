"""One registry style (distill.registry.Registry) for loss terms, variants, data sources, fine-tune
methods, teachers and student towers: lookup, the "did you mean" line, registration by decorator or
call, and the configs' ``_target_``s naming registered things."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill.errors import UserError
from distill.registry import STUDENT_TOWERS, Registry, first_sentence
from tests.conftest import REPO


def _reg() -> Registry:
    reg = Registry("widget")

    @reg.register("sprocket")
    def sprocket():
        """Turns the chain. Then more text that is not the description."""

    reg.register("gear", object(), doc="A toothed wheel.\n\nDetails.")
    reg.register("cog", lambda: None, doc="One tooth of a gear.")
    return reg


def test_registry_registers_by_decorator_or_call_and_describes_each_entry_in_one_line():
    reg = _reg()
    assert reg.names() == list(reg) == ["sprocket", "gear", "cog"] and len(reg) == 3 and "gear" in reg
    assert reg.get("sprocket").__name__ == "sprocket" and reg["cog"] is reg.get("cog")
    assert reg.entries() == [("sprocket", "Turns the chain."), ("gear", "A toothed wheel."),
                             ("cog", "One tooth of a gear.")]
    assert reg.describe("gear") == "A toothed wheel."
    with pytest.raises(ValueError, match="widget 'gear' is registered twice"):
        reg.register("gear", object())
    copy = reg.copy()
    copy.register("chain", object(), doc="Links.")
    assert "chain" in copy and "chain" not in reg


def test_unknown_name_is_one_did_you_mean_line_listing_every_registered_name():
    reg = _reg()
    with pytest.raises(UserError) as e:
        reg.get("sprockett")
    assert str(e.value) == "widget 'sprockett' is not registered; did you mean 'sprocket'? registered: sprocket, gear, cog"
    with pytest.raises(UserError) as e:
        reg["zzz"]
    assert str(e.value) == "widget 'zzz' is not registered; registered: sprocket, gear, cog"
    assert reg.get("zzz", None) is None  # with a default it reads like dict.get (monkeypatch.setitem relies on it)
    with pytest.raises(UserError, match=r"^finetune.method: widget 'cogg' is not registered; did you mean 'cog'\?"):
        reg.get("cogg", where="finetune.method")


def test_first_sentence_skips_abbreviations_and_cuts_long_text():
    assert first_sentence("CLIP-KD (Yang et al. 2024): feature distillation. More.") == \
        "CLIP-KD (Yang et al. 2024): feature distillation."
    assert first_sentence("  two\n  lines, one sentence.\n\nNext paragraph.") == "two lines, one sentence."
    assert len(first_sentence("word " * 100)) <= 120 and first_sentence(None) == ""


def test_every_extension_point_is_a_registry_and_its_unknown_names_say_did_you_mean():
    from distill.datasets import SOURCES
    from distill.finetune.methods import METHODS
    from distill.losses import TERMS, DistillLoss
    from distill.teachers import TEACHERS
    from distill.variants import VARIANTS

    for reg, wrong, right in ((TERMS, "feature_mes", "feature_mse"), (VARIANTS, "student_onnx_int", "student_onnx_int8"),
                              (SOURCES, "fashion_mnst", "fashion_mnist"), (METHODS, "lorra", "lora"),
                              (TEACHERS, "OpenClipTeachr", "OpenClipTeacher"), (STUDENT_TOWERS, None, None)):
        assert isinstance(reg, Registry), reg
        if wrong is not None:
            with pytest.raises(UserError, match=f"did you mean '{right}'"):
                reg.get(wrong)
    with pytest.raises(UserError) as e:
        DistillLoss(weights={"feature_mes": 1.0})
    assert str(e.value).startswith("loss.weights: loss term 'feature_mes' is not registered; did you mean 'feature_mse'?")
    assert list(METHODS) == ["none", "full", "lock_image", "lock_text", "lora", "adapter", "head"]


def test_a_loss_term_registered_in_a_test_is_in_the_registry_and_usable_by_name(monkeypatch):
    from distill import losses

    monkeypatch.setattr(losses, "TERMS", losses.TERMS.copy())

    @losses.term("text_cosine", projected=True)
    def _text_cosine(ctx):
        """1 − mean cos(P s_t, t_t): a term defined by a test."""
        return 1 - (ctx.proj_txt * ctx.t_txt).sum(-1).mean()

    assert "text_cosine" in losses.TERMS and losses.TERMS.get("text_cosine").fn is _text_cosine
    assert ("text_cosine", "1 − mean cos(P s_t, t_t): a term defined by a test.") in losses.TERMS.entries()
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
             for k in ("image_features", "text_features")}
    out = losses.DistillLoss(weights={"text_cosine": 2.0})({**feats, "logit_scale": 10.0}, {**feats, "logit_scale": 100.0})
    assert list(out) == ["text_cosine_loss"] and abs(float(out["text_cosine_loss"])) < 1e-6


def test_the_fine_tune_stage_dispatches_through_the_method_registry(monkeypatch):
    from distill.finetune import methods, stage

    seen = []
    reg = methods.METHODS.copy()
    monkeypatch.setattr(methods, "METHODS", reg)

    @methods.method("bias_only")
    def _bias_only(model, layout, cfg):
        """Only the biases train: a method defined by a test."""
        seen.append(cfg.method)
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
        return model, methods.check_trainable(model, "bias_only")

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    cfg = OmegaConf.create({"method": "bias_only"})
    out, counts = stage.apply_method(model, methods.OPEN_CLIP, cfg)
    assert out is model and seen == ["bias_only"] and counts == {"trainable": 2, "total": 6}
    assert reg.get("bias_only").save(model, Path("unused")) == {}  # no parts of its own beside the weights
    with pytest.raises(UserError, match=r"finetune.method: fine-tune method 'bias_onl' is not registered; "
                                        r"did you mean 'bias_only'\?"):
        stage.apply_method(model, methods.OPEN_CLIP, OmegaConf.create({"method": "bias_onl"}))


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        return [t for k, v in node.items() for t in ([v] if k == "_target_" else _targets(v))]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def _resolve(target: str):
    module, _, name = target.rpartition(".")
    return name, getattr(importlib.import_module(module), name)


def test_every_data_and_teacher_target_in_conf_names_a_registered_thing():
    from distill.datasets import SOURCES
    from distill.teachers import TEACHERS

    def check(target: str, reg: Registry) -> None:
        name, obj = _resolve(target)
        assert name in reg and reg.get(name) is obj, f"{target} is not registered as {reg.kind} {name!r}"

    data_targets = [t for p in (REPO / "conf" / "data").glob("*.yaml")
                    for t in _targets(OmegaConf.to_container(OmegaConf.load(p)))]
    assert len(data_targets) >= 10
    for target in data_targets:
        check(target, SOURCES)
    teacher_files = list((REPO / "conf" / "teacher").glob("*.yaml"))
    assert teacher_files
    for p in teacher_files:
        check(OmegaConf.load(p)["_target_"], TEACHERS)
    for p in (REPO / "conf").rglob("*.yaml"):  # experiments and the rest: any source or teacher they name
        for target in _targets(OmegaConf.to_container(OmegaConf.load(p))):
            if target.startswith(("distill.datasets.", "distill.streaming.")):
                check(target, SOURCES)
            elif target.startswith("distill.teachers."):
                check(target, TEACHERS)


def test_the_registry_module_imports_only_the_standard_library_and_distill_errors():
    tree = ast.parse((REPO / "distill" / "registry.py").read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in mods if m.split(".")[0] not in ("__future__", "difflib", "importlib", "pkgutil", "re", "typing")} == {"distill.errors"}
