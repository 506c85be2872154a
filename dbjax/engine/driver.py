"""The sequential driver: train(task, config, workdir, train_data), the same for every task.

Schedule (paper, Sec. 4): every iteration draws one block uniformly at random and
trains it on the whole batch; DiffusionBlocks runs B times as many iterations as
end-to-end training, so both spend the same layer evaluations.

Memory: all blocks' states live in host memory as numpy; only the block being trained
(and the small shared state, if the task has one) is on the accelerator, with the next
block on its way there and the last on its way back (`train_interval`, config
train.stream_blocks). When blocks
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
uninterrupted one would.
"""
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dbjax import config as config_lib
from dbjax.data.batches import batch_indices
from dbjax.engine import parallel, state as state_lib
from dbjax.engine.metric_log import MetricLog
from dbjax.engine.signals import agreed_stop, stop_on_signals
from dbjax.engine.step import jit_train_step
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


def _dispatch_block_steps(step_fn, state, shared, task, block_index, steps, train_data,
                          config, bar, should_stop):
  """Dispatch one block's iterations (its state already on the device, or on its way),
  stopping early after the first one at which should_stop() holds; return its state,
  the shared state and the metrics of the iterations dispatched, all still on the
  device (JAX dispatches asynchronously: nothing here waits for the steps)."""
  metrics = []
  interval = jnp.asarray(task.intervals[block_index])
  for step in steps:
    index = batch_indices(config.seed, int(step), train_data.num_examples,
                          config.train.batch_size)
    state, shared, step_metrics = step_fn(
        state, shared, train_data.batch(index), step_key(config.seed, int(step), block_index),
        interval)
    metrics.append(step_metrics)
    bar.update(1)
    if should_stop():
      break
  return state, shared, metrics


def waiting_placement(waiting: str):
  """Where a block waits in host memory while another trains (config
  train.waiting_blocks): the device's pinned host memory where its backend has that memory
  kind ("pinned_host"; page-locked, so copies to and from the device are DMA that need no
  staging buffer and run beside the steps), else None, numpy arrays in ordinary memory."""
  device = jax.local_devices()[0]
  if waiting == "pinned_host" and "pinned_host" in {m.kind for m in
                                                    device.addressable_memories()}:
    return jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
  return None


def train_interval(step_fn, states, shared, task, chunk, train_data, config, bar, progress,
                    should_stop, stream: bool = True, waiting: str = "numpy"):
  """Train the iterations in `chunk` that are not applied yet (block b's from
  progress[b] on), until should_stop() holds; update the host `states` and `progress`
  in place and return (metric rows in iteration order, the host shared state).

  stream: a block's steps are dispatched first (JAX runs them asynchronously), and only
  then is the previous block fetched back to the host and the next one sent to the
  device, so both transfers overlap the steps and the device never waits for them; it
  holds the training block and the one arriving. Without it each block goes there and
  back between the steps. The results are the same, bit for bit.
  waiting: where streamed blocks wait (`waiting_placement`); the states are numpy again
  when the interval ends."""
  schedule = np.array([block_for_step(config.seed, s, task.num_blocks) for s in chunk])
  runs = [(b, steps[steps >= progress[b]])
          for b, steps in block_runs(chunk, schedule, task.couples_blocks)]
  runs = [(b, steps) for b, steps in runs if len(steps)]
  # Explicitly the device's default memory: a plain device_put leaves a pinned array there.
  on_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  parked = waiting_placement(waiting) if stream else None
  upload = (lambda i: jax.device_put(states[runs[i][0]], on_device) if i < len(runs)
            else None)
  rows, leaving = [], None  # leaving: (block, its device state on its way to the host)
  shared = jax.device_put(shared, on_device)  # small; on the device through the interval
  arriving = upload(0)
  for i, (b, own_steps) in enumerate(runs):
    if should_stop():
      break
    state, shared, metrics = _dispatch_block_steps(step_fn, arriving, shared, task, b,
                                                   own_steps, train_data, config, bar,
                                                   should_stop)
    arriving = None
    if stream:  # while block b computes: the last block back, the next one there
      _land(states, leaving)
      if parked is not None:  # dispatched, not awaited: the copy follows b's steps
        states[b], leaving = jax.device_put(state, parked), None
      else:
        leaving = (b, state)
      arriving = upload(i + 1)
    metrics = jax.device_get(metrics)  # waits for block b's steps
    for step, m in zip(own_steps, metrics):
      rows.append({"step": int(step), "block": b, **{k: float(v) for k, v in m.items()}})
    progress[b] = int(own_steps[len(metrics) - 1]) + 1  # its iterations before are applied
    if not stream:  # back to host, then the next block to the device
      states[b] = jax.device_get(state)
      del state  # free its device buffers before the next block is put there
      arriving = upload(i + 1)
  _land(states, leaving)
  if parked is not None:  # the parked blocks back to numpy (numpy ones stay as they are)
    for b in {b for b, _ in runs}:
      states[b] = jax.device_get(states[b])
  return sorted(rows, key=lambda r: r["step"]), jax.device_get(shared)


