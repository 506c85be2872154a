"""Shared fixtures: a tiny config that trains in seconds on a CPU.

Every test process (the xdist workers and the command-line runs the tests start) shares
one persistent XLA compilation cache, so a computation compiled by one test is loaded, not
recompiled, by the next: most of the suite's time is compilation (a one-step run of a
config spends 14 of its 20 s there). The cache lives in .pytest_cache, so a fresh clone
(CI) starts it empty; JAX_COMPILATION_CACHE_DIR overrides the place.

They also compile with LLVM's optimisation of the generated CPU code turned off
(--xla_backend_optimization_level=0, appended to XLA_FLAGS unless it names a level): the
test programs are tiny, so that optimisation costs far more than it saves (measured: a
third to two fifths of a cold compile). It is below XLA's own passes, so the compiled
steps' buffers, and the memory figures the tests read, are the same.
"""
import os
import tempfile

import jax
import numpy as np
import pytest
from flax import nnx

from dbjax.config import default_config
from dbjax.nets import fused

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(_ROOT, ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # cache them all
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_pytests_directory(tmp_path_factory):
  """Every temporary file of the run, the command lines' it starts included, goes under
  pytest's own directory, which pytest prunes (it keeps the last three runs): tfds's
  DatasetInfo.initialize_from_bucket makes a tempfile.mkdtemp() it never removes, each
  time a test asks for a data set this machine does not hold."""
  directory = str(tmp_path_factory.mktemp("tempfiles"))
  saved = tempfile.tempdir, os.environ.get("TMPDIR")
  tempfile.tempdir = os.environ["TMPDIR"] = directory
  yield directory
  tempfile.tempdir = saved[0]
  if saved[1] is None:
    os.environ.pop("TMPDIR")
  else:
    os.environ["TMPDIR"] = saved[1]


def plain_modulated_norm(x, shift, scale):
  """DiT's adaLN as written: flax's LayerNorm without affine, then x (1 + scale) + shift
  (the reference dbjax.nets.fused's norm is tested against)."""
  norm = nnx.LayerNorm(x.shape[-1], epsilon=fused.LAYER_NORM_EPSILON, use_scale=False,
                       use_bias=False, rngs=nnx.Rngs(0))
  return norm(x) * (1 + scale) + shift


def shrink_model(config):
  """A narrow network, no progress bars, no evaluation: for runs that take seconds."""
  config.model.hidden_size = 32
  config.model.num_heads = 2
  config.model.frequency_dim = 32
  config.train.progress = False
  config.eval.enabled = False
  # Every test process has 8 fake devices (tests/test_parallel.py and test_mesh.py set
  # them at import); a run stays on one of them unless its test spreads it.
  config.parallel.mesh.data = 1
  return config


def tiny_config(**overrides):
  """A 4-layer, 2-block DiT on digits with a short schedule; eval off unless asked. A
  task= override gives that task's config (its own sections at their defaults)."""
  config = shrink_model(default_config(overrides.pop("task", "generation")))
  config.model.num_layers = 4
  config.diffusion.num_blocks = 2
  config.train.num_steps = 10
  config.train.batch_size = 32
  config.train.warmup_steps = 2
  config.train.checkpoint_every = 5
  if "sample" in config:
    config.sample.num_steps = 4
    config.sample.grid_size = 4
  config.eval.num_samples = 100
  config.eval.classifier_steps = 50
  for dotted, value in overrides.items():
    section, field = dotted.split("__") if "__" in dotted else (None, dotted)
    setattr(config[section] if section else config, field, value)
  return config


@pytest.fixture
def config():
  return tiny_config()


def assert_rows_follow_their_own_prompts(continued, prompts, vocab_size: int):
  """continued(prompts, seed) -> (N, length) ids, as a task's continue_prompts: each row
  starts with its prompt and depends on it alone (another prompt in row 0 leaves the
  other rows as they were), the same seed gives the same rows and another seed others.
  Returns the rows of seed 0."""
  rows = continued(prompts, 0)
  np.testing.assert_array_equal(rows[:, :prompts.shape[1]], prompts)
  np.testing.assert_array_equal(continued(prompts, 0), rows)
  assert not np.array_equal(continued(prompts, 1), rows)
  other = prompts.copy()
  other[0] = (other[0] + 1) % vocab_size
  changed = continued(other, 0)
  np.testing.assert_array_equal(changed[1:], rows[1:])
  assert not np.array_equal(changed[0], rows[0])
  return rows
