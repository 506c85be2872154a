"""Blocks as independent jobs: each block trains in a job of its own, started whenever and
wherever there is room, with no coordinator, no collective and nothing exchanged but
files at the end.

Why the result is exact: a block's iterations, batches and keys are pure functions of
(seed, iteration) (engine.driver), and when blocks share no trained parameters
(task.couples_blocks is False) a block's parameters depend on its own iterations alone
(paper, Sec. 3: each block is trained independently on its own noise levels). So a job
that runs block b through the iterations the schedule gives it, with their batches and
keys, ends with the parameters block b has after a sequential run, bit for bit.

The shared state of such a task (a frozen label or token embedding) never changes its
parameters, but its optimizer counts every iteration of every block; the job that
assembles the run replays those counts (`replayed_shared`), so the assembled shared
state is the sequential run's too.

Layout, in the run's workdir W (shared by all jobs, or one per job and then `assemble`d):

  W/blocks/block_<b>/checkpoints/<p>/  block b, its iterations before iteration p applied
  W/blocks/block_<b>/train_metrics.jsonl, tensorboard/  its metric rows
  W/blocks/block_<b>/lock              the job training it now (BlockLock)
  W/checkpoints/<total>/               every block and the shared state, written by the
                                       job that finishes the last block: a sequential
                                       run's layout, which every command reads as it is
"""
import contextlib
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dbjax import config as config_lib
from dbjax.engine import driver, placement as placement_lib, saved_runs, signals, state as state_lib
from dbjax.engine.locks import BlockLock
from dbjax.engine.metric_log import MetricLog
from dbjax.engine.step import update
from dbjax.errors import ConfigError, TrainingInterrupted, WorkdirError
from dbjax.progress import progress_bar

BLOCKS_DIR = "blocks"
LOCK_FILE = "lock"


def block_dir(workdir: str, block: int) -> str:
  """Where block b's job keeps its checkpoints, rows and lock."""
  return os.path.join(os.path.abspath(workdir), BLOCKS_DIR, f"block_{block}")


def parse_blocks(text, num_blocks: int) -> list[int]:
  """The blocks of a --blocks value: "2", "0,2" or "1-3" (SLURM's array syntax), or a
  list of indices, sorted; ConfigError naming the value otherwise."""
  if not isinstance(text, str):
    text = ",".join(str(b) for b in np.atleast_1d(text))
  blocks = set()
  for part in str(text).replace(" ", "").split(","):
    first, dash, last = part.partition("-")
    if not first.isdigit() or (dash and not (last.isdigit() and int(last) >= int(first))):
      raise ConfigError(f"--blocks={text}: {part!r} is not a block index or a range a-b; "
                        "give e.g. --blocks=2, --blocks=0,2 or --blocks=1-3")
    blocks.update(range(int(first), int(last or first) + 1))
  if outside := sorted(b for b in blocks if b >= num_blocks):
    raise ConfigError(f"--blocks={text}: block {outside[0]} does not exist; this run has "
                      f"blocks 0 to {num_blocks - 1} (config.diffusion.num_blocks="
                      f"{num_blocks})")
  return sorted(blocks)


def check_block_job(task, config):
  """ConfigError, one line, for a run whose blocks cannot train as separate jobs."""
  if config.parallel.mode == "blocks":
    raise ConfigError("--blocks trains blocks as separate jobs and config.parallel.mode="
                      "'blocks' trains them in one program: choose one")
  if task.couples_blocks:
    raise ConfigError(
        "the blocks of this config share trained parameters (a jointly trained label or "
        "token embedding, or shared modules), so they cannot train as separate jobs; "
        "freeze them (classifier.label_embedding='frozen', classifier.shared_modules="
        "'per_block', language.token_embedding='frozen') or train without --blocks")
  if jax.process_count() > 1:
    raise ConfigError("a block job runs in one process; start one job per block instead "
                      "of a multi-process run")


