r"""Train and evaluate one config at several values of one field, side by side.

  python -m experiments.sweep --config=experiments/configs/digits.py \
      --field=diffusion.num_blocks --values=1,2,3,4,6 \
      --config.diffusion.overlap_gamma=0 --workdir=runs/sweep_blocks

Each value trains in <workdir>/<field>=<value> (resuming if interrupted) at the config's
budget; prints a table and writes <workdir>/sweep.json. The paper's ablations (Table 5:
number of blocks; Table 6: partition) are two such sweeps, and so are the choices
behind the classifier's defaults:

  python -m experiments.sweep --config=experiments/configs/classify_digits.py \
      --field=classifier.label_embedding --values=joint,frozen --workdir=runs/sweep_label
"""
import json
import os

from absl import flags
from ml_collections import config_flags

from dbjax import tasks
from dbjax.engine import profiling
from dbjax.train import train_and_evaluate
from experiments.cli import config_help, print_table, run, summary_columns, with_field

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/digits.py",
                                          config_help(), lock_config=True)
_FIELD = flags.DEFINE_string("field", None, "dotted config field, e.g. diffusion.num_blocks")
_VALUES = flags.DEFINE_list("values", None, "values to try, comma-separated")
_WORKDIR = flags.DEFINE_string("workdir", "runs/sweep", "one subdirectory per value")
flags.mark_flags_as_required(["field", "values"])


def main(argv):
  del argv
  rows = []
  for text in _VALUES.value:
    config = with_field(_CONFIG.value, _FIELD.value, text)
    results = train_and_evaluate(config, os.path.join(_WORKDIR.value, f"{_FIELD.value}={text}"))
    task = tasks.build(tasks.resolve(config))
    memory = profiling.train_step_memory(task, config.train.batch_size)
    rows.append({_FIELD.value: text, "iterations": results["iterations"],
                 **summary_columns(task, results), "step_MiB": memory["step_bytes"] / 2**20})
  print_table(rows, list(dict.fromkeys(k for row in rows for k in row)))
  with open(os.path.join(_WORKDIR.value, "sweep.json"), "w") as f:
    json.dump({"field": _FIELD.value, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  run(main)
