"""The Task: everything particular to one of the paper's tasks, in one object.

The engine (dbjax.engine) keeps block states on the host, steps one block at a time or
all at once, checkpoints and logs, and never asks which task it runs. A Task tells it:

  init_block_params(key)          one block's parameters (its network of L/B layers)
  init_shared_params(key)         what all blocks share: a label or token embedding, or
                                  {} (images: blocks share nothing)
  loss(params, shared_params, batch, key, interval) -> (loss, metrics)
                                  one block's loss on a batch; interval = the block's
                                  training interval of the task's noise variable
  optimizer, shared_optimizer     each block's own optax transformation, and the shared
                                  group's
  num_blocks, intervals           B (1 for end-to-end) and each block's interval (B, 2)
  couples_blocks                  whether blocks share trained parameters (the driver then
                                  keeps the interleaved order of iterations)
  example_batch(batch_size)       a batch of the right shapes (profiling)
  check_batch(batch)              the batch, or a one-line DataError naming what is wrong
                                  (the Python API's check of a user's batch)
  sample(block_params, shared_params, key, inputs, num_steps, **options)
                                  the task's sampler or predictor (images from labels,
                                  labels from images, text from a prompt)
  evaluate(config, workdir, states, shared, data)
                                  metrics dict, with pictures or texts written to workdir
  write_samples(config, workdir, states, shared, data, seed, path=None)
                                  what experiments/sample.py draws

A task module (dbjax/tasks/*.py) exposes build(config) -> Task, load_data(config,
workdir=None) -> (config, RunData) and resolve(config) -> config (the data-derived fields
alone); dbjax.tasks maps config.task to it. docs/design.md shows how to add one.
"""
import dataclasses
from typing import Any, ClassVar, NamedTuple

import numpy as np
import optax

from dbjax import noise
from dbjax.errors import ConfigError


class RunData(NamedTuple):
  """A run's data sets: each has .num_examples and .batch(index) -> the batch tuple."""
  train: Any
  test: Any


class NoisePlan(NamedTuple):
  """The noise levels of a sigma-denoising task: EDM's distribution, the partition's
  kind and its B + 1 ascending boundaries (float64; block 0 owns the highest interval,
  noise.block_interval), and sigma_data."""
  dist: noise.NoiseDistribution
  partition: str
  boundaries: np.ndarray
  sigma_data: float


def noise_plan(config, num_blocks: int) -> tuple[NoisePlan, np.ndarray]:
  """(NoisePlan, widened training intervals (B, 2)) of a run with num_blocks blocks."""
  d = config.diffusion
  dist = noise.NoiseDistribution(d.p_mean, d.p_std, d.sigma_min, d.sigma_max)
  boundaries = noise.partition(d.partition, num_blocks, dist)
  # End-to-end training is one denoiser over the whole range: no overlap to add.
  gamma = d.overlap_gamma if num_blocks > 1 else 0.0
  intervals = noise.training_intervals(boundaries, gamma, d.sigma_min, d.sigma_max)
  return NoisePlan(dist, d.partition, boundaries, d.sigma_data), intervals


def sampling_plan(plan: NoisePlan, num_steps: int):
  """Host-side (float64) grid: sigmas (num_steps + 1,), descending and following the
  partition (noise.sampling_sigmas), and the block of each step (noise.block_of_sigma,
  the map training uses)."""
  sigmas = noise.sampling_sigmas(num_steps, plan.dist, plan.partition, plan.boundaries)
  return sigmas, noise.block_of_sigma(sigmas, plan.boundaries)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Task:
  """The base of every task; see the module docstring for what each member means."""
  num_blocks: int
  intervals: np.ndarray
  optimizer: optax.GradientTransformation
  shared_optimizer: optax.GradientTransformation

  # The training metric plotted per block in loss_curves.png.
  curve_metric = "loss"
  # The evaluation's headline key in metrics.json, and the keys experiments/compare.py
  # and sweep.py tabulate.
  headline_metric = ""
  summary_metrics: ClassVar[tuple] = ()
  # Command-line flags of experiments/evaluate.py and sample.py -> the config field each
  # sets for this task; a flag a task does not list is refused, naming the task.
  evaluate_flags: ClassVar[dict] = {}
  sample_flags: ClassVar[dict] = {}

  @property
  def couples_blocks(self) -> bool:
    """Whether blocks share trained parameters (then their iterations keep their order)."""
    return False

  def init_block_params(self, key):
    """A fresh block's parameters (its network of num_layers / B layers)."""
    raise NotImplementedError

  def init_shared_params(self, key):
    """What all blocks share; nothing by default."""
    del key
    return {}

  def loss(self, params, shared_params, batch: tuple, key, interval):
    """(loss, metrics dict) of one block with `params` on `batch`; interval: the block's
    training interval (lo, hi) of the task's noise variable, traced."""
    raise NotImplementedError

  def example_batch(self, batch_size: int, rng: np.random.Generator | None = None) -> tuple:
    """A batch of the task's shapes: zeros, or random values from `rng` (profiling)."""
    raise NotImplementedError

  def network(self, block_params, shared_params=None):
    """The nnx.Module of one block's params (and the shared ones it reads)."""
    raise NotImplementedError

  def target_embedding(self, shared_params):
    """The target space E with unit-norm rows, for tasks whose target is an embedded
    symbol (a label, a token)."""
    raise NotImplementedError(f"{type(self).__name__}'s target is not an embedding")

  def sample(self, block_params: list, shared_params, key, inputs, num_steps: int,
             **options):
    """The task's sampler or predictor over all B blocks, num_steps calls."""
    raise NotImplementedError

  def evaluate(self, config, workdir: str, states, shared, data: RunData,
               prefix: str = "") -> dict:
    """Metrics of a trained run; pictures or texts go to workdir with `prefix`."""
    return {}

  def evaluation_name(self, config) -> str:
    """The stem of experiments/evaluate.py's output files for this config."""
    return "eval"

  def check_train_data(self, config, train_data):
    """DataError, naming the problem, unless train_data fits this task and config."""

  def check_batch(self, batch) -> tuple:
    """The batch as a tuple; DataError, naming the array, unless it fits this task:
    shapes and dtypes always, values where they are concrete (dbjax.checks)."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)

  def write_run_files(self, workdir: str, train_data):
    """Files a later command needs to read this run's data as it trained (none here)."""

  def check_sample_flags(self, given: dict):
    """ConfigError, in one line, for a flag of sample_flags in `given` ({flag: value} a
    user passed) that this task's sampler, as configured, cannot act on: refused rather
    than echoed as if it changed something. Every flag acts by default."""

  def write_samples(self, config, workdir: str, states, shared, data: RunData, seed: int,
                    path: str | None = None) -> str:
    """Draw samples as the config says and write them to `path` (default: a file in
    workdir named by the settings); return the path."""
    raise ConfigError(f"config.task={config.task!r} draws no samples; evaluate the run "
                      "with experiments.evaluate")
