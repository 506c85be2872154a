r"""End-to-end against DiffusionBlocks at a matched budget of layer evaluations, on the
same data, evaluated side by side in one table.

  python -m experiments.compare --config=experiments/configs/digits.py \
      --workdir=runs/compare_digits
  python -m experiments.compare --config=experiments/configs/classify_fashion_mnist.py \
      --workdir=runs/compare_classify_fashion_mnist
  python -m experiments.compare --config=experiments/configs/shakespeare_md4.py \
      --workdir=runs/compare_shakespeare_md4

Each method trains in <workdir>/<method> (resuming if interrupted) with the config's
train.num_steps as the budget: end-to-end runs num_steps iterations of all L layers,
DiffusionBlocks num_steps * B iterations of L/B layers. Prints a table and writes
<workdir>/compare.json: each method's task summary metrics (the task's headline first),
compiled train-step memory and step time, and the ratios DiffusionBlocks / end-to-end of
the headline and end-to-end / DiffusionBlocks of memory and time. Targets (each task
page's results table, docs/):
for generation, DiffusionBlocks' Frechet distance at most 1.1x end-to-end's (paper, Table
1: 37.20 against 39.83 FID on CIFAR-10); for classification, test accuracy within 1.5
points (paper: 59.30 against 60.25 on CIFAR-100); for language, bits per character at most
1.05x for MD4 (paper: 1.45 against 1.56 on text8) and 1.10x for the autoregressive model.
All: train-step memory end-to-end / DiffusionBlocks >= 0.8 B.
"""
import json
import os

from absl import flags
from ml_collections import config_flags

from dbjax.engine import profiling
from dbjax.train import train_and_evaluate
from experiments.cli import config_help, method_variant, print_table, run, summary_columns

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/digits.py",
                                          config_help(), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "one subdirectory per method")


def main(argv):
  del argv
  rows = []
  for method in ("end_to_end", "diffusion_blocks"):
    config, task = method_variant(_CONFIG.value, method)
    results = train_and_evaluate(config, os.path.join(_WORKDIR.value, method))
    memory = profiling.train_step_memory(task, config.train.batch_size)
    step_seconds = profiling.time_train_step(task, config.train.batch_size)
    rows.append({"method": method, "iterations": results["iterations"],
                 "layers_per_iteration": task.network_config.num_layers,
                 **summary_columns(task, results),
                 "step_MiB": memory["step_bytes"] / 2**20, "step_ms": 1000 * step_seconds,
                 "train_seconds": results["train_seconds_this_session"]})
  e2e, db = rows
  headline = task.headline_metric
  summary = {"task": _CONFIG.value.task, "config": _CONFIG.value.data.name,
             "headline": headline, "rows": rows,
             f"{headline}_ratio_db_over_e2e": db[headline] / e2e[headline],
             f"{headline}_e2e_minus_db": e2e[headline] - db[headline],
             "memory_ratio_e2e_over_db": e2e["step_MiB"] / db["step_MiB"],
             "step_time_ratio_e2e_over_db": e2e["step_ms"] / db["step_ms"]}
  print_table(rows, list(dict.fromkeys(k for row in rows for k in row)))
  print(f"{headline}: DB / end-to-end = {summary[f'{headline}_ratio_db_over_e2e']:.3f}, "
        f"end-to-end - DB = {summary[f'{headline}_e2e_minus_db']:.4g}; train-step memory "
        f"end-to-end / DB = {summary['memory_ratio_e2e_over_db']:.2f}; step time "
        f"end-to-end / DB = {summary['step_time_ratio_e2e_over_db']:.2f}")
  with open(os.path.join(_WORKDIR.value, "compare.json"), "w") as f:
    json.dump(summary, f, indent=2)


if __name__ == "__main__":
  run(main)
