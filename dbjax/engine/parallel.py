"""All B blocks at once, each on its own slice of the run's mesh (dbjax.engine.mesh).

DiffusionBlocks' blocks share no activations and, for images, no parameters
(docs/method.md, "Shared parameters"), so with parallel.mode="blocks" every step trains
all B blocks, each on its own batch, and the compiled step has no collective across the
"block" axis (tests/test_parallel.py reads the HLO to check, with benchmarks/hlo.py).
The step is manual over "block" alone (jax.shard_map with axis_names={"block"}); within
a block's slice the compiler places the work: its batch is split over data x fsdp and
its state sharded over fsdp (x tensor), as in sequential mode.

Mesh: config parallel.mesh, the block axis G (-1: the largest divisor of B that fits).
With G < B each slice trains its B / G blocks one after another (lax.scan), so the same
run resumes on any device count down to one.

Schedule: step s trains block b on the batch data.batch_indices(seed, s, block=b) with
the key train.step_key(seed, s, b), both pure functions, and the noise is drawn for
the block's whole batch, so a run's parameters do not depend on the mesh beyond the
order of float reductions.

Shared parameters (label or token embeddings, shared modules): every block keeps its own
copy with its own optimizer state. Frozen ones never change, so no communication at
all; trained ones are averaged over the blocks every parallel.shared_sync_every steps by
a second compiled step with one all-reduce of their size.

States are born sharded (jit with out_shardings). For a checkpoint each block is cut
from the stack and spread over every device of the mesh (1 / N of it on each), so that
every host writes a share of every block, which orbax needs; no host gathers a block.
Each host builds only the rows of the batches its devices hold.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dbjax.data.batches import batch_indices
from dbjax.data.prefetch import depth_for, prefetched
from dbjax.engine import mesh as mesh_lib, state as state_lib
from dbjax.engine.step import train_step
from dbjax.errors import ConfigError

BLOCK, DATA = mesh_lib.BLOCK, mesh_lib.DATA
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all")


def mesh_shape(num_blocks: int, num_devices: int) -> tuple[int, int]:
  """(block groups G, data width) of the default mesh: G the largest divisor of B with
  G <= num_devices, the data axis the devices left over."""
  sizes = mesh_lib.resolve_sizes(dict(block=-1, data=-1, fsdp=1, tensor=1), num_devices,
                                 num_blocks, "blocks")
  return sizes[BLOCK], sizes[DATA]


def make_mesh(num_blocks: int, devices=None, config=None) -> jax.sharding.Mesh:
  """The run's mesh of `devices` (default: all) for B blocks: config.parallel.mesh's
  sizes, or the default (block=-1, data=-1) without a config."""
  if config is None:
    from dbjax.config import default_config  # pylint: disable=g-import-not-at-top
    config = default_config()
    config.parallel.mode = "blocks"
  return mesh_lib.make_mesh(config, num_blocks, devices)


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
  """Small global arrays (metrics) -> numpy on every host."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def _average_over_blocks(tree):
  """Every block's copy replaced by the mean over all blocks' copies."""
  def average(x):
    mean = jax.lax.pmean(jnp.mean(x, axis=0), BLOCK)
    return jnp.broadcast_to(mean, x.shape)
  return jax.tree.map(average, tree)


def make_step(task, mesh, state_shardings, shared_shardings, sync_shared: bool = False):
  """The compiled parallel step (states, shared, batch, key_data, intervals) ->
  (states, shared, metrics), every argument and result stacked over the B blocks.

  task: a dbjax.tasks.Task (engine.step.train_step steps it). batch: the task's batch
  tuple with shapes (B, batch_size, ...); key_data: (B, 2) uint32 raw keys.
  state_shardings, shared_shardings: the stacked states' (BlockParallelTrainer's).
  sync_shared: also average the shared parameters over the blocks at the end.
  """
  def train_block(_, inputs):
    # One block's whole batch: the compiler splits it over data x fsdp and takes the
    # mean of the gradients where it must; the noise is drawn for the whole batch.
    state, shared, batch, key_data, interval = inputs
    return None, train_step(task, state, shared, batch, jax.random.wrap_key_data(key_data),
                            interval)

  def local_blocks(states, shared, batch, key_data, intervals):
    # This slice's B / G blocks, one after another: one at a time in activations.
    _, (states, shared, metrics) = jax.lax.scan(
        train_block, None, (states, shared, batch, key_data, intervals))
    if sync_shared:
      shared = shared._replace(params=_average_over_blocks(shared.params))
    return states, shared, metrics

  blocks = P(BLOCK)
  everywhere_but_blocks = NamedSharding(mesh, P(BLOCK))
  step = jax.shard_map(local_blocks, mesh=mesh, in_specs=blocks, out_specs=blocks,
                       axis_names={BLOCK})
  return jax.jit(step, in_shardings=(state_shardings, shared_shardings,
                                     mesh_lib.batch_sharding(mesh, stacked=True),
                                     everywhere_but_blocks, everywhere_but_blocks),
                 out_shardings=(state_shardings, shared_shardings, everywhere_but_blocks),
                 donate_argnums=(0, 1))


