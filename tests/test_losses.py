"""DistillLoss: values pinned against formulas written out by hand on 3x4 tensors."""

from __future__ import annotations

import math

import pytest
import torch

from distill.errors import UserError
from distill.losses import DistillLoss


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).sum(-1, keepdim=True).sqrt()


def _feats(seed: int = 0, B: int = 3, Ds: int = 4, Dt: int = 4, grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    s_img = torch.randn(B, Ds, generator=g, dtype=torch.float64)
    s_txt = torch.randn(B, Ds, generator=g, dtype=torch.float64)
    t_img = _unit(torch.randn(B, Dt, generator=g, dtype=torch.float64))
    t_txt = _unit(torch.randn(B, Dt, generator=g, dtype=torch.float64))
    if grad:
        s_img.requires_grad_(True)
        s_txt.requires_grad_(True)
    s_scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=grad)
    student = {"image_features": s_img, "text_features": s_txt, "logit_scale": s_scale}
    teacher = {"image_features": t_img, "text_features": t_txt, "logit_scale": 100.0}
    return student, teacher


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    """Written out: z - log(sum(exp(z))) per row, with the max subtracted for stability."""
    m = z.max(dim=1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(dim=1, keepdim=True))


def _kl_rows(zt: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    lp, lq = _log_softmax(zt), _log_softmax(zs)
    return (lp.exp() * (lp - lq)).sum(dim=1).mean()


def _ce_diag(z: torch.Tensor) -> torch.Tensor:
    lq = _log_softmax(z)
    return -torch.stack([lq[i, i] for i in range(z.shape[0])]).mean()


def _expected_kd(student, teacher, a_s: float, a_t: float, T: float = 1.0) -> torch.Tensor:
    si, st = _unit(student["image_features"]), _unit(student["text_features"])
    ti, tt = teacher["image_features"], teacher["text_features"]
    i2t = _kl_rows(a_t / T * ti @ tt.T, a_s / T * si @ st.T)
    t2i = _kl_rows(a_t / T * tt @ ti.T, a_s / T * st @ si.T)
    return T * T * (i2t + t2i) / 2


def test_contrastive_kd_fixed_matches_hand_formula():
    student, teacher = _feats()
    out = DistillLoss(weights={"contrastive_kd": 1.0}, temperature_mode="fixed", temperature=0.05)(student, teacher)
    assert set(out) == {"contrastive_kd_loss"}
    expected = _expected_kd(student, teacher, 20.0, 20.0)
    assert out["contrastive_kd_loss"].item() == pytest.approx(expected.item(), rel=1e-10)
    assert expected.item() > 1e-3  # the fixture really differs


@pytest.mark.parametrize("mode", ["teacher", "student", "own"])
def test_temperature_modes_use_documented_scales(mode):
    student, teacher = _feats(1)
    a = {"teacher": (100.0, 100.0), "student": (14.0, 14.0), "own": (14.0, 100.0)}[mode]
    loss = DistillLoss(weights={"contrastive_kd": 2.0}, temperature_mode=mode, temperature=0.05)
    got = loss(student, teacher)["contrastive_kd_loss"].item()
    assert got == pytest.approx(2.0 * _expected_kd(student, teacher, *a).item(), rel=1e-10)


def test_temperature_modes_differ():
    student, teacher = _feats(2)
    vals = {m: DistillLoss(weights={"contrastive_kd": 1.0}, temperature_mode=m, temperature=0.05)(student, teacher)
            ["contrastive_kd_loss"].item() for m in ("fixed", "teacher", "student", "own")}
    assert len({round(v, 8) for v in vals.values()}) == 4, vals


def test_kd_T_softens_and_multiplies_by_T_squared():
    student, teacher = _feats(3)
    got = DistillLoss(weights={"contrastive_kd": 1.0}, temperature_mode="teacher", kd_T=4.0)(student, teacher)
    expected = _expected_kd(student, teacher, 100.0, 100.0, T=4.0)
    assert got["contrastive_kd_loss"].item() == pytest.approx(expected.item(), rel=1e-10)
    plain = _expected_kd(student, teacher, 25.0, 25.0, T=1.0)  # same softmaxes, no T^2
    assert expected.item() == pytest.approx(16.0 * plain.item(), rel=1e-10)


def test_student_mode_target_does_not_train_the_scale_through_the_teacher_side():
    student, teacher = _feats(4)
    DistillLoss(weights={"contrastive_kd": 1.0}, temperature_mode="student")(student, teacher)[
        "contrastive_kd_loss"].backward()
    g_mode = student["logit_scale"].grad.clone()
    # Reference: scale enters the student logits only; the teacher side uses a constant 14.
    s2, t2 = _feats(4)
    ref = _expected_kd(s2, t2, s2["logit_scale"], 14.0)
    ref.backward()
    assert g_mode.item() == pytest.approx(s2["logit_scale"].grad.item(), rel=1e-9)


def test_feature_mse_clip_interactive_match_hand_formulas():
    student, teacher = _feats(5)
    loss = DistillLoss(weights={"feature_mse": 3.0, "clip": 0.5, "interactive": 2.0, "contrastive_kd": 0.0})
    out = loss(student, teacher)
    assert set(out) == {"feature_mse_loss", "clip_loss", "interactive_loss"}
    si, st = _unit(student["image_features"]), _unit(student["text_features"])
    ti, tt = teacher["image_features"], teacher["text_features"]
    a = 14.0
    mse = ((si - ti) ** 2).sum() / si.numel() / 2 + ((st - tt) ** 2).sum() / st.numel() / 2
    clip = (_ce_diag(a * si @ st.T) + _ce_diag(a * st @ si.T)) / 2
    icl = (_ce_diag(a * si @ tt.T) + _ce_diag(a * st @ ti.T)) / 2
    assert out["feature_mse_loss"].item() == pytest.approx(3.0 * mse.item(), rel=1e-10)
    assert out["clip_loss"].item() == pytest.approx(0.5 * clip.item(), rel=1e-10)
    assert out["interactive_loss"].item() == pytest.approx(2.0 * icl.item(), rel=1e-10)



def test_feature_mse_per_tower_terms_are_the_two_halves_with_their_own_weights():
    student, teacher = _feats(7)
    si, st = _unit(student["image_features"]), _unit(student["text_features"])
    ti, tt = teacher["image_features"], teacher["text_features"]
    out = DistillLoss(weights={"feature_mse_image": 5.0, "feature_mse_text": 0.25})(student, teacher)
    assert set(out) == {"feature_mse_image_loss", "feature_mse_text_loss"}
    assert out["feature_mse_image_loss"].item() == pytest.approx(5.0 * ((si - ti) ** 2).mean().item(), rel=1e-10)
    assert out["feature_mse_text_loss"].item() == pytest.approx(0.25 * ((st - tt) ** 2).mean().item(), rel=1e-10)
    both = DistillLoss(weights={"feature_mse_image": 1.5, "feature_mse_text": 1.5})(student, teacher)
    whole = DistillLoss(weights={"feature_mse": 3.0})(student, teacher)["feature_mse_loss"]
    assert (both["feature_mse_image_loss"] + both["feature_mse_text_loss"]).item() == pytest.approx(whole.item(), rel=1e-10)
    # only the student's image tower gets a gradient from the image term
    s = {k: (v.detach().clone().requires_grad_(True) if torch.is_tensor(v) else v) for k, v in student.items()}
    DistillLoss(weights={"feature_mse_image": 1.0})(s, teacher)["feature_mse_image_loss"].backward()
    assert s["image_features"].grad.abs().sum() > 0 and s["text_features"].grad is None
    proj = DistillLoss(weights={"feature_mse_text": 1.0}, student_dim=3, teacher_dim=4)
    assert isinstance(proj.projector, torch.nn.Linear)  # the per-tower terms need the projector too

def test_projector_when_dims_differ_and_its_output_is_renormalised():
    torch.manual_seed(0)
    student, teacher = _feats(6, Ds=3, Dt=4)
    loss = DistillLoss(weights={"feature_mse": 1.0, "interactive": 1.0}, student_dim=3, teacher_dim=4).double()
    assert isinstance(loss.projector, torch.nn.Linear) and loss.projector.bias is None
    assert [tuple(p.shape) for p in loss.parameters()] == [(4, 3)]
    out = loss(student, teacher)
    W = loss.projector.weight.detach()
    pi = _unit(_unit(student["image_features"]) @ W.T)
    pt = _unit(_unit(student["text_features"]) @ W.T)
    ti, tt = teacher["image_features"], teacher["text_features"]
    mse = (((pi - ti) ** 2).mean() + ((pt - tt) ** 2).mean()) / 2
    icl = (_ce_diag(14.0 * pi @ tt.T) + _ce_diag(14.0 * pt @ ti.T)) / 2
    assert out["feature_mse_loss"].item() == pytest.approx(mse.item(), rel=1e-10)
    assert out["interactive_loss"].item() == pytest.approx(icl.item(), rel=1e-10)
    # no projector for terms that do not need one, nor when the dims agree
    assert DistillLoss(weights={"contrastive_kd": 1.0}, student_dim=3, teacher_dim=4).projector is None
    assert DistillLoss(weights={"feature_mse": 1.0}, student_dim=4, teacher_dim=4).projector is None
    with pytest.raises(UserError, match="student_dim=3, teacher_dim=4"):
        DistillLoss(weights={"feature_mse": 1.0})(student, teacher)


def test_gradients_reach_student_and_projector_never_teacher():
    student, teacher = _feats(7, Ds=3, Dt=4)
    teacher["image_features"].requires_grad_(True)
    teacher["text_features"].requires_grad_(True)
    t_scale = torch.tensor(100.0, dtype=torch.float64, requires_grad=True)
    teacher["logit_scale"] = t_scale
    loss = DistillLoss(weights={"feature_mse": 1.0, "contrastive_kd": 1.0, "clip": 1.0, "interactive": 1.0},
                       temperature_mode="own", student_dim=3, teacher_dim=4).double()
    total = sum(v for k, v in loss(student, teacher).items() if k.endswith("_loss"))
    total.backward()
    for t in (student["image_features"], student["text_features"], student["logit_scale"], loss.projector.weight):
        assert t.grad is not None and t.grad.abs().sum() > 0
    for t in (teacher["image_features"], teacher["text_features"], t_scale):
        assert t.grad is None


def test_zero_when_student_equals_teacher():
    student, teacher = _feats(8, grad=False)
    same = {"image_features": teacher["image_features"].clone(), "text_features": teacher["text_features"].clone(),
            "logit_scale": torch.tensor(100.0, dtype=torch.float64)}
    for mode in ("fixed", "teacher", "student", "own"):
        out = DistillLoss(weights={"feature_mse": 1.0, "contrastive_kd": 1.0}, temperature_mode=mode)(same, teacher)
        assert abs(out["feature_mse_loss"].item()) < 1e-6
        assert abs(out["contrastive_kd_loss"].item()) < 1e-6
    # and clearly non-zero otherwise
    out = DistillLoss(weights={"feature_mse": 1.0, "contrastive_kd": 1.0})(student, teacher)
    assert out["feature_mse_loss"].item() > 1e-3 and out["contrastive_kd_loss"].item() > 1e-3


def test_pair_terms_use_only_rows_with_their_own_caption():
    """Image-only and uncaptioned rows carry a corpus text, not a pair: they are negatives, never positives."""
    student, teacher = _feats(5, B=5)
    mask = torch.tensor([True, False, True, False, True])
    out = DistillLoss(weights={"clip": 1.0, "interactive": 1.0, "contrastive_kd": 0.0})(
        student, teacher, has_pairs=False, pair_mask=mask)
    si, st = _unit(student["image_features"]), _unit(student["text_features"])
    ti, tt = teacher["image_features"], teacher["text_features"]
    rows, y = mask.nonzero().flatten(), mask.nonzero().flatten()
    a = 14.0
    ce = lambda logits: torch.nn.functional.cross_entropy(logits[rows], y)  # noqa: E731
    clip = (ce(a * si @ st.T) + ce(a * st @ si.T)) / 2
    icl = (ce(a * si @ tt.T) + ce(a * st @ ti.T)) / 2
    assert out["clip_loss"].item() == pytest.approx(clip.item(), rel=1e-10)
    assert out["interactive_loss"].item() == pytest.approx(icl.item(), rel=1e-10)
    none = DistillLoss(weights={"clip": 1.0, "interactive": 1.0, "contrastive_kd": 1.0})(
        student, teacher, has_pairs=False, pair_mask=torch.zeros(5, dtype=torch.bool))
    assert set(none) == {"contrastive_kd_loss"}  # no pair in the batch: both pair terms sit out


def test_zero_weight_absent_and_has_pairs_false_drops_clip():
    student, teacher = _feats(9)
    loss = DistillLoss(weights={"feature_mse": 0.0, "contrastive_kd": 1.0, "clip": 1.0})
    assert set(loss(student, teacher)) == {"contrastive_kd_loss", "clip_loss"}
    assert set(loss(student, teacher, has_pairs=False)) == {"contrastive_kd_loss"}
    assert set(DistillLoss()(student, teacher)) == {"feature_mse_loss", "contrastive_kd_loss"}


def test_float32_student_with_float_teacher_scale():
    student, teacher = _feats(10, grad=False)
    s32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in student.items()}
    t32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in teacher.items()}
    out = DistillLoss(weights={"contrastive_kd": 1.0}, temperature_mode="teacher")(s32, t32)
    assert out["contrastive_kd_loss"].dtype == torch.float32
    assert math.isclose(out["contrastive_kd_loss"].item(), _expected_kd(student, teacher, 100.0, 100.0).item(),
                        rel_tol=1e-4)


