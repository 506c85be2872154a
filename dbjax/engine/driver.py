"""The sequential driver: train(task, config, workdir, train_data), the same for every task.

Schedule (paper, Sec. 4): every iteration draws one block uniformly at random and
trains it on the whole batch; DiffusionBlocks runs B times as many iterations as
end-to-end training, so both spend the same layer evaluations.

Mesh (dbjax.engine.mesh): the active block's step runs on every device of the run's
mesh (block axis 1), its batch split over data x fsdp and its state sharded over fsdp
(x tensor). Each host builds only the rows of the batch its devices hold.

Memory: blocks are born sharded where they live (jit with out_shardings) and wait in
the devices' pinned host memory, with the same sharding, so no host holds more of a
block than its own devices' shards; only the block being trained (and the small shared
state, if the task has one) is in device memory, with the next block on its way there
and the last on its way back (`train_interval`, config train.stream_blocks). When blocks
share no trained parameters (task.couples_blocks is False) the iterations of a
checkpoint interval are regrouped by block: each block still sees its own iterations in
order, with the batch and key of that iteration, which gives exactly the parameters of
the interleaved order while moving each block to the device once per interval. When
they share trained parameters the interleaved order is kept, and a block moves only
when the next iteration's block differs.

With parallel.mode="blocks" the driver hands each interval to
engine.parallel.BlockParallelTrainer instead, which trains all blocks at every step.

Determinism: the block, the batch and the key of iteration `step` are pure functions
of (seed, step), so a run resumed from a checkpoint continues exactly as an
uninterrupted one would. The step draws its noise for the global batch (JAX's
partitionable threefry), so the parameters do not depend on the mesh beyond the order
of float reductions.
"""
import json
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from dbjax import config as config_lib
from dbjax.data.batches import batch_indices
from dbjax.data.prefetch import depth_for, prefetched
from dbjax.engine import mesh as mesh_lib, parallel
from dbjax.engine.metric_log import MetricLog
from dbjax.engine.placement import (Placement, born_sharded, jit_sharded_step, on_host,
                                    placement_of, assemble_batch, local_rows, to_waiting)
from dbjax.engine.saved_runs import checkpointer_of, one_shared, restore, saved_shared
from dbjax.engine.signals import agreed_stop, stop_on_signals
from dbjax.errors import NonFiniteLossError, TrainingInterrupted, WorkdirError, warn
from dbjax.progress import progress_bar

METRICS_FILE = "train_metrics.jsonl"


def block_for_step(seed: int, step: int, num_blocks: int) -> int:
  """The block trained at iteration `step`: uniform, derived from (seed, step)."""
  return int(np.random.default_rng([seed, step, 1]).integers(num_blocks))


def step_key(seed: int, step: int, block_index: int) -> jax.Array:
  """The PRNG key of iteration `step`, trained by block `block_index`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), block_index)


def prepare_workdir(workdir: str):
  """Create the workdir and check that it is writable (WorkdirError if not)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # Per process: the hosts of a multi-host run probe the same shared workdir.
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from e


def read_history(path: str, progress) -> list[dict]:
  """Metric rows of the iterations a checkpoint holds: block b's rows before
  progress[b] (see `train`); the rows past it are dropped from the file."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if r["step"] < progress[r["block"]]]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return rows


def block_runs(chunk: np.ndarray, schedule: np.ndarray, couples_blocks: bool):
  """[(block, its iterations)] in the order they are trained (see the module docstring):
  regrouped by block when blocks are independent, interleaved when they are coupled."""
  order = np.arange(len(chunk)) if couples_blocks else np.argsort(schedule, kind="stable")
  runs = []
  for i in order:
    if runs and runs[-1][0] == schedule[i]:
      runs[-1][1].append(chunk[i])
    else:
      runs.append((int(schedule[i]), [chunk[i]]))
  return [(b, np.array(steps)) for b, steps in runs]


def step_key_data(seed: int, step: int, block_index: int) -> np.ndarray:
  """step_key's raw key data, as numpy: the same value on every host."""
  return np.asarray(jax.random.key_data(step_key(seed, step, block_index)))


