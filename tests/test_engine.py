"""The training engine with a task that is not distillation: what any training stage inherits."""

from __future__ import annotations

import json

import pytest
import torch

from distill.engine import EngineConfig, TrainingDiverged, fit
from distill.compose import train_defaults as defaults
from distill.errors import UserError


class Regression:
    """y = x @ w_true: a linear model learns w_true; batches are seeded by their position."""

    name = "model"

    def __init__(self, batch_size: int = 8, nan_at: int | None = None) -> None:
        torch.manual_seed(123)
        self.model = torch.nn.Linear(4, 1, bias=False)
        self.w_true = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
        self.batch_size, self.nan_at, self.calls = batch_size, nan_at, 0
        self.samples_per_step = batch_size

    def modules(self):
        return {"model": self.model}

    def tower_of(self, name):
        return ""

    def prepare(self, device, model):
        self.forward = model

    def batches(self, start_step):
        k = start_step
        while True:
            g = torch.Generator().manual_seed(k)
            x = torch.randn(self.batch_size, 4, generator=g)
            yield x, x @ self.w_true.T
            k += 1

    def loss(self, batch, step, micro, autocast):
        self.calls += 1
        x, y = batch
        with autocast():
            mse = ((self.forward(x) - y) ** 2).mean()
        if self.nan_at == self.calls:
            mse = mse * float("nan")
        return {"mse_loss": mse}

    def after_backward(self):
        pass

    def after_step(self):
        pass

    def stats(self):
        return {"batches": self.calls}


def _cfg(**kw):
    base = dict(steps=60, batch_size=8, optimizer={"lr": 0.2, "weight_decay": 0.0}, scheduler={"warmup_steps": 0},
                num_workers=0, log_every=1, eval_every=0, ckpt_every=0, resume="never", tensorboard=False,
                progress=False)
    return EngineConfig.from_mapping(defaults(**{**base, **kw}))


def test_a_task_trains_logs_and_reports(tmp_path):
    task = Regression()
    out = fit(task, _cfg(), tmp_path, torch.device("cpu"))
    assert torch.allclose(task.model.weight, task.w_true, atol=0.15)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 61)) and lines[-1]["mse_loss"] < 0.01 * lines[0]["mse_loss"]
    assert out["steps"] == 60 and out["batches"] == 60 and out["precision"] == "fp32"
    assert set(out["step_time_split_ms"]) == {"load", "optim"}


def test_step_ms_counts_the_optimizer_steps_not_the_evaluations(tmp_path):
    import time

    def slow_eval(model):
        time.sleep(0.2)
        return {"val": 0.0}

    out = fit(Regression(), _cfg(steps=4, eval_every=1), tmp_path, torch.device("cpu"), evaluate=slow_eval)
    # four 0.2 s evaluations are in the run's seconds, none in its per-step time
    assert out["seconds"] >= 0.8 and out["step_ms"] < 1000 * (out["seconds"] - 0.8) / 4 + 1e-6


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    full = Regression()
    fit(full, _cfg(steps=12), tmp_path / "a", torch.device("cpu"))
    part = Regression()
    fit(part, _cfg(steps=12, ckpt_every=4, stop_after_steps=6), tmp_path / "b", torch.device("cpu"))
    resumed = Regression()
    resumed.model.weight.data.zero_()  # the checkpoint, not the initialisation, decides
    out = fit(resumed, _cfg(steps=12, ckpt_every=4, resume="auto"), tmp_path / "b", torch.device("cpu"))
    assert out["resumed_from_step"] == 4 and torch.equal(full.model.weight, resumed.model.weight)
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # steps 5-6 of the stopped run were logged once, not twice


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big, acc = Regression(batch_size=8), Regression(batch_size=4)

    def halves(start_step):  # the same 8 samples per step, as two micro-batches of 4
        for x, y in Regression(batch_size=8).batches(start_step):
            yield x[:4], y[:4]
            yield x[4:], y[4:]

    acc.batches = halves
    opt = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
    fit(big, EngineConfig.from_mapping({**defaults(**_plain(_cfg(steps=5))), "optimizer": opt}), tmp_path / "a",
        torch.device("cpu"))
    fit(acc, EngineConfig.from_mapping({**defaults(**_plain(_cfg(steps=5, grad_accum=2, batch_size=4))), "optimizer": opt}),
        tmp_path / "b", torch.device("cpu"))
    torch.testing.assert_close(big.model.weight, acc.model.weight, rtol=1e-5, atol=1e-6)


def test_nan_stops_with_the_step_and_the_last_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"at step 5;.*step_0000004"):
        fit(Regression(nan_at=5), _cfg(ckpt_every=2), tmp_path, torch.device("cpu"))


def test_early_stopping_restores_the_best_weights(tmp_path):
    scores = iter([0.3, 0.9, 0.5, 0.4, 0.2])
    seen = []

    def evaluate(model):
        seen.append(model.weight.detach().clone())
        return {"acc": next(scores)}

    task = Regression()
    out = fit(task, _cfg(steps=10, eval_every=1, early_stop={"metric": "acc", "patience": 3}), tmp_path,
              torch.device("cpu"), evaluate=evaluate)
    assert out["early_stopped"] and out["steps"] == 5 and out["best_step"] == 2
    assert torch.equal(task.model.weight, seen[1]) and (tmp_path / "best_model.safetensors").exists()


