r"""Train a run, then write metrics.json, loss_curves.png and the task's pictures to its
workdir: samples.png (generation), confusion.png and accuracy_vs_steps.png
(classification), or samples.txt (language, also printed).

  python -m experiments.train --config=experiments/configs/digits.py --workdir=runs/digits
  python -m experiments.train --config=experiments/configs/digits.py \
      --config.method=end_to_end --workdir=runs/digits_e2e
  python -m experiments.train --config=experiments/configs/classify_digits.py \
      --workdir=runs/classify_digits
  python -m experiments.train --config=experiments/configs/shakespeare_ar.py \
      --workdir=runs/shakespeare

Any config field can be overridden with --config.<field>=<value>. Re-running the same
command resumes from the latest checkpoint in the workdir.

All blocks at once, one slice of the devices each (docs/scaling_out.md):

  python -m experiments.train --config=experiments/configs/digits.py --parallel=blocks \
      --workdir=runs/digits_parallel

Blocks as separate jobs, anywhere and any time (docs/design.md, "Blocks as separate jobs"): each
job trains the blocks it is given; the one that finishes the last block assembles the run
and evaluates it.

  python -m experiments.train --config=experiments/configs/digits.py --blocks=2 \
      --workdir=runs/digits_jobs

On many hosts, run the same command on every host with --distributed (TPU pods and
SLURM find their peers; elsewhere add --coordinator_address, --num_processes and
--process_id).
"""
import json
import os

from absl import flags
from ml_collections import config_flags

from dbjax.config import PARALLEL_MODES
from dbjax.tasks.language.common import SAMPLES_FILE
from dbjax.train import train_and_evaluate
from experiments.cli import config_help, initialize_distributed, run

_CONFIG = config_flags.DEFINE_config_file("config", None, config_help(), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and images")
_PARALLEL = flags.DEFINE_enum("parallel", None, PARALLEL_MODES,
                              "sets config.parallel.mode: 'blocks' trains all blocks at once "
                              "on a (block, data) mesh of the devices present")
_BLOCKS = flags.DEFINE_string("blocks", None,
                              "train only these blocks, as a job of their own: 2, 0,2 or 1-3 "
                              "(dbjax.engine.block_jobs)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "call jax.distributed.initialize() first (many hosts)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, where not auto-detected")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if _DISTRIBUTED.value:
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  if _PARALLEL.value is not None:
    config = config.copy_and_resolve_references()
    config.parallel.mode = _PARALLEL.value
  results = train_and_evaluate(config, _WORKDIR.value, blocks=_BLOCKS.value)
  if not results:  # not process 0 of a multi-host run
    return
  if "blocks_trained" in results:  # a block job, and the run is not complete yet
    trained = ", ".join(map(str, results["blocks_trained"]))
    waiting = results["unfinished_blocks"]
    print(f"block {trained} trained to the end; "
          + (f"waiting for block {', '.join(waiting)}: the job that finishes the last "
             "block assembles and evaluates the run" if waiting
             else "another job is assembling the run"))
    return
  print(json.dumps(results, indent=2))
  samples = os.path.join(_WORKDIR.value, SAMPLES_FILE)
  if os.path.exists(samples):  # generated text: print it too
    with open(samples, encoding="utf-8") as f:
      print(f.read())
  print(f"wrote metrics.json, loss_curves.png and pictures to {_WORKDIR.value}")


if __name__ == "__main__":
  run(main)
