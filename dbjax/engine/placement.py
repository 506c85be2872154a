"""Where a sequential run's block states live on its mesh: in device memory while a
block trains, in the devices' pinned host memory (or numpy, on one process) while it
waits for its turn, each with the sharding of dbjax.engine.mesh; and the one compiled
step and the sharded batches that train the block on the devices."""
from typing import Any, NamedTuple

import jax
import numpy as np

from dbjax.engine import mesh as mesh_lib, state as state_lib
from dbjax.engine.step import train_step


class Placement(NamedTuple):
  """Where a sequential run's states live on its mesh (block axis 1)."""
  mesh: jax.sharding.Mesh
  block: Any      # NamedShardings of a block's state in device memory
  waiting: Any    # the same in pinned host memory, or None: numpy (one process only)
  shared: Any     # the shared state's, in device memory
  batch: jax.sharding.NamedSharding


def placement_of(task, config, devices=None) -> Placement:
  """The sequential run's mesh (config parallel.mesh) and its states' shardings
  (config parallel.rules); ConfigError naming the field for sizes that do not fit."""
  mesh = mesh_lib.make_mesh(config, task.num_blocks, devices)
  mesh_lib.check_batch_size(config.train.batch_size, mesh)
  rules = mesh_lib.Rules.of(config)
  block, shared = state_lib.abstract_states(task)
  host = mesh_lib.host_memory_kind(mesh)
  numpy = (config.train.waiting_blocks == "numpy" or host is None) and \
      jax.process_count() == 1
  return Placement(mesh, mesh_lib.shardings(block, mesh, rules),
                   None if numpy else mesh_lib.shardings(block, mesh, rules, memory_kind=host),
                   mesh_lib.shardings(shared, mesh, rules), mesh_lib.batch_sharding(mesh))


def jit_sharded_step(task, placement: Placement):
  """train_step compiled once for all blocks on the placement's mesh: states in and out
  with their shardings (both donated), the batch split over data x fsdp, the key (raw
  key data) and the interval on every device."""
  everywhere = mesh_lib.replicated(placement.mesh)
  def sharded_train_step(state, shared, batch, key_data, interval):
    return train_step(task, state, shared, batch, jax.random.wrap_key_data(key_data),
                      interval)
  return jax.jit(sharded_train_step,
                 in_shardings=(placement.block, placement.shared, placement.batch,
                               everywhere, everywhere),
                 out_shardings=(placement.block, placement.shared, everywhere),
                 donate_argnums=(0, 1))


def local_rows(train_data, index: np.ndarray, sharding) -> tuple:
  """What this host reads of the batch of examples `index` split by `sharding` over
  its rows: (each batch row's place among the host's rows, -1 for other hosts' rows;
  the batch tuple of the host's rows): this host reads only the rows its own devices
  hold. The driver runs it ahead of the step (dbjax.data.prefetch), then
  assemble_batch makes the global arrays."""
  num_rows = len(index)
  device_rows = [range(num_rows)[i[0]] for i in
                 sharding.addressable_devices_indices_map((num_rows,)).values()]
  own = sorted({row for rows in device_rows for row in rows})
  position = np.full(num_rows, -1)
  position[own] = np.arange(len(own))
  return position, tuple(np.asarray(x) for x in train_data.batch(index[own]))


def assemble_batch(local: tuple, sharding) -> tuple:
  """The batch as global arrays split by `sharding`, from this host's rows (local_rows)."""
  position, rows = local
  num_rows = len(position)
  def global_leaf(x):
    return jax.make_array_from_callback(
        (num_rows, *x.shape[1:]), sharding,
        lambda i: x[position[np.arange(num_rows)[i[0]]]][(slice(None), *i[1:])])
  return tuple(global_leaf(x) for x in rows)


def to_waiting(tree, placement: Placement):
  """A block's state sent to where it waits between its turns: pinned host memory with
  its sharding (dispatched, not awaited), or numpy when placement.waiting is None."""
  if placement.waiting is None:
    return jax.device_get(tree)
  return jax.device_put(tree, placement.waiting)


def on_host(states, shared):
  """(states, shared) as numpy where this process holds them whole (one process), for
  evaluation and sampling; the sharded arrays as they are on many hosts."""
  if all(getattr(leaf, "is_fully_addressable", True)
         for leaf in jax.tree.leaves((states, shared))):
    return jax.device_get(states), jax.device_get(shared)
  return states, shared


def born_sharded(task, seed: int, placement: Placement):
  """(every block's fresh state where it waits, the fresh shared state on the devices):
  each made by a jit whose out_shardings are the placement's, so no host ever holds
  more of a block than its own devices' shards. The same values as
  state.init_on_host (block b from fold_in(key(seed), b), shared from index B)."""
  def fresh(init, index, shardings):
    return jax.jit(lambda: init(task, jax.random.fold_in(jax.random.key(seed), index)),
                   out_shardings=shardings)()
  states = [to_waiting(fresh(state_lib.init_block, b, placement.block), placement)
            for b in range(task.num_blocks)]
  return states, fresh(state_lib.init_shared, task.num_blocks, placement.shared)


def with_shardings(abstract, shardings):
  """Abstract arrays that carry `shardings` (None: as they are; orbax then reads numpy)."""
  if shardings is None:
    return abstract
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
