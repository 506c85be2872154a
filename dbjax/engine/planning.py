"""The number of blocks for a memory budget: the compiled train step of every B that
divides the layer count (nothing allocated), and the smallest B whose step fits.

The step's footprint is memory_analysis of the compiled step (arguments + outputs -
donated + temporaries: the active block's state, the shared state, the batch and the
step's activations, which is all the sequential driver keeps on the device while a
block trains); its FLOPs come from cost_analysis. experiments/plan_blocks.py prints them.

pod_plan does the same for a pod: the step compiled for the run's mesh over N devices
(fake CPU devices stand in for a pod's: the compiled program's per-device bytes are the
same), and what each host keeps of the waiting blocks. experiments/plan_pod.py prints it.
"""
import math
import re

import jax

from dbjax import config as config_lib, tasks
from dbjax.engine import profiling, state as state_lib
from dbjax.errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
  """"8GiB" -> 8589934592; ConfigError naming the value otherwise."""
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
  if not match or match.group(2).upper() not in _UNITS:
    raise ConfigError(f"memory budget {text!r} is invalid: a number of bytes with an "
                      f"optional unit, one of {', '.join(u for u in _UNITS if u)}")
  return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def candidates(config) -> list[int]:
  """Every B that divides model.num_layers, smallest first."""
  return [b for b in range(1, config.model.num_layers + 1) if config.model.num_layers % b == 0]


def footprints(config) -> list[dict]:
  """One row per candidate B: its compiled step's bytes and FLOPs (nothing allocated)."""
  rows = []
  for b in candidates(config):
    task = tasks.build(config_lib.variant(config, "diffusion_blocks", diffusion__num_blocks=b))
    compiled = profiling.compiled_train_step(task, config.train.batch_size)
    memory = profiling.compiled_memory(compiled)
    rows.append({"num_blocks": b, "layers_per_block": config.model.num_layers // b,
                 "step_bytes": memory["step_bytes"], "state_bytes": profiling.state_bytes(task),
                 "step_flops": profiling.compiled_flops(compiled)})
  for row in rows:
    row["flops_over_end_to_end"] = row["step_flops"] / rows[0]["step_flops"]
  return rows


def choose(rows: list[dict], budget: int) -> int:
  """The smallest B whose step fits `budget` bytes; ConfigError when none does."""
  fitting = [r["num_blocks"] for r in rows if r["step_bytes"] <= budget]
  if not fitting:
    smallest = min(rows, key=lambda r: r["step_bytes"])
    raise ConfigError(f"no number of blocks fits a memory budget of {budget} bytes: the "
                      f"smallest step footprint is {smallest['step_bytes']} bytes "
                      f"({smallest['step_bytes'] / 2**20:.1f} MiB) at B = "
                      f"{smallest['num_blocks']}; lower train.batch_size or the width")
  return min(fitting)


def abstract_with(tree, shardings):
  """Abstract arrays of `tree` carrying `shardings` (what lower() takes)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def compiled_sharded_step(task, config, devices):
  """(the sequential run's train step compiled for its mesh over `devices`, its
  placement): abstract arguments carrying the run's shardings, nothing allocated."""
  from dbjax.engine import placement as placement_lib  # pylint: disable=g-import-not-at-top
  placement = placement_lib.placement_of(task, config, devices)
  block, shared = state_lib.abstract_states(task)
  batch = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement.batch)
                for x in task.example_batch(config.train.batch_size))
  args = (abstract_with(block, placement.block), abstract_with(shared, placement.shared),
          batch, jax.ShapeDtypeStruct((2,), "uint32"), jax.ShapeDtypeStruct((2,), "float32"))
  return placement_lib.jit_sharded_step(task, placement).lower(*args).compile(), placement


def per_device_bytes(abstract, shardings) -> int:
  """The largest per-device sum of the shards `shardings` cut `abstract`'s leaves into."""
  totals = {}
  for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    nbytes = math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    for device in sharding.device_set:
      totals[device] = totals.get(device, 0) + nbytes
  return max(totals.values())


def pod_plan(config, devices, num_hosts: int, num_blocks_list) -> list[dict]:
  """One row for end-to-end training and one per B in num_blocks_list: per device, the
  compiled sharded step's bytes (the active block's shards, the shared state, the
  batch's rows, gathered weights and activations: memory_analysis); per host, the
  shards of the blocks waiting in its host memory ((B - 1) blocks while one trains,
  each host its own devices' share). With parallel.mode "blocks" a block's step is
  compiled for its slice (the devices / the block axis), a device also holds the other
  blocks its slice trains in turn, and hosts hold nothing between checkpoints."""
  rows = []
  per_host_devices = len(devices) // num_hosts
  in_parallel = config.parallel.mode == "blocks"
  for method, b in [("end_to_end", 1)] + [("diffusion_blocks", b) for b in num_blocks_list]:
    variant = config_lib.variant(config, method, diffusion__num_blocks=b)
    task = tasks.build(variant)
    slice_devices, groups = devices, 1
    if in_parallel:  # a block's step on its slice: the sequential step on that slice
      from dbjax.engine import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
      groups = mesh_lib.resolve_sizes(variant.parallel.mesh, len(devices), task.num_blocks,
                                      "blocks")[mesh_lib.BLOCK]
      slice_devices = devices[:len(devices) // groups]
      variant = variant.copy_and_resolve_references()
      variant.parallel.mode = "none"
      variant.parallel.mesh.block = 1
    compiled, placement = compiled_sharded_step(task, variant, slice_devices)
    memory = profiling.compiled_memory(compiled)
    block, _ = state_lib.abstract_states(task)
    block_share = per_device_bytes(block, placement.block)
    # Parallel: the blocks a slice trains one after another stay on its devices;
    # sequential: only the active block is on the devices.
    per_slice = task.num_blocks // groups if in_parallel else 1
    rows.append({"method": method, "num_blocks": task.num_blocks,
                 "layers_per_block": config.model.num_layers // task.num_blocks,
                 "mesh": (f"block={groups}," if in_parallel else "") + ",".join(
                     f"{k}={v}" for k, v in placement.mesh.shape.items() if k != "block"),
                 "device_bytes": memory["step_bytes"] + (per_slice - 1) * block_share,
                 "device_state_bytes": per_slice * block_share,
                 "host_bytes": 0 if in_parallel else
                               (task.num_blocks - 1) * block_share * per_host_devices,
                 "block_state_bytes": profiling.state_bytes(task)})
  return rows
