r"""How long the sequential driver waits for blocks to move between host and device:
one checkpoint interval trained with the blocks sent there and back synchronously, with
them streamed (the next on its way while one trains, config train.stream_blocks), waiting
as numpy or in pinned host memory (train.waiting_blocks; where the backend has it), and
with every block kept on the device (no transfers at all: the time of the steps alone),
side by side in one run.

  python -m benchmarks.bench_transfers --config=experiments/configs/digits.py \
      --out=benchmarks/results/bench_transfers_digits.json

Waiting share of a way = 1 - (time with every block resident) / (its time); the blocks
on the device = the most live device bytes at any step, in units of one block's state.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from dbjax import config as config_lib, tasks
from dbjax.data.batches import batch_indices
from dbjax.engine import driver, placement as placement_lib, profiling, state as state_lib
from dbjax.engine.step import jit_train_step
from dbjax.progress import progress_bar
from experiments.cli import config_help, print_table, run, write_json

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/digits.py",
                                          config_help(), lock_config=True)
_ITERATIONS = flags.DEFINE_integer("iterations", 90, "iterations in the timed interval")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed intervals per way, taken in turn")
_OUT = flags.DEFINE_string("out", "benchmarks/results/bench_transfers_digits.json", "JSON output")

# way -> (stream, waiting) for driver.train_interval
MOVED = {"synchronous": (False, "numpy"), "streamed": (True, "numpy"),
         "streamed_pinned_host": (True, "pinned_host")}


def train_all_resident(step_fn, device_states, shared, task, chunk, train_data, config):
  """The interval's iterations in the driver's order, every block already on the device."""
  schedule = np.array([driver.block_for_step(config.seed, s, task.num_blocks) for s in chunk])
  for b, steps in driver.block_runs(chunk, schedule, task.couples_blocks):
    for step in steps:
      index = batch_indices(config.seed, int(step), train_data.num_examples,
                            config.train.batch_size)
      device_states[b], shared, _ = step_fn(device_states[b], shared, train_data.batch(index),
                                            driver.step_key(config.seed, int(step), b),
                                            jnp.asarray(task.intervals[b]))
  return jax.block_until_ready((device_states, shared))


def interval_seconds(way, step_fn, host_states, host_shared, task, chunk, train_data,
                     config) -> float:
  """Seconds to train `chunk` from the given states, the blocks moved `way`; step_fn:
  None, or a wrapper of the compiled step (recording_live_bytes)."""
  states = [jax.tree.map(np.copy, s) for s in host_states]
  bar = progress_bar(disable=True)
  if way == "all_resident":
    device_states, shared = jax.device_put((states, host_shared))
    jax.block_until_ready(device_states)
    plain_step = _SHARDED.setdefault("all_resident", jit_train_step(task))
    start = time.perf_counter()
    train_all_resident(plain_step if step_fn is None else step_fn(plain_step), device_states,
                       shared, task, chunk, train_data, config)
  else:
    stream, waiting = MOVED[way]
    placement, sharded_step = sharded_for(task, config, waiting)
    start = time.perf_counter()
    driver.train_interval(sharded_step if step_fn is None else step_fn(sharded_step), states,
                          host_shared, task, chunk, train_data, config, bar,
                          [0] * task.num_blocks, lambda: False, placement, stream=stream)
  return time.perf_counter() - start


_SHARDED = {}  # waiting -> (placement, its step): compiled once, outside the timing


def sharded_for(task, config, waiting: str):
  """(placement_for's placement, the driver's step compiled for it), made once."""
  if waiting not in _SHARDED:
    placement = placement_for(task, config, waiting)
    _SHARDED[waiting] = placement, placement_lib.jit_sharded_step(task, placement)
  return _SHARDED[waiting]


def placement_for(task, config, waiting: str):
  """The driver's placement with blocks waiting as `waiting` (train.waiting_blocks)."""
  config = config.copy_and_resolve_references()
  config.train.waiting_blocks = waiting
  return placement_lib.placement_of(task, config)


def recording_live_bytes(peaks: list):
  """A wrapper of a step that notes the live device bytes (block states, batches) at
  each call."""
  def wrap(step_fn):
    def step(*args):
      peaks.append(profiling.live_device_bytes())
      return step_fn(*args)
    return step
  return wrap


def main(argv):
  del argv
  config, data = tasks.load_data(config_lib.validate(_CONFIG.value))
  task = tasks.build(config)
  host_states, host_shared = state_lib.init_on_host(task, config.seed)
  chunk = np.arange(_ITERATIONS.value)
  args = (host_states, host_shared, task, chunk, data.train, config)
  ways = [way for way, (_, waiting) in MOVED.items()  # pinned_host where the backend has it
          if waiting == "numpy" or placement_for(task, config, waiting).waiting is not None
          ] + ["all_resident"]
  for way in ways:  # compile, and warm every path
    interval_seconds(way, None, *args)
  seconds = {way: [] for way in ways}
  for _ in range(_REPEATS.value):  # in turn, so that the machine's noise falls on all
    for way in ways:
      seconds[way].append(interval_seconds(way, None, *args))
  block_bytes = profiling.state_bytes(task)
  baseline = profiling.live_device_bytes()
  rows = []
  for way in ways:
    peaks = []
    interval_seconds(way, recording_live_bytes(peaks), *args)
    median = float(np.median(seconds[way]))
    rows.append({"way": way, "interval_seconds": median,
                 "waiting_share": 1 - float(np.median(seconds["all_resident"])) / median,
                 "blocks_on_device": (max(peaks) - baseline) / block_bytes})
  summary = {"device": jax.devices()[0].device_kind, "num_blocks": task.num_blocks,
             "iterations": _ITERATIONS.value, "block_state_bytes": block_bytes,
             "repeats": _REPEATS.value, "rows": rows,
             "seconds": {way: s for way, s in seconds.items()}}
  print_table(rows, list(rows[0]))
  shares = ", ".join(f"{r['waiting_share']:.1%} {r['way'].replace('_', ' ')}"
                     for r in rows[:-1])
  print(f"waiting on transfers, share of an interval: {shares} (target <= 5%); "
        f"device: {summary['device']}")
  write_json(_OUT.value, summary)


if __name__ == "__main__":
  run(main)
