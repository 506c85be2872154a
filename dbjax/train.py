"""One run: train_and_evaluate(config, workdir), which the CLI, the notebook and the tests
all call, and load_run(workdir), which loads a trained run back.

It looks the task up in the registry (dbjax.tasks), trains it with the engine
(dbjax.engine.driver) and lets the task evaluate itself; nothing here depends on which
task runs.
"""
import glob
import json
import os
import time
from typing import Any, NamedTuple

import jax

from dbjax import config as config_lib, tasks
from dbjax.data.images import read_class_names
from dbjax.engine import block_jobs, driver, saved_runs, signals
from dbjax.engine.driver import (METRICS_FILE, TrainedRun, block_for_step, block_runs,
                                 step_key)
from dbjax.engine.metric_log import MetricLog
from dbjax.errors import ConfigError, WorkdirError

__all__ = ["train", "train_and_evaluate", "assemble_run", "load_run", "restore_run",
           "LoadedRun", "TrainedRun", "block_for_step", "block_runs", "step_key", "METRICS_FILE",
           "CONFIG_FILE"]

# The run's config, written when it starts: readable without dbjax or orbax.
CONFIG_FILE = "config.json"


def _build(config):
  return tasks.build(config_lib.validate(config))


def train(config, workdir: str, train_data=None, devices=None, blocks=None):
  """Train (or resume) the run of `config` in `workdir`: a TrainedRun.

  train_data: the training split (default: loaded by dbjax.tasks.load_data, which also
  fills in data-derived fields such as a text's data.vocab_size; a config given with its
  own train_data must carry them). devices: those a parallel.mode="blocks" run may use.
  See dbjax.engine.driver.train.
  blocks: train only these blocks ("2", "0,2", "1-3" or a list), as a job of their own
  (dbjax.engine.block_jobs): a BlockJob, whose .run is the assembled run when this job
  finished the run's last block.
  """
  config_lib.validate(config)
  if train_data is None:
    config, data = tasks.load_data(config)
    train_data = data.train
  task = tasks.build(config)
  task.check_train_data(config, train_data)
  driver.prepare_workdir(workdir)
  if jax.process_index() == 0:
    task.write_run_files(workdir, train_data)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json(indent=2))
  if blocks is not None:
    return block_jobs.train_blocks(task, config, workdir, train_data,
                                   block_jobs.parse_blocks(blocks, task.num_blocks),
                                   build=_build)
  if block_jobs.is_block_job_workdir(workdir):
    block_jobs.require_assembled(workdir, config)
  return driver.train(task, config, workdir, train_data, devices, build=_build)


def _run_config(workdir: str):
  """The config a run (or a block job) in `workdir` wrote when it started."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise WorkdirError(f"no {CONFIG_FILE} in {workdir!r}: it holds no run or block job")
  with open(path) as f:
    return config_lib.from_saved(json.load(f))


def assemble_run(workdir: str, sources: list[str]) -> TrainedRun:
  """One run in `workdir` from block jobs that trained in `sources` (workdirs), laid out
  as a sequential run's, which evaluate, sample, compare and load_run read as usual.
  ConfigError naming the first config field in which two sources differ (seed and
  num_steps among them; not config.EXECUTION_FIELDS); WorkdirError naming blocks that no source finished."""
  configs = [_run_config(source) for source in sources]
  flat = [config_lib.flatten(c.to_dict()) for c in configs]
  for source, other in zip(sources[1:], flat[1:]):
    if field := next((f for f in sorted(set(flat[0]) | set(other))
                      if flat[0].get(f) != other.get(f)
                      and f not in config_lib.EXECUTION_FIELDS), None):
      raise ConfigError(f"the block jobs differ in config.{field}: {flat[0].get(field)!r} in "
                        f"{sources[0]}, {other.get(field)!r} in {source}; only jobs of one "
                        "config assemble into one run")
  config = config_lib.validate(configs[0])
  task = tasks.build(config)
  driver.prepare_workdir(workdir)
  in_place = [os.path.abspath(s) for s in sources] == [os.path.abspath(workdir)]
  if in_place and block_jobs.is_assembled(workdir, config):
    return block_jobs.finish(task, config, workdir, []).run  # read back as it is
  run = block_jobs.assemble(task, config, workdir, sources)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json(indent=2))
  # What later commands read besides the checkpoint (a text run's vocabulary), made as
  # the jobs made it.
  task.write_run_files(workdir, tasks.load_data(config)[1].train)
  return run


def final_losses(history: list[dict], num_blocks: int, window: int = 20,
                 metric: str = "loss") -> dict:
  """Mean `metric` of each block's last `window` applied iterations (None if none)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  values = {b: [r[metric] for r in history if r["block"] == b and not r.get("skipped")][-window:]
            for b in range(num_blocks)}
  return {b: float(np.mean(v)) if v else None for b, v in values.items()}