def block_checkpointer(task, config, workdir: str, block: int, build=None,
                       remove_partial: bool = True):
  """The RunCheckpointer of one block's job: block_<b> alone, with the job's metadata."""
  from dbjax.engine.checkpoint import RunCheckpointer  # pylint: disable=g-import-not-at-top
  name = f"block_{block}"
  targets_of = None if build is None else (
      lambda other: {name: saved_runs.checkpoint_targets(build(other), other)[name]})
  return RunCheckpointer(os.path.join(block_dir(workdir, block), "checkpoints"),
                         task.num_blocks, config.train.max_checkpoints, targets_of=targets_of,
                         block_ids=[block], remove_partial=remove_partial,
                         asynchronous=config.train.async_checkpoints)


def block_progress(workdir: str, block: int) -> int | None:
  """Iterations before which block b's are applied, by its newest complete checkpoint
  (orbax names a step's directory only once it is complete); None without one. Reads no
  file a running job writes."""
  directory = os.path.join(block_dir(workdir, block), "checkpoints")
  if not os.path.isdir(directory):
    return None
  return max((int(name) for name in os.listdir(directory) if name.isdigit()), default=None)


def unfinished_blocks(workdir: str, config) -> dict[int, int | None]:
  """{block: its progress (None: never started)} of the blocks not yet at the end."""
  total = config_lib.total_iterations(config)
  progress = {b: block_progress(workdir, b)
              for b in range(config_lib.num_trained_blocks(config))}
  return {b: p for b, p in progress.items() if p != total}


def describe_unfinished(unfinished: dict, total: int) -> str:
  """'block 1 (at iteration 120 of 600), block 3 (not started)'."""
  return ", ".join(f"block {b} (" + (f"at iteration {p} of {total}" if p is not None
                                     else "not started") + ")"
                   for b, p in unfinished.items())


def is_block_job_workdir(workdir: str) -> bool:
  """Whether block jobs have trained in `workdir`."""
  return os.path.isdir(os.path.join(workdir, BLOCKS_DIR))


def replayed_shared(task, config) -> state_lib.BlockState:
  """The shared state after a sequential run of `config`: the fresh one, updated once
  per iteration with gradients that its frozen parameters ignore (see the module
  docstring)."""
  total = config_lib.total_iterations(config)
  shared = state_lib.init_shared_on_host(task, config.seed)
  if not state_lib.has_shared(task):
    return shared

  @jax.jit
  def replay(shared):
    zero_update = lambda _, s: update(task.shared_optimizer, s,
                                      jax.tree.map(jnp.zeros_like, s.params))
    return jax.lax.fori_loop(0, total, zero_update, shared)
  return jax.device_get(replay(shared))


class BlockJob(NamedTuple):
  """What train_blocks did."""
  blocks: list[int]          # the blocks this job trained
  unfinished: dict           # other blocks not yet at the end: {block: progress or None}
  run: driver.TrainedRun | None  # the assembled run, when this job finished the last block


def train_blocks(task, config, workdir: str, train_data, blocks: list[int],
                 build=None) -> BlockJob:
  """Train (or resume) `blocks` of the run of `config` in `workdir`, each through exactly
  its iterations of the sequential schedule; then, if every block of the run is at its
  end, assemble the run (`assemble`). SIGTERM or Ctrl-C stop it within one train step,
  with each block's checkpoint of the iterations applied (TrainingInterrupted)."""
  check_block_job(task, config)
  driver.prepare_workdir(workdir)
  run_checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(run_checkpoints) and not is_block_job_workdir(workdir) and any(
      name.isdigit() for name in os.listdir(run_checkpoints)):
    raise WorkdirError(f"{workdir!r} holds a run trained without --blocks; block jobs need "
                       "a workdir of their own")
  with signals.stop_on_signals() as stop, contextlib.ExitStack() as held:
    locks = {b: held.enter_context(BlockLock(os.path.join(block_dir(workdir, b), LOCK_FILE),
                                             f"block {b} of {workdir}"))
             for b in blocks}
    _train_own_blocks(task, config, workdir, train_data, blocks, locks, stop, build)
  return finish(task, config, workdir, blocks)


