"""What every task's sampler shares: the Euler step of the probability-flow ODE, the
chain over an embedded target (labels, tokens), and the helpers around them.

Sigmas descend from sigma_max to sigma_min on the sampling grid
(dbjax.tasks.base.sampling_plan); at each step only the block that owns the current sigma
runs (`noise.block_of_sigma`, the same map training uses). The Euler step is

  d = (z - D(z; s_i)) / s_i,   z <- z + (s_{i+1} - s_i) d

(the paper's printed Eq. 3-5 has the sign flipped; this is the ODE dz/ds = (z - D)/s).
"""
import jax
import jax.numpy as jnp
import numpy as np


def stack_params(params_per_block):
  """B blocks' params -> one pytree with a leading block axis (blocks share a graph)."""
  return jax.tree.map(lambda *p: jnp.stack(p), *params_per_block)


def euler_step(z, denoised, sigma, sigma_next):
  """One Euler step of dz/ds = (z - D(z; s)) / s from sigma to sigma_next."""
  return z + (sigma_next - sigma) * (z - denoised) / sigma


def unit_rows(raw) -> jax.Array:
  """A target embedding (labels, tokens) with unit-norm rows (docs/method.md, the tasks)."""
  return raw / jnp.linalg.norm(raw, axis=-1, keepdims=True)


def bridge_estimate(logits, embedding, bridge: str) -> jax.Array:
  """The clean estimate that the Euler step moves toward, for a target that is a row of
  `embedding` (labels, tokens): the argmax row, which keeps the estimate's norm, or the
  expected row softmax(logits) @ E, which shrinks it when the logits are unsure
  (docs/method.md, pitfalls)."""
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
  each block runs once (paper, Sec. 3; docs/method.md). The classifier, the autoregressive LMs and
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
