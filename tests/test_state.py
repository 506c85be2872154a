"""dbjax.engine.state: each block's own optimizer and state. The schedule's closed form,
the NaN guard, the recorded learning rate, and host init's per-block keys."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dbjax import tasks
from dbjax.engine import state as state_lib
from tests.conftest import tiny_config


def test_the_schedule_warms_up_linearly_then_decays_by_a_cosine_to_a_tenth():
  schedule = state_lib.learning_rate_schedule(1e-3, warmup_steps=10, num_updates=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5e-3)
  assert float(schedule(10)) == pytest.approx(1e-3)
  # Half-way through the cosine: the mean of the peak and the end value.
  assert float(schedule(60)) == pytest.approx(0.55e-3, rel=1e-5)
  assert float(schedule(110)) == pytest.approx(1e-4)


def test_the_guard_leaves_params_and_state_alone_on_a_non_finite_gradient():
  optimizer = state_lib.guarded(optax.sgd(0.1), grad_clip=1.0)
  state = state_lib.new_state(optimizer, {"w": jnp.ones(3)})
  bad = {"w": jnp.array([1.0, jnp.nan, 0.0])}
  from dbjax.engine.step import update  # pylint: disable=g-import-not-at-top
  after = update(optimizer, state, bad)
  np.testing.assert_array_equal(after.params["w"], state.params["w"])
  good = update(optimizer, after, {"w": jnp.array([3.0, 4.0, 0.0])})  # norm 5: clipped to 1
  np.testing.assert_allclose(good.params["w"], [1 - 0.1 * 0.6, 1 - 0.1 * 0.8, 1.0],
                             rtol=1e-6)
  assert int(good.step) == 2  # the skipped update counts as a step of the block


def test_make_optimizer_records_the_rate_of_its_last_update():
  config = tiny_config()
  config.train.learning_rate, config.train.warmup_steps = 1e-2, 4
  optimizer = state_lib.make_optimizer(config.train)
  state = state_lib.new_state(optimizer, {"w": jnp.zeros(2)})
  from dbjax.engine.step import update  # pylint: disable=g-import-not-at-top
  for _ in range(3):
    state = update(optimizer, state, {"w": jnp.ones(2)})
  # Updates 0, 1, 2 ran at the schedule's 0, 1, 2: the last one's rate is 2 / 4 of 1e-2.
  assert float(state_lib.learning_rate(state.opt_state)) == pytest.approx(0.5e-2)


def test_host_init_makes_block_b_from_fold_in_of_the_seed():
  task = tasks.build(tiny_config())
  states, shared = state_lib.init_on_host(task, seed=3)
  assert len(states) == task.num_blocks
  for b, state in enumerate(states):
    again = state_lib.init_block(task, jax.random.fold_in(jax.random.key(3), b))
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(again)):  # (jit: last bits)
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-9)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(states[0].params),
                                                      jax.tree.leaves(states[1].params)))
  assert not state_lib.has_shared(task) and jax.tree.leaves(shared.params) == []
