"""Student builder, open_clip round trip, teacher text tower, TinyCLIP-style inheritance."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from distill.errors import UserError
from distill.students import attach_teacher_text_tower, build_student, inherit_from_teacher, text_cfg_of

VISION = {"width": 64, "layers": 2, "heads": 2, "patch_size": 16, "image_size": 32}
TEXT = {"mode": "distilled", "width": 32, "layers": 1, "heads": 2, "context_length": 16}
TEACHER_CFG = dict(  # a "wide" teacher for inheritance: 3 vision / 2 text layers
    embed_dim=32,
    vision_cfg=dict(width=64, layers=3, head_width=32, patch_size=8, image_size=32),
    text_cfg=dict(width=64, layers=2, heads=2, context_length=16, vocab_size=49408),
)


def _inputs(ctx: int = 16, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, size, size, generator=g)
    tokens = torch.randint(1, 1000, (3, ctx), generator=g)
    tokens[:, -1] = 49407  # end-of-text: argmax pooling reads this position
    return images, tokens


def _clip(cfg, seed=0):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}).eval()


def _out(model, images, tokens):
    model.output_dict = True
    with torch.no_grad():
        return model(image=images, text=tokens)


def test_build_student_shapes_and_model_cfg():
    torch.manual_seed(0)
    model, cfg = build_student(48, VISION, TEXT)
    assert isinstance(model, open_clip.model.CLIP)
    assert cfg == {"embed_dim": 48,
                   "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16,
                                  "mlp_ratio": 4.0},
                   "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                                "mlp_ratio": 4.0},
                   "quick_gelu": False}
    out = _out(model.eval(), *_inputs())
    assert out["image_features"].shape == (3, 48) and out["text_features"].shape == (3, 48)
    assert out["logit_scale"].ndim == 0
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert model.visual.transformer.resblocks[0].attn.num_heads == 2
    assert len(model.visual.transformer.resblocks) == 2 and len(model.transformer.resblocks) == 1


def test_model_cfg_round_trip_through_open_clip_local_dir(tmp_path):
    torch.manual_seed(0)
    model, cfg = build_student(32, VISION, TEXT, quick_gelu=True)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    rebuilt = open_clip.create_model(f"local-dir:{tmp_path}")
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in rebuilt.modules())
    images, tokens = _inputs()
    a, b = _out(model.eval(), images, tokens), _out(rebuilt.eval(), images, tokens)
    for k in ("image_features", "text_features", "logit_scale"):
        assert torch.equal(a[k], b[k]), k


def test_build_student_passes_open_clip_vision_options(tmp_path):
    torch.manual_seed(0)
    model, cfg = build_student(32, {**VISION, "pool_type": "avg"}, TEXT)
    assert cfg["vision_cfg"]["pool_type"] == "avg" and model.visual.pool_type == "avg"
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    rebuilt = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    assert rebuilt.visual.pool_type == "avg"
    images, _ = _inputs()
    with torch.no_grad():  # average pooling of the patch tokens: not the class token's output
        torch.testing.assert_close(rebuilt.encode_image(images), model.eval().encode_image(images))
        model.visual.pool_type = "tok"
        assert not torch.allclose(rebuilt.encode_image(images), model.encode_image(images))


@pytest.mark.parametrize("vision,text,msg", [
    ({**VISION, "heads": 3}, TEXT, "divisible"),
    ({**VISION, "image_size": 40}, TEXT, "multiple of patch_size"),
    (VISION, {**TEXT, "heads": 3}, "divisible"),
    (VISION, {"mode": "frozen"}, "mode"),
    ({**VISION, "pool": "avg"}, TEXT, r"unknown keys \['pool'\].*pool_type"),
])
def test_build_student_config_errors(vision, text, msg):
    with pytest.raises(UserError, match=msg):
        build_student(32, vision, text)


# --------------------------------------------------------------------------- teacher text tower
# Models are compared with equal requires_grad: nn.MultiheadAttention takes its fused fast path
# only when no parameter needs a gradient, and the two kernels differ by ~1e-6.
def test_teacher_text_mode_copies_and_freezes_exactly_the_text_tower():
    teacher = _clip(TEACHER_CFG, seed=1).requires_grad_(False)  # frozen, as every teacher is
    model, cfg = build_student(32, VISION, {"mode": "teacher"}, teacher_model=teacher)
    assert cfg["text_cfg"] == {**TEACHER_CFG["text_cfg"], "mlp_ratio": 4.0}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    text_names = {n for n, _ in teacher.named_parameters() if not n.startswith("visual.") and n != "logit_scale"}
    assert frozen == text_names
    assert "token_embedding.weight" in frozen and "text_projection" in frozen
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("visual."))
    assert model.logit_scale.requires_grad
    images, tokens = _inputs(seed=2)
    s, t = _out(model.eval(), images, tokens), _out(teacher, images, tokens)
    assert torch.equal(s["text_features"], t["text_features"])


def test_teacher_text_mode_with_a_config_dict_and_quick_gelu(tmp_path):
    teacher = _clip({**TEACHER_CFG, "quick_gelu": True}, seed=2).requires_grad_(False)
    model, cfg = build_student(32, VISION, {"mode": "teacher"}, teacher_model=teacher,
                               teacher_text_cfg=TEACHER_CFG["text_cfg"])
    assert cfg["quick_gelu"] is True  # follows the teacher's text tower
    images, tokens = _inputs(seed=3)
    assert torch.equal(_out(model.eval(), images, tokens)["text_features"], _out(teacher, images, tokens)["text_features"])
    # and the exported config rebuilds the same text tower in open_clip
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    rebuilt = open_clip.create_model(f"local-dir:{tmp_path}").eval().requires_grad_(False)
    assert torch.equal(_out(rebuilt, images, tokens)["text_features"], _out(teacher, images, tokens)["text_features"])


def test_teacher_text_mode_errors():
    with pytest.raises(UserError, match="open_clip CLIP teacher"):
        build_student(32, VISION, {"mode": "teacher"}, teacher_model=None)
    with pytest.raises(UserError, match="open_clip CLIP teacher"):
        build_student(32, VISION, {"mode": "teacher"}, teacher_model=torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="embed_dim"):
        build_student(16, VISION, {"mode": "teacher"}, teacher_model=_clip(TEACHER_CFG))
    student, _ = build_student(32, VISION, TEXT)
    with pytest.raises(UserError, match="cannot be rebuilt"):
        attach_teacher_text_tower(student, _clip(TEACHER_CFG))


def test_text_cfg_of_reads_back_options():
    cfg = {**TEACHER_CFG, "text_cfg": {**TEACHER_CFG["text_cfg"], "proj_bias": True, "pool_type": "last",
                                       "mlp_ratio": 2.0}}
    got = text_cfg_of(_clip(cfg))
    assert got["mlp_ratio"] == 2.0 and got["proj_bias"] is True and got["pool_type"] == "last"
    assert (got["width"], got["heads"], got["layers"], got["context_length"]) == (64, 2, 2, 16)


# ------------------------------------------------------------------------------------ inheritance
def test_inherit_same_size_is_an_exact_copy():
    teacher = _clip(TEACHER_CFG, seed=3)
    student = _clip(TEACHER_CFG, seed=4)
    images, tokens = _inputs(seed=4)
    before = _out(student, images, tokens)
    report = inherit_from_teacher(student, teacher)
    assert set(report) == {n for n, _ in student.named_parameters()}
    assert set(report.values()) == {"inherited"}
    s, t = _out(student, images, tokens), _out(teacher, images, tokens)
    assert not torch.equal(before["image_features"], t["image_features"])
    for k in ("image_features", "text_features", "logit_scale"):
        assert torch.equal(s[k], t[k]), k


def test_inherit_narrow_shallow_takes_expected_slices():
    teacher = _clip(TEACHER_CFG, seed=5)
    # vision: 3 -> 2 layers, width 64 -> 32, head width 32 kept (whole heads); patch 8 -> 16
    # text: 2 -> 1 layer, width 64 -> 32, heads 2 of 32 -> 2 of 16 (channels inside each head); embed 32 -> 16
    torch.manual_seed(0)
    student, _ = build_student(16, {"width": 32, "layers": 2, "heads": 1, "patch_size": 16, "image_size": 32},
                               {"mode": "distilled", "width": 32, "layers": 1, "heads": 2, "context_length": 16})
    random_conv = student.visual.conv1.weight.detach().clone()
    report = inherit_from_teacher(student, teacher, layers="uniform", channels="first")
    tv, sv = teacher.visual, student.visual
    # conv1 cannot be inherited across patch sizes; the grid 4x4 -> 2x2 is interpolated
    assert report["visual.conv1.weight"] == "random" and torch.equal(sv.conv1.weight, random_conv)
    assert report["visual.positional_embedding"] == "sliced" and sv.positional_embedding.shape == (5, 32)
    assert torch.equal(sv.positional_embedding[0], tv.positional_embedding[0, :32])  # class token position
    assert report["logit_scale"] == "inherited"
    # uniform depth: student block 1 <- teacher block 2
    sb, tb = sv.transformer.resblocks[1], tv.transformer.resblocks[2]
    W = tb.attn.in_proj_weight
    assert torch.equal(sb.attn.in_proj_weight[:32], W[:32, :32])  # q: head 0
    assert torch.equal(sb.attn.in_proj_weight[32:64], W[64:96, :32])  # k: head 0
    assert torch.equal(sb.attn.in_proj_weight[64:], W[128:160, :32])  # v: head 0
    assert torch.equal(sb.attn.out_proj.weight, tb.attn.out_proj.weight[:32, :32])
    assert torch.equal(sb.mlp.c_fc.weight, tb.mlp.c_fc.weight[:128, :32])
    assert torch.equal(sb.mlp.c_proj.weight, tb.mlp.c_proj.weight[:32, :128])
    assert torch.equal(sb.ln_2.bias, tb.ln_2.bias[:32])
    assert torch.equal(sv.transformer.resblocks[0].ln_1.weight, tv.transformer.resblocks[0].ln_1.weight[:32])
    assert torch.equal(sv.proj, tv.proj[:32, :16])
    assert report["visual.transformer.resblocks.1.attn.in_proj_weight"] == "sliced"
    # text: one layer <- the last teacher layer; within-head channel slices
    sbt, tbt = student.transformer.resblocks[0], teacher.transformer.resblocks[1]
    Wt = tbt.attn.in_proj_weight
    assert torch.equal(sbt.attn.in_proj_weight[:16], Wt[:16, :32])  # q head 0, channels 0-15
    assert torch.equal(sbt.attn.in_proj_weight[16:32], Wt[32:48, :32])  # q head 1, channels 0-15
    assert torch.equal(sbt.attn.in_proj_weight[48:64], Wt[96:112, :32])  # k head 1
    assert torch.equal(sbt.attn.out_proj.weight[:, 16:], tbt.attn.out_proj.weight[:32, 32:48])
    assert torch.equal(student.token_embedding.weight, teacher.token_embedding.weight[:, :32])
    assert torch.equal(student.text_projection, teacher.text_projection[:32, :16])
    assert torch.equal(student.ln_final.weight, teacher.ln_final.weight[:32])
    assert set(report.values()) == {"sliced", "random", "inherited"}
    # the inherited student still runs
    out = _out(student, *_inputs())
    assert out["image_features"].shape == (3, 16) and torch.isfinite(out["text_features"]).all()


def test_inherit_importance_picks_largest_norm_heads_and_units():
    teacher = _clip(TEACHER_CFG, seed=6)
    tb = teacher.visual.transformer.resblocks[0]
    with torch.no_grad():  # make head 1 and hidden units 200.. of block 0 clearly the largest
        tb.attn.in_proj_weight.view(3, 2, 32, 64)[:, 1] *= 10
        tb.mlp.c_fc.weight[200:] *= 10
    torch.manual_seed(0)
    student, _ = build_student(32, {"width": 64, "layers": 1, "heads": 1, "patch_size": 8, "image_size": 32,
                                    "mlp_ratio": 0.875}, {**TEXT, "width": 64})
    report = inherit_from_teacher(student, teacher, layers="first", channels="importance")
    sb = student.visual.transformer.resblocks[0]
    assert sb.mlp.c_fc.out_features == 56  # of the teacher's 256
    assert torch.equal(sb.mlp.c_fc.weight, tb.mlp.c_fc.weight[200:256])
    assert torch.equal(sb.mlp.c_proj.weight, tb.mlp.c_proj.weight[:, 200:256])
    assert report["visual.transformer.resblocks.0.mlp.c_fc.weight"] == "sliced"
    # same width, one head of 64 vs two of 32: all q/k/v channels, in order (an exact copy)
    assert torch.equal(sb.attn.in_proj_weight, tb.attn.in_proj_weight)
    assert report["visual.transformer.resblocks.0.attn.in_proj_weight"] == "inherited"


def test_inherit_more_student_heads_than_teacher_heads_slices_q_k_v_channels():
    teacher = _clip(TEACHER_CFG, seed=8)
    torch.manual_seed(0)
    student, _ = build_student(32, {"width": 32, "layers": 1, "heads": 4, "patch_size": 8, "image_size": 32}, TEXT)
    report = inherit_from_teacher(student, teacher, layers="first")
    sb, tb = student.visual.transformer.resblocks[0], teacher.visual.transformer.resblocks[0]
    W = tb.attn.in_proj_weight
    assert torch.equal(sb.attn.in_proj_weight, torch.cat([W[:32, :32], W[64:96, :32], W[128:160, :32]]))
    assert torch.equal(sb.attn.in_proj_bias, torch.cat([tb.attn.in_proj_bias[i:i + 32] for i in (0, 64, 128)]))
    assert report["visual.conv1.weight"] == "sliced"  # same patch size: first 32 output channels
    assert torch.equal(student.visual.conv1.weight, teacher.visual.conv1.weight[:32])
    assert torch.equal(student.visual.positional_embedding, teacher.visual.positional_embedding[:, :32])


def test_inherit_importance_whole_heads():
    teacher = _clip(TEACHER_CFG, seed=7)
    tb = teacher.visual.transformer.resblocks[2]
    with torch.no_grad():
        tb.attn.in_proj_weight.view(3, 2, 32, 64)[:, 1] *= 10
    torch.manual_seed(0)
    student, _ = build_student(32, {"width": 32, "layers": 2, "heads": 1, "patch_size": 8, "image_size": 32}, TEXT)
    inherit_from_teacher(student, teacher, channels="importance")
    sb = student.visual.transformer.resblocks[1]
    r = torch.topk(sum((b.attn.in_proj_weight.pow(2).sum(0) + b.mlp.c_fc.weight.pow(2).sum(0)
                        + b.attn.out_proj.weight.pow(2).sum(1) + b.mlp.c_proj.weight.pow(2).sum(1)).detach()
                       for b in teacher.visual.transformer.resblocks), 32).indices.sort().values
    W = tb.attn.in_proj_weight.detach()
    assert torch.equal(sb.attn.in_proj_weight[:32], W[32:64][:, r])  # q of head 1
    assert torch.equal(sb.attn.in_proj_weight[64:], W[160:192][:, r])  # v of head 1
    assert torch.equal(student.visual.class_embedding, teacher.visual.class_embedding[r])


def test_inherit_rejects_non_open_clip():
    student, _ = build_student(32, VISION, TEXT)
    with pytest.raises(UserError, match="student.init=random"):
        inherit_from_teacher(student, torch.nn.Linear(2, 2))


def _letter_teacher(dim: int = 16):
    """A fake teacher text encoder: a string's embedding is its first letter's fixed direction plus noise."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(27, dim, generator=gen), dim=-1)

    def encode_text(texts):
        idx = torch.tensor([ord(t[0].lower()) - 97 if t[0].isalpha() and t[0].isascii() else 26 for t in texts])
        return torch.nn.functional.normalize(centres[idx] + 0.05 * torch.randn(len(texts), dim, generator=gen), dim=-1)

    return encode_text