def read_ahead(train_data, steps, config, batch_sharding):
  """This host's rows of each iteration's batch in `steps`, in order, read ahead of the
  steps in background threads as config data.prefetch says (dbjax.data.prefetch)."""
  def read(step):
    index = batch_indices(config.seed, step, train_data.num_examples, config.train.batch_size)
    return local_rows(train_data, index, batch_sharding)
  platform = batch_sharding.mesh.devices.flat[0].platform
  return prefetched(read, steps, depth_for(config.data.prefetch, platform))


def _dispatch_block_steps(step_fn, state, shared, task, block_index, steps, batches,
                          config, bar, should_stop, batch_sharding):
  """Dispatch one block's iterations (its state already on the device, or on its way)
  on the next of `batches` (read_ahead's), stopping early after the first one at which
  should_stop() holds; return its state, the shared state and the metrics of the
  iterations dispatched, all still on the device (JAX dispatches asynchronously:
  nothing here waits for the steps)."""
  metrics = []
  interval = np.asarray(task.intervals[block_index], np.float32)
  for step in steps:
    state, shared, step_metrics = step_fn(
        state, shared, assemble_batch(next(batches), batch_sharding),
        step_key_data(config.seed, int(step), block_index), interval)
    metrics.append(step_metrics)
    bar.update(1)
    if should_stop():
      break
  return state, shared, metrics


def train_interval(step_fn, states, shared, task, chunk, train_data, config, bar, progress,
                   should_stop, placement: Placement, stream: bool = True):
  """Train the iterations in `chunk` that are not applied yet (block b's from
  progress[b] on), until should_stop() holds; update `states` (where blocks wait,
  to_waiting) and `progress` in place and return (metric rows in iteration order, the
  shared state).

  A block is in one place at a time: its waiting copy is dropped when it is sent to the
  devices (states[b] is None meanwhile) and it comes back after its steps, so a host
  never holds a block twice.
  stream: a block's steps are dispatched first (JAX runs them asynchronously), and only
  then is the block sent back to pinned host memory and the next one to the devices,
  so both copies overlap the steps; the devices hold the training block and the one
  arriving. Without it each block goes there and back between the steps. The results
  are the same, bit for bit."""
  schedule = np.array([block_for_step(config.seed, s, task.num_blocks) for s in chunk])
  runs = [(b, steps[steps >= progress[b]])
          for b, steps in block_runs(chunk, schedule, task.couples_blocks)]
  runs = [(b, steps) for b, steps in runs if len(steps)]

  def to_devices(i):  # (block, its state on the devices), its waiting copy dropped
    if i >= len(runs):
      return None
    b = runs[i][0]
    state, states[b] = jax.device_put(states[b], placement.block), None
    return b, state

  rows = []
  shared = jax.device_put(shared, placement.shared)  # small; there through the interval
  batches = read_ahead(train_data, [s for _, steps in runs for s in steps], config,
                       placement.batch)
  arriving = to_devices(0)
  for i, (b, own_steps) in enumerate(runs):
    if should_stop():
      break
    state, shared, metrics = _dispatch_block_steps(step_fn, arriving[1], shared, task, b,
                                                   own_steps, batches, config, bar,
                                                   should_stop, placement.batch)
    arriving = None
    if stream:  # while block b computes: it leaves for host memory, the next one comes
      if placement.waiting is not None:
        states[b], state = to_waiting(state, placement), None
      arriving = to_devices(i + 1)
    metrics = jax.device_get(metrics)  # waits for block b's steps
    for step, m in zip(own_steps, metrics):
      rows.append({"step": int(step), "block": b, **{k: float(v) for k, v in m.items()}})
    progress[b] = int(own_steps[len(metrics) - 1]) + 1  # its iterations before are applied
    if state is not None:  # back to host memory now, then the next block
      states[b] = jax.block_until_ready(to_waiting(state, placement))
      state = None  # free its device buffers before the next block is put there
      if not stream:
        arriving = to_devices(i + 1)
  if arriving is not None:  # stopped before its turn: back where it waits, untrained
    states[arriving[0]] = to_waiting(arriving[1], placement)
  return sorted(rows, key=lambda r: r["step"]), shared


