"""Where the loop's numbers go: a progress bar, ``metrics.jsonl`` and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from tqdm import tqdm


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop the records a killed run wrote after its last checkpoint (``step > last_step``), so a
    resumed run's metrics.jsonl holds every step once. Returns the number of records dropped."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by the kill
            dropped += 1
            continue
        if int(rec.get("step", 0)) > last_step:
            dropped += 1
        else:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return dropped


class Loggers:
    """Progress bar, JSONL and TensorBoard together. On a resume the steps a killed run logged
    after its last checkpoint are dropped from both files, so each step appears once."""

    def __init__(self, out_dir: Path, *, enabled: bool, steps: int, start_step: int, resumed: bool,
                 log_every: int, progress: bool, tensorboard: bool) -> None:
        self.enabled, self.steps, self.log_every = enabled, steps, max(1, int(log_every))
        self.bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", disable=not (enabled and progress))
        self.writer = None
        self.file = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if resumed else None)
            except ImportError:  # tensorboard is optional
                self.writer = None
        if resumed:
            truncate_metrics(out_dir / "metrics.jsonl", start_step)
        self.file = (out_dir / "metrics.jsonl").open("a")

    def _write(self, record: Mapping[str, Any], prefix: str, step: int) -> None:
        self.file.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.writer:
            for k, v in record.items():
                if k != "step":
                    self.writer.add_scalar(f"{prefix}{k}", v, step)

    def step(self, record: Mapping[str, Any]) -> None:
        """One optimizer step's record (with "step", "loss", "lr", "images_per_s")."""
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.0f}")
        step = record["step"]
        if step % self.log_every == 0 or step == self.steps:
            self._write(record, "train/", step)

    def evaluation(self, step: int, results: Mapping[str, float]) -> None:
        if self.enabled:
            self.file.write(json.dumps({"step": step, **{f"val/{k}": v for k, v in results.items()}}) + "\n")
            self.file.flush()
            if self.writer:
                for k, v in results.items():
                    self.writer.add_scalar(f"val/{k}", v, step)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()
