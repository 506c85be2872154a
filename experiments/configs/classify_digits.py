"""DiffusionBlocks ViT classifier (12 layers, B=3) on scikit-learn's 8x8 digits.

Needs no download; a few minutes on a 2-core CPU. The end-to-end baseline, a plain ViT
of the same 12 layers with cross-entropy, at the same budget of layer evaluations:
--config.method=end_to_end.
"""
from dbjax.config import default_config


def get_config():
  config = default_config("classification")
  config.data.name = "digits"
  config.data.image_size, config.data.channels, config.data.num_classes = 8, 1, 10
  config.train.learning_rate = 1e-3
  return config
