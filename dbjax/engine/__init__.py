"""The engine: everything that moves, steps, saves and logs blocks, for any task.

  state       BlockState(params, opt_state, step), each block's own optimizer, host init
  step        the pure train step (state, shared, batch, key, interval) with its reduce hook
  driver      the sequential driver: one block on the mesh at a time, resume
  placement   where a sequential run's blocks live: training on the devices, waiting in host memory
  saved_runs  what a run checkpoints, and its restore to where each block lives
  signals     a stop within one train step on SIGTERM or Ctrl-C, agreed by every process
  block_jobs  blocks trained as separate jobs, and their assembly into one run
  locks       the lock file that keeps a second job off a block a live job trains
  mesh        the one mesh of every mode, and where each leaf of a state lives on it
  parallel    all blocks at once, each on its slice of the mesh (jax.shard_map)
  checkpoint  orbax checkpoints, one item per block, checksummed and checked for fit
  metric_log  train_metrics.jsonl, TensorBoard and the console
  profiling   compiled memory and step time of a block's step
  planning    the number of blocks whose compiled step fits a memory budget

It reads only the Task protocol (dbjax.tasks.base).
"""
from dbjax.engine.state import (BlockState, abstract_states, init_block, init_on_host,
                                init_shared, make_optimizer)
from dbjax.engine.step import jit_train_step, train_step

__all__ = ["BlockState", "abstract_states", "init_block", "init_on_host", "init_shared",
           "make_optimizer", "jit_train_step", "train_step"]
