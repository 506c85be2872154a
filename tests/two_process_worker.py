"""One of two processes of a localhost multi-host run (tests/test_parallel.py).

  python tests/two_process_worker.py COORDINATOR_ADDRESS PROCESS_ID WORKDIR [once|rows]

Each process has 2 fake CPU devices; B = 2 blocks train on a 2 x 2 ("block", "data")
mesh, so each block lives on one process and its gradient mean runs over that process's
two devices. The run trains 4 steps (checkpoints at 2 and 4), then the step-4
checkpoint is removed and the run resumes from step 2; process 0 writes both results'
parameters to WORKDIR/params.npz.

With "rows", it trains 2 iterations in sequential mode over both processes' devices and
writes the rows this process read per batch (each host reads only its own rows).

With "once", it trains a longer run (60 steps, checkpoints every 20) once, as a
preempted job would: a signal makes it exit with the run's status (143 for SIGTERM)
after printing the stop line; at the end process 0 writes WORKDIR/params.npz.
"""
import os
import shutil
import sys

import jax
import numpy as np


def two_process_config():
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(train__num_steps=4, train__checkpoint_every=2)
  config.parallel.mode = "blocks"
  config.parallel.mesh.data = -1  # a 2 x 2 mesh: block x data
  return config


def flat_params(states) -> dict:
  """{block/path: numpy} of the blocks' parameters; on many processes the sharded
  arrays are gathered (the test compares whole values; every process must call it)."""
  def whole(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)
  return {f"{b}/{jax.tree_util.keystr(path)}": whole(leaf)
          for b, state in enumerate(states)
          for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}


def main(coordinator: str, process_id: int, workdir: str):
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=2,
                             process_id=process_id)
  from dbjax import train  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  config = two_process_config()
  uninterrupted = train.train(config, workdir)
  multihost_utils.sync_global_devices("trained")
  if process_id == 0:
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  multihost_utils.sync_global_devices("removed the last checkpoint")
  uninterrupted = flat_params(uninterrupted.states)
  resumed = flat_params(train.train(config, workdir).states)
  if process_id == 0:
    np.savez(os.path.join(workdir, "params.npz"),
             **{f"uninterrupted/{k}": v for k, v in uninterrupted.items()},
             **{f"resumed/{k}": v for k, v in resumed.items()})
  multihost_utils.sync_global_devices("done")


def train_once(coordinator: str, process_id: int, workdir: str):
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=2,
                             process_id=process_id)
  import signal  # pylint: disable=import-outside-toplevel
  from dbjax import train  # pylint: disable=import-outside-toplevel
  from dbjax.errors import TrainingInterrupted  # pylint: disable=import-outside-toplevel
  config = two_process_config()
  config.train.num_steps, config.train.checkpoint_every = 60, 20
  try:
    run = train.train(config, workdir)
  except TrainingInterrupted as e:
    print(e, flush=True)
    sys.exit(128 + signal.Signals[e.signal_name])
  params = flat_params(run.states)
  if process_id == 0:
    np.savez(os.path.join(workdir, "params.npz"), **params)


def count_rows(coordinator: str, process_id: int, workdir: str):
  """Sequential mode over both processes' 4 devices (data 4): the number of rows this
  process read for each batch goes to WORKDIR/rows_<process>.json."""
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=2,
                             process_id=process_id)
  import json  # pylint: disable=import-outside-toplevel
  from dbjax import data, train  # pylint: disable=import-outside-toplevel
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(train__num_steps=2, train__checkpoint_every=2)
  config.parallel.mesh.data = -1
  digits = data.load_images("digits", "train")
  reads = []

  class Counting:
    def __getattr__(self, name):  # images, labels, num_examples: the digits'
      return getattr(digits, name)

    def batch(self, index):
      reads.append(len(index))
      return digits.batch(index)
  train.train(config, workdir, Counting())
  with open(os.path.join(workdir, f"rows_{process_id}.json"), "w") as f:
    json.dump({"reads": reads, "batch_size": config.train.batch_size}, f)


if __name__ == "__main__":
  # Before the backend starts, which is at the first computation.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  mode = {"once": train_once, "rows": count_rows}.get(sys.argv[4] if sys.argv[4:] else "", main)
  mode(sys.argv[1], int(sys.argv[2]), sys.argv[3])
