"""Stable Diffusion's VAE as an encode/decode pair for experiments/encode_latents.py, through
diffusers' Flax port (FlaxAutoencoderKL; pip install diffusers transformers). Untested
here: no weights are available offline, and the tests never need them.

checkpoint: a diffusers model id or directory holding the VAE, e.g.
"stabilityai/sd-vae-ft-ema". Images are float32 (N, H, W, 3) in [-1, 1]; the latent is the
posterior's mean (deterministic), unscaled (encode_latents records the scale factor,
0.18215 for this VAE).
"""
import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=2)
def _vae(checkpoint: str):
  from diffusers import FlaxAutoencoderKL  # pylint: disable=g-import-not-at-top
  return FlaxAutoencoderKL.from_pretrained(checkpoint)


def _channels_last(x, channels: int):
  """The port works in (N, C, H, W) at its boundary; dbjax in (N, H, W, C)."""
  return x if x.shape[-1] == channels else jnp.transpose(x, (0, 2, 3, 1))


def encode(images, checkpoint: str) -> np.ndarray:
  """Latents (N, h, w, 4): the posterior's mean of images (N, H, W, 3) in [-1, 1], by the
  VAE at `checkpoint` (a diffusers Flax checkpoint's path or hub name)."""
  vae, params = _vae(checkpoint)
  images = jnp.transpose(jnp.asarray(images, jnp.float32), (0, 3, 1, 2))
  posterior = vae.apply({"params": params}, images, method=vae.encode).latent_dist
  return np.asarray(_channels_last(posterior.mean, vae.config.latent_channels))


def decode(latents, checkpoint: str) -> np.ndarray:
  """Images (N, H, W, 3) in [-1, 1] from (unscaled) latents, by the VAE at `checkpoint`."""
  vae, params = _vae(checkpoint)
  images = vae.apply({"params": params}, jnp.asarray(latents, jnp.float32),
                     method=vae.decode).sample
  return np.clip(np.asarray(_channels_last(images, 3)), -1.0, 1.0)
