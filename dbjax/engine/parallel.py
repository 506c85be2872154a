"""All B blocks at once, each on its own slice of a ("block", "data") device mesh.

DiffusionBlocks' blocks share no activations and, for images, no parameters
(docs/method.md, "Shared parameters"), so with parallel.mode="blocks" every step trains
all B blocks, each on its own batch, and the compiled step has no collective across the
"block" axis (tests/test_parallel.py reads the HLO to check, with experiments/hlo.py).
Within a block the batch is split over the "data" axis, and the mean of the gradients
over that axis is the step's only collective.

Mesh: jax.make_mesh((G, N // G), ("block", "data")) with G the largest divisor of B that
is at most the number of devices N: (B, N // B) when there are at least B devices. With
fewer, each device trains its B / G blocks one after another (lax.scan), so the same run
resumes on any device count down to one.

Schedule: step s trains block b on the batch data.batch_indices(seed, s, block=b) with
the key train.step_key(seed, s, b), both pure functions, so a run's parameters do not
depend on G. They do depend on the data width (N // G) when it is above one: each data
shard then draws its own noise (its index is folded into the key).

Shared parameters (label or token embeddings, shared modules): every block keeps its own
copy with its own optimizer state. Frozen ones never change, so no communication at
all; trained ones are averaged over the blocks every parallel.shared_sync_every steps by
a second compiled step with one all-reduce of their size.

Host memory holds all blocks' states, as in dbjax.train; the devices hold each block's
state on its own slice. On many hosts (after jax.distributed.initialize) each host builds
only the batches of the blocks on its devices; checkpoints gather every block to every
host (numpy), so a checkpoint is the same orbax layout as a one-device run's.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dbjax.data.batches import batch_indices
from dbjax.engine import state as state_lib
from dbjax.engine.step import no_reduction, train_step
from dbjax.errors import ConfigError

BLOCK, DATA = "block", "data"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all")


def mesh_shape(num_blocks: int, num_devices: int) -> tuple[int, int]:
  """(block groups G, data width): G the largest divisor of B with G <= num_devices."""
  groups = max(g for g in range(1, num_blocks + 1) if num_blocks % g == 0 and g <= num_devices)
  return groups, num_devices // groups


def make_mesh(num_blocks: int, devices=None) -> jax.sharding.Mesh:
  """The ("block", "data") mesh of `devices` (default: all) for B blocks."""
  devices = list(jax.devices() if devices is None else devices)
  groups, width = mesh_shape(num_blocks, len(devices))
  return jax.make_mesh((groups, width), (BLOCK, DATA), axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:groups * width])


def stack(trees: list):
  """One tree with a leading axis from a list of trees of numpy arrays."""
  return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def unstack(tree, n: int) -> list:
  """The n trees of numpy arrays (0-d ones too, which orbax saves) along the first axis."""
  return [jax.tree.map(lambda leaf: np.asarray(leaf[i]), tree) for i in range(n)]


def init_on_host(task, seed: int):
  """(all blocks' host states, the host shared state stacked over the blocks): a fresh
  run's states in the form BlockParallelTrainer and its checkpoints take."""
  states, shared = state_lib.init_on_host(task, seed)
  return states, stack([shared] * task.num_blocks)


def stacked_abstract(tree, n: int):
  """Abstract `tree` with a leading axis of n (a checkpoint target)."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct((n, *s.shape), s.dtype), tree)


def put(host_tree, mesh, spec: P):
  """Host arrays -> global arrays sharded by `spec`; each host copies only the shards
  of its own devices (works the same on one host and on many)."""
  sharding = NamedSharding(mesh, spec)
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda index: np.asarray(x[index])), host_tree)


def gather(tree):
  """Global arrays -> full numpy arrays on every host."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _average_over_blocks(tree):
  """Every block's copy replaced by the mean over all blocks' copies."""
  def average(x):
    mean = jax.lax.pmean(jnp.mean(x, axis=0), BLOCK)
    return jnp.broadcast_to(mean, x.shape)
  return jax.tree.map(average, tree)


def make_step(task, mesh, sync_shared: bool = False):
  """The compiled parallel step (states, shared, batch, key_data, intervals) ->
  (states, shared, metrics), every argument and result stacked over the B blocks.

  task: a dbjax.tasks.Task (engine.step.train_step steps it). batch: the task's batch
  tuple with shapes (B, batch_size, ...); key_data: (B, 2) uint32 raw keys.
  sync_shared: also average the shared parameters over the blocks at the end.
  """
  width = mesh.shape[DATA]

  def mean_over_data(outputs):
    # Under shard_map the gradient of parameters that all data shards hold is already
    # summed over "data" (the transpose of their implicit broadcast, "psum_invariant" in
    # the HLO): dividing by the width makes it the gradient of the mean loss. The loss
    # and metrics are per shard, so they are averaged.
    value, grads = outputs
    return jax.lax.pmean(value, DATA), jax.tree.map(lambda g: g / width, grads)
  reduce = mean_over_data if width > 1 else no_reduction

  def train_block(_, inputs):
    state, shared, batch, key_data, interval = inputs
    key = jax.random.wrap_key_data(key_data)
    if width > 1:  # each data shard draws its own noise for its own examples
      key = jax.random.fold_in(key, jax.lax.axis_index(DATA))
    return None, train_step(task, state, shared, batch, key, interval, reduce=reduce)

  def local_blocks(states, shared, batch, key_data, intervals):
    # This device's B / G blocks, one after another: one at a time in activations.
    _, (states, shared, metrics) = jax.lax.scan(
        train_block, None, (states, shared, batch, key_data, intervals))
    if sync_shared:
      shared = shared._replace(params=_average_over_blocks(shared.params))
    return states, shared, metrics

  # With one device per data group the batch is not split, and nothing varies over
  # "data" (so shard_map can see the results are the same on the whole group).
  blocks, rows = P(BLOCK), P(BLOCK, DATA) if width > 1 else P(BLOCK)
  return jax.jit(jax.shard_map(local_blocks, mesh=mesh,
                               in_specs=(blocks, blocks, rows, blocks, blocks),
                               out_specs=(blocks, blocks, blocks)),
                 donate_argnums=(0, 1))


def step_key_data(seed: int, step: int, num_blocks: int) -> np.ndarray:
  """(B, 2) raw keys of step `step`: block b's is train.step_key(seed, step, b)."""
  base = jax.random.fold_in(jax.random.key(seed), step)
  return np.asarray(jax.random.key_data(
      jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(num_blocks))))


