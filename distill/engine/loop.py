"""The loop: accumulation, clipping, the NaN stop, evaluation, early stopping and checkpoints
around a Task that supplies batches and returns its loss dict. It knows nothing about teachers."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch

from distill import distributed as dist_utils
from distill.engine import optim, precision
from distill.engine.checkpoint import Checkpointer, find_checkpoint, latest_checkpoint, save_weights, unwrap
from distill.engine.config import EngineConfig
from distill.engine.early_stop import EarlyStopping
from distill.engine.loggers import Loggers
from distill.errors import UserError

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


class Task(Protocol):
    """What a training stage gives the engine.

    Optional hooks, looked up with ``hasattr``, for a task whose data position is not a function of
    the step (a stream): ``data_state() -> dict | None``, called on every rank at each checkpoint
    (it may be a collective) and saved as the checkpoint's ``data`` unless None; and
    ``load_data_state(state)``, called on resume with that saved ``data`` before ``batches``.
    """

    name: str  # the trained model's name: its checkpoint file is <name>.safetensors
    model: torch.nn.Module  # the trained network, unwrapped
    samples_per_step: int  # samples of the global stream one optimizer step consumes

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every module with trainable parameters or state to checkpoint, ``name`` first."""

    def tower_of(self, param_name: str) -> str:
        """"text", "image" or "": which ``lr_scale`` applies to a parameter of ``model``."""

    def prepare(self, device: torch.device, model: torch.nn.Module) -> None:
        """Called once the (possibly DDP-/compile-wrapped) ``model`` is ready: run the forward through it."""

    def batches(self, start_step: int) -> Iterator[Any]:
        """Micro-batches from the position ``start_step`` optimizer steps into the stream."""

    def loss(self, batch: Any, step: int, micro: int, autocast: Callable) -> dict[str, torch.Tensor] | None:
        """{"<term>_loss": tensor, ...} for one micro-batch (summed by the engine), None to skip it."""

    def after_backward(self) -> None:
        """After each micro-batch's backward (e.g. book its time)."""

    def after_step(self) -> None:
        """After each optimizer step (e.g. clamp a temperature)."""

    def stats(self) -> dict[str, Any]:
        """The task's own figures for the result (images seen, time split)."""


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> bool:
    """Under DDP, a BatchNorm tower (timm conv/hybrid students) normalises over the global batch, as one
    process with that batch would: SyncBatchNorm, in place. torch implements it for GPUs only, so CPU
    ranks keep per-rank statistics (said once). -> whether it converted."""
    if not has_batchnorm(model):
        return False
    if device.type != "cuda":
        if dist_utils.rank() == 0:
            log.warning("BatchNorm layers on CPU ranks normalise over each rank's own batch (torch's SyncBatchNorm "
                        "needs GPUs): the run is not identical to one process with the global batch")
        return False
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if converted is not model:  # the model itself is a BatchNorm layer: not a tower this engine trains
        raise ValueError("sync_batchnorm converts BatchNorm layers inside a model, not a bare BatchNorm module")
    return True


def _wrap(model: torch.nn.Module, cfg: EngineConfig, device: torch.device) -> torch.nn.Module:
    if dist_utils.world_size() > 1:
        sync_batchnorm(model, device)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(cfg.find_unused_parameters))
    return torch.compile(model) if cfg.compile else model


