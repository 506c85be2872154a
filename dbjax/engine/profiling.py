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
from dbjax.engine.step import jit_train_step


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


def compiled_flops(compiled) -> float:
  """The FLOPs XLA counts for one call of a compiled computation (cost_analysis)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def state_bytes(task) -> int:
  """Bytes of one block's state (parameters, optimizer state, step) and the shared
  state: what stays on the device between the steps of one block."""
  return sum(leaf.size * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(state_lib.abstract_states(task)))


def _live_device_bytes() -> int:
  return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


def resident_bytes(task, batch_size: int, seed: int = 0) -> int:
  """Bytes on the device while one block trains, as the driver places them.

  All blocks are initialised to host memory; one (and the shared state) is moved to the
  device and stepped. Measured as the growth of live device arrays over the baseline
  before the run.
  """
  gc.collect()
  baseline = _live_device_bytes()
  host_states, host_shared = state_lib.init_on_host(task, seed)
  batch = task.example_batch(batch_size)
  out = jit_train_step(task)(jax.device_put(host_states[0]), jax.device_put(host_shared),
                             batch, jax.random.key(0), jnp.asarray(task.intervals[0]))
  jax.block_until_ready(out)
  resident = _live_device_bytes() - baseline
  del out, batch
  gc.collect()
  return resident


def time_train_step(task, batch_size: int, repeats: int = 10, warmup: int = 2) -> float:
  """Median seconds of one block's train step (compiled, data already on the device)."""
  step = jit_train_step(task)
  key = jax.random.key(0)
  state = jax.jit(lambda key: state_lib.init_block(task, key))(key)  # one block only
  shared = jax.jit(lambda key: state_lib.init_shared(task, key))(key)
  batch = task.example_batch(batch_size, np.random.default_rng(0))
  interval = jnp.asarray(task.intervals[0])
  times = []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    state, shared, metrics = step(state, shared, batch, jax.random.key(i), interval)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return float(np.median(times[warmup:]))
