"""dbjax.engine.step: one block's train step is one optimizer update on the gradient of
its task's loss, the shared state left alone when the task shares nothing, and a
non-finite loss skips the update and says so."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbjax import data, tasks
from dbjax.engine import state as state_lib, step as step_lib
from tests.conftest import tiny_config


def _setup():
  task = tasks.build(tiny_config())
  states, shared = state_lib.init_on_host(task, seed=0)
  digits = data.load_images("digits", "train")
  batch = digits.batch(np.arange(8))
  return task, states[1], shared, batch, jnp.asarray(task.intervals[1])


def test_a_step_is_one_optimizer_update_on_the_loss_gradient():
  task, state, shared, batch, interval = _setup()
  key = jax.random.key(5)
  new, new_shared, metrics = step_lib.train_step(task, state, shared, batch, key, interval)
  (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(
      state.params, shared.params, batch, key, interval)
  updates, _ = task.optimizer.update(grads, state.opt_state, state.params)
  expected = optax.apply_updates(state.params, updates)
  for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert int(new.step) == 1 and float(metrics["skipped"]) == 0.0
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(grads), rtol=1e-5)
  assert jax.tree.leaves(new_shared.params) == []


def test_a_non_finite_loss_skips_the_update_and_counts_it():
  task, state, shared, batch, interval = _setup()
  images, labels = batch
  images = np.array(images)
  images[0, 0, 0, 0] = np.inf
  poisoned = (images, labels)
  new, _, metrics = step_lib.train_step(task, state, shared, poisoned, jax.random.key(5),
                                        interval)
  assert float(metrics["skipped"]) == 1.0
  for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(x, y)
