"""DiffusionBlocks ViT classifier on Fashion-MNIST, 28x28 (Debian's dataset-fashion-mnist).

The paper's classification ViT (12 layers, width 128, B = 3; paper, Sec. 5.2) on
7 x 7 patches of 4 x 4 pixels. End-to-end baseline: --config.method=end_to_end.

  python -m experiments.compare --config=experiments/configs/classify_fashion_mnist.py \
      --workdir=runs/compare_cls_fmnist

Test accuracy 79.50% against 84.19% with the paper's training
(results/classify_compare_fashion_mnist.json); with dbjax's
--config.classifier.token_corruption=0.5 --config.classifier.loss_weighting=batch_mean,
83.48% (experiments.train, 1742 s on a 2-core CPU beside other jobs) against 84.55%
(738 s; results/classify_fashion_mnist_corruption_0.5_batch_mean.json,
classify_fashion_mnist_end_to_end_train.json).
"""
from experiments.configs import classify_digits


def get_config():
  config = classify_digits.get_config()
  config.data.name = "fashion_mnist"
  config.data.image_size, config.data.channels, config.data.num_classes = 28, 1, 10
  config.model.patch_size = 4
  config.model.hidden_size = 128
  # A budget that fits a 2-core CPU in about ten minutes per method (docs/classification.md, Results).
  config.train.num_steps = 600
  config.train.batch_size = 64
  config.train.checkpoint_every = 200
  return config
