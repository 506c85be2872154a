"""EDM preconditioning and loss weighting (Karras et al. 2022, Table 1; paper, Eq. 4-6).

The denoiser wraps a raw network F:
  D(z; sigma) = c_skip(sigma) z + c_out(sigma) F(c_in(sigma) z, c_noise(sigma)),
chosen so that F's input and training target both have unit variance at every sigma.
The loss weight w(sigma) = 1 / c_out(sigma)^2 makes every sigma contribute equally.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Preconditioning(NamedTuple):
  c_skip: jax.Array
  c_out: jax.Array
  c_in: jax.Array
  c_noise: jax.Array


def preconditioning(sigma, sigma_data: float = 0.5) -> Preconditioning:
  """The four EDM coefficients at noise level sigma."""
  sigma = jnp.asarray(sigma)
  total_var = sigma**2 + sigma_data**2
  return Preconditioning(
      c_skip=sigma_data**2 / total_var,
      c_out=sigma * sigma_data / jnp.sqrt(total_var),
      c_in=1.0 / jnp.sqrt(total_var),
      c_noise=jnp.log(sigma) / 4.0,
  )


def loss_weight(sigma, sigma_data: float = 0.5) -> jax.Array:
  """w(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
  sigma = jnp.asarray(sigma)
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2


def _expand_to(x, like):
  """Broadcast a per-example (batch,) array against an (batch, ...) array."""
  return jnp.reshape(x, x.shape + (1,) * (like.ndim - x.ndim))


def denoise(network: Callable[[jax.Array, jax.Array], jax.Array], noisy: jax.Array,
            sigma: jax.Array, sigma_data: float = 0.5) -> jax.Array:
  """D(noisy; sigma) for a raw network(scaled_input, c_noise) -> output of noisy's shape.

  sigma has one entry per example.
  """
  c = preconditioning(sigma, sigma_data)
  raw = network(_expand_to(c.c_in, noisy) * noisy, c.c_noise)
  return _expand_to(c.c_skip, noisy) * noisy + _expand_to(c.c_out, noisy) * raw


def weighted_l2_loss(denoised: jax.Array, clean: jax.Array, sigma: jax.Array,
                     sigma_data: float = 0.5) -> jax.Array:
  """Per-example w(sigma) * mean squared error: the image task's loss (paper, Eq. 6)."""
  per_example = jnp.mean(jnp.square(denoised - clean).reshape(clean.shape[0], -1), axis=1)
  return loss_weight(sigma, sigma_data) * per_example
