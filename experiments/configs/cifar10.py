"""The paper's CIFAR-10 setting: DiT-S/2-sized, 12 layers, B=3, CFG, 50 Euler steps
(paper, Sec. 5.1 and Table 1). Through tensorflow-datasets; an accelerator is advised.
"""
from dbjax.config import default_config


def get_config():
  config = default_config()
  config.data.name = "tfds:cifar10"
  config.data.image_size, config.data.channels, config.data.num_classes = 32, 3, 10
  config.model.patch_size = 2            # 16 x 16 = 256 tokens, as DiT-S/2 on 32x32
  config.model.hidden_size = 384
  config.model.num_heads = 6
  config.model.frequency_dim = 256
  config.train.batch_size = 128
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 1000
  config.train.num_steps = 100_000
  config.train.checkpoint_every = 5000
  config.sample.num_steps = 50
  config.sample.guidance_scale = 1.5
  config.eval.num_samples = 10_000
  config.eval.classifier_steps = 3000
  # An accelerator config: bfloat16 matmuls and activations, float32 parameters,
  # optimizer state, softmax, norm statistics and loss (dbjax.nets.dit.compute_dtype).
  config.model.dtype = "bfloat16"
  return config