@pytest.mark.parametrize("kw,msg", [({"weights": {"mse": 1.0}}, "loss term 'mse' is not registered"),
                                    ({"temperature_mode": "hinton"}, "temperature_mode"),
                                    ({"temperature": 0.0}, "temperature"),
                                    ({"kd_T": 0.0}, "kd_T")])
def test_config_errors_are_user_errors(kw, msg):
    with pytest.raises(UserError, match=msg):
        DistillLoss(**kw)


def test_autocast_does_not_lower_the_loss_to_bf16():
    g = torch.Generator().manual_seed(11)
    B, D = 16, 32
    f = [_unit(torch.randn(B, D, generator=g)) for _ in range(2)]
    noisy = [_unit(x + 0.05 * torch.randn(B, D, generator=g)) for x in f]
    student = {"image_features": noisy[0], "text_features": noisy[1], "logit_scale": torch.tensor(100.0)}
    teacher = {"image_features": f[0], "text_features": f[1], "logit_scale": 100.0}
    loss = DistillLoss(weights={"feature_mse": 1.0, "contrastive_kd": 1.0, "clip": 1.0, "interactive": 1.0},
                       temperature_mode="teacher")
    ref = loss(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(student, teacher)
        # what a bf16 matmul would have given for the KD term: clearly off at scale 100
        lowered = (100.0 * student["image_features"] @ student["text_features"].T).float()
    exact = 100.0 * student["image_features"] @ student["text_features"].T
    assert (lowered - exact).abs().max() > 1e-2  # the hazard is real on this machine
    for k, v in ref.items():
        assert got[k].dtype == torch.float32
        assert got[k].item() == pytest.approx(v.item(), rel=1e-6, abs=1e-7), k


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.pow(2).sum(-1).sqrt() * b.pow(2).sum(-1).sqrt())


