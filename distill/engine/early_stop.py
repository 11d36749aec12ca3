"""Stop when an evaluation metric has not improved for ``patience`` evaluations."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from distill.errors import UserError

log = logging.getLogger(__name__)


class EarlyStopping:
    """``{metric, patience, mode}`` (train.early_stop); an empty mapping never stops. Its state
    (best value, evaluations without improvement, best step) travels in checkpoints."""

    def __init__(self, spec: Mapping[str, Any] | None, state: Mapping[str, Any] | None = None) -> None:
        spec = dict(spec or {})
        self.metric = spec.get("metric")
        self.patience = int(spec.get("patience", 3))
        self.sign = 1.0 if spec.get("mode", "max") == "max" else -1.0
        state = state or {}
        self.best, self.bad_evals, self.best_step = state.get("best"), state.get("bad_evals", 0), state.get("best_step")

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals, "best_step": self.best_step}

    def update(self, step: int, results: Mapping[str, float]) -> tuple[bool, bool]:
        """(keep, stop) after an evaluation at ``step``: keep = these weights are the best so far.
        Patience counts evaluations without a strict improvement, but a tie with the best moves the
        best to the later weights: a metric counted on a few hundred images ties often, and the later
        weights have trained longer (to the end of the schedule, when the last evaluation ties)."""
        if not self.metric:
            return False, False
        if self.metric not in results:
            raise UserError(f"train.early_stop.metric={self.metric} is not an evaluation metric; known: {sorted(results)}")
        val = self.sign * results[self.metric]
        if self.best is None or val > self.best:
            self.best, self.bad_evals, self.best_step = val, 0, step
            return True, False
        tie = val == self.best
        if tie:
            self.best_step = step
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            log.info("early stop at step %d: %s did not improve for %d evaluations", step, self.metric, self.bad_evals)
            return tie, True
        return tie, False