def checkpoint_chunks(first: int, total: int, every: int) -> list[np.ndarray]:
  """The iterations from `first` to `total` in checkpoint intervals: up to the next
  multiple of `every`, then `every` at a time."""
  ends = list(range((first // every + 1) * every, total, every)) + [total]
  starts = [first] + ends[:-1]
  return [np.arange(a, b) for a, b in zip(starts, ends) if b > a]


class TrainedRun(NamedTuple):
  task: Any                  # the dbjax.tasks.Task the blocks belong to
  states: list               # each block's BlockState, in host memory
  shared: Any                # the shared BlockState (empty params when nothing is shared)
  history: list[dict]        # one metrics row per iteration


def skipped_steps(rows: list[dict], policy: str, unit: str) -> list[dict]:
  """The rows whose update was skipped for a NaN or inf. policy "stop" (config
  train.on_nonfinite) raises NonFiniteLossError for the first, before any checkpoint
  could hold what followed it."""
  skipped = [r for r in rows if r["skipped"]]
  if skipped and policy == "stop":
    first = skipped[0]
    raise NonFiniteLossError(first["step"], first["block"], first["loss"], first["grad_norm"],
                             unit)
  for r in skipped:
    logging.warning("skipped the update of block %d at %s %d: loss %s, gradient norm %s",
                    r["block"], unit, r["step"], r["loss"], r["grad_norm"])
  return skipped


# Fields whose change alters the learning-rate schedule of a resumed run.
SCHEDULE_FIELDS = ("train.num_steps", "train.warmup_steps", "train.learning_rate")


def _warn_about_schedule(config, saved_config: dict | None):
  """One-line warnings for a schedule that runs but not as meant: a warmup as long as
  the updates a block gets, or a resumed run whose schedule fields changed."""
  t = config.train
  config_lib.warn_if_warmup_outlasts(("config.train.warmup_steps", t.warmup_steps),
                                     ("config.train.num_steps", t.num_steps), stacklevel=5)
  ours, saved = config_lib.flatten(config.to_dict()), config_lib.flatten(saved_config or {})
  for field in SCHEDULE_FIELDS:
    if field in saved and saved[field] != ours[field]:
      warn(f"config.{field}={ours[field]!r} differs from the checkpoint's {saved[field]!r}: "
           "the resumed run's learning-rate schedule is not the one it started with",
           stacklevel=4)


def train(task, config, workdir: str, train_data, devices=None, build=None) -> TrainedRun:
  """Train (or resume) the run of `task` in `workdir` on `train_data` (a data set whose
  .batch(index) is the task's batch tuple).

  devices: those a parallel.mode="blocks" run may use (default: all). build(config):
  the registry's task builder, for naming config fields in checkpoint errors.
  Raises NonFiniteLossError, naming step and block, if a loss becomes NaN or inf; the
  last good checkpoint stays in place. On many hosts every process calls it; only
  process 0 writes the metrics file.
  SIGTERM and a first SIGINT, from the moment it starts, stop the run within one train
  step with a checkpoint of exactly the iterations applied (TrainingInterrupted); the
  same call then resumes it to the parameters of an uninterrupted run.
  """
  with stop_on_signals() as stop:  # from the start: a signal during compilation waits
    return _train(task, config, workdir, train_data, devices, build, stop)


def _train(task, config, workdir, train_data, devices, build, stop) -> TrainedRun:
  """train(), with `stop` telling whether a signal asked it to stop."""
  prepare_workdir(workdir)
  chief = jax.process_index() == 0
  in_parallel = config.parallel.mode == "blocks"
  unit = config_lib.counter_unit(config)
  checkpointer = checkpointer_of(task, config, workdir, build)
  saved_config = None
  if in_parallel:
    placement = trainer = parallel.BlockParallelTrainer(task, config, train_data,
                                                        devices=devices, allocate=False)
  else:
    placement = placement_of(task, config, devices)
  if chief:
    print(f"training on {mesh_lib.describe(placement.mesh)}", flush=True)
  if checkpointer.latest_step() is None:
    if in_parallel:
      trainer.load()
      states, shared = trainer.host_states()
    else:
      states, shared = born_sharded(task, config.seed, placement)
    applied, meta = 0, {}
    if chief and (aside := checkpointer.set_aside()):
      print(f"starting afresh from {unit} 0: no readable checkpoint in "
            f"{checkpointer.directory}; the unreadable ones are kept in "
            f"{checkpointer.corrupt_directory} ({', '.join(aside)})", flush=True)
  else:
    applied, states, shared, meta = restore(task, config, checkpointer, placement)
    saved_config = meta.get("config")
    if chief:
      print(f"resuming from the checkpoint of {unit} {applied} in {workdir}", flush=True)
  if chief:
    _warn_about_schedule(config, saved_config)
  # progress[b]: every iteration of block b before it is applied, none after. A
  # checkpoint at an interval's end has progress[b] = the iterations done for every b;
  # one written on a stop inside an interval (its iterations regrouped by block) has
  # each block's own, and is named by the number of iterations applied.
  progress = list(meta.get("progress", [applied] * task.num_blocks))
  start = min(progress)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  history = read_history(metrics_path, progress) if chief else []
  num_skipped = sum(r.get("skipped", 0) for r in history)

  if in_parallel:  # train.num_steps steps, each of all B blocks at once
    total = config.train.num_steps
    if trainer.states is None:  # restored
      trainer.load(states, shared)
    def train_chunk(chunk, states, shared, should_stop):
      del states, shared  # the trainer holds them on the devices
      rows = trainer.train(chunk, bar, should_stop=should_stop)
      if rows:  # every block at the same step
        progress[:] = [max(r["step"] for r in rows) + 1] * task.num_blocks
      return (rows, *trainer.host_states())
  else:  # total_iterations iterations of one block each
    total = config_lib.total_iterations(config)
    step_fn = jit_sharded_step(task, placement)
    def train_chunk(chunk, states, shared, should_stop):
      rows, shared = train_interval(step_fn, states, shared, task, chunk, train_data,
                                     config, bar, progress, should_stop, placement,
                                     stream=config.train.stream_blocks)
      return rows, states, shared
  # Purged from `start` on, also at 0: a run started afresh over unreadable checkpoints
  # must not show the old run's curves.
  log = MetricLog(workdir, METRICS_FILE, enabled=chief, purge_step=start)
  # TensorBoard discards from `start` on; blocks ahead of it keep their applied rows.
  log.write_rows([r for r in history if r["step"] >= start], tensorboard_only=True)
  bar = progress_bar(total=total, initial=applied, desc=f"training {config.method}, {unit}s",
                     disable=not (config.train.progress and chief), unit=unit,
                     first_compiles=True)
  try:
    should_stop = agreed_stop(stop)
    for chunk in checkpoint_chunks(start, total, config.train.checkpoint_every):
      interval_start = time.perf_counter()
      rows, states, shared = train_chunk(chunk, states, shared, should_stop)
      num_skipped += len(skipped_steps(rows, config.train.on_nonfinite, unit))
      log.write_rows(rows)
      history += rows
      applied += len(rows) // (task.num_blocks if in_parallel else 1)
      if not should_stop():  # the whole interval: every block is at its end
        progress[:] = [max(p, int(chunk[-1]) + 1) for p in progress]
        # At the interval's last iteration (a resume purges from the next one on); a
        # parallel step trains every block, each on its own batch.
        log.write_throughput(int(chunk[-1]), len(chunk), time.perf_counter() - interval_start,
                             config.train.batch_size * (task.num_blocks if in_parallel else 1),
                             unit)
      if rows:
        checkpointer.save(applied, states, config,
                          {"iterations": total, "progress": progress}, saved_shared(shared))
        log.print_interval(applied, total, rows, unit=unit)
        bar.set_postfix(loss=f"{np.nanmean([r['loss'] for r in rows]):.4g}",
                        **({"skipped": num_skipped} if num_skipped else {}))
      if should_stop():
        raise TrainingInterrupted(stop.signal_name, applied, workdir, unit)
  finally:
    bar.close()
    checkpointer.close()
    log.close()
  return TrainedRun(task, *on_host(states, one_shared(config, shared)), history)


