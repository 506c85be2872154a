"""DiffusionBlocks DiT on MNIST through tensorflow-datasets (needs the internet once).

The same 28x28 network and schedule as the Fashion-MNIST config.
"""
from experiments.configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.data.name = "tfds:mnist"
  return config
