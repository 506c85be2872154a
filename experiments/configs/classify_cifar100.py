"""DiffusionBlocks ViT classifier on CIFAR-100 through tfds (the paper's setting).

The paper: 12 layers, width 128, B = 3; CIFAR-100 accuracy 59.30 against 60.25 end to end
(paper, Sec. 5.2). Needs the internet once to prepare the data set (tfds); other
tfds image sets by name: --config.data.name=tfds:cifar10 --config.data.num_classes=10.
"""
from experiments.configs import classify_digits


def get_config():
  config = classify_digits.get_config()
  config.data.name = "tfds:cifar100"
  config.data.image_size, config.data.channels, config.data.num_classes = 32, 3, 100
  config.model.patch_size = 4                  # 8 x 8 = 64 tokens
  config.model.hidden_size = 128
  config.classifier.augment = True             # random flip and crop
  config.train.num_steps = 20000
  config.train.checkpoint_every = 1000
  # An accelerator config: bfloat16 matmuls and activations, float32 parameters,
  # optimizer state, softmax, norm statistics and loss (dbjax.nets.dit.compute_dtype).
  config.model.dtype = "bfloat16"
  return config