def step_key_data(seed: int, step: int, num_blocks: int) -> np.ndarray:
  """(B, 2) raw keys of step `step`: block b's is train.step_key(seed, step, b)."""
  base = jax.random.fold_in(jax.random.key(seed), step)
  return np.asarray(jax.random.key_data(
      jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(num_blocks))))


def local_block_rows(train_data, mesh, seed: int, step: int, num_blocks: int,
                     batch_size: int) -> dict:
  """What this host reads of every block's batch at `step`: {block: (each batch row's
  place among the host's rows, -1 for others; the batch tuple of those rows)} for the
  blocks whose rows its devices hold, run ahead of the step (dbjax.data.prefetch);
  assemble_blocks_batch makes the global arrays."""
  sharding = mesh_lib.batch_sharding(mesh, stacked=True)
  wanted = {}  # block -> the rows of its batch this host holds
  for index in sharding.addressable_devices_indices_map((num_blocks, batch_size)).values():
    for b in range(num_blocks)[index[0]]:
      wanted.setdefault(b, set()).update(range(batch_size)[index[1]])
  local = {}
  for b, rows in wanted.items():
    rows = sorted(rows)
    index = batch_indices(seed, step, train_data.num_examples, batch_size, block=b)
    position = np.full(batch_size, -1)
    position[rows] = np.arange(len(rows))
    local[b] = (position, [np.asarray(x) for x in train_data.batch(index[rows])])
  return local


def assemble_blocks_batch(local: dict, mesh, num_blocks: int, batch_size: int) -> tuple:
  """The batch of every block, shape (B, batch_size, ...), split over ("block", data x
  fsdp), from this host's rows (local_block_rows)."""
  sharding = mesh_lib.batch_sharding(mesh, stacked=True)
  first = next(iter(local.values()))[1]
  def leaf(i):
    def shard(index):
      return np.stack([local[b][1][i][local[b][0][np.arange(batch_size)[index[1]]]]
                       for b in range(num_blocks)[index[0]]])[(slice(None), slice(None),
                                                              *index[2:])]
    return jax.make_array_from_callback((num_blocks, batch_size, *first[i].shape[1:]),
                                        sharding, shard)
  return tuple(leaf(i) for i in range(len(first)))