def _train_own_blocks(task, config, workdir, train_data, blocks, locks, stop, build):
  """train_blocks' training, with the locks of `blocks` held."""
  total, every = config_lib.total_iterations(config), config.train.checkpoint_every
  checkpointers = {b: block_checkpointer(task, config, workdir, b, build) for b in blocks}
  states, progress = [None] * task.num_blocks, [total] * task.num_blocks
  fresh = [b for b in blocks if checkpointers[b].latest_step() is None]
  for b, state in zip(fresh, state_lib.init_blocks_on_host(task, config.seed, fresh)):
    states[b], progress[b] = state, 0
  target = state_lib.abstract_states(task)[0]
  for b in set(blocks) - set(fresh):
    progress[b], [states[b]], _, _ = checkpointers[b].restore_latest_good([target], config)
    print(f"block {b}: resuming from its checkpoint at iteration {progress[b]} of {total}",
          flush=True)
  saved = list(progress)
  logs = {b: MetricLog(block_dir(workdir, b), driver.METRICS_FILE, purge_step=progress[b])
          for b in blocks}
  for b in blocks:
    driver.read_history(os.path.join(block_dir(workdir, b), driver.METRICS_FILE),
                        {b: progress[b]})
  schedule = np.array([driver.block_for_step(config.seed, s, task.num_blocks)
                       for s in range(total)])
  mine = np.isin(schedule, blocks)
  done = sum(int(np.sum(schedule[:progress[b]] == b)) for b in blocks)
  bar = progress_bar(total=int(mine.sum()), initial=done, unit="iteration",
                     desc=f"training block{'s' if len(blocks) > 1 else ''} "
                          f"{','.join(map(str, blocks))}, iterations",
                     disable=not config.train.progress, first_compiles=True)
  placement = placement_lib.placement_of(task, config)
  step_fn = placement_lib.jit_sharded_step(task, placement)
  shared = state_lib.init_shared_on_host(task, config.seed)
  should_stop = lambda: stop.signal_name is not None
  try:
    for chunk in driver.checkpoint_chunks(min(progress[b] for b in blocks), total, every):
      rows, shared = driver.train_interval(
          step_fn, states, shared, task, chunk[mine[chunk]], train_data, config, bar,
          progress, should_stop, placement, stream=config.train.stream_blocks)
      driver.skipped_steps(rows, config.train.on_nonfinite, "iteration")
      done += len(rows)
      for b in blocks:
        if not should_stop():  # the whole interval: the block is at its end
          progress[b] = max(progress[b], int(chunk[-1]) + 1)
        if progress[b] != saved[b]:
          locks[b].check()
          # Rows first: a kill before the save leaves rows past the checkpoint, which
          # the resumed job drops; the other order would lose rows.
          logs[b].write_rows([r for r in rows if r["block"] == b])
          checkpointers[b].save(progress[b], [states[b]], config,
                                {"iterations": total, "progress": progress[b], "block": b})
          saved[b] = progress[b]
      if rows:
        logs[blocks[0]].print_interval(done, bar.total, rows)
      if should_stop():
        raise TrainingInterrupted(
            stop.signal_name, done, workdir, saved="after saving " + ", ".join(
                f"block {b}'s checkpoint at iteration {progress[b]}" for b in blocks)
            + f" in {workdir}")
  finally:
    bar.close()
    for b in blocks:
      checkpointers[b].close()
      logs[b].close()


def is_assembled(workdir: str, config) -> bool:
  """Whether the run's final checkpoint is in place (complete: orbax names it last)."""
  return os.path.isdir(os.path.join(workdir, "checkpoints",
                                    str(config_lib.total_iterations(config))))


def require_assembled(workdir: str, config):
  """WorkdirError, one line, for a workdir of block jobs whose run is not assembled yet:
  the blocks not at their end, or the command that assembles it."""
  if is_assembled(workdir, config):
    return
  total = config_lib.total_iterations(config)
  if unfinished := unfinished_blocks(workdir, config):
    raise WorkdirError(
        f"{workdir!r} holds block jobs whose run is not complete: "
        f"{describe_unfinished(unfinished, total)}; run "
        f"{'its job' if len(unfinished) == 1 else 'their jobs'} (python -m "
        f"experiments.train ... --blocks={','.join(map(str, unfinished))}); "
        "the last to finish assembles the run")
  raise WorkdirError(f"every block in {workdir!r} is at its end but the run is not assembled: "
                     f"python -m experiments.assemble --workdir={workdir}")


