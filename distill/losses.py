"""Distillation losses: terms registered by name, weighted, returned as ``{"<name>_loss": tensor}``.

The training loop sums the values whose key ends in ``_loss`` and logs each one. Terms with
weight 0 (or absent from ``weights``) are neither computed nor logged. A term is one function of
a ``LossContext`` (normalised features, scales, the projection and the cross-rank gathers, each
done once per forward) registered with ``@term`` in ``TERMS`` (a distill.registry.Registry);
``python -m distill list`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from distill import distributed as dist_utils
from distill.errors import UserError
from distill.registry import Registry, first_sentence

TEMPERATURE_MODES = ("fixed", "teacher", "student", "own")


@dataclass(frozen=True)
class Term:
    """A registered loss term: ``fn(ctx)`` gives its unweighted value, or None when it does not
    apply to this batch (``clip`` without real pairs). The flags say what the context must prepare."""

    name: str
    fn: Callable[["LossContext"], torch.Tensor | None]
    doc: str
    projected: bool = False  # compares P(student) with teacher features
    gathers_student: bool = False  # needs every rank's student features (with gradients)
    gathers_teacher: bool = False  # needs every rank's teacher features
    teacher_means: bool = False  # needs the mean teacher embeddings (buffers of DistillLoss)
    text_bank: bool = False  # needs the teacher's embeddings of the training captions (set_text_bank)


TERMS: Registry[Term] = Registry("loss term")  # registration order is also the order of the summed losses


def term(name: str, **flags: bool) -> Callable:
    """Register ``fn(ctx) -> tensor | None`` as loss term ``name`` in ``TERMS`` (its docstring is its description)."""

    def wrap(fn: Callable[["LossContext"], torch.Tensor | None]) -> Callable:
        TERMS.register(name, Term(name, fn, first_sentence(fn.__doc__), **flags), doc=fn.__doc__)
        return fn

    return wrap


@dataclass
class LossContext:
    """What the terms share in one forward: (B, D) L2-normalised features, the scales, this rank's
    own-pair column indices, and, where an active term asked for them, the projected student
    features (B, Dt) and the gathered (N, D) features of every rank."""

    loss: "DistillLoss"
    s_img: torch.Tensor
    s_txt: torch.Tensor
    s_scale: torch.Tensor
    t_img: torch.Tensor
    t_txt: torch.Tensor
    t_scale: torch.Tensor
    labels: torch.Tensor
    has_pairs: bool
    pair_mask: torch.Tensor | None = None  # (B,) rows with a real caption; None: every row is (has_pairs)
    proj_img: torch.Tensor | None = None
    proj_txt: torch.Tensor | None = None
    S_img: torch.Tensor | None = None
    S_txt: torch.Tensor | None = None
    T_img: torch.Tensor | None = None
    T_txt: torch.Tensor | None = None
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)
    _mse: tuple[torch.Tensor, torch.Tensor] | None = None

    def feature_mse(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) mean squared error of P(student) against the teacher, computed once."""
        if self._mse is None:
            self._mse = (F.mse_loss(self.proj_img, self.t_img), F.mse_loss(self.proj_txt, self.t_txt))
        return self._mse


# ----------------------------------------------------------------------------------- the terms


@term("feature_mse", projected=True)
def _feature_mse(ctx: LossContext) -> torch.Tensor:
    """½ [mean((P s_i − t_i)²) + mean((P s_t − t_t)²)], mean over B × D_t elements."""
    mse_img, mse_txt = ctx.feature_mse()
    return 0.5 * (mse_img + mse_txt)


@term("feature_mse_image", projected=True)
def _feature_mse_image(ctx: LossContext) -> torch.Tensor:
    """mean((P s_i − t_i)²): feature_mse's image half, for a weight per tower."""
    return ctx.feature_mse()[0]


@term("feature_mse_text", projected=True)
def _feature_mse_text(ctx: LossContext) -> torch.Tensor:
    """mean((P s_t − t_t)²): feature_mse's text half, for a weight per tower."""
    return ctx.feature_mse()[1]