def test_a_run_that_ends_past_its_best_hands_on_the_best_weights(tmp_path):
    scores = iter([0.3, 0.9, 0.5, 0.4])
    seen = []

    def evaluate(model):
        seen.append(model.weight.detach().clone())
        return {"acc": next(scores)}

    task = Regression()
    out = fit(task, _cfg(steps=4, eval_every=1, early_stop={"metric": "acc", "patience": 5}), tmp_path / "a",
              torch.device("cpu"), evaluate=evaluate)
    assert not out["early_stopped"] and out["steps"] == 4 and out["best_step"] == 2 and out["restored_best"]
    assert torch.equal(task.model.weight, seen[1]) and not torch.equal(task.model.weight, seen[3])

    # a tie with the best moves the best to the later weights: here the last, so nothing is restored
    scores, seen = iter([0.3, 0.9, 0.5, 0.9]), []
    tied = Regression()
    out = fit(tied, _cfg(steps=4, eval_every=1, early_stop={"metric": "acc", "patience": 5}), tmp_path / "t",
              torch.device("cpu"), evaluate=evaluate)
    assert out["best_step"] == 4 and not out["restored_best"] and torch.equal(tied.model.weight, seen[3])

    # a run paused by stop_after_steps keeps its last weights: it resumes from them
    scores, seen = iter([0.3, 0.9, 0.5, 0.4]), []
    paused = Regression()
    out = fit(paused, _cfg(steps=8, eval_every=1, stop_after_steps=4, early_stop={"metric": "acc", "patience": 5}),
              tmp_path / "b", torch.device("cpu"), evaluate=evaluate)
    assert out["steps"] == 4 and not out["restored_best"] and torch.equal(paused.model.weight, seen[3])


def test_config_declares_every_default_once():
    with pytest.raises(UserError, match=r"missing \['attention', 'batch_size'.*unknown \['stepz'\]"):
        EngineConfig.from_mapping({"stepz": 3})
    cfg = defaults()
    assert EngineConfig.from_mapping(cfg).steps == cfg["steps"]
    with pytest.raises(UserError, match=r"unknown \['extra_texts_weight'\]"):
        EngineConfig.from_mapping({**cfg, "extra_texts_weight": 1.0})


def _plain(cfg: EngineConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "optimizer"}


def test_gradients_are_clipped_to_clip_grad_before_every_optimizer_step(tmp_path):
    seen = []

    def record(optimizer, args, kwargs):  # runs inside optimizer.step(), after the engine clipped
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(record)
    try:
        fit(Regression(), _cfg(steps=10, clip_grad=0.05), tmp_path / "clipped", torch.device("cpu"))
        clipped, seen[:] = list(seen), []
        fit(Regression(), _cfg(steps=10, clip_grad=0.0), tmp_path / "free", torch.device("cpu"))  # 0: no clipping
    finally:
        handle.remove()
    logged = [json.loads(l)["grad_norm"] for l in (tmp_path / "clipped" / "metrics.jsonl").read_text().splitlines()]
    assert len(clipped) == 10 and max(clipped) <= 0.05 + 1e-6
    assert min(logged) > 0.05 and max(seen) > 0.05  # the raw norms (logged) were above the limit


def test_warmup_fraction_sets_the_warmup_steps_and_is_checked():
    from distill.engine.optim import cosine_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_schedule(opt, total_steps=20, warmup_steps=99, warmup_fraction=0.2)  # the fraction wins
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0]) and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # cosine decay after the 4 warm-up steps
    with pytest.raises(UserError, match=r"warmup_fraction=1.5 must lie in \[0, 1\)"):
        cosine_schedule(opt, total_steps=20, warmup_fraction=1.5)


def test_grad_checkpointing_on_a_model_without_the_switch_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="Linear has no set_grad_checkpointing; set grad_checkpointing=false"):
        fit(Regression(), _cfg(grad_checkpointing=True), tmp_path, torch.device("cpu"))


def test_progress_bar_and_tensorboard_show_every_step(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(Regression(), _cfg(steps=12, tensorboard=True, progress=True), tmp_path, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "train: 100%" in err and "12/12" in err and "loss=" in err
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/mse_loss")] == list(range(1, 13))
    assert {"train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])


def test_early_stopping_counts_ties_as_no_improvement_but_keeps_the_later_weights():
    from distill.engine.early_stop import EarlyStopping

    early = EarlyStopping({"metric": "acc", "patience": 2})
    assert early.update(1, {"acc": 0.5}) == (True, False)
    assert early.update(2, {"acc": 0.5}) == (True, False) and early.best_step == 2  # tie: the later weights
    assert early.update(3, {"acc": 0.4}) == (False, True) and early.best_step == 2  # two evaluations, no gain
    low = EarlyStopping({"metric": "loss", "patience": 1, "mode": "min"})
    assert low.update(1, {"loss": 2.0}) == (True, False) and low.update(2, {"loss": 1.0}) == (True, False)
    assert low.state() == {"best": -1.0, "bad_evals": 0, "best_step": 2}
    with pytest.raises(UserError, match="not an evaluation metric"):
        low.update(3, {"acc": 1.0})
