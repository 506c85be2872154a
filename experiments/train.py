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
"""
import json
import os

from absl import flags
from ml_collections import config_flags

from dbjax.train import SAMPLES_FILE, train_and_evaluate
from experiments.cli import run, config_help

_CONFIG = config_flags.DEFINE_config_file("config", None, config_help(), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and images")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(results, indent=2))
  samples = os.path.join(_WORKDIR.value, SAMPLES_FILE)
  if _CONFIG.value.task == "language" and os.path.exists(samples):
    with open(samples, encoding="utf-8") as f:
      print(f.read())
  print(f"wrote metrics.json, loss_curves.png and pictures to {_WORKDIR.value}")


if __name__ == "__main__":
  run(main)
