"""dbjax.engine.saved_runs: what a run checkpoints (one item per block, the shared state
when the task has one, one copy per block in parallel mode) and its restore, which
gives back the states the run ended with."""
import jax
import numpy as np

from dbjax import tasks, train
from dbjax.engine import saved_runs
from tests.conftest import tiny_config


def test_a_run_checkpoints_one_item_per_block_and_a_shared_state_when_it_has_one():
  config = tiny_config()
  targets = saved_runs.checkpoint_targets(tasks.build(config), config)
  assert sorted(targets) == ["block_0", "block_1"]  # images: the blocks share nothing
  classes = tiny_config(task="classification")
  classes.classifier.label_embedding = "joint"
  targets = saved_runs.checkpoint_targets(tasks.build(classes), classes)
  assert sorted(targets) == ["block_0", "block_1", "shared"]
  classes.parallel.mode = "blocks"  # each block's own copy of the shared state
  stacked = saved_runs.checkpoint_targets(tasks.build(classes), classes)["shared"]
  one = targets["shared"]
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(one)):
    assert a.shape == (2, *b.shape)


def test_restore_gives_back_the_states_a_run_ended_with(tmp_path):
  config = tiny_config()
  run = train.train(config, str(tmp_path))
  task = tasks.build(config)
  checkpointer = saved_runs.checkpointer_of(task, config, str(tmp_path))
  step, states, shared, meta = saved_runs.restore(task, config, checkpointer)
  checkpointer.close()
  assert step == 2 * config.train.num_steps and meta["config"]["task"] == "generation"
  for restored, ended in zip(states, run.states):
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(ended)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert jax.tree.leaves(shared.params) == []
