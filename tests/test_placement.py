"""dbjax.engine.placement: where a sequential run's blocks live. Born where they wait
with the values host init gives, waiting in pinned host memory (or as numpy) with the
sharding they train with while another block trains."""
import jax
import numpy as np
import pytest
from tqdm.auto import tqdm

from dbjax import data, engine, tasks
from dbjax.engine import driver, placement as placement_lib
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def digits():
  return data.load_images("digits", "train")


def test_blocks_are_born_where_they_wait_with_host_inits_values():
  config = tiny_config()
  task = tasks.build(config)
  placement = placement_lib.placement_of(task, config)
  states, _ = placement_lib.born_sharded(task, config.seed, placement)
  on_host, _ = engine.init_on_host(task, config.seed)
  for born, host in zip(states, on_host):
    for x, y in zip(jax.tree.leaves(born), jax.tree.leaves(host)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-9)
  kinds = {leaf.sharding.memory_kind for s in states for leaf in jax.tree.leaves(s)}
  assert kinds == {"pinned_host"}  # this CPU backend has the memory kind


@pytest.mark.parametrize("waiting_blocks", ["pinned_host", "numpy"])
def test_streamed_blocks_wait_where_configured(digits, waiting_blocks):
  """While a block trains, the others wait in pinned host memory (this CPU backend has
  that memory kind), with the block's own sharding, or as numpy; they stay there
  between intervals (checkpoints save them from there)."""
  config = tiny_config()
  config.diffusion.num_blocks = 3
  config.train.waiting_blocks = waiting_blocks
  task = tasks.build(config)
  placement = placement_lib.placement_of(task, config)
  states, shared = placement_lib.born_sharded(task, config.seed, placement)
  step_fn, seen = placement_lib.jit_sharded_step(task, placement), []

  def kind(leaf):
    return type(leaf).__name__ if isinstance(leaf, np.ndarray) else leaf.sharding.memory_kind

  def noting_step(state, *args):
    seen.append({kind(leaf) for s in states for leaf in jax.tree.leaves(s)})
    return step_fn(state, *args)
  chunk = np.arange(12)
  driver.train_interval(noting_step, states, shared, task, chunk, digits, config,
                        tqdm(disable=True), [0] * 3, lambda: False, placement, stream=True)
  waiting = "pinned_host" if waiting_blocks == "pinned_host" else "ndarray"
  assert waiting in set().union(*seen)
  assert {kind(leaf) for s in states for leaf in jax.tree.leaves(s)} == {waiting}
  if waiting_blocks == "pinned_host":
    for state in states:  # each leaf with the sharding it trains with, in host memory
      assert [leaf.sharding for leaf in jax.tree.leaves(state)] == jax.tree.leaves(
          placement.waiting)
