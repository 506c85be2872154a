"""Memory and speed of a block's train step, measured the same way for every method.

- Compiled footprint: jit(step).lower(...).compile().memory_analysis() gives the exact
  bytes of arguments, outputs, aliases (donated buffers reused as outputs) and
  temporaries. step_bytes = arguments + outputs - aliased + temporaries: what the
  step needs at once on the device.
- Resident bytes: the bytes of live jax arrays on the device while a step runs, with
  the driver's real placement (the active block's state and the batch on the device,
  the other blocks in host memory).
"""
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from dbjax.engine import state as state_lib
from dbjax.engine.step import jit_train_step, train_step


def compiled_memory(compiled) -> dict:
  """Bytes a compiled step needs on each device (see the module docstring)."""
  stats = compiled.memory_analysis()
  out = {"argument_bytes": stats.argument_size_in_bytes,
         "output_bytes": stats.output_size_in_bytes,
         "alias_bytes": stats.alias_size_in_bytes,
         "temp_bytes": stats.temp_size_in_bytes}
  out["step_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  return out


def compiled_train_step(task, batch_size: int):
  """One block's train step, compiled for abstract states (nothing allocated)."""
  block, shared = state_lib.abstract_states(task)
  return jit_train_step(task).lower(block, shared, task.example_batch(batch_size),
                                    jax.random.key(0), jnp.asarray(task.intervals[0])).compile()


def train_step_memory(task, batch_size: int) -> dict:
  """Compiled memory of one block's train step, in bytes (no allocation needed)."""
  return compiled_memory(compiled_train_step(task, batch_size))


# The short dtype names jax prints (f32[128,49,512]), and their dtypes.
_SHORT_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64",
                 "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64", "u8": "uint8",
                 "u32": "uint32", "u64": "uint64", "bool": "bool"}


def residuals_of(fn, *args) -> list[tuple[tuple, np.dtype, str]]:
  """(shape, dtype, where it comes from) of each array the backward pass of fn(*args)
  keeps from its forward pass, its arguments and literals left out: what
  jax.ad_checkpoint.print_saved_residuals lists, read before any backend compiles it."""
  import contextlib, io, re  # pylint: disable=g-import-not-at-top,multiple-imports
  from jax import ad_checkpoint  # pylint: disable=g-import-not-at-top
  listing = io.StringIO()
  with contextlib.redirect_stdout(listing):
    ad_checkpoint.print_saved_residuals(fn, *args)
  residuals = []
  for line in listing.getvalue().splitlines():
    found = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
    if found is None or "from the argument" in found.group(3) or "literal" in found.group(3):
      continue
    shape = tuple(int(n) for n in found.group(2).split(",") if n)
    residuals.append((shape, np.dtype(_SHORT_DTYPES.get(found.group(1), "float32")),
                      found.group(3)))
  return residuals


def saved_residuals(task, batch_size: int) -> list[tuple[tuple, np.dtype, str]]:
  """`residuals_of` one block's loss with respect to its parameters."""
  block, shared = state_lib.abstract_states(task)
  batch, interval = task.example_batch(batch_size), jnp.asarray(task.intervals[0])
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  shared_params = zeros(shared.params)
  loss = lambda params: task.loss(params, shared_params, batch, jax.random.key(0), interval)[0]
  return residuals_of(loss, zeros(block.params))


def saved_activation_bytes(task, batch_size: int) -> dict:
  """{dtype name: bytes} of `saved_residuals`. Unlike compiled_memory, it does not
  depend on how a backend lowers a dtype: XLA's CPU backend computes bfloat16 in
  float32, so only this shows on a CPU what bfloat16 saves on a GPU or TPU."""
  totals = {}
  for shape, dtype, _ in saved_residuals(task, batch_size):
    totals[dtype.name] = totals.get(dtype.name, 0) + int(np.prod(shape)) * dtype.itemsize
  return totals


