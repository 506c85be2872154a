"""One named mesh for every mode, and where each leaf of a block's state lives on it.

Axes (config parallel.mesh, one size each, -1 = the devices left over):
  block   blocks trained at once (parallel.mode "blocks"); 1 in sequential mode
  data    the batch is split over it; the state is copied
  fsdp    the batch is split over it too, and the state is sharded over it (ZeRO-3 /
          FSDP: each device keeps 1/fsdp of a block's parameters and Adam moments, and
          XLA gathers a layer's weights where the step needs them)
  tensor  a leaf's named dimension ("mlp", "heads", "vocab") is split over it

Sequential mode is the mesh with a block axis of 1: the active block's step runs on
every device. Parallel mode gives each block its own (data, fsdp, tensor) slice.

Sharding is declared once, by name (as maxtext's logical axis rules): a leaf whose
variable carries names (nnx.with_partitioning; flax keeps them as `out_sharding`;
dbjax's own networks name every kernel, dbjax.nets.dit.named) maps each through config
parallel.rules to a mesh axis; a leaf without names, or whose names leave fsdp unused,
is sharded over fsdp along its largest free dimension that fsdp divides (not one a rule
keeps whole, as "layers"), and one smaller than parallel.min_shard_size elements is
copied (a norm's scale, a bias: gathering it would
cost more than it saves). Adam's moments take their parameter's sharding: the same
rule, the same shapes.
"""
import math
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dbjax.errors import ConfigError

BLOCK, DATA, FSDP, TENSOR = "block", "data", "fsdp", "tensor"
AXES = (BLOCK, DATA, FSDP, TENSOR)
# The batch dimension is split over both data-parallel axes.
BATCH_AXES = (DATA, FSDP)