class _Run:
    """One fit: the built parts and the loop's running state."""

    def __init__(self, task: Task, cfg: EngineConfig, out_dir: Path, device: torch.device,
                 evaluate: Callable[[torch.nn.Module], dict[str, float]] | None) -> None:
        torch.manual_seed(int(cfg.seed))
        self.task, self.cfg, self.out_dir, self.device, self.evaluate = task, cfg, out_dir, device, evaluate
        self.main = dist_utils.rank() == 0
        self.precision, self.autocast = precision.step_context(cfg.precision, cfg.attention, device)
        for m in task.modules().values():
            m.to(device).train()
        if cfg.grad_checkpointing:
            if not callable(getattr(task.model, "set_grad_checkpointing", None)):
                raise UserError(f"grad_checkpointing=true: {type(task.model).__name__} has no set_grad_checkpointing; "
                                f"set grad_checkpointing=false for this model")
            task.model.set_grad_checkpointing(True)
        task.prepare(device, _wrap(task.model, cfg, device))
        self.optimizer, self.scheduler = optim.build(cfg.optimizer, cfg.scheduler, list(task.modules().values()),
                                                     int(cfg.steps), cfg.lr_scale, task.tower_of)
        self.ckpt = Checkpointer(out_dir / "checkpoints", task.modules(), keep=int(cfg.keep_checkpoints))
        self.resumed_from = find_checkpoint(cfg.resume, self.ckpt.root)
        state: Mapping[str, Any] = {}
        if self.resumed_from is not None:
            state = self.ckpt.restore(self.resumed_from, self.optimizer, self.scheduler, device)
            if self.main:
                log.info("resumed from %s at step %d", self.resumed_from, state["step"])
        self.start_step = self.step = int(state.get("step", 0))
        self.early = EarlyStopping(cfg.early_stop, state)
        if "data" in state and hasattr(task, "load_data_state"):
            task.load_data_state(state["data"])  # the stream's own position: batches() continues from it
        self.batches = task.batches(self.start_step)
        self.loggers = Loggers(out_dir, enabled=self.main, steps=int(cfg.steps), start_step=self.start_step,
                               resumed=self.resumed_from is not None, log_every=int(cfg.log_every),
                               progress=bool(cfg.progress), tensorboard=bool(cfg.tensorboard))
        self.optim_s, self.load_s, self.step_s, self.last, self.stopped_early = 0.0, 0.0, 0.0, {}, False
        self.restored_best = False

    def micro_step(self, micro: int, accum: int, terms: dict[str, float]) -> None:
        t_load = time.perf_counter()
        batch = next(self.batches)  # the loader's fetch: decoding, augmenting and collating the batch
        self.load_s += time.perf_counter() - t_load
        losses = self.task.loss(batch, self.step, micro, self.autocast)
        if losses is None:
            return
        total = sum(v for k, v in losses.items() if k.endswith("_loss"))
        if not torch.isfinite(total):
            last_ckpt = latest_checkpoint(self.ckpt.root)
            raise TrainingDiverged(
                f"loss became {total.item()} at step {self.step + 1}; last good checkpoint: "
                f"{last_ckpt or 'none (no checkpoint written yet)'}; lower train.lr or raise train.warmup_steps")
        (total / accum).backward()
        self.task.after_backward()
        for k, v in losses.items():
            terms[k] = terms.get(k, 0.0) + float(v.detach()) / accum

    def optimizer_step(self) -> None:
        accum = int(self.cfg.grad_accum)
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        t_step = time.perf_counter()
        for micro in range(accum):
            self.micro_step(micro, accum, terms)
        if dist_utils.world_size() > 1:  # rank 0 logs the global batch's loss, not its own share's
            terms = dist_utils.mean_over_ranks(terms)
        t0 = time.perf_counter()
        modules = self.task.modules()
        if dist_utils.world_size() > 1:  # modules outside DDP (the loss's projector): average by hand
            for name, m in modules.items():
                if name != self.task.name:
                    dist_utils.all_reduce_grads(m.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in self.optimizer.param_groups for p in g["params"]], float(self.cfg.clip_grad) or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.task.after_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.optim_s += time.perf_counter() - t0
        self.step += 1
        dt = time.perf_counter() - t_step
        self.step_s += dt
        self.last = {**terms, "loss": sum(v for k, v in terms.items() if k.endswith("_loss")),
                     "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                     "images_per_s": self.task.samples_per_step / max(dt, 1e-9), "step": self.step}
        self.loggers.step(self.last)

    def maybe_evaluate(self) -> None:
        every, steps = int(self.cfg.eval_every or 0), int(self.cfg.steps)
        if self.evaluate is None or not every or not (self.step % every == 0 or self.step == steps):
            return
        model = unwrap(self.task.model)
        model.eval()
        res = self.evaluate(model) if self.main else {}
        model.train()
        self.loggers.evaluation(self.step, res)
        if self.main:
            keep, self.stopped_early = self.early.update(self.step, res)
            if keep:
                save_weights(self.task.model, self.out_dir / f"best_{self.task.name}.safetensors")
        self.stopped_early = dist_utils.broadcast_flag(self.stopped_early)

    def maybe_checkpoint(self) -> None:
        every = int(self.cfg.ckpt_every or 0)
        if every and (self.step % every == 0 or self.step == int(self.cfg.steps) or self.stopped_early):
            data = self.task.data_state() if hasattr(self.task, "data_state") else None  # a collective: every rank
            if self.main:
                extra = {**self.early.state(), **({"data": data} if data is not None else {})}
                self.ckpt.save(self.step, self.optimizer, self.scheduler, extra)
            dist_utils.barrier()

    def run(self) -> None:
        stop_after = self.cfg.stop_after_steps
        try:
            while self.step < int(self.cfg.steps):
                if stop_after is not None and self.step - self.start_step >= int(stop_after):
                    break
                self.optimizer_step()
                self.maybe_evaluate()
                self.maybe_checkpoint()
                if self.stopped_early:
                    break
        finally:
            self.loggers.close()
        self.restore_best()

    def restore_best(self) -> None:
        """With early stopping configured, the run hands on its best evaluated weights, whether it
        stopped early or ran to the end past its best (a run stopped by stop_after_steps keeps its
        last weights: it resumes from them)."""
        best = self.out_dir / f"best_{self.task.name}.safetensors"
        best_step = dist_utils.broadcast_object(self.early.best_step)
        if best_step is None or best_step == self.step or not best.exists():
            return
        if not self.stopped_early and self.step < int(self.cfg.steps):
            return
        from safetensors.torch import load_file

        log.info("restoring the best weights, step %d (%s), over the last, step %d", best_step,
                 self.early.metric, self.step)
        unwrap(self.task.model).load_state_dict(load_file(str(best), device=str(self.device)))
        self.restored_best = True


def fit(task: Task, cfg: EngineConfig, out_dir: str | Path, device: torch.device,
        evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None) -> dict[str, Any]:
    """Train ``task`` for ``cfg.steps`` optimizer steps (resuming per ``cfg.resume``); returns the
    run's figures, the task's own (``task.stats()``) merged in."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    r = _Run(task, cfg, out_dir, device, evaluate)
    r.run()
    elapsed = time.perf_counter() - t_start
    run_steps = max(1, r.step - r.start_step)
    stats = task.stats()
    result = {
        "steps": r.step,
        "resumed_from_step": r.start_step if r.resumed_from is not None else None,
        "final_loss": r.last.get("loss"),
        **{f"final_{k}": v for k, v in r.last.items() if k.endswith("_loss")},
        **{k: v for k, v in stats.items() if k != "timers"},
        "seconds": round(elapsed, 2),
        # optimizer steps only: setup, evaluation and checkpoints are in "seconds", not here
        "step_ms": round(1000 * r.step_s / run_steps, 2),
        "step_time_split_ms": {k: round(1000 * v / run_steps, 2)
                               for k, v in {"load": r.load_s, **stats.get("timers", {}), "optim": r.optim_s}.items()},
        "precision": r.precision,
        "world_size": dist_utils.world_size(),
        "early_stopped": r.stopped_early,
        "best_step": r.early.best_step,
        "restored_best": r.restored_best,
    }
    if "images_seen" in stats:
        result["images_per_s"] = round(stats["images_seen"] / max(elapsed, 1e-9), 2)
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return result
