"""QuickGELU for open_clip teachers (open_clip#771): OpenAI's checkpoint formats turn it on, an
open_clip file keeps its config's activation, teacher.quick_gelu overrides both, and the teacher
runs bit-exactly like a reference CLIP built with the chosen activation.

Checkpoints are tiny random CLIPs written here in each format: OpenAI's TorchScript archive and
state dict (partly fp16, with OpenAI's input_resolution/context_length/vocab_size entries) and
open_clip's safetensors / .bin. Widths are multiples of 64 so open_clip's own OpenAI loader
(which infers heads as width // 64) reads them too.
"""

from __future__ import annotations

import copy
import logging
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, convert_weights_to_lp
from safetensors.torch import save_file

from distill import pipeline
from distill.errors import UserError
from distill.teachers import open_clip_teacher as oct
from distill.teachers.open_clip_teacher import OpenClipTeacher
from tests.conftest import REPO

TINY = dict(embed_dim=32, vision_cfg=dict(width=64, layers=1, patch_size=8, image_size=32),
            text_cfg=dict(width=64, heads=1, layers=1, context_length=16, vocab_size=49408))
NAME = "TinyQG-test"  # registered with open_clip for the named-model path (and NAME-quickgelu)
TEXTS = ["a photo of a dog.", "a cat on a mat"]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notices


@pytest.fixture(scope="module", autouse=True)
def named_configs():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(open_clip.factory._MODEL_CONFIGS, NAME, copy.deepcopy(TINY))
        mp.setitem(open_clip.factory._MODEL_CONFIGS, f"{NAME}-quickgelu", {**copy.deepcopy(TINY), "quick_gelu": True})
        yield


def _meta_free(state):
    return {k: v for k, v in state.items() if k not in oct.OPENAI_META_KEYS}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("qg_ckpts")
    torch.manual_seed(1)
    m = CLIP(**copy.deepcopy(TINY), quick_gelu=True).eval()
    convert_weights_to_lp(m)  # OpenAI ships its weights partly in fp16
    m.attn_mask = m._buffers.pop("attn_mask")  # a plain attribute: OpenAI's state dicts have no mask
    for k, v in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
        m.__dict__.pop(k, None)
        m.register_buffer(k, torch.tensor(v))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(m)
        torch.jit.save(scripted, str(d / "ViT-tiny.pt"))
    openai_state = {k: v.detach().clone() for k, v in scripted.state_dict().items()}
    torch.save(openai_state, d / "openai_state_dict.pt")
    # the same OpenAI weights as open_clip writes them (hf-hub open_clip_pytorch_model.bin): no markers
    torch.save(_meta_free(openai_state), d / "open_clip_pytorch_model.bin")
    torch.manual_seed(2)
    gelu_state = {k: v.contiguous() for k, v in CLIP(**copy.deepcopy(TINY)).state_dict().items()}
    save_file(gelu_state, str(d / "open_clip_model.safetensors"))
    return {"torchscript": str(d / "ViT-tiny.pt"), "openai_sd": str(d / "openai_state_dict.pt"),
            "openai_bin": str(d / "open_clip_pytorch_model.bin"),
            "safetensors": str(d / "open_clip_model.safetensors"),
            "openai_weights": _meta_free(openai_state), "gelu_weights": gelu_state}


def _teacher(via: str, path: str, **kw) -> OpenClipTeacher:
    if via == "named":
        return OpenClipTeacher(kw.pop("model_name", NAME), pretrained=path, **kw)
    return OpenClipTeacher(model_name=None, model_cfg=copy.deepcopy(TINY), pretrained=path, **kw)


def _reference(weights, quick_gelu: bool) -> CLIP:
    m = CLIP(**copy.deepcopy(TINY), quick_gelu=quick_gelu).eval()
    m.load_state_dict(weights)
    return m.requires_grad_(False)