def _residual(s_f: torch.Tensor, t_f: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    mu = mu.to(t_f.dtype)
    return (1.0 - F.cosine_similarity(s_f - mu, t_f - mu, dim=-1, eps=1e-8)).mean()


@term("feature_residual_image", projected=True, teacher_means=True)
def _feature_residual_image(ctx: LossContext) -> torch.Tensor:
    """mean_rows(1 − cos(P s_i − μ_i, t_i − μ_i)): the deviation from the teacher's mean image embedding."""
    return _residual(ctx.proj_img, ctx.t_img, ctx.loss.teacher_image_mean)


@term("feature_residual_text", projected=True, teacher_means=True)
def _feature_residual_text(ctx: LossContext) -> torch.Tensor:
    """mean_rows(1 − cos(P s_t − μ_t, t_t − μ_t)): the deviation from the teacher's mean text embedding."""
    return _residual(ctx.proj_txt, ctx.t_txt, ctx.loss.teacher_text_mean)


@term("contrastive_kd", gathers_student=True, gathers_teacher=True)
def _contrastive_kd(ctx: LossContext) -> torch.Tensor:
    """T² · ½ [KL(teacher ‖ student) image→text + text→image] over temperature-scaled similarities."""
    T = ctx.loss.kd_T
    kl = (_softened_kl(ctx, ctx.s_img, ctx.S_txt, ctx.t_img, ctx.T_txt)
          + _softened_kl(ctx, ctx.s_txt, ctx.S_img, ctx.t_txt, ctx.T_img))
    return (T * T) * 0.5 * kl


def _softened_kl(ctx: LossContext, s_rows: torch.Tensor, s_cols: torch.Tensor, t_rows: torch.Tensor,
                 t_cols: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the rows' softmax over the columns at the KD scales / kd_T, mean over rows."""
    a_s, a_t = ctx.loss.kd_scales(ctx.s_scale, ctx.t_scale)
    T = ctx.loss.kd_T
    log_q = F.log_softmax(a_s / T * s_rows @ s_cols.T, dim=-1)  # (B, N) student
    log_p = F.log_softmax(a_t / T * t_rows @ t_cols.T, dim=-1)  # (B, N) teacher target
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


@term("bank_kd", projected=True, text_bank=True)
def _bank_kd(ctx: LossContext) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of each image's distribution over a fixed bank of teacher caption embeddings."""
    bank = ctx.loss.text_bank
    if bank.shape[0] == 0:
        raise UserError("loss term bank_kd has no caption bank: the training set has no captions, or the bank was "
                        "never set (DistillLoss.set_text_bank); drop loss.weights.bank_kd or add captioned sources")
    # every caption once, so each image learns the teacher's ranking of all the domain's texts, not the batch's repeats
    bank = bank.to(ctx.proj_img.dtype)
    T = ctx.loss.kd_T
    return (T * T) * _softened_kl(ctx, ctx.proj_img, bank, ctx.t_img, bank)  # (B, K) distributions over the bank


@term("clip", gathers_student=True)
def _clip(ctx: LossContext) -> torch.Tensor | None:
    """½ [CE(α_s s_i S_tᵀ, y) + CE(α_s s_t S_iᵀ, y)]: the CLIP loss on real pairs (skipped without them)."""
    m = _pair_rows(ctx)
    if m is None:
        return None
    return 0.5 * (F.cross_entropy(ctx.s_scale * ctx.s_img[m] @ ctx.S_txt.T, ctx.labels[m])
                  + F.cross_entropy(ctx.s_scale * ctx.s_txt[m] @ ctx.S_img.T, ctx.labels[m]))


def _pair_rows(ctx: LossContext) -> torch.Tensor | None:
    """The rows whose text is the image's own caption (a corpus text is no pair), or None when there is none."""
    if ctx.pair_mask is None:
        return torch.ones_like(ctx.labels, dtype=torch.bool) if ctx.has_pairs else None
    m = ctx.pair_mask.to(ctx.labels.device, torch.bool)
    return m if bool(m.any()) else None


@term("interactive", projected=True, gathers_teacher=True)
def _interactive(ctx: LossContext) -> torch.Tensor:
    """½ [CE(α_s P s_i T_tᵀ, y) + CE(α_s P s_t T_iᵀ, y)]: CLIP-KD's interactive contrastive loss, over real pairs."""
    m = _pair_rows(ctx)
    if m is None:
        return None
    return 0.5 * (F.cross_entropy(ctx.s_scale * ctx.proj_img[m] @ ctx.T_txt.T, ctx.labels[m])
                  + F.cross_entropy(ctx.s_scale * ctx.proj_txt[m] @ ctx.T_img.T, ctx.labels[m]))


@term("extra_text_mse")
def _extra_text_mse(ctx: LossContext) -> torch.Tensor | None:
    """mean((P s_x − t_x)²) over text-only rows (train.extra_texts): more texts per step for the text tower."""
    if "student_text" not in ctx.extra:
        return None
    # neither side renormalised: the rows are the model's own unit outputs and the cached targets as stored
    s_x = ctx.loss.project(ctx.extra["student_text"].to(ctx.s_txt.dtype), ctx.t_txt.shape[-1])
    return ((s_x - ctx.extra["teacher_text"].to(s_x.dtype)) ** 2).mean()


class DistillLoss(torch.nn.Module):
    """Weighted sum of the registered CLIP distillation terms, each in its own ``"<name>_loss"`` key.

    Features are L2-normalised here; ``P`` is the projector (identity when student_dim == teacher_dim,
    else ``Linear(student_dim, teacher_dim, bias=False)`` then L2 normalisation); the logit scales
    arrive already exp'd. Teacher tensors are detached targets. Under several processes each rank
    scores its own rows against every rank's gathered columns (see ``forward``).

    Args:
        weights: term name -> weight; names from ``TERMS`` (the config surface: loss.weights).
        temperature: used by ``temperature_mode="fixed"`` only (logits = cos / temperature).
        temperature_mode: the scales ``(a_s, a_t)`` that multiply the student's and the teacher's
            cosines in the KD terms: ``"fixed"`` 1/temperature for both; ``"teacher"`` the teacher's
            scale for both; ``"student"`` the student's learned scale, the target's detached;
            ``"own"`` each model its own (open_clip's ``DistillClipLoss``).
        kd_T: Hinton softening temperature of the KD terms (with the T² factor).
        student_dim, teacher_dim: embedding sizes; when they differ a projector is created for the
            projected terms. It is a submodule, so ``loss.parameters()`` holds it and the optimizer
            must include them. ``feature_residual_*`` keep the teacher's mean embeddings as buffers,
            set by ``set_teacher_means`` or, without a cache, a moving average of the teacher batches.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        temperature: float = 0.01,
        temperature_mode: str = "fixed",
        kd_T: float = 1.0,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
    ) -> None:
        super().__init__()
        weights = dict(weights) if weights is not None else {"feature_mse": 1.0, "contrastive_kd": 1.0}
        for name in weights:
            TERMS.get(name, where="loss.weights")
        if temperature_mode not in TEMPERATURE_MODES:
            raise UserError(f"loss.temperature_mode={temperature_mode!r} is unknown; use one of {list(TEMPERATURE_MODES)}")
        if temperature_mode == "fixed" and not temperature > 0:
            raise UserError(f"loss.temperature={temperature} must be > 0 (TinyCLIP uses 0.02)")
        if not kd_T > 0:
            raise UserError(f"loss.kd_T={kd_T} must be > 0 (1.0 = no softening)")
        self.weights = {k: float(v) for k, v in weights.items() if float(v) != 0.0}
        self.active = [t for name, t in TERMS.items() if name in self.weights]  # registration order
        self.temperature = float(temperature)
        self.temperature_mode = temperature_mode
        self.kd_T = float(kd_T)
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        needs_proj = any(t.projected or t.name == "extra_text_mse" for t in self.active)
        self.projector: torch.nn.Linear | None = None
        if needs_proj and student_dim is not None and teacher_dim is not None and int(student_dim) != int(teacher_dim):
            self.projector = torch.nn.Linear(int(student_dim), int(teacher_dim), bias=False)
        self.uses_teacher_means = any(t.teacher_means for t in self.active)
        self._means_fixed = False
        if self.uses_teacher_means:
            if teacher_dim is None:
                raise UserError("loss terms feature_residual_* need the teacher's embedding size: build DistillLoss "
                                "with teacher_dim=... (the pipeline passes it)")
            self.register_buffer("teacher_image_mean", torch.zeros(int(teacher_dim)))
            self.register_buffer("teacher_text_mean", torch.zeros(int(teacher_dim)))
            self.register_buffer("teacher_mean_updates", torch.zeros((), dtype=torch.long))
        self.uses_text_bank = any(t.text_bank for t in self.active)
        # not persistent: the bank is the cache's caption rows, set again by every run (and resume)
        self.register_buffer("text_bank", torch.zeros(0, int(teacher_dim or 0)), persistent=False)

    def extra_repr(self) -> str:
        return (f"weights={self.weights}, temperature_mode={self.temperature_mode}, "
                f"temperature={self.temperature}, kd_T={self.kd_T}")

    def project(self, x: torch.Tensor, teacher_dim: int) -> torch.Tensor:
        """(B, Ds) -> (B, Dt) L2-normalised."""
        if self.projector is not None:
            w = self.projector.weight
            return F.normalize(self.projector(x.to(w.dtype)).to(x.dtype), dim=-1)
        if x.shape[-1] != teacher_dim:
            raise UserError(
                f"student dim {x.shape[-1]} != teacher dim {teacher_dim} and the loss has no projector: "
                f"build DistillLoss with student_dim={x.shape[-1]}, teacher_dim={teacher_dim}")
        return x

    @torch.no_grad()
    def set_teacher_means(self, image_mean: torch.Tensor, text_mean: torch.Tensor) -> None:
        """Fix μ_i, μ_t (each (Dt,): the mean of the teacher's L2-normalised embeddings over the
        training data, not renormalised) for the feature_residual_* terms; no moving average after."""
        if not self.uses_teacher_means:
            return
        for buf, val in ((self.teacher_image_mean, image_mean), (self.teacher_text_mean, text_mean)):
            if tuple(val.shape) != tuple(buf.shape):
                raise UserError(f"teacher mean of shape {tuple(val.shape)} for a loss built with teacher_dim "
                                f"{buf.shape[0]}")
            buf.copy_(val.to(buf.device, buf.dtype))
        self._means_fixed = True

    @torch.no_grad()
    def set_text_bank(self, text_emb: torch.Tensor) -> None:
        """The (K, Dt) teacher embeddings of the training captions for ``bank_kd`` (L2-normalised here)."""
        if text_emb.ndim != 2 or (self.teacher_dim is not None and text_emb.shape[1] != int(self.teacher_dim)):
            raise UserError(f"caption bank of shape {tuple(text_emb.shape)} for a loss built with teacher_dim "
                            f"{self.teacher_dim}")
        self.text_bank = F.normalize(text_emb.float(), dim=-1).to(self.text_bank.device)

    @torch.no_grad()
    def _update_teacher_means(self, t_img: torch.Tensor, t_txt: torch.Tensor, momentum: float = 0.99) -> None:
        """Moving average of the (gathered) teacher batch means, for training without a cache."""
        for buf, x in ((self.teacher_image_mean, t_img), (self.teacher_text_mean, t_txt)):
            m = x.mean(0).to(buf.dtype)
            buf.copy_(m if int(self.teacher_mean_updates) == 0 else momentum * buf + (1 - momentum) * m)
        self.teacher_mean_updates += 1

    def kd_scales(self, s_scale: torch.Tensor, t_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mode = self.temperature_mode
        if mode == "fixed":
            a = torch.tensor(1.0 / self.temperature, device=s_scale.device, dtype=s_scale.dtype)
            return a, a
        if mode == "teacher":
            return t_scale, t_scale
        if mode == "student":
            return s_scale, s_scale.detach()
        return s_scale, t_scale  # own

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor | float],
                has_pairs: bool = True, extra: Mapping[str, torch.Tensor] | None = None,
                pair_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """student/teacher: {"image_features": (B, D), "text_features": (B, D), "logit_scale": exp'd scalar}.
        extra: {"student_text": (E, Ds), "teacher_text": (E, Dt)} text-only rows for ``extra_text_mse``.

        Returns {"<term>_loss": weighted scalar} for every term with non-zero weight that applies
        to the batch (``clip`` only when ``has_pairs``, ``extra_text_mse`` only with ``extra``).

        Each rank returns the mean over its own B rows against all N = W*B gathered columns, so DDP's
        average of the ranks' gradients is exactly the single-process global-batch gradient: no
        rescaling (the full N x N loss on every rank would be W times too big, open_clip#616).
        The projector lives outside DDP: average its gradients with
        ``distill.distributed.all_reduce_grads(loss.parameters())`` after backward.
        """
        dev = student["image_features"].device
        # at least fp32 even under the loop's autocast: bf16's 8 mantissa bits blur a logit of 100 * cos
        with torch.autocast(device_type=dev.type, enabled=False):
            ctx = self._context(student, teacher, has_pairs, extra or {})
            ctx.pair_mask = pair_mask
            out: dict[str, torch.Tensor] = {}
            for t in self.active:
                value = t.fn(ctx)
                if value is not None:
                    out[f"{t.name}_loss"] = self.weights[t.name] * value
            return out

    def _context(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor | float],
                 has_pairs: bool, extra: Mapping[str, torch.Tensor]) -> LossContext:
        """Normalise, project and gather once for all active terms."""
        dtype = torch.promote_types(student["image_features"].dtype, torch.float32)
        s_img = F.normalize(student["image_features"].to(dtype), dim=-1)  # (B, Ds)
        s_txt = F.normalize(student["text_features"].to(dtype), dim=-1)  # (B, Ds)
        s_scale = student["logit_scale"]
        if not torch.is_tensor(s_scale):
            s_scale = torch.tensor(float(s_scale), device=s_img.device)
        s_scale = s_scale.to(s_img.dtype).reshape(())
        t_img = F.normalize(teacher["image_features"].detach().to(s_img.dtype), dim=-1)  # (B, Dt)
        t_txt = F.normalize(teacher["text_features"].detach().to(s_img.dtype), dim=-1)  # (B, Dt)
        t_scale = teacher["logit_scale"]
        t_scale = (t_scale.detach() if torch.is_tensor(t_scale) else torch.tensor(float(t_scale)))
        t_scale = t_scale.to(device=s_img.device, dtype=s_img.dtype).reshape(())
        B, Dt = t_img.shape
        labels = torch.arange(B, device=s_img.device) + dist_utils.rank() * B  # own pair's column
        ctx = LossContext(self, s_img, s_txt, s_scale, t_img, t_txt, t_scale, labels, bool(has_pairs),
                          extra={k: v.detach() if k.startswith("teacher") else v for k, v in extra.items()})
        if any(t.projected for t in self.active):
            ctx.proj_img, ctx.proj_txt = self.project(s_img, Dt), self.project(s_txt, Dt)  # (B, Dt)
        # Gather once, whatever has_pairs says, so every rank joins the same collectives.
        if any(t.gathers_student for t in self.active):
            ctx.S_img = dist_utils.gather_features(s_img, with_grad=True)  # (N, Ds)
            ctx.S_txt = dist_utils.gather_features(s_txt, with_grad=True)
        if any(t.gathers_teacher for t in self.active):
            ctx.T_img = dist_utils.gather_features(t_img, with_grad=False)  # (N, Dt)
            ctx.T_txt = dist_utils.gather_features(t_txt, with_grad=False)
        if self.uses_teacher_means and self.training and not self._means_fixed:
            g_img = ctx.T_img if ctx.T_img is not None else dist_utils.gather_features(t_img, with_grad=False)
            g_txt = ctx.T_txt if ctx.T_txt is not None else dist_utils.gather_features(t_txt, with_grad=False)
            self._update_teacher_means(g_img, g_txt)
        return ctx
