"""Latent DiffusionBlocks on Fashion-MNIST: the DiT trains on the 7 x 7 x 4 latents of the
small VAE trained here (dbjax.nets.autoencoder), as the paper's ImageNet-256 result trains
on Stable Diffusion's VAE's (Sec. 5.1), in miniature. The whole path, offline:

  python -m experiments.train_autoencoder --data=fashion_mnist --width=32 \
      --batch_size=64 --num_steps=2000 --workdir=runs/vae_fashion_mnist
  python -m experiments.encode_latents --data=fashion_mnist \
      --checkpoint=runs/vae_fashion_mnist --out=runs/latents_fashion_mnist
  python -m experiments.compare --config=experiments/configs/fashion_mnist_latent.py \
      --workdir=runs/compare_fashion_mnist_latent

and, at the same budget, the same DiT on pixels (patch 4: the same 49 tokens):

  python -m experiments.compare --config=experiments/configs/fashion_mnist_latent.py \
      --config.data.name=fashion_mnist --config.model.patch_size=4 \
      --config.diffusion.sigma_data=0.5 --workdir=runs/compare_fashion_mnist_pixels

The image shape and classes come from the data. Samples are decoded for the grids, and
the Frechet distance is computed on the decoded images in pixel space, so it compares
with the pixel run's. On a 2-core CPU the latent pair took 323 s (DiffusionBlocks) and
414 s (end to end): Frechet distance 2.27 against 2.51, on pixels 4.27 against 5.27
(results/compare_fashion_mnist_{latent,pixels}.json).
"""
from dbjax.config import default_config


def get_config():
  config = default_config()
  config.data.name = "latents:runs/latents_fashion_mnist"
  config.model.patch_size = 1           # 7 x 7 latents: 49 tokens
  config.model.hidden_size = 64
  config.diffusion.sigma_data = 1.0     # latents scaled to unit variance (latents.json)
  config.train.batch_size = 64
  config.train.num_steps = 1000         # a 2-core CPU's budget: end-to-end 1000 steps
  config.train.checkpoint_every = 500
  config.eval.num_samples = 1000
  config.eval.classifier_steps = 1000
  return config
