"""A small convolutional VAE: the autoencoder whose latents a DiT can train on offline.

Latent diffusion (Rombach et al. 2022), and the paper's ImageNet-256 setting with it, train
the DiT on a KL-regularised autoencoder's latents: Stable Diffusion's VAE maps 256 x 256 x 3
to 32 x 32 x 4 (8x down). This one is its small offline stand-in, trained here
(experiments/train_autoencoder.py): two stride-2 convolutions down (4x: 28 x 28 x 1 to
7 x 7 x 4), two transposed ones up, a diagonal Gaussian posterior whose KL to N(0, I) is
weighted lightly, so the latents keep the detail and stay near unit scale.

`encode(images, checkpoint)` and `decode(latents, checkpoint)` are the "module:function"
pair experiments/encode_latents.py and a latent run's evaluation call
(dbjax.nets.autoencoder:encode, dbjax.nets.autoencoder:decode): images in [-1, 1], the
posterior's mean as the latent (deterministic, so a resumed encoding gives the same bits).
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CONFIG_FILE = "autoencoder.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  channels: int = 1          # the images'
  latent_channels: int = 4   # Stable Diffusion's VAE has 4
  width: int = 64            # channels of the inner convolutions


class Autoencoder(nnx.Module):
  """Encoder: conv, two stride-2 convs (4x down), a 1x1 conv to the posterior's mean and
  log-variance. Decoder: conv, two stride-2 transposed convs (4x up), conv to the image."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    w = cfg.width
    conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding="SAME", rngs=rngs)
    up = functools.partial(nnx.ConvTranspose, kernel_size=(4, 4), strides=(2, 2),
                           padding="SAME", rngs=rngs)
    self.encoder = nnx.List([conv(cfg.channels, w // 2), conv(w // 2, w, strides=(2, 2)),
                             conv(w, w, strides=(2, 2))])
    self.posterior = nnx.Conv(w, 2 * cfg.latent_channels, kernel_size=(1, 1), rngs=rngs)
    self.decoder = nnx.List([conv(cfg.latent_channels, w), up(w, w), up(w, w // 2)])
    self.output = conv(w // 2, cfg.channels)

  def posterior_of(self, images):
    """(mean, log-variance) of q(z | images), each (N, H/4, W/4, latent_channels)."""
    x = images
    for layer in self.encoder:
      x = nnx.gelu(layer(x))
    mean, log_variance = jnp.split(self.posterior(x), 2, axis=-1)
    return mean, jnp.clip(log_variance, -20.0, 10.0)

  def decode(self, latents):
    """Images in about [-1, 1] from latents."""
    x = latents
    for layer in self.decoder:
      x = nnx.gelu(layer(x))
    return self.output(x)


def loss(model: Autoencoder, images, key, kl_weight: float):
  """(loss, metrics): mean squared reconstruction error per pixel of a posterior sample,
  plus kl_weight times the KL of the posterior to N(0, I) per latent element."""
  mean, log_variance = model.posterior_of(images)
  z = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(key, mean.shape)
  reconstruction = jnp.mean(jnp.square(model.decode(z) - images))
  kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(log_variance) - 1.0 - log_variance)
  return reconstruction + kl_weight * kl, {"reconstruction_mse": reconstruction, "kl": kl}


def save(directory: str, model: Autoencoder, cfg: AutoencoderConfig, summary: dict):
  """The model's parameters (orbax) and its config and summary (JSON) in `directory`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, PARAMS_DIR), nnx.state(model, nnx.Param),
                      force=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump({"config": dataclasses.asdict(cfg), **summary}, f, indent=2)


@functools.lru_cache(maxsize=4)
def load(directory: str) -> Autoencoder:
  """The trained autoencoder saved in `directory` (cached: one read per process)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from dbjax.errors import DataError  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise DataError(f"{directory}: holds no trained autoencoder (no {CONFIG_FILE}; "
                    "experiments/train_autoencoder.py writes one)")
  with open(path) as f:
    cfg = AutoencoderConfig(**json.load(f)["config"])
  model = nnx.eval_shape(lambda: Autoencoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model, nnx.Param)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), abstract)
  return nnx.merge(graphdef, params)


@nnx.jit
def encode_with(model: Autoencoder, images):
  """The posterior's mean (the latent) of images in [-1, 1]."""
  return model.posterior_of(images)[0]


@nnx.jit
def decode_with(model: Autoencoder, latents):
  """Images from latents, clipped to [-1, 1]."""
  return jnp.clip(model.decode(latents), -1.0, 1.0)


def encode(images, checkpoint: str) -> np.ndarray:
  """Latents (N, H/4, W/4, c): the posterior's mean for images (N, H, W, C) in [-1, 1],
  by the autoencoder trained in directory `checkpoint`."""
  return np.asarray(encode_with(load(checkpoint), jnp.asarray(images, jnp.float32)))


def decode(latents, checkpoint: str) -> np.ndarray:
  """Images in [-1, 1] from (unscaled) latents, by the autoencoder in `checkpoint`."""
  return np.asarray(decode_with(load(checkpoint), jnp.asarray(latents, jnp.float32)))