def finish(task, config, workdir: str, blocks: list[int]) -> BlockJob:
  """After a job's blocks: assemble the run if every block is at its end and no other
  job is assembling it, or read it back if it is assembled; the BlockJob either way."""
  unfinished = unfinished_blocks(workdir, config)
  if unfinished:
    return BlockJob(blocks, unfinished, None)
  if is_assembled(workdir, config):  # a finished job run again
    checkpointer = saved_runs.checkpointer_of(task, config, workdir)
    _, states, shared, _ = saved_runs.restore(task, config, checkpointer)
    checkpointer.close()
    history = driver.read_history(os.path.join(workdir, driver.METRICS_FILE),
                                  [config_lib.total_iterations(config)] * task.num_blocks)
    return BlockJob(blocks, {}, driver.TrainedRun(task, states, shared, history))
  with contextlib.ExitStack() as held:
    try:
      held.enter_context(BlockLock(os.path.join(workdir, BLOCKS_DIR, "assembly_lock"),
                                   f"the assembly of {workdir}"))
    except WorkdirError:  # another job finished at the same moment and assembles it
      return BlockJob(blocks, {}, None)
    return BlockJob(blocks, {}, assemble(task, config, workdir, [workdir]))


def _rows(path: str) -> list[dict]:
  """The metric rows of a finished block (read only: a source may be read-only)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def assemble(task, config, workdir: str, sources: list[str]) -> driver.TrainedRun:
  """Write the run of `config` into `workdir` as a sequential run lays it out: its final
  checkpoint (every block at the end, the replayed shared state) and its metric rows.
  Each block is read from the first of `sources` (workdirs of block jobs) where it is
  at its end; WorkdirError naming the blocks that are nowhere finished."""
  total = config_lib.total_iterations(config)
  if is_assembled(workdir, config):
    raise WorkdirError(f"{workdir!r} already holds an assembled run (checkpoints/{total}); "
                       "evaluate it as it is, or assemble into another workdir")
  where = {}
  for source in sources:
    for b in range(task.num_blocks):
      if b not in where and block_progress(source, b) == total:
        where[b] = source
  if missing := {b: max((p for s in sources if (p := block_progress(s, b)) is not None),
                        default=None)
                 for b in range(task.num_blocks) if b not in where}:
    raise WorkdirError(f"cannot assemble the run in {workdir!r}: "
                       f"{describe_unfinished(missing, total)} in {', '.join(sources)}; "
                       f"run {'its job' if len(missing) == 1 else 'their jobs'} (--blocks="
                       f"{','.join(map(str, missing))}) to the end first")
  target = state_lib.abstract_states(task)[0]
  states, history = [], []
  for b in range(task.num_blocks):
    checkpointer = block_checkpointer(task, config, where[b], b, remove_partial=False)
    states += checkpointer.restore([target], config, step=total)[1]
    checkpointer.close()
    history += _rows(os.path.join(block_dir(where[b], b), driver.METRICS_FILE))
  history.sort(key=lambda r: r["step"])
  shared = replayed_shared(task, config)
  checkpointer = saved_runs.checkpointer_of(task, config, workdir)
  checkpointer.save(total, states, config,
                    {"iterations": total, "progress": [total] * task.num_blocks},
                    saved_runs.saved_shared(shared))
  checkpointer.close()
  metrics_path = os.path.join(workdir, driver.METRICS_FILE)
  if os.path.exists(metrics_path):  # assembled again: the rows are written afresh
    os.remove(metrics_path)
  log = MetricLog(workdir, driver.METRICS_FILE, purge_step=0)
  log.write_rows(history)
  log.close()
  print(f"assembled the run in {workdir}: every block at iteration {total}", flush=True)
  return driver.TrainedRun(task, states, shared, history)
