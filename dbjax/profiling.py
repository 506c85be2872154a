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

from dbjax import blocks


def _example_batch(model: blocks.BlockModel, batch_size: int):
  d = model.dit
  images = jnp.zeros((batch_size, d.image_size, d.image_size, d.channels), jnp.float32)
  labels = jnp.zeros((batch_size,), jnp.int32)
  return images, labels


def train_step_memory(model: blocks.BlockModel, batch_size: int) -> dict:
  """Compiled memory of one block's train step, in bytes (no allocation needed)."""
  images, labels = _example_batch(model, batch_size)
  compiled = blocks.jit_train_step(model).lower(
      blocks.abstract_block_state(model), images, labels, jax.random.key(0),
      jnp.asarray(model.intervals[0])).compile()
  stats = compiled.memory_analysis()
  out = {"argument_bytes": stats.argument_size_in_bytes,
         "output_bytes": stats.output_size_in_bytes,
         "alias_bytes": stats.alias_size_in_bytes,
         "temp_bytes": stats.temp_size_in_bytes}
  out["step_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  return out


def _live_device_bytes() -> int:
  return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


def resident_bytes(model: blocks.BlockModel, batch_size: int, seed: int = 0) -> int:
  """Bytes on the device while one block trains, as the driver places them.

  All blocks are initialised to host memory; one is moved to the device and stepped.
  Measured as the growth of live device arrays over the baseline before the run.
  """
  gc.collect()
  baseline = _live_device_bytes()
  host_states = blocks.init_blocks_on_host(model, seed)
  step = blocks.jit_train_step(model)
  images, labels = _example_batch(model, batch_size)
  state, metrics = step(jax.device_put(host_states[0]), images, labels, jax.random.key(0),
                        jnp.asarray(model.intervals[0]))
  jax.block_until_ready((state, metrics))
  resident = _live_device_bytes() - baseline
  del state, metrics, images, labels
  gc.collect()
  return resident


def time_train_step(model: blocks.BlockModel, batch_size: int, repeats: int = 10,
                    warmup: int = 2) -> float:
  """Median seconds of one block's train step (compiled, data already on the device)."""
  step = blocks.jit_train_step(model)
  state = jax.jit(lambda key: blocks.init_block(model, key))(jax.random.key(0))  # one block
  rng = np.random.default_rng(0)
  d = model.dit
  images = jnp.asarray(rng.standard_normal((batch_size, d.image_size, d.image_size,
                                            d.channels)).astype(np.float32) * 0.5)
  labels = jnp.asarray(rng.integers(0, d.num_classes, batch_size).astype(np.int32))
  interval = jnp.asarray(model.intervals[0])
  times = []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    state, metrics = step(state, images, labels, jax.random.key(i), interval)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return float(np.median(times[warmup:]))
