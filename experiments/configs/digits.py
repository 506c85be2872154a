"""The main job: a DiffusionBlocks DiT (12 layers, B=3) on scikit-learn's 8x8 digits.

Needs no download. End-to-end baseline at the same budget of layer evaluations:
--config.method=end_to_end.

  python -m experiments.train --config=experiments/configs/digits.py --workdir=runs/digits

About 3 minutes on a 2-core CPU (2 min 35 s measured, training and evaluation,
2026-12-07), Frechet distance 4.80 (train's metrics.json; the README's 4.77 against
5.01 is experiments.compare's pair, results/compare_digits.json).
"""
from dbjax.config import default_config

# The defaults are this job's settings: learning rate 3e-3 and guidance 2.0 were chosen
# by experiments/compare.py (docs/generation.md, Results).


def get_config():
  config = default_config()
  config.data.name = "digits"
  config.data.image_size, config.data.channels, config.data.num_classes = 8, 1, 10
  return config