def resolve_sizes(sizes: dict, num_devices: int, num_blocks: int, mode: str) -> dict:
  """{axis: size} of the mesh for `num_devices` devices; ConfigError naming the field
  when the sizes cannot be met. The block axis of -1 is the largest divisor of B whose
  slices fit; then one other axis of -1 takes the devices left over. Sizes whose
  product is below the device count leave the rest idle (the run's first line says
  how many: `describe`); above it they are refused."""
  sizes = {axis: int(sizes[axis]) for axis in AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"config.parallel.mesh.{axis}={size} is invalid: use a size >= 1, "
                        "or -1 for the devices left over")
  if mode != "blocks":
    if sizes[BLOCK] not in (-1, 1):
      raise ConfigError(f"config.parallel.mesh.block={sizes[BLOCK]} is invalid with "
                        "parallel.mode='none' (one block trains at a time): use 1 or -1")
    sizes[BLOCK] = 1
  rest = [axis for axis in AXES[1:] if sizes[axis] == -1]
  if len(rest) > 1:
    raise ConfigError(f"config.parallel.mesh has {len(rest)} axes of -1 "
                      f"({', '.join(rest)}): at most one of data, fsdp, tensor may take "
                      "the devices left over")
  fixed = math.prod(sizes[axis] for axis in AXES[1:] if sizes[axis] != -1)
  if sizes[BLOCK] == -1:
    fits = [g for g in range(1, num_blocks + 1) if num_blocks % g == 0 and g * fixed <= num_devices]
    sizes[BLOCK] = max(fits, default=1)
  elif mode == "blocks" and num_blocks % sizes[BLOCK]:
    raise ConfigError(f"config.parallel.mesh.block={sizes[BLOCK]} is invalid: it must "
                      f"divide the number of blocks (diffusion.num_blocks={num_blocks})")
  if rest:
    sizes[rest[0]] = max(num_devices // (sizes[BLOCK] * fixed), 1)
  used = math.prod(sizes.values())
  if used > num_devices:
    shape = " x ".join(str(sizes[a]) for a in AXES)
    raise ConfigError(
        f"config.parallel.mesh={dict(sizes)} is invalid: block x data x fsdp x tensor = "
        f"{shape} = {used} devices, but {num_devices} are present; use sizes whose "
        "product is at most the device count, or set one of data, fsdp, tensor to -1 "
        "(the rest)")
  return sizes


def make_mesh(config, num_blocks: int, devices=None) -> jax.sharding.Mesh:
  """The run's mesh over `devices` (default: all), axes AXES, sizes from
  config.parallel.mesh (resolve_sizes). Auto axes: the compiler places what the
  shardings leave open, and a user's reshape inside a layer needs no annotation."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_sizes(config.parallel.mesh, len(devices), num_blocks, config.parallel.mode)
  used = math.prod(sizes.values())
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices[:used])


def describe(mesh: jax.sharding.Mesh, num_devices: int | None = None) -> str:
  """One line: the axes and their sizes, the devices used and those left idle."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  axes = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
  idle = num_devices - mesh.size
  return (f"mesh ({axes}): {mesh.size} of {num_devices} devices used"
          + (f", {idle} idle" if idle else "")
          + (f", {jax.process_count()} processes" if jax.process_count() > 1 else ""))


class Rules(NamedTuple):
  """How a block's leaves are sharded: logical name -> mesh axis (or None), and the
  size below which an unnamed leaf is copied."""
  logical: dict
  min_shard_size: int

  @classmethod
  def of(cls, config) -> "Rules":
    return cls(dict(config.parallel.rules), int(config.parallel.min_shard_size))


def _names_of(variable) -> tuple | None:
  """The logical names a variable was annotated with (nnx.with_partitioning), if any."""
  if not isinstance(variable, nnx.Variable):
    return None
  metadata = variable.get_metadata()
  names = metadata.get("out_sharding", metadata.get("sharding_names"))
  return tuple(names) if names else None


def leaf_spec(shape: tuple, names: tuple | None, mesh, rules: Rules, where: str = "") -> P:
  """The PartitionSpec of one leaf of `shape` (see the module docstring); ConfigError,
  naming the leaf, for a name the rules and the mesh lack or a dimension its axis does
  not divide."""
  whole = set()  # dimensions a rule keeps whole (the stacked "layers")
  if names is not None:
    if len(names) != len(shape):
      raise ConfigError(f"{where or 'a leaf'} of shape {tuple(shape)} is annotated with "
                        f"{len(names)} names {tuple(names)}: give one per dimension")
    spec = []
    for i, (dim, name) in enumerate(zip(shape, names)):
      axis = None if name is None else rules.logical.get(name, name)
      if axis is not None and axis not in mesh.shape:
        raise ConfigError(
            f"{where or 'a leaf'} is annotated with axis {name!r}, which neither "
            f"config.parallel.rules maps nor the mesh has (axes: {', '.join(mesh.shape)})")
      if axis is not None and mesh.shape[axis] > 1 and dim % mesh.shape[axis]:
        raise ConfigError(
            f"{where or 'a leaf'} of shape {tuple(shape)}: its dimension {name!r} of "
            f"{dim} is not divisible by the mesh's {axis} axis of {mesh.shape[axis]}; "
            "change config.parallel.mesh or config.parallel.rules")
      if name is not None and axis is None:
        whole.add(i)
      spec.append(axis if axis is not None and mesh.shape[axis] > 1 else None)
  else:
    spec = [None] * len(shape)
  width = mesh.shape.get(FSDP, 1)
  if width == 1 or FSDP in spec or math.prod(shape) < rules.min_shard_size:
    return P(*spec) if any(spec) else P()
  # Names that leave fsdp unused (a bias named "mlp" with tensor 1): as unnamed.
  divisible = [i for i, dim in enumerate(shape)
               if spec[i] is None and i not in whole and dim % width == 0]
  if divisible:
    spec[max(divisible, key=lambda i: shape[i])] = FSDP
  return P(*spec) if any(spec) else P()


def spread_spec(shape: tuple, mesh) -> P:
  """A leaf over every device of the mesh: its largest dimension that the device count
  divides, split over all axes; else copied (how parallel mode checkpoints a block)."""
  divisible = [i for i, dim in enumerate(shape) if dim % mesh.size == 0]
  if mesh.size == 1 or not divisible:
    return P()
  largest = max(divisible, key=lambda i: shape[i])
  return P(*([None] * largest + [tuple(mesh.axis_names)]))


def state_specs(tree, mesh, rules: Rules, stacked: bool = False, spread: bool = False):
  """A PartitionSpec for every array leaf of `tree` (concrete or abstract; a block's
  state, a shared state), in a tree of the same structure. stacked: leaves carry a
  leading axis of B blocks (parallel mode), which goes over the block axis, the rest as
  one block's leaf. spread: every leaf over all the mesh's devices (spread_spec), as
  parallel mode checkpoints a block."""
  def spec(path, variable):
    names = _names_of(variable)
    leaf = variable.get_value() if isinstance(variable, nnx.Variable) else variable
    shape = tuple(np.shape(leaf))
    where = "leaf " + jax.tree_util.keystr(path)
    if spread:
      result = spread_spec(shape, mesh)
    elif stacked:
      result = P(BLOCK, *leaf_spec(shape[1:], names, mesh, rules, where))
    else:
      result = leaf_spec(shape, names, mesh, rules, where)
    # The tree keeps its variables (holding the spec), so it matches the state's.
    return variable.replace(value=result) if isinstance(variable, nnx.Variable) else result
  return jax.tree_util.tree_map_with_path(
      spec, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shardings(tree, mesh, rules: Rules, stacked: bool = False, memory_kind=None,
              spread: bool = False):
  """NamedShardings of `tree`'s leaves (state_specs), in `memory_kind` (None: the
  device's own memory; "pinned_host": where waiting blocks are kept)."""
  specs = state_specs(tree, mesh, rules, stacked, spread)
  return jax.tree.map(lambda s: NamedSharding(mesh, s, memory_kind=memory_kind), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh, stacked: bool = False) -> NamedSharding:
  """A batch's sharding: examples over data x fsdp (after the block axis, stacked)."""
  return NamedSharding(mesh, P(BLOCK, BATCH_AXES) if stacked else P(BATCH_AXES))


def batch_width(mesh) -> int:
  """The number of parts a batch is split into: data x fsdp."""
  return mesh.shape[DATA] * mesh.shape[FSDP]


def check_batch_size(batch_size: int, mesh):
  """ConfigError unless the batch splits evenly over data x fsdp."""
  width = batch_width(mesh)
  if batch_size % width:
    raise ConfigError(
        f"config.train.batch_size={batch_size} is invalid: a block's batch is split over "
        f"data x fsdp = {mesh.shape[DATA]} x {mesh.shape[FSDP]} = {width} devices; use a "
        f"multiple of {width}, or change config.parallel.mesh")


def replicated(mesh) -> NamedSharding:
  """Every device of the mesh holds the whole value (keys, intervals)."""
  return NamedSharding(mesh, P())


def host_memory_kind(mesh) -> str | None:
  """"pinned_host" where the mesh's devices have it (page-locked host memory that
  the devices copy to and from by DMA), else None."""
  device = mesh.devices.flat[0]
  return "pinned_host" if "pinned_host" in {m.kind for m in device.addressable_memories()} \
      else None


def largest_shard_bytes(tree) -> int:
  """The largest per-device sum of `tree`'s shards (bytes): what one device holds."""
  per_device = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values(), default=0)
