"""Deterministic samplers of the probability-flow ODE, run block by block.

Sigmas descend from sigma_max to sigma_min on a grid equally spaced in the log-normal
CDF; at each step only the block that owns the current sigma runs
(`noise.block_of_sigma`, the same map training uses). The Euler step is

  d = (z - D(z; s_i)) / s_i,   z <- z + (s_{i+1} - s_i) d

(the paper's printed Eq. 3-5 has the sign flipped; this is the ODE dz/ds = (z - D)/s).
Heun adds the trapezoidal correction with a second evaluation at s_{i+1}, by the same
block, so one step never mixes blocks. A last D at sigma_min gives the output.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from dbjax import edm, noise
from dbjax.blocks import BlockModel


def stack_params(params_per_block):
  """B blocks' params -> one pytree with a leading block axis (blocks share a graph)."""
  return jax.tree.map(lambda *p: jnp.stack(p), *params_per_block)


def sampling_plan(model: BlockModel, num_steps: int):
  """Host-side (float64) grid: sigmas (num_steps + 1,), following the model's partition
  (noise.sampling_sigmas), and the block of each step."""
  sigmas = noise.sampling_sigmas(num_steps, model.dist, model.partition, model.boundaries)
  blocks = noise.block_of_sigma(sigmas, model.boundaries)
  return sigmas, blocks


def guided_denoiser(model: BlockModel, params, labels, guidance_scale: float):
  """D(z; sigma) of one block, with classifier-free guidance when guidance_scale != 1:
  D = D_uncond + w (D_cond - D_uncond)."""
  network = nnx.merge(model.graphdef, params)
  if guidance_scale == 1.0:
    return lambda z, sigma: edm.denoise(lambda x, c: network(x, c, labels), z, sigma,
                                        model.sigma_data)
  null = jnp.full_like(labels, model.dit.null_label)

  def denoise(z, sigma):
    both = edm.denoise(lambda x, c: network(x, c, jnp.concatenate([labels, null])),
                       jnp.concatenate([z, z]), jnp.concatenate([sigma, sigma]),
                       model.sigma_data)
    cond, uncond = jnp.split(both, 2)
    return uncond + guidance_scale * (cond - uncond)
  return denoise


@functools.partial(jax.jit, static_argnames=("model", "solver", "guidance_scale"))
def _integrate(model, stacked_params, z, labels, sigmas, blocks, solver, guidance_scale):
  batch = z.shape[0]

  def denoiser(block):
    params = jax.tree.map(lambda p: p[block], stacked_params)
    return guided_denoiser(model, params, labels, guidance_scale)

  def step(z, xs):
    sigma, sigma_next, block = xs
    denoise = denoiser(block)
    denoised = denoise(z, jnp.full((batch,), sigma))
    z_next = euler_step(z, denoised, sigma, sigma_next)
    if solver == "heun":
      slope = (z - denoised) / sigma
      slope_next = (z_next - denoise(z_next, jnp.full((batch,), sigma_next))) / sigma_next
      z_next = z + (sigma_next - sigma) * 0.5 * (slope + slope_next)
    return z_next, None

  z, _ = jax.lax.scan(step, z, (sigmas[:-1], sigmas[1:], blocks[:-1]))
  return denoiser(blocks[-1])(z, jnp.full((batch,), sigmas[-1]))


def sample(model: BlockModel, stacked_params, key: jax.Array, labels: jax.Array,
           num_steps: int, solver: str = "euler", guidance_scale: float = 1.0) -> jax.Array:
  """Generate one image per label, (N, H, W, C) in the data's range (about [-1, 1]).

  stacked_params: `stack_params` of all blocks' params. The start is z ~ N(0, sigma_max^2).
  """
  if solver not in ("euler", "heun"):
    raise ValueError(f"solver={solver!r} is not one of ('euler', 'heun')")
  sigmas, blocks = sampling_plan(model, num_steps)
  shape = (labels.shape[0], model.dit.image_size, model.dit.image_size, model.dit.channels)
  z = noise.pure_noise(key, shape, model.dist)
  return _integrate(model, stacked_params, z, labels, jnp.asarray(sigmas, jnp.float32),
                    jnp.asarray(blocks, jnp.int32), solver, float(guidance_scale))


def euler_step(z, denoised, sigma, sigma_next):
  """One Euler step of dz/ds = (z - D(z; s)) / s from sigma to sigma_next."""
  return z + (sigma_next - sigma) * (z - denoised) / sigma


def unit_rows(raw) -> jax.Array:
  """A target embedding (labels, tokens) with unit-norm rows (METHOD.md, task table)."""
  return raw / jnp.linalg.norm(raw, axis=-1, keepdims=True)


def bridge_estimate(logits, embedding, bridge: str) -> jax.Array:
  """The clean estimate that the Euler step moves toward, for a target that is a row of
  `embedding` (labels, tokens): the argmax row, which keeps the estimate's norm, or the
  expected row softmax(logits) @ E, which shrinks it when the logits are unsure
  (METHOD.md, Known pitfalls)."""
  if bridge == "argmax":
    return embedding[jnp.argmax(logits, axis=-1)]
  return jax.nn.softmax(logits, axis=-1) @ embedding