def train_and_evaluate(config, workdir: str, blocks=None) -> dict:
  """Train (resuming if possible), then evaluate and write metrics.json, loss_curves.png
  and the task's pictures or texts (samples.png; confusion.png and
  accuracy_vs_steps.png; samples.txt) to `workdir`; return the metrics.

  blocks: train only these blocks, as a job of their own (see `train`); the job that
  finishes the run's last block evaluates it, the others return {"blocks_trained",
  "unfinished_blocks"}."""
  from dbjax.eval import plots  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  config_lib.validate(config)
  if blocks is not None:  # a bad --blocks stops the job before the data load, not after
    block_jobs.parse_blocks(blocks, config_lib.num_trained_blocks(config))
  # SIGTERM or Ctrl-C while the data load or the step compiles stops the run before
  # its first iteration; during the evaluation they end it (the next call redoes it).
  with signals.stop_on_signals():
    config, data = tasks.load_data(config)
    trained = train(config, workdir, data.train, blocks=blocks)
  if blocks is not None:
    if trained.run is None:  # other blocks train on, or another job assembles the run
      return {"blocks_trained": trained.blocks,
              "unfinished_blocks": {str(b): p for b, p in trained.unfinished.items()}}
    trained = trained.run
  task, states, shared, history = trained
  train_seconds = time.perf_counter() - start
  if jax.process_index() != 0:  # on many hosts, process 0 evaluates and writes the files
    return {}
  plots.save_loss_curves(history, task.num_blocks, os.path.join(workdir, "loss_curves.png"),
                         title=f"{config.method}, {config.data.name}", metric=task.curve_metric)
  results = {"task": config.task, "method": config.method, "num_blocks": task.num_blocks,
             "iterations": config_lib.total_iterations(config),
             "train_seconds_this_session": train_seconds,
             # The training objective (paper, Eq. 6: w(sigma)-weighted for a denoiser) ...
             "final_loss_per_block": final_losses(history, task.num_blocks),
             "skipped_updates": int(sum(r.get("skipped", 0) for r in history))}
  if task.curve_metric != "loss":  # ... and the unweighted metric loss_curves.png plots
    results[f"final_{task.curve_metric}_per_block"] = final_losses(
        history, task.num_blocks, metric=task.curve_metric)
  results.update(task.evaluate(config, workdir, states, shared, data))
  partial = os.path.join(workdir, "metrics.json.partial")  # whole or not at all
  with open(partial, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(partial, os.path.join(workdir, "metrics.json"))
  log = MetricLog(workdir, METRICS_FILE)
  log.write_results(results["iterations"], results)
  # The pictures and texts the run wrote, beside its curves in TensorBoard.
  log.write_pictures(results["iterations"], sorted(glob.glob(os.path.join(workdir, "*.png"))))
  for path in sorted(glob.glob(os.path.join(workdir, "*samples*.txt"))):
    with open(path, encoding="utf-8") as f:
      log.write_text(results["iterations"], os.path.basename(path), f.read())
  log.close()
  return results


def saved_config(workdir: str):
  """The config the run in `workdir` was trained with, as its newest checkpoint saved it."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  config_file = os.path.join(workdir, CONFIG_FILE)
  if block_jobs.is_block_job_workdir(workdir) and os.path.exists(config_file):
    with open(config_file) as f:
      block_jobs.require_assembled(workdir, config_lib.from_saved(json.load(f)))
  if not os.path.isdir(directory):
    raise WorkdirError(f"no checkpoints in {workdir!r}: train a run there first")
  from dbjax.engine.checkpoint import RunCheckpointer  # pylint: disable=g-import-not-at-top
  probe = RunCheckpointer(directory, 1, 1)
  step = probe.latest_step()
  if step is None:
    raise WorkdirError(f"no complete checkpoint in {directory!r}")
  meta = probe.read_metadata(step)
  probe.close()
  return config_lib.from_saved(meta["config"])


def restore_run(workdir: str, config=None):
  """(config, task, host block states, host shared state) of the latest checkpoint in
  `workdir`. The config saved with the checkpoint is used unless one is given."""
  config = config_lib.validate(saved_config(workdir) if config is None else config)
  task = tasks.build(config)
  checkpointer = saved_runs.checkpointer_of(task, config, workdir)
  _, states, shared, _ = saved_runs.restore(task, config, checkpointer)
  checkpointer.close()
  return config, task, states, saved_runs.one_shared(config, shared)


class LoadedRun(NamedTuple):
  """A trained run, as load_run gives it back."""
  config: Any          # the config it was trained with (ml_collections.ConfigDict)
  task: Any            # the model: the dbjax.tasks Task (its networks, sampler, loss)
  params: list         # each block's parameters (numpy), block 0 the noisiest
  shared_params: Any   # what the blocks share (a label or token embedding; {} if nothing)
  iteration: int       # iterations done when the checkpoint was written
  states: list         # each block's whole BlockState (params, optimizer state, count)
  class_names: tuple = ()  # image tasks: the classes' names in label order, where named

  def sample(self, key, inputs, num_steps: int | None = None, **options):
    """The task's sampler or predictor over every block (default: one call per block):
    images from labels, labels from images, or text from a prompt."""
    return self.task.sample(self.params, self.shared_params, key, inputs,
                            num_steps or self.task.num_blocks, **options)

  def network(self, block: int):
    """The nnx.Module of block `block` with its trained parameters."""
    return self.task.network(self.params[block], self.shared_params)


def load_run(workdir: str) -> LoadedRun:
  """The run trained in `workdir` (by experiments/train.py, train_and_evaluate or
  train), from its newest readable checkpoint and the config saved with it."""
  config = config_lib.validate(saved_config(workdir))
  task = tasks.build(config)
  checkpointer = saved_runs.checkpointer_of(task, config, workdir)
  iteration, states, shared, _ = saved_runs.restore(task, config, checkpointer)
  checkpointer.close()
  shared = saved_runs.one_shared(config, shared)
  return LoadedRun(config, task, [s.params for s in states], shared.params, iteration, states,
                   read_class_names(workdir))



def load_run_data(config, workdir: str):
  """(config, RunData) of a trained run, its data read as the run saw it (a text run's
  with the vocabulary saved in its workdir)."""
  return tasks.load_data(config, workdir)
