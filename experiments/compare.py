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
<workdir>/compare.json. Targets: for generation, DiffusionBlocks' Frechet distance at
most 1.1x end-to-end's (paper, Table 1: 37.20 against 39.83 FID on CIFAR-10); for
classification, test accuracy within 1.5 points of end-to-end's (paper: 59.30 against
60.25 on CIFAR-100); for language, bits per character at most 1.05x end-to-end's for
MD4 (paper: 1.45 against 1.56 on text8) and 1.10x for the autoregressive model. All:
train-step memory end-to-end / DiffusionBlocks >= 0.8 B.
"""
import json
import os

from absl import flags
from ml_collections import config_flags

from dbjax import profiling
from dbjax.train import train_and_evaluate
from experiments.cli import config_help, method_variant, print_table, run

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/digits.py",
                                          config_help(), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "one subdirectory per method")


def quality_columns(config, results) -> dict:
  if config.task == "classification":
    return {"accuracy": results["accuracy"]}
  if config.task == "language":
    # The autoregressive model's headline is its first call's (language.sequence_nats).
    return {"bpc": results["bits_per_character"]}
  return {"frechet_distance": results["frechet_distance"],
          "class_accuracy": results["class_accuracy"]}


def speed_columns(config, results, step_seconds: float) -> dict:
  """Language: characters per second through one iteration's layers, and generated."""
  if config.task != "language":
    return {}
  return {"train_chars_per_s": config.train.batch_size * config.language.seq_len / step_seconds,
          "generated_chars_per_s": results["generated_chars_per_second"]}


def main(argv):
  del argv
  rows = []
  for method in ("end_to_end", "diffusion_blocks"):
    config, model = method_variant(_CONFIG.value, method)
    results = train_and_evaluate(config, os.path.join(_WORKDIR.value, method))
    memory = profiling.train_step_memory(model, config.train.batch_size)
    step_seconds = profiling.time_train_step(model, config.train.batch_size)
    rows.append({"method": method, "iterations": results["iterations"],
                 "layers_per_iteration": model.network_config.num_layers,
                 **quality_columns(config, results),
                 "step_MiB": memory["step_bytes"] / 2**20, "step_ms": 1000 * step_seconds,
                 **speed_columns(config, results, step_seconds),
                 "train_seconds": results["train_seconds_this_session"]})
  e2e, db = rows
  summary = {"task": _CONFIG.value.task, "config": _CONFIG.value.data.name, "rows": rows,
             "memory_ratio_e2e_over_db": e2e["step_MiB"] / db["step_MiB"],
             "step_time_ratio_e2e_over_db": e2e["step_ms"] / db["step_ms"]}
  print_table(rows, list(rows[0]))
  if _CONFIG.value.task == "language":
    summary["bpc_ratio_db_over_e2e"] = db["bpc"] / e2e["bpc"]
    target = 1.05 if _CONFIG.value.language.kind == "masked" else 1.10
    print(f"bits per character DB / end-to-end = {summary['bpc_ratio_db_over_e2e']:.3f} "
          f"(target <= {target})", end="")
  elif _CONFIG.value.task == "classification":
    summary["accuracy_gap_points"] = 100 * (e2e["accuracy"] - db["accuracy"])
    print(f"accuracy end-to-end - DB = {summary['accuracy_gap_points']:.2f} points "
          "(target <= 1.5)", end="")
  else:
    summary["frechet_ratio_db_over_e2e"] = db["frechet_distance"] / e2e["frechet_distance"]
    print(f"Frechet distance DB / end-to-end = {summary['frechet_ratio_db_over_e2e']:.3f} "
          "(target <= 1.1)", end="")
  print(f"; train-step memory end-to-end / DB = {summary['memory_ratio_e2e_over_db']:.2f}")
  with open(os.path.join(_WORKDIR.value, "compare.json"), "w") as f:
    json.dump(summary, f, indent=2)


if __name__ == "__main__":
  run(main)
