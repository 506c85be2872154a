"""DiffusionBlocks DiT on MNIST through tensorflow-datasets (needs the internet once)."""
from dbjax.config import default_config


def get_config():
  config = default_config()
  config.data.name = "tfds:mnist"
  config.data.image_size, config.data.channels, config.data.num_classes = 28, 1, 10
  config.model.patch_size = 4
  config.model.hidden_size = 128
  config.train.learning_rate = 1e-3  # wider than digits' net; not tuned yet
  config.train.num_steps = 3000
  config.train.checkpoint_every = 500
  config.eval.classifier_steps = 1000
  return config
