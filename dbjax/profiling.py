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

from dbjax import blocks, classify, language


def _task(model):
  """The module that steps this model: dbjax.classify, dbjax.language or dbjax.blocks."""
  if isinstance(model, classify.ClassifierModel):
    return classify
  return language if isinstance(model, language.LanguageModel) else blocks


def _example_batch(model, batch_size: int, rng=None):
  """The step's batch inputs: images and labels of the model's shapes (zeros, or random
  values from `rng`), or token ids for a language model."""
  if isinstance(model, language.LanguageModel):
    return language.example_batch(model, batch_size, rng)
  net = model.network_config
  shape = (batch_size, net.image_size, net.image_size, net.channels)
  if rng is None:
    return jnp.zeros(shape, jnp.float32), jnp.zeros((batch_size,), jnp.int32)
  return (jnp.asarray(0.5 * rng.standard_normal(shape).astype(np.float32)),
          jnp.asarray(rng.integers(0, net.num_classes, batch_size).astype(np.int32)))


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


def train_step_memory(model, batch_size: int) -> dict:
  """Compiled memory of one block's train step, in bytes (no allocation needed)."""
  batch = _example_batch(model, batch_size)
  block, shared = _task(model).abstract_states(model)
  return compiled_memory(_task(model).jit_run_step(model).lower(
      block, shared, *batch, jax.random.key(0),
      jnp.asarray(model.intervals[0])).compile())


def _live_device_bytes() -> int:
  return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


def resident_bytes(model, batch_size: int, seed: int = 0) -> int:
  """Bytes on the device while one block trains, as the driver places them.

  All blocks are initialised to host memory; one (and the shared state, if any) is
  moved to the device and stepped. Measured as the growth of live device arrays over
  the baseline before the run.
  """
  gc.collect()
  baseline = _live_device_bytes()
  host_states, host_shared = _task(model).init_on_host(model, seed)
  step = _task(model).jit_run_step(model)
  batch = _example_batch(model, batch_size)
  out = step(jax.device_put(host_states[0]), jax.device_put(host_shared), *batch,
             jax.random.key(0), jnp.asarray(model.intervals[0]))
  jax.block_until_ready(out)
  resident = _live_device_bytes() - baseline
  del out, batch
  gc.collect()
  return resident


def time_train_step(model, batch_size: int, repeats: int = 10, warmup: int = 2) -> float:
  """Median seconds of one block's train step (compiled, data already on the device)."""
  task = _task(model)
  step = task.jit_run_step(model)
  key = jax.random.key(0)
  state = jax.jit(lambda key: task.init_block(model, key))(key)  # one block only
  shared = (jax.jit(lambda key: task.init_shared(model, key))(key)
            if hasattr(task, "init_shared") else None)
  batch = _example_batch(model, batch_size, np.random.default_rng(0))
  interval = jnp.asarray(model.intervals[0])
  times = []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    state, shared, metrics = step(state, shared, *batch, jax.random.key(i), interval)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return float(np.median(times[warmup:]))