def test_feature_residual_terms_match_hand_formula_with_fixed_means():
    student, teacher = _feats(11)
    g = torch.Generator().manual_seed(5)
    mu_i, mu_t = 0.8 * _unit(torch.randn(4, generator=g, dtype=torch.float64)), 0.5 * _unit(torch.randn(4, generator=g, dtype=torch.float64))
    loss = DistillLoss(weights={"feature_residual_image": 3.0, "feature_residual_text": 0.5}, teacher_dim=4).double()
    loss.set_teacher_means(mu_i, mu_t)
    out = loss(student, teacher)
    si, st = _unit(student["image_features"]), _unit(student["text_features"])
    want_i = 3.0 * (1 - _cos_rows(si - mu_i, teacher["image_features"] - mu_i)).mean()
    want_t = 0.5 * (1 - _cos_rows(st - mu_t, teacher["text_features"] - mu_t)).mean()
    assert set(out) == {"feature_residual_image_loss", "feature_residual_text_loss"}
    assert math.isclose(out["feature_residual_image_loss"].item(), want_i.item(), rel_tol=1e-9)
    assert math.isclose(out["feature_residual_text_loss"].item(), want_t.item(), rel_tol=1e-9)
    # fixed means: training-mode calls leave them alone
    assert torch.equal(loss.teacher_image_mean, mu_i) and int(loss.teacher_mean_updates) == 0
    # gradients reach the student features only
    out["feature_residual_image_loss"].backward()
    assert student["image_features"].grad is not None and student["image_features"].grad.abs().sum() > 0
    # zero when the student equals the teacher
    same = {**teacher, "logit_scale": torch.tensor(100.0, dtype=torch.float64)}
    assert abs(loss(same, teacher)["feature_residual_image_loss"].item()) < 1e-9


