"""Where a run's metrics go: train_metrics.jsonl (one row per iteration), TensorBoard
event files in <workdir>/tensorboard (tensorboardX; `tensorboard --logdir=<workdir>`),
and one console line per checkpoint interval.

Rows are dicts {"step", "block", "loss", "grad_norm", "skipped", "learning_rate", ...}
("step" is TensorBoard's name for its axis: the iteration, or the parallel step); each
metric goes to TensorBoard as block_<b>/<name> at its iteration, so every block gets its
own curve. Throughput goes as throughput/*, the evaluation's numbers as eval/* and the
run's pictures as images.

A resumed run logs again the iterations after its checkpoint: the JSONL file drops its
rows past the checkpoint (driver.read_history), and the TensorBoard writer is opened
with purge_step, which makes TensorBoard discard the earlier events from that step on,
so every (tag, step) has one point after any number of resumes.
"""
import json
import os
import time

import numpy as np
from tqdm.auto import tqdm

from dbjax.config import flatten

TENSORBOARD_DIR = "tensorboard"


class MetricLog:
  """The writers of one run; on other processes than the chief, `enabled` is False and
  every method does nothing."""

  def __init__(self, workdir: str, jsonl_name: str, enabled: bool = True,
               purge_step: int | None = None):
    """purge_step: the iteration the run (re)starts at (see the module docstring)."""
    self.jsonl_path = os.path.join(workdir, jsonl_name)
    self.enabled = enabled
    self.writer = None
    if enabled:
      # Imported here, not with the package: only a training run writes event files.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # tensorboardX names the file by the second it opens it, so a run resumed within
      # that second would write over the stopped run's file; the nanoseconds make each
      # name new, and TensorBoard reads the files in name order, the resumed one last.
      self.writer = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                  purge_step=purge_step,
                                  filename_suffix=f".{time.time_ns()}")

  def write_rows(self, rows: list[dict], tensorboard_only: bool = False):
    """Append iteration rows to the JSONL file (unless tensorboard_only) and to
    TensorBoard."""
    if not self.enabled:
      return
    if not tensorboard_only:
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

  def write_throughput(self, step: int, counted: int, seconds: float, batch_size: int,
                       unit: str = "iteration"):
    """`counted` iterations (or parallel steps: `unit`) of `batch_size` examples each
    took `seconds`: their rate and the examples per second, at `step`."""
    if not self.enabled or seconds <= 0:
      return
    self.writer.add_scalar(f"throughput/{unit}s_per_second", counted / seconds, step)
    self.writer.add_scalar("throughput/examples_per_second", counted * batch_size / seconds,
                           step)
    self.writer.flush()

  def write_pictures(self, step: int, paths: list[str]):
    """PNG files (samples, loss curves, confusion matrix, ...) as images/<file stem>."""
    if not self.enabled or not paths:
      return
    from matplotlib import image  # pylint: disable=g-import-not-at-top
    for path in paths:
      pixels = image.imread(path)[..., :3]  # RGB in [0, 1]; the alpha channel dropped
      self.writer.add_image(f"images/{os.path.splitext(os.path.basename(path))[0]}", pixels,
                            step, dataformats="HWC")
    self.writer.flush()

  def write_text(self, step: int, tag: str, text: str):
    """A text (generated samples) at `step`, shown in TensorBoard's text tab."""
    if self.enabled:
      self.writer.add_text(tag, text, step)
      self.writer.flush()

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