def compiled_flops(compiled) -> float:
  """The FLOPs XLA counts for one call of a compiled computation (cost_analysis)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _dot_flops(eqn) -> int:
  """2 x (output elements) x (contracted size) of one dot_general."""
  lhs = eqn.invars[0].aval.shape
  (contracting, _), _ = eqn.params["dimension_numbers"]
  contracted = int(np.prod([lhs[d] for d in contracting]))
  return 2 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted


def jaxpr_matmul_flops(jaxpr) -> int:
  """The dot_general FLOPs of a jaxpr, into its sub-jaxprs (jit, remat, custom
  derivatives, scan bodies times their length; a cond's costliest branch)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      total += _dot_flops(eqn)
      continue
    inner = []
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(item, "eqns") or hasattr(item, "jaxpr"):
          inner.append(getattr(item, "jaxpr", item))
    flops = [jaxpr_matmul_flops(j) for j in inner]
    if eqn.primitive.name == "cond":
      total += max(flops, default=0)
    else:
      total += sum(flops) * int(eqn.params.get("length", 1))
  return total


def matmul_flops(task, batch_size: int) -> int:
  """FLOPs of the matrix products in one train step of one block: forward, backward
  (and any rematerialised forward) and the optimizer's update, counted from the step's
  jaxpr as 2 x output elements x contracted size per dot_general. The denominator of
  model FLOPs utilisation: the elementwise work is left out, as is usual."""
  block, shared = state_lib.abstract_states(task)
  jaxpr = jax.make_jaxpr(lambda b, s, batch: train_step(task, b, s, batch, jax.random.key(0),
                                                        jnp.asarray(task.intervals[0])))(
      block, shared, task.example_batch(batch_size))
  return jaxpr_matmul_flops(jaxpr.jaxpr)


def state_bytes(task) -> int:
  """Bytes of one block's state (parameters, optimizer state, step) and the shared
  state: what stays on the device between the steps of one block."""
  return sum(leaf.size * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(state_lib.abstract_states(task)))


def live_device_bytes() -> int:
  """Bytes of every live (not donated or deleted) array in the devices' own memory (not
  those placed in their host memory kinds, such as pinned_host)."""
  return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted()
             and a.sharding.memory_kind in (None, *{d.default_memory().kind
                                                    for d in a.sharding.device_set}))


def resident_bytes(task, batch_size: int, seed: int = 0) -> int:
  """Bytes on the device while one block trains, as the driver places them.

  All blocks are initialised to host memory; one (and the shared state) is moved to the
  device and stepped. Measured as the growth of live device arrays over the baseline
  before the run.
  """
  gc.collect()
  baseline = live_device_bytes()
  host_states, host_shared = state_lib.init_on_host(task, seed)
  batch = task.example_batch(batch_size)
  out = jit_train_step(task)(jax.device_put(host_states[0]), jax.device_put(host_shared),
                             batch, jax.random.key(0), jnp.asarray(task.intervals[0]))
  jax.block_until_ready(out)
  resident = live_device_bytes() - baseline
  del out, batch
  gc.collect()
  return resident


def time_train_step(task, batch_size: int, repeats: int = 10, warmup: int = 2,
                    step=None) -> float:
  """Median seconds of one block's train step (compiled, data already on the device);
  step: a compiled step to time (compiled_train_step's), else jit_train_step's."""
  step = step or jit_train_step(task)
  key = jax.random.key(0)
  state = jax.jit(lambda key: state_lib.init_block(task, key))(key)  # one block only
  shared = jax.jit(lambda key: state_lib.init_shared(task, key))(key)
  batch = jax.device_put(task.example_batch(batch_size, np.random.default_rng(0)))
  interval = jnp.asarray(task.intervals[0])
  times = []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    state, shared, metrics = step(state, shared, batch, jax.random.key(i), interval)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return float(np.median(times[warmup:]))