def global_batch(train_data, mesh, seed: int, step: int, num_blocks: int, batch_size: int):
  """The batch of every block at `step`, shape (B, batch_size, ...), sharded
  ("block", "data"); this host loads only its own devices' blocks."""
  sharding = NamedSharding(mesh, P(BLOCK, DATA) if mesh.shape[DATA] > 1 else P(BLOCK))
  own = sorted({b for index in sharding.addressable_devices_indices_map(
      (num_blocks, batch_size)).values() for b in range(num_blocks)[index[0]]})
  batches = {b: train_data.batch(batch_indices(
      seed, step, train_data.num_examples, batch_size, block=b)) for b in own}
  def leaf(i):
    example = batches[own[0]][i]
    def shard(index):
      return np.stack([batches[b][i] for b in range(num_blocks)[index[0]]])[
          (slice(None), *index[1:])]
    return jax.make_array_from_callback((num_blocks, *example.shape), sharding, shard)
  return tuple(leaf(i) for i in range(len(batches[own[0]])))


class BlockParallelTrainer:
  """Holds all blocks on the mesh between checkpoints; see the module docstring."""

  def __init__(self, task, config, train_data, states, shared, devices=None):
    """task: a dbjax.tasks.Task; states: the B blocks' host states; shared: the host
    shared state stacked over the blocks (`stack`)."""
    self.task, self.config, self.train_data = task, config, train_data
    self.mesh = make_mesh(task.num_blocks, devices)
    width = self.mesh.shape[DATA]
    if config.train.batch_size % width:
      raise ConfigError(
          f"config.train.batch_size={config.train.batch_size} is invalid: with "
          f"parallel.mode='blocks' on {self.mesh.size} devices each block's batch is split "
          f"over a data axis of {width}; use a multiple of {width}")
    sync = config.parallel.shared_sync_every
    if task.couples_blocks and not sync:
      raise ConfigError(
          "config.parallel.shared_sync_every=0 is invalid: this run trains parameters that "
          "all blocks share (a joint label or token embedding, or shared modules); set it "
          ">= 1 to average them every k steps, or freeze them")
    self.sync_every = sync if task.couples_blocks else 0
    # sync_shared -> the step compiled for this run's arrays (.as_text() is its HLO)
    self.compiled = {}
    self.states = put(stack(states), self.mesh, P(BLOCK))
    self.shared = put(shared, self.mesh, P(BLOCK))
    self.intervals = put(np.asarray(task.intervals, np.float32), self.mesh, P(BLOCK))

  def train(self, steps: np.ndarray, bar=None, should_stop=None) -> list[dict]:
    """Run parallel steps `steps`; return one metrics row per (step, block) done.
    bar: a progress bar (dbjax.progress) to advance, if any; should_stop(): checked
    after every step, ends the run of steps early when true."""
    cfg, num_blocks = self.config, self.task.num_blocks
    pending = []
    for step in steps:
      step = int(step)
      # Trained shared parameters are averaged every sync_every steps and at the end,
      # so every checkpoint and the final model hold one shared state.
      synced = bool(self.sync_every) and ((step + 1) % self.sync_every == 0
                                          or step + 1 == cfg.train.num_steps)
      args = (self.states, self.shared,
              global_batch(self.train_data, self.mesh, cfg.seed, step, num_blocks,
                           cfg.train.batch_size),
              put(step_key_data(cfg.seed, step, num_blocks), self.mesh, P(BLOCK)),
              self.intervals)
      if synced not in self.compiled:
        self.compiled[synced] = make_step(self.task, self.mesh, synced).lower(*args).compile()
      self.states, self.shared, metrics = self.compiled[synced](*args)
      pending.append((step, metrics))
      if bar is not None:
        bar.update(1)
      if should_stop is not None and should_stop():
        break
    rows = []
    for step, metrics in pending:
      metrics = gather(metrics)
      for b in range(num_blocks):
        rows.append({"step": step, "block": b,
                     **{k: float(v[b]) for k, v in metrics.items()}})
    return rows

  def host_states(self):
    """(the B blocks' host states, the host shared state stacked over blocks)."""
    return unstack(gather(self.states), self.task.num_blocks), gather(self.shared)
