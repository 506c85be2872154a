"""Where a run's metrics go: train_metrics.jsonl (one row per iteration), TensorBoard
event files in <workdir>/tensorboard (tensorboardX; `tensorboard --logdir=<workdir>`),
and one console line per checkpoint interval.

Rows are dicts {"step", "block", "loss", "grad_norm", "skipped", ...}; each metric goes
to TensorBoard as block_<b>/<name> at its iteration, so every block gets its own curve.
"""
import json
import os

import numpy as np
from tqdm.auto import tqdm

from dbjax.config import flatten

TENSORBOARD_DIR = "tensorboard"


class MetricLog:
  """The writers of one run; on other processes than the chief, `enabled` is False and
  every method does nothing."""

  def __init__(self, workdir: str, jsonl_name: str, enabled: bool = True):
    self.jsonl_path = os.path.join(workdir, jsonl_name)
    self.enabled = enabled
    # Imported here, not with the package: only a training run writes event files.
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.writer = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR)) if enabled else None

  def write_rows(self, rows: list[dict]):
    """Append iteration rows to the JSONL file and to TensorBoard."""
    if not self.enabled:
      return
    with open(self.jsonl_path, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    for row in rows:
      for name, value in row.items():
        if name not in ("step", "block"):
          self.writer.add_scalar(f"block_{row['block']}/{name}", value, row["step"])
    self.writer.flush()

  def print_interval(self, done: int, total: int, rows: list[dict], metric: str = "loss",
                     unit: str = "iteration"):
    """One console line: iterations (or parallel steps: `unit`) done and each block's
    mean `metric` over `rows`."""
    if not self.enabled:
      return
    by_block = {}
    for row in rows:
      by_block.setdefault(row["block"], []).append(row[metric])
    means = "  ".join(f"block {b}: {np.nanmean(v):.4g}" for b, v in sorted(by_block.items()))
    tqdm.write(f"{unit} {done}/{total}  {metric}  {means}")

  def write_results(self, step: int, results: dict):
    """The evaluation's numbers (nested dicts flattened) as eval/<name> at `step`."""
    if not self.enabled:
      return
    for name, value in flatten(results).items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self.writer.add_scalar(f"eval/{name}", value, step)
    self.writer.flush()

  def close(self):
    """Flush and close the TensorBoard writer."""
    if self.writer is not None:
      self.writer.close()
