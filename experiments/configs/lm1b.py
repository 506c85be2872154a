"""Autoregressive DiffusionBlocks LM on LM1B, characters, read by tfds (needs the
internet the first time, then tfds's data_dir). The first 20 M characters of each split.
MD4 instead: --config.language.kind=masked --config.diffusion.num_blocks=3.
"""
from experiments.configs import shakespeare_ar


def get_config():
  config = shakespeare_ar.get_config()
  config.data.name = "tfds:lm1b"
  config.data.max_chars = 20_000_000
  config.train.num_steps = 20_000
  config.train.batch_size = 64
  config.train.checkpoint_every = 1000
  # An accelerator config: bfloat16 matmuls and activations, float32 parameters,
  # optimizer state, softmax, norm statistics and loss (dbjax.nets.dit.compute_dtype).
  config.model.dtype = "bfloat16"
  return config
