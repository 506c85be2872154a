"""The exact denoiser of an embedded target (labels, tokens), for probes and tests: with
every block exact, a chain run with it shows what the chain itself does to a perfect
model (studies/exact_chain.py; tests/test_sampling.py)."""
import jax
import jax.numpy as jnp

from dbjax import noise, sampling


def exact_posterior_logits(log_prior, embedding, token_corruption: float = 0.0):
  """logits_of(z, sigma, block, step) for `embedding_chain` of the exact denoiser of a
  target y ~ exp(log_prior) (one prior (V,), or one per row (N, V)) embedded as the rows
  e_y of `embedding`: log p(y | z) = log p_y - |z - e_y|^2 / (2 sigma^2) + const. Every
  block is exact, so a chain run with it shows what the chain itself does to a perfect
  model (tests; studies/exact_chain.py). With token_corruption = r the denoiser is
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
  return sampling.embedding_chain(exact_posterior_logits(log_prior, embedding, token_corruption), z,
                         jnp.asarray(sigmas, jnp.float32), jnp.asarray(owners), embedding,
                         bridge)
