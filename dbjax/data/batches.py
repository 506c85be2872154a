"""The step-indexed batch order shared by every data set.

The examples of iteration `step` are a pure function of (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would, whatever the task.
"""
import numpy as np


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int,
                  block: int | None = None) -> np.ndarray:
  """Example indices of iteration `step`: a pure function of (seed, step), or, when all
  blocks train at every step (dbjax.engine.parallel), of (seed, step, block)."""
  rng = np.random.default_rng([seed, step] if block is None else [seed, step, block, 3])
  return rng.choice(num_examples, size=batch_size, replace=batch_size > num_examples)
