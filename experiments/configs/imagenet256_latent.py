"""The paper's class-conditional ImageNet 256 x 256 setting (Sec. 5.1; FID 12.09 end to end
against 10.63 for DiffusionBlocks): a DiT on Stable Diffusion's VAE latents
(32 x 32 x 4, scale factor 0.18215), patch 2 (256 tokens), 12 layers, B = 3, classifier-free
guidance, 50 Euler steps. For an accelerator; it needs ImageNet and the VAE's weights,
which the tests never do.

Encode ImageNet once (a folder of class subfolders, e.g. ILSVRC2012's train/ and val/
sorted into <dir>/train/<wnid>/ and <dir>/test/<wnid>/), with diffusers' Flax port of the
VAE (pip install diffusers transformers; dbjax/nets/sd_vae.py adapts it):

  python -m experiments.encode_latents --data=folder:/data/imagenet \
      --resize=256 --center_crop --dtype=float16 \
      --encoder=dbjax.nets.sd_vae:encode --decoder=dbjax.nets.sd_vae:decode \
      --checkpoint=stabilityai/sd-vae-ft-ema --scale_factor=0.18215 \
      --batch_size=64 --out=/data/imagenet256_latents

(--resize=256 --center_crop is ADM's and DiT's preprocessing; the images are read a
batch at a time, so memory stays flat; add --process_index=k --process_count=n to
encode with n processes or hosts at once), then train and compare (the latents are read
row by row from disk: 1,281,167 of 32 x 32 x 4, 21.0 GB in float32 and 10.5 GB in
float16, need not fit in memory):

  python -m experiments.compare --config=experiments/configs/imagenet256_latent.py \
      --config.data.name=latents:/data/imagenet256_latents --workdir=runs/imagenet256

Samples are decoded by the VAE for the grids, and the Frechet distance is computed on the
decoded images with dbjax's small feature classifier, not Inception's: comparable between
the two methods here, not with published FIDs.
"""
from dbjax.config import default_config


def get_config():
  config = default_config()
  config.data.name = "latents:/data/imagenet256_latents"
  config.model.patch_size = 2            # 32 x 32 latents: 256 tokens, as DiT-S/2
  config.model.hidden_size = 384
  config.model.num_heads = 6
  config.model.frequency_dim = 256
  config.model.dtype = "bfloat16"
  config.diffusion.sigma_data = 1.0      # latents times 0.18215: about unit variance
  config.train.batch_size = 256
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 1000
  config.train.num_steps = 400_000
  config.train.checkpoint_every = 5000
  config.sample.num_steps = 50
  config.sample.guidance_scale = 1.5
  config.eval.num_samples = 10_000
  config.eval.classifier_steps = 3000
  return config
