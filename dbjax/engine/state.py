"""A block's state and optimizer, and making every block's state in host memory.

A block's state is a plain pytree, BlockState(params, opt_state, step), with its own
optax state: an inactive block gets no update, no momentum and no weight decay, and its
step count (which drives its learning-rate schedule) does not move. The shared state
(a label or token embedding that blocks agree on; empty for images) has the same form
and its own optimizer (paper, Sec. 4; docs/method.md, "Shared parameters").

What a state holds comes from the task (dbjax.tasks): task.init_block_params(key),
task.init_shared_params(key), task.optimizer and task.shared_optimizer.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class BlockState(NamedTuple):
  params: Any
  opt_state: optax.OptState
  step: jax.Array


# optax.apply_if_finite applies the update anyway after this many non-finite ones in a
# row; the driver stops or counts long before (config train.on_nonfinite).
_NEVER = 2**31 - 1


def learning_rate_schedule(peak: float, warmup_steps: int, num_updates: int) -> optax.Schedule:
  """Linear warmup to `peak` over warmup_steps updates, then cosine decay to peak / 10
  at num_updates (the updates the block gets)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(num_updates, warmup_steps + 1), end_value=0.1 * peak)


def guarded(optimizer: optax.GradientTransformation,
            grad_clip: float | None) -> optax.GradientTransformation:
  """`optimizer` behind global-norm clipping at grad_clip (None: no clipping) and a NaN
  guard: a step whose gradients hold a NaN or inf changes neither the parameters nor
  the optimizer's state."""
  if grad_clip is not None:
    optimizer = optax.chain(optax.clip_by_global_norm(grad_clip), optimizer)
  return optax.apply_if_finite(optimizer, max_consecutive_errors=_NEVER)


class LearningRateState(NamedTuple):
  count: jax.Array          # updates seen
  learning_rate: jax.Array  # the schedule's value at the last one


def record_learning_rate(schedule: optax.Schedule) -> optax.GradientTransformation:
  """Leaves the updates as they are and keeps schedule(count) of the last update in its
  state, where the metrics read it. (optax.inject_hyperparams would record it too, but
  its updates differ from adamw(schedule)'s in the last bit, and the measured runs in
  the docs' results tables were made with the latter.)"""
  def init(params):
    del params
    return LearningRateState(jnp.zeros([], jnp.int32), jnp.asarray(schedule(0), jnp.float32))

  def update(updates, state, params=None):
    del params
    return updates, LearningRateState(state.count + 1,
                                      jnp.asarray(schedule(state.count), jnp.float32))
  return optax.GradientTransformation(init, update)


def adamw(train_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with the config's moments and decay, on `schedule`, recording its rate."""
  return optax.chain(optax.adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
                                 weight_decay=train_cfg.weight_decay),
                     record_learning_rate(schedule))


def make_optimizer(train_cfg, num_updates: int | None = None) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay over `num_updates` updates (default
  train.num_steps: about the updates each block gets), guarded (clipping at
  train.grad_clip, the NaN guard). The learning rate of the last update sits in the
  optimizer's state, where the metrics read it."""
  num_updates = train_cfg.num_steps if num_updates is None else num_updates
  schedule = learning_rate_schedule(train_cfg.learning_rate, train_cfg.warmup_steps,
                                    num_updates)
  return guarded(adamw(train_cfg, schedule), train_cfg.grad_clip)


def learning_rate(opt_state):
  """The learning rate of a state's last update, where its optimizer records it (as
  make_optimizer's does, or optax.inject_hyperparams); None where it does not."""
  # The value, not the schedule's own state that inject_hyperparams keeps beside it.
  return optax.tree_utils.tree_get(opt_state, "learning_rate",
                                   filtering=lambda _, value: hasattr(value, "dtype"))


def shared_optimizer(train_cfg, num_updates: int, trained: Any) -> optax.GradientTransformation:
  """The shared group's optimizer: make_optimizer on the leaves `trained` labels
  "train", zero updates on those labelled "frozen" (a pytree prefix of the params, or a
  function of them, as optax.multi_transform takes)."""
  return optax.multi_transform({"train": make_optimizer(train_cfg, num_updates),
                                "frozen": optax.set_to_zero()}, trained)


def new_state(optimizer, params) -> BlockState:
  """Fresh state of `params`: the optimizer's initial state, step 0."""
  return BlockState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def init_block(task, key) -> BlockState:
  """A fresh block: the task's parameters, its own optimizer state, step 0."""
  return new_state(task.optimizer, task.init_block_params(key))


def init_shared(task, key) -> BlockState:
  """The fresh shared state (empty for tasks whose blocks share nothing)."""
  return new_state(task.shared_optimizer, task.init_shared_params(key))


def has_shared(task) -> bool:
  """Whether the task's blocks share any parameters (else the shared state is empty and
  is neither saved nor moved)."""
  return bool(jax.tree.leaves(jax.eval_shape(task.init_shared_params, jax.random.key(0))))


def init_on_host(task, seed: int) -> tuple[list[BlockState], BlockState]:
  """(all B blocks' states, the shared state), made one at a time into host memory.

  One compiled init serves every block, and each block goes to host memory before the
  next is made, so at most one block is ever on the accelerator. Block b's key is
  fold_in(seed, b); the shared state's is block index B's, so it never repeats a block's.
  """
  return init_blocks_on_host(task, seed, range(task.num_blocks)), init_shared_on_host(task, seed)


def init_blocks_on_host(task, seed: int, blocks) -> list[BlockState]:
  """The fresh states of `blocks` (indices), one at a time into host memory, as
  init_on_host makes them: block b from fold_in(key(seed), b)."""
  init = jax.jit(lambda key: init_block(task, key))
  base = jax.random.key(seed)
  return [jax.device_get(init(jax.random.fold_in(base, b))) for b in blocks]


def init_shared_on_host(task, seed: int) -> BlockState:
  """The fresh shared state in host memory, as init_on_host makes it."""
  return jax.device_get(jax.jit(lambda key: init_shared(task, key))(
      jax.random.fold_in(jax.random.key(seed), task.num_blocks)))


def abstract_states(task) -> tuple[BlockState, BlockState]:
  """(one block's state, the shared state) as shapes and dtypes, allocating nothing."""
  return (jax.eval_shape(lambda: init_block(task, jax.random.key(0))),
          jax.eval_shape(lambda: init_shared(task, jax.random.key(0))))
