"""dbjax.engine.driver: the schedule, the block-regrouped loop against the paper's
interleaved order, one compiled step for every iteration."""
import chex
import jax
import numpy as np
import optax
import pytest

from dbjax import config as config_lib, data, engine, tasks, train
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def digits():
  return data.load_images("digits", "train")


def interleaved_reference(config, train_data):
  """Train the paper's way, one iteration at a time in order, recording that every
  step leaves the inactive blocks bit-identical."""
  model = tasks.build(config)
  states, shared = engine.init_on_host(model, config.seed)
  step_fn = engine.jit_train_step(model)
  for step in range(config_lib.total_iterations(config)):
    b = train.block_for_step(config.seed, step, model.num_blocks)
    before = [jax.tree.map(np.copy, s) for s in states]
    index = data.batch_indices(config.seed, step, len(train_data.labels),
                               config.train.batch_size)
    new, shared, _ = step_fn(jax.device_put(states[b]), jax.device_put(shared),
                             train_data.batch(index), train.step_key(config.seed, step, b),
                             jax.numpy.asarray(model.intervals[b]))
    states[b] = jax.device_get(new)
    for other in range(model.num_blocks):
      if other != b:
        chex.assert_trees_all_equal(states[other], before[other])
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(states[b]),
                                                         jax.tree.leaves(before[b])))
  return states


@pytest.mark.parametrize("stream_blocks,waiting_blocks",
                         [(True, "pinned_host"), (True, "numpy"), (False, "numpy")])
def test_regrouped_driver_equals_interleaved_training(tmp_path, digits, stream_blocks,
                                                       waiting_blocks):
  """Regrouped by block, and with the next block streamed to the device while one trains
  (waiting in pinned host memory or as numpy), or each sent there and back
  synchronously: the interleaved order's parameters."""
  config = tiny_config()
  config.train.num_steps = 6  # 12 iterations over 2 blocks, 3 checkpoint intervals
  config.train.stream_blocks = stream_blocks
  config.train.waiting_blocks = waiting_blocks
  _, states, _, history = train.train(config, str(tmp_path), digits)
  chex.assert_trees_all_equal(states, interleaved_reference(config, digits))
  # Each block's own step count is the number of iterations it was drawn for.
  draws = [train.block_for_step(0, s, 2) for s in range(12)]
  for b in range(2):
    assert int(states[b].step) == draws.count(b)
    # AdamW's own counts (its moments' and its schedule's, and the recorded rate's).
    counts = optax.tree_utils.tree_get_all_with_path(states[b].opt_state, "count")
    assert len(counts) >= 3 and {int(c) for _, c in counts} == {draws.count(b)}
  assert [r["step"] for r in history] == list(range(12))


def test_schedule_is_uniform_over_blocks():
  draws = np.array([train.block_for_step(3, s, 4) for s in range(4000)])
  counts = np.bincount(draws, minlength=4)
  assert np.all(np.abs(counts - 1000) < 120)



def test_a_run_compiles_its_train_step_once(tmp_path, caplog):
  """Every iteration of every block, the first included, runs one compiled step: the
  shared state goes to the device as the blocks do (a plain device_put of it made the
  first call's arguments differ from the step's own outputs, and XLA compiled the step
  a second time for the second call)."""
  with jax.log_compiles(), caplog.at_level("WARNING"):
    train.train(tiny_config(), str(tmp_path))
  compiles = [r for r in caplog.records if "Compiling jit(sharded_train_step)" in r.getMessage()]
  assert len(compiles) == 1