def test_token_strings_decode_bpe():
    from distill.students import token_strings

    tok = open_clip.SimpleTokenizer()
    strings = token_strings(tok)
    assert len(strings) == len(tok.decoder)
    assert strings[tok.encoder["cat</w>"]] == "cat" and strings[tok.encoder["sel"]] == "sel"
    assert strings[tok.encoder["<start_of_text>"]] is None and strings[tok.encoder["<end_of_text>"]] is None


def test_init_tokens_from_teacher_puts_tokens_where_the_teacher_does():
    from distill.students import init_tokens_from_teacher

    model, _ = build_student(16, {"width": 32, "layers": 1, "heads": 2, "patch_size": 16, "image_size": 32},
                             {"width": 8, "layers": 1, "heads": 2, "context_length": 16})
    tok = open_clip.SimpleTokenizer(context_length=16)
    before = model.token_embedding.weight.detach().clone()
    info = init_tokens_from_teacher(model, _letter_teacher(), tok)
    emb = model.token_embedding.weight.detach()
    from distill.students import token_strings

    assert info["width"] == 8 and 0 < info["explained_variance"] <= 1
    assert info["tokens"] == sum(s is not None for s in token_strings(tok)) > len(tok.decoder) - 100
    sot, eot = tok.encoder["<start_of_text>"], tok.encoder["<end_of_text>"]
    assert torch.equal(emb[sot], before[sot]) and torch.equal(emb[eot], before[eot])  # no text: left random
    assert emb.std().item() == pytest.approx(0.02, rel=0.05)  # open_clip's init scale
    # tokens sharing a first letter now sit together; tokens of different letters apart
    cat, car, dog = (tok.encoder[w] for w in ("cat</w>", "car</w>", "dog</w>"))
    cos = torch.nn.functional.cosine_similarity
    assert cos(emb[cat], emb[car], dim=0) > 0.8 > cos(emb[cat], emb[dog], dim=0)
    # the projection reads the components back into the teacher's space with the random init's norm
    assert model.text_projection.shape == (8, 16)
    assert model.text_projection.norm().item() == pytest.approx(16 ** 0.5, rel=1e-4)


