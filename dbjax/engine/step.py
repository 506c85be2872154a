"""The train step of one block: a pure function, the same for every task.

  (block state, shared state, batch, key, interval) -> (block state, shared state, metrics)

task.loss(block params, shared params, batch, key, interval) -> (loss, metrics) is the
only task-specific part. The block and the shared group each clip their own gradients
and keep their own AdamW state; the shared group steps with every block's iterations
(with nothing shared, its state is empty and the step leaves it as it is). `interval` is
the block's training interval of the task's noise variable, traced, so one compiled step
serves every block. Jit it with both states donated (`jit_train_step`).
"""
import functools

import jax
import jax.numpy as jnp
import optax

from dbjax.engine.state import BlockState, learning_rate


def no_reduction(tree):
  """The identity: a step on one device combines nothing across shards."""
  return tree


def update(optimizer, state: BlockState, grads) -> BlockState:
  """One optimizer step of a state with its own optax state and step count."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return BlockState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)


def nan_unless_loss_finite(loss, grads):
  """grads, or NaN everywhere if the loss is NaN or inf, so that the NaN guard
  (engine.state.guarded), which reads the gradients, skips every step that step_metrics
  counts as skipped. The two can differ: an inf loss from squaring a huge but finite
  error has finite gradients."""
  return jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)


def step_metrics(loss, grads, **others) -> dict:
  """Loss, gradient norm and whether the update was skipped (a NaN or inf in the loss
  or the gradients; see engine.state.guarded)."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return dict(others, loss=loss, grad_norm=grad_norm,
              skipped=jnp.logical_not(finite).astype(jnp.float32))


def apply_step(optimizer, state: BlockState, grads, loss, metrics: dict):
  """(the state after one optimizer step, the step's metrics): step_metrics, and the
  learning rate of the update where the optimizer records it."""
  metrics = step_metrics(loss, grads, **metrics)
  state = update(optimizer, state, nan_unless_loss_finite(loss, grads))
  if (rate := learning_rate(state.opt_state)) is not None:
    metrics["learning_rate"] = rate
  return state, metrics


def train_step(task, state: BlockState, shared: BlockState, batch: tuple, key, interval,
               reduce=no_reduction):
  """One block's step; see the module docstring.

  reduce((loss and metrics, grads)) combines them across data-parallel shards before the
  update: dbjax.engine.parallel passes a mean over the mesh's "data" axis.
  """
  (loss, metrics), (block_grads, shared_grads) = reduce(jax.value_and_grad(
      task.loss, argnums=(0, 1), has_aux=True)(state.params, shared.params, batch, key,
                                               interval))
  if jax.tree.leaves(shared.params):  # (known when tracing) an empty one stays as it is
    shared = update(task.shared_optimizer, shared, nan_unless_loss_finite(loss, shared_grads))
  state, metrics = apply_step(task.optimizer, state, block_grads, loss, metrics)
  return state, shared, metrics


def jit_train_step(task):
  """train_step compiled once for all blocks; the block's and the shared state's buffers
  are donated."""
  return jax.jit(functools.partial(train_step, task), donate_argnums=(0, 1))