class BlockParallelTrainer:
  """Holds all blocks on the mesh between checkpoints; see the module docstring."""

  def __init__(self, task, config, train_data, states=None, shared=None, devices=None,
               allocate: bool = True):
    """task: a dbjax.tasks.Task; states: the B blocks' states (numpy, or global arrays
    each on its own slice, as a checkpoint restores them) and shared: the shared state
    stacked over the blocks (`stack`); None: fresh ones, born sharded. allocate=False:
    no states yet (the shardings are known; `load` places them)."""
    self.task, self.config, self.train_data = task, config, train_data
    self.mesh = make_mesh(task.num_blocks, devices, config)
    mesh_lib.check_batch_size(config.train.batch_size, self.mesh)
    sync = config.parallel.shared_sync_every
    if task.couples_blocks and not sync:
      raise ConfigError(
          "config.parallel.shared_sync_every=0 is invalid: this run trains parameters that "
          "all blocks share (a joint label or token embedding, or shared modules); set it "
          ">= 1 to average them every k steps, or freeze them")
    self.sync_every = sync if task.couples_blocks else 0
    rules = mesh_lib.Rules.of(config)
    block, one_shared = state_lib.abstract_states(task)
    n = task.num_blocks
    self.state_shardings = mesh_lib.shardings(stacked_abstract(block, n), self.mesh, rules,
                                              stacked=True)
    self.shared_shardings = mesh_lib.shardings(stacked_abstract(one_shared, n), self.mesh,
                                               rules, stacked=True)
    # sync_shared -> the step compiled for this run's arrays (.as_text() is its HLO)
    self.compiled = {}
    self.states = self.shared = None
    if allocate:
      self.load(states, shared)
    self.intervals = put(np.asarray(task.intervals, np.float32), self.mesh, P(BLOCK))

  def load(self, states=None, shared=None):
    """Place the blocks' states and the stacked shared state (None: fresh ones)."""
    if states is None:
      self.states, self.shared = self.born_sharded()
    else:
      self.states = self.place_blocks(states)
      self.shared = jax.device_put(shared, self.shared_shardings)

  def born_sharded(self):
    """Fresh stacked states made where they live (jit with out_shardings): block b from
    fold_in(key(seed), b), the shared state's copies from index B, as
    state.init_on_host makes them."""
    task, seed, n = self.task, self.config.seed, self.task.num_blocks
    keys = lambda: jax.vmap(lambda b: jax.random.fold_in(jax.random.key(seed), b))(
        jnp.arange(n))
    states = jax.jit(lambda: jax.vmap(lambda k: state_lib.init_block(task, k))(keys()),
                     out_shardings=self.state_shardings)()
    shared = jax.jit(lambda: jax.vmap(lambda _: state_lib.init_shared(
        task, jax.random.fold_in(jax.random.key(seed), n)))(jnp.arange(n)),
                     out_shardings=self.shared_shardings)()
    return states, shared

  def place_blocks(self, states: list):
    """Per-block states -> the stacked state with its shardings: numpy ones copied in
    by shard (each host its own), global ones (a restore's, block_shardings) stacked by
    one compiled program on the mesh."""
    if all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(states)):
      return jax.jit(lambda blocks: jax.tree.map(lambda *x: jnp.stack(x), *blocks),
                     out_shardings=self.state_shardings)(states)
    return jax.tree.map(lambda s, x: jax.make_array_from_callback(
        x.shape, s, lambda index: np.asarray(x[index])), self.state_shardings, stack(states))

  def block_shardings(self, block: int = 0):
    """One block's shardings as checkpoints hold it: spread over every device of the
    mesh (mesh.spread_specs), so every host writes and reads a share of every block
    (orbax needs each process to hold a shard of each array it saves)."""
    del block  # the same for every block
    block, _ = state_lib.abstract_states(self.task)
    return mesh_lib.shardings(block, self.mesh, mesh_lib.Rules.of(self.config), spread=True)

  def train(self, steps: np.ndarray, bar=None, should_stop=None) -> list[dict]:
    """Run parallel steps `steps`; return one metrics row per (step, block) done.
    bar: a progress bar (dbjax.progress) to advance, if any; should_stop(): checked
    after every step, ends the run of steps early when true."""
    cfg, num_blocks = self.config, self.task.num_blocks
    pending = []
    batches = prefetched(lambda step: local_block_rows(
        self.train_data, self.mesh, cfg.seed, step, num_blocks, cfg.train.batch_size),
                         steps, depth_for(cfg.data.prefetch, self.mesh.devices.flat[0].platform))
    for step in steps:
      step = int(step)
      # Trained shared parameters are averaged every sync_every steps and at the end,
      # so every checkpoint and the final model hold one shared state.
      synced = bool(self.sync_every) and ((step + 1) % self.sync_every == 0
                                          or step + 1 == cfg.train.num_steps)
      args = (self.states, self.shared,
              assemble_blocks_batch(next(batches), self.mesh, num_blocks,
                                    cfg.train.batch_size),
              put(step_key_data(cfg.seed, step, num_blocks), self.mesh, P(BLOCK)),
              self.intervals)
      if synced not in self.compiled:
        self.compiled[synced] = make_step(self.task, self.mesh, self.state_shardings,
                                          self.shared_shardings, synced
                                          ).lower(*args).compile()
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
    """(the B blocks' states, each a global array spread over the mesh as checkpoints
    hold it (block_shardings), cut from the stack by one compiled program; the shared
    state stacked over blocks, as it is). Each device then holds 1 / N of every block
    beside its own blocks' shards: the checkpoint's only extra memory."""
    n = self.task.num_blocks
    return jax.jit(lambda stacked: [jax.tree.map(lambda x: x[b], stacked) for b in range(n)],
                   out_shardings=[self.block_shardings()] * n)(self.states), self.shared