_IMAGES = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def _embed(model: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    tokens = open_clip.SimpleTokenizer(context_length=16)(TEXTS)
    return (F.normalize(model.encode_image((_IMAGES - mean) / std).float(), dim=-1),
            F.normalize(model.encode_text(tokens).float(), dim=-1))


def _same(teacher: OpenClipTeacher, model: CLIP) -> bool:
    img, txt = _embed(model)
    return torch.equal(teacher.encode_image(_IMAGES), img) and torch.equal(teacher.encode_text(TEXTS), txt)


@pytest.mark.parametrize("via", ["named", "inline"])
@pytest.mark.parametrize("fmt,reason", [("torchscript", "OpenAI TorchScript checkpoint"),
                                        ("openai_sd", "OpenAI state dict")])
def test_openai_checkpoints_get_quick_gelu_and_run_bit_exactly(ckpts, fmt, reason, via, caplog):
    with caplog.at_level(logging.INFO, logger="distill.teachers.open_clip_teacher"):
        t = _teacher(via, ckpts[fmt])
    assert (t.activation, t.activation_reason) == ("quick_gelu", reason)
    assert f"teacher activation: QuickGELU ({reason})" in caplog.text
    assert _same(t, _reference(ckpts["openai_weights"], quick_gelu=True))
    assert not _same(t, _reference(ckpts["openai_weights"], quick_gelu=False))  # the test can tell them apart
    # open_clip's own OpenAI loader (always QuickGELU) builds the same teacher
    openai_model = open_clip.load_openai_model(ckpts[fmt], precision="fp32", device="cpu")
    assert _same(t, openai_model.requires_grad_(False))  # frozen like the teacher: same attention kernels


@pytest.mark.parametrize("via", ["named", "inline"])
def test_open_clip_safetensors_keeps_gelu(ckpts, via):
    t = _teacher(via, ckpts["safetensors"])
    assert t.activation == "gelu" and "teacher.quick_gelu=true" in t.activation_reason
    assert _same(t, _reference(ckpts["gelu_weights"], quick_gelu=False))


def test_explicit_quick_gelu_overrides_auto_both_ways(ckpts, caplog):
    on = _teacher("named", ckpts["safetensors"], quick_gelu=True)
    assert (on.activation, on.activation_reason) == ("quick_gelu", "teacher.quick_gelu=true")
    assert _same(on, _reference(ckpts["gelu_weights"], quick_gelu=True))
    with caplog.at_level(logging.WARNING, logger="distill.teachers.open_clip_teacher"):
        off = _teacher("inline", ckpts["torchscript"], quick_gelu=False)
    assert (off.activation, off.activation_reason) == ("gelu", "teacher.quick_gelu=false")
    assert "teacher.quick_gelu=false although QuickGELU is expected (OpenAI TorchScript checkpoint)" in caplog.text
    assert _same(off, _reference(ckpts["openai_weights"], quick_gelu=False))
    # the same weights under either activation are different teachers to the cache
    assert off.fingerprint != _teacher("inline", ckpts["torchscript"]).fingerprint


def test_open_clip_file_of_openai_weights_needs_the_quickgelu_name_or_flag(ckpts, caplog):
    """The issue's case: OpenAI weights saved by open_clip carry no marker of their activation."""
    plain = _teacher("named", ckpts["openai_bin"])
    assert plain.activation == "gelu" and "pass teacher.quick_gelu=true" in plain.activation_reason
    by_name = _teacher("named", ckpts["openai_bin"], model_name=f"{NAME}-quickgelu")
    assert (by_name.activation, by_name.activation_reason) == ("quick_gelu", f"model {NAME}-quickgelu")
    assert _same(by_name, _reference(ckpts["openai_weights"], quick_gelu=True))
    by_flag = _teacher("named", ckpts["openai_bin"], quick_gelu="true")
    assert by_flag.activation == "quick_gelu" and by_flag.fingerprint == by_name.fingerprint
    with caplog.at_level(logging.WARNING, logger="distill.teachers.open_clip_teacher"):
        off = _teacher("named", ckpts["openai_bin"], model_name=f"{NAME}-quickgelu", quick_gelu=False)
    assert off.activation == "gelu" and f"QuickGELU is expected (model {NAME}-quickgelu)" in caplog.text
    assert _same(off, _reference(ckpts["openai_weights"], quick_gelu=False))


def test_quick_gelu_values():
    assert [oct.parse_quick_gelu(v) for v in ("auto", "AUTO", None, True, False, "true", "false")] == \
        [None, None, None, True, False, True, False]
    with pytest.raises(UserError, match="auto, true or false"):
        oct.parse_quick_gelu("maybe")
    # the older flag still means QuickGELU
    assert OpenClipTeacher(model_name=None, model_cfg=copy.deepcopy(TINY), force_quick_gelu=True).activation \
        == "quick_gelu"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_teacher_configs_pick_the_activation(ckpts):
    cfg = _compose("+experiment=smoke", "teacher=openclip", f"teacher.model_name={NAME}",
                   f"teacher.pretrained={ckpts['torchscript']}")
    assert cfg.teacher.quick_gelu == "auto"
    t = pipeline.build_teacher(cfg.teacher, torch.device("cpu"))
    assert t.activation == "quick_gelu" and _same(t, _reference(ckpts["openai_weights"], quick_gelu=True))
    cfg = _compose("+experiment=smoke", "teacher=openclip", f"teacher.model_name={NAME}",
                   f"teacher.pretrained={ckpts['openai_bin']}", "teacher.quick_gelu=true")
    assert pipeline.build_teacher(cfg.teacher, torch.device("cpu")).activation == "quick_gelu"
    tiny = pipeline.build_teacher(_compose("+experiment=smoke").teacher, torch.device("cpu"))
    assert (tiny.activation, tiny.activation_reason) == ("gelu", "model config")
    # the design card's teacher is the QuickGELU architecture, so a local file of OpenAI weights keeps it
    name = _compose("+experiment=vitb32_to_vits").teacher.model_name
    assert name == "ViT-B-32-quickgelu" and open_clip.get_model_config(name)["quick_gelu"] is True
    assert "openai" in open_clip.list_pretrained_tags_by_model(name)


def test_offline_error_is_one_line_and_names_quick_gelu(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(oct, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # restored after the test, as is the constant below
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        OpenClipTeacher("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "teacher.pretrained=/path/to/" in msg
    assert "QuickGELU" in msg and "teacher.quick_gelu=true" in msg and "ViT-B-32-quickgelu" in msg
    with pytest.raises(UserError) as e:
        OpenClipTeacher("ViT-B-32-quickgelu", pretrained="openai", cache_dir=str(tmp_path))
    assert "QuickGELU stays on for it (ViT-B-32-quickgelu)" in str(e.value)


def test_error_summary_ends_on_a_whole_word(monkeypatch):
    words = " ".join(f"w{i}{'x' * (i % 7)}" for i in range(60))
    def fail(*a, **k):
        raise RuntimeError(f"{words}\nsecond line")
    monkeypatch.setattr(oct, "_hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(open_clip, "create_model", fail)
    with pytest.raises(UserError) as e:
        OpenClipTeacher("ViT-B-32", pretrained="openai")
    msg = str(e.value)
    summary = msg.split("(RuntimeError: ", 1)[1].split("); offline", 1)[0]
    assert "\n" not in msg and summary.endswith(" ...") and len(summary) <= 124
    kept = summary[:-len(" ...")]
    assert words.startswith(kept) and words[len(kept)] == " "  # cut between words
    assert oct.first_line(RuntimeError("short")) == "short"
    long_token = "x" * 200
    assert oct.first_line(RuntimeError(f"{long_token} tail"), width=120) == f"{long_token} ..."