def test_feature_residual_means_follow_a_moving_average_without_a_cache():
    student, teacher = _feats(13, grad=False)
    _, teacher2 = _feats(14, grad=False)
    loss = DistillLoss(weights={"feature_residual_image": 1.0}, teacher_dim=4).double()
    loss(student, teacher)  # first batch: its mean
    assert torch.allclose(loss.teacher_image_mean, teacher["image_features"].mean(0))
    loss(student, teacher2)
    want = 0.99 * teacher["image_features"].mean(0) + 0.01 * teacher2["image_features"].mean(0)
    assert torch.allclose(loss.teacher_image_mean, want) and int(loss.teacher_mean_updates) == 2
    loss.eval()
    loss(student, teacher)  # evaluation does not move the means
    assert torch.allclose(loss.teacher_image_mean, want)
    assert set(loss.state_dict()) == {"teacher_image_mean", "teacher_text_mean", "teacher_mean_updates"}


def test_feature_residual_needs_the_teacher_dim():
    with pytest.raises(UserError, match="teacher_dim"):
        DistillLoss(weights={"feature_residual_image": 1.0})


# ------------------------------------------------------------------------------- the registry


def test_extra_text_mse_matches_hand_formula_and_needs_rows():
    student, teacher = _feats()
    g = torch.Generator().manual_seed(5)
    xs = _unit(torch.randn(6, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    xt = _unit(torch.randn(6, 4, generator=g, dtype=torch.float64))
    loss = DistillLoss(weights={"extra_text_mse": 2.0}, student_dim=3, teacher_dim=4).double()
    s3 = {**student, "image_features": student["image_features"][:, :3], "text_features": student["text_features"][:, :3]}
    out = loss(s3, teacher, extra={"student_text": xs, "teacher_text": xt})
    want = 2.0 * ((_unit(xs @ loss.projector.weight.T) - xt) ** 2).mean()
    assert set(out) == {"extra_text_mse_loss"}
    torch.testing.assert_close(out["extra_text_mse_loss"], want)
    out["extra_text_mse_loss"].backward()
    assert xs.grad is not None and loss.projector.weight.grad is not None
    assert loss(s3, teacher) == {}  # without text-only rows the term does not apply


def test_registry_lists_every_term_with_a_description_and_a_new_term_is_one_definition(monkeypatch):
    from distill import losses

    assert list(losses.TERMS)[:3] == ["feature_mse", "feature_mse_image", "feature_mse_text"]
    assert {"contrastive_kd", "clip", "interactive", "extra_text_mse"} <= set(losses.TERMS)
    assert all(t.doc for t in losses.TERMS.values())
    monkeypatch.setattr(losses, "TERMS", losses.TERMS.copy())  # keep the real registry clean

    @losses.term("image_cosine", projected=True)
    def _image_cosine(ctx):
        """1 − mean cos(P s_i, t_i)."""
        return 1 - (ctx.proj_img * ctx.t_img).sum(-1).mean()

    student, teacher = _feats()
    out = DistillLoss(weights={"image_cosine": 3.0, "feature_mse": 1.0})(student, teacher)
    assert list(out) == ["feature_mse_loss", "image_cosine_loss"]  # registration order, not weights order
    want = 3.0 * (1 - (_unit(student["image_features"]) * teacher["image_features"]).sum(-1).mean())
    torch.testing.assert_close(out["image_cosine_loss"], want)
    with pytest.raises(ValueError, match="registered twice"):
        losses.term("image_cosine")(_image_cosine)


def test_unknown_term_is_one_line_listing_the_known_ones():
    with pytest.raises(UserError) as e:
        DistillLoss(weights={"feature_mes": 1.0})
    msg = str(e.value)
    assert "\n" not in msg and "feature_mes" in msg and "extra_text_mse" in msg and "contrastive_kd" in msg


def test_bank_kd_matches_hand_formula_trains_the_image_side_only_and_needs_a_bank():
    student, teacher = _feats(B=3, Ds=4, Dt=4)
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3  # set_text_bank normalises it
    loss = DistillLoss(weights={"bank_kd": 2.0}, temperature_mode="fixed", temperature=0.05, kd_T=2.0,
                       student_dim=4, teacher_dim=4).double()
    with pytest.raises(UserError, match="no caption bank"):
        loss(student, teacher)
    loss.set_text_bank(bank)
    out = loss(student, teacher)
    b = _unit(bank)
    zt = 20.0 / 2.0 * teacher["image_features"] @ b.T
    zs = 20.0 / 2.0 * _unit(student["image_features"]) @ b.T
    torch.testing.assert_close(out["bank_kd_loss"], 2.0 * 4.0 * _kl_rows(zt, zs))
    out["bank_kd_loss"].backward()
    assert student["image_features"].grad.abs().sum() > 0
    assert student["text_features"].grad is None  # the bank is the teacher's text: only the image tower learns
    same = {**student, "image_features": teacher["image_features"].clone()}
    assert float(loss(same, teacher)["bank_kd_loss"]) == pytest.approx(0.0, abs=1e-12)
    assert "bank_kd" in loss.extra_repr() and "text_bank" not in loss.state_dict()  # set anew by every run
    with pytest.raises(UserError, match="caption bank of shape"):
        loss.set_text_bank(torch.zeros(6, 5))