def embedding_chain(logits_of, z, sigmas, blocks, embedding, bridge: str,
                    keep=lambda logits: logits):
  """keep(logits) of every call (calls, ...) of the deterministic chain over an embedded
  target; keep (default: the logits themselves) lets a caller store a per-call statistic
  instead of every call's logits.

  Call i runs logits_of(z, sigma_i, block_i, i), where block_i owns sigma_i; z then takes
  one Euler step toward the bridge's estimate (see `bridge_estimate`). With N = B calls
  each block runs once (METHOD.md, Sampling). The classifier, the autoregressive LMs and
  the wrapped token model all run their chains through this one function.
  """
  def call(z, xs):
    sigma, sigma_next, block, step = xs
    logits = logits_of(z, sigma, block, step)
    estimate = bridge_estimate(logits, embedding, bridge)
    return euler_step(z, estimate, sigma, sigma_next), keep(logits)

  steps = jnp.arange(sigmas.shape[0] - 1)
  _, logits = jax.lax.scan(call, z, (sigmas[:-1], sigmas[1:], blocks[:-1], steps))
  return logits


def exact_posterior_logits(log_prior, embedding, token_corruption: float = 0.0):
  """logits_of(z, sigma, block, step) for `embedding_chain` of the exact denoiser of a
  target y ~ exp(log_prior) (one prior (V,), or one per row (N, V)) embedded as the rows
  e_y of `embedding`: log p(y | z) = log p_y - |z - e_y|^2 / (2 sigma^2) + const. Every
  block is exact, so a chain run with it shows what the chain itself does to a perfect
  model (tests; experiments/exact_chain.py). With token_corruption = r the denoiser is
  exact for training tokens built from a uniformly random class with probability r
  (classify.corrupt_labels): p(z | y) = (1 - r) N(z; e_y) + r mean_k N(z; e_k)."""
  def logits_of(z, sigma, block, step):
    del block, step
    distance = jnp.sum((z[:, None, :] - embedding[None]) ** 2, -1)
    log_kernel = -distance / (2 * sigma**2)
    if token_corruption:
      any_class = jax.nn.logsumexp(log_kernel, -1, keepdims=True) - jnp.log(embedding.shape[0])
      log_kernel = jnp.logaddexp(jnp.log1p(-token_corruption) + log_kernel,
                                 jnp.log(token_corruption) + any_class)
    return log_prior + log_kernel
  return logits_of


def exact_posterior_chain(log_prior, embedding, num_steps: int, num_blocks: int, bridge: str,
                          key, dist: noise.NoiseDistribution = noise.NoiseDistribution(),
                          token_corruption: float = 0.0):
  """Per-call logits (calls, N, V) of one N-call chain per row of log_prior (N, V), every
  block the exact denoiser (`exact_posterior_logits`) and z ~ N(0, sigma_max^2): what
  the chain does to a perfect model."""
  sigmas = noise.sampling_sigmas(num_steps, dist)
  owners = noise.block_of_sigma(sigmas, noise.block_boundaries(
      num_blocks, dist.p_mean, dist.p_std, dist.sigma_min, dist.sigma_max))
  z = noise.pure_noise(key, (log_prior.shape[0], embedding.shape[1]), dist)
  return embedding_chain(exact_posterior_logits(log_prior, embedding, token_corruption), z,
                         jnp.asarray(sigmas, jnp.float32), jnp.asarray(owners), embedding,
                         bridge)


def mixture_log_probs(log_probs) -> jax.Array:
  """log of the mean over the leading axis (chains with independent noise) of the
  probabilities exp(log_probs): the predictive distribution of the chain as a sampler,
  estimated from K chains. Its cross-entropy is the honest likelihood of a chain (one
  fixed-seed chain's last call is near-certain of where it ended; tests/test_sampling.py),
  and by Jensen a K-chain estimate errs on the high side."""
  return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(log_probs.shape[0])


def fixed_size_batches(array: np.ndarray, batch_size: int) -> np.ndarray:
  """(N, ...) -> (ceil(N / batch_size), batch_size, ...), zero-padded at the end, so one
  compiled function serves every batch; callers drop the padding from the outputs."""
  pad = -len(array) % batch_size
  padded = np.concatenate([array, np.zeros((pad,) + array.shape[1:], array.dtype)])
  return padded.reshape((-1, batch_size) + array.shape[1:])


def sample_in_batches(model, stacked_params, key, labels, num_steps, solver="euler",
                      guidance_scale=1.0, batch_size=500, progress=False) -> np.ndarray:
  """`sample` over many labels in fixed-size batches (one compile), returned as numpy."""
  labels = np.asarray(labels, np.int32)
  padded = fixed_size_batches(labels, batch_size)
  out = [np.asarray(sample(model, stacked_params, jax.random.fold_in(key, i), jnp.asarray(b),
                           num_steps, solver, guidance_scale))
         for i, b in enumerate(tqdm(padded, desc="sampling", disable=not progress, leave=False))]
  return np.concatenate(out)[:len(labels)]