def test_init_tokens_from_teacher_needs_the_open_clip_vocabulary():
    from distill.students import init_tokens_from_teacher

    model, _ = build_student(16, {"width": 32, "layers": 1, "heads": 2, "patch_size": 16, "image_size": 32},
                             {"width": 8, "layers": 1, "heads": 2, "context_length": 16, "vocab_size": 1000})
    with pytest.raises(UserError, match="vocab_size=1000"):
        init_tokens_from_teacher(model, _letter_teacher(), open_clip.SimpleTokenizer(context_length=16))


def test_student_stage_token_init_uses_and_fills_the_text_cache(tmp_path):
    """student.token_init=teacher through the pipeline: the teacher embeds the tokens once; a second
    build reads them from the cache and gives the same table; DDP ranks > 0 skip it."""
    from omegaconf import OmegaConf

    from distill.students.stage import build_student_stage

    class Teacher:
        embed_dim, fingerprint, model = 48, "letters", None

        def __init__(self):
            self.encode, self.calls = _letter_teacher(48), 0

        def encode_text(self, texts):
            self.calls += len(texts)
            return self.encode(texts)

    cfg = OmegaConf.load("conf/student/tiny.yaml")
    cfg.token_init = "teacher"
    teacher = Teacher()
    torch.manual_seed(0)
    a, _ = build_student_stage(cfg, teacher, cache_dir=str(tmp_path))
    n = teacher.calls
    assert n > 49000
    torch.manual_seed(0)
    b, _ = build_student_stage(cfg, teacher, cache_dir=str(tmp_path))
    assert teacher.calls == n and torch.equal(a.token_embedding.weight, b.token_embedding.weight)
    torch.manual_seed(0)
    c, _ = build_student_stage(cfg, teacher, cache_dir=str(tmp_path), token_init=False)
    assert teacher.calls == n and not torch.equal(a.token_embedding.weight, c.token_embedding.weight)
    cfg.token_init = "pca"
    with pytest.raises(UserError, match="token_init='pca' is unknown"):
        build_student_stage(cfg, teacher)