def _land(states, leaving):
  """Wait for a block's copy to the host to finish and keep it in `states`."""
  if leaving is not None:
    b, state = leaving
    states[b] = jax.device_get(state)


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
  if t.warmup_steps >= t.num_steps:
    warn(f"config.train.warmup_steps={t.warmup_steps} is not below the {t.num_steps} "
         "updates each block gets (config.train.num_steps): its learning rate never "
         "reaches config.train.learning_rate", stacklevel=4)
  ours, saved = config_lib.flatten(config.to_dict()), config_lib.flatten(saved_config or {})
  for field in SCHEDULE_FIELDS:
    if field in saved and saved[field] != ours[field]:
      warn(f"config.{field}={ours[field]!r} differs from the checkpoint's {saved[field]!r}: "
           "the resumed run's learning-rate schedule is not the one it started with",
           stacklevel=4)


def checkpoint_targets(task, config) -> dict:
  """{item name: abstract tree} of what a run saves: one item per block and the shared
  state, when the task has one (one copy per block with parallel.mode "blocks": each
  block's copy has its own optimizer state; see engine.parallel)."""
  block, shared = state_lib.abstract_states(task)
  targets = {f"block_{b}": block for b in range(task.num_blocks)}
  if state_lib.has_shared(task):
    if config.parallel.mode == "blocks":
      shared = parallel.stacked_abstract(shared, task.num_blocks)
    targets["shared"] = shared
  return targets


def saved_shared(shared):
  """The shared state as a checkpoint holds it: None when the task shares nothing."""
  return shared if jax.tree.leaves(shared.params) else None


def _restored_shared(task, config, shared):
  """The shared state of a restored run: rebuilt empty when the task shares nothing."""
  if shared is not None:
    return shared
  empty = jax.device_get(state_lib.init_shared(task, jax.random.key(0)))
  return parallel.stack([empty] * task.num_blocks) if config.parallel.mode == "blocks" else empty


def one_shared(config, shared):
  """The shared state a trained run is evaluated with: the copies are equal after
  every average (parallel.mode "blocks"), so block 0's."""
  if config.parallel.mode == "blocks":
    return jax.tree.map(lambda x: x[0], shared)
  return shared


def checkpointer_of(task, config, workdir: str, build=None):
  """The run's RunCheckpointer; build(config) -> task (the registry's) lets it name the
  config fields behind a checkpoint that does not fit."""
  # Imported here: orbax takes a quarter of a second to import, and `import dbjax` for
  # a model alone should not pay for it.
  from dbjax.engine.checkpoint import RunCheckpointer  # pylint: disable=g-import-not-at-top
  targets_of = None if build is None else (
      lambda other: checkpoint_targets(build(other), other))
  return RunCheckpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                         task.num_blocks, config.train.max_checkpoints, targets_of=targets_of)


def restore(task, config, checkpointer):
  """(step, host block states, host shared state, saved metadata) of the newest readable
  checkpoint (the metadata holds the config it was saved with)."""
  targets = checkpoint_targets(task, config)
  step, states, shared, meta = checkpointer.restore_latest_good(
      [targets[f"block_{b}"] for b in range(task.num_blocks)], config,
      target_shared=targets.get("shared"))
  return step, states, _restored_shared(task, config, shared), meta


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
  if checkpointer.latest_step() is None:
    init = parallel.init_on_host if in_parallel else state_lib.init_on_host
    applied, (states, shared), meta = 0, init(task, config.seed), {}
    if chief and (aside := checkpointer.set_aside()):
      print(f"starting afresh from {unit} 0: no readable checkpoint in "
            f"{checkpointer.directory}; the unreadable ones are kept in "
            f"{checkpointer.corrupt_directory} ({', '.join(aside)})", flush=True)
  else:
    applied, states, shared, meta = restore(task, config, checkpointer)
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
    trainer = parallel.BlockParallelTrainer(task, config, train_data, states, shared, devices)
    def train_chunk(chunk, states, shared, should_stop):
      del states, shared  # the trainer holds them on the devices
      rows = trainer.train(chunk, bar, should_stop=should_stop)
      if rows:  # every block at the same step
        progress[:] = [max(r["step"] for r in rows) + 1] * task.num_blocks
      return (rows, *trainer.host_states())
  else:  # total_iterations iterations of one block each
    total = config_lib.total_iterations(config)
    step_fn = jit_train_step(task)
    def train_chunk(chunk, states, shared, should_stop):
      rows, shared = train_interval(step_fn, states, shared, task, chunk, train_data,
                                     config, bar, progress, should_stop,
                                     stream=config.train.stream_blocks,
                                     waiting=config.train.waiting_blocks)
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
  return TrainedRun(task, states, one_shared(config, shared), history)
