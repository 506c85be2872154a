"""Masked diffusion (MD4, Shi et al. 2024, linear schedule alpha_t = 1 - t) as blocks.

Each token is masked with probability t; the negative ELBO per token is
  L = int_0^1 (1/t) E[sum_{masked i} -log p(x_i | x_t)] dt / T,
and block b owns masking levels t in [1 - (b+1)/B, 1 - b/B] (block 0 the most masked),
training (hi - lo) / t * sum_masked CE / T with t ~ U(lo, hi): the blocks' losses sum to
L. Sampling unmasks from t = 1 to 0, each step by the block owning its t (routed in exact
fractions, `masking_owner`). End-to-end is the same task with B = 1 over all t.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbjax.sampling import stack_params
from dbjax.tasks.language.common import (LanguageTask, block_params, clean_vectors,
                                         sample_token, token_embedding)

# The smallest masking level drawn: bounds the 1/t weight. Masking with probability t
# and weighting by 1/t at the same t keeps the estimate unbiased for t >= MIN_MASKING;
# the part of the integral below it is under 1e-3 nats per token.
MIN_MASKING = 1e-3


@dataclasses.dataclass(frozen=True, eq=False)
class MaskedDiffusion(LanguageTask):
  """B blocks, each an MD4 denoiser over its own range of masking levels."""
  masking_levels: np.ndarray    # (B + 1,) ascending block boundaries 0, 1/B, .., 1

  evaluate_flags = {**LanguageTask.evaluate_flags}
  sample_flags = {**LanguageTask.sample_flags, "num_steps": "language.sample_steps"}

  def loss(self, params, shared_params, batch, key, interval):
    """(loss, metrics): the block's part of the negative ELBO; interval = its t range."""
    (tokens,) = batch
    terms, (logits, cross_entropy, masked) = masked_elbo_terms(
        self, self.network(params), token_embedding(shared_params), tokens, key,
        interval[0], interval[1])
    hits = jnp.where(masked, jnp.argmax(logits, -1) == tokens, False)
    count = jnp.maximum(jnp.sum(masked), 1)
    return jnp.mean(terms), {
        "cross_entropy": jnp.sum(jnp.where(masked, cross_entropy, 0.0)) / count,
        "denoising_accuracy": jnp.sum(hits) / count}  # of the masked positions

  def sequence_nats(self, stacked_params, shared_params, tokens, key, num_steps=None,
                    num_chains=0):
    """{"headline": the MD4 negative ELBO of each sequence, stratified over t}."""
    del num_steps, num_chains
    tokens = jnp.asarray(tokens)
    levels = elbo_strata(self.num_blocks)
    terms = [_masked_elbo_stratum(
        self, stacked_params, shared_params, tokens, jax.random.fold_in(key, k),
        jnp.float32(lo), jnp.float32(hi),
        int(masking_owner(k + 1, len(levels) - 1, self.num_blocks)))
        for k, (lo, hi) in enumerate(zip(levels[:-1], levels[1:]))]
    return {"headline": sum(terms)}

  def generate(self, block_params_list, shared_params, prompt_ids, num_samples, seed=0,
               temperature=0.0, top_p=1.0, num_steps=None):
    """Ancestral sampling in num_steps unmasking steps (default seq_len)."""
    prompt_ids = self.checked_prompt(prompt_ids, num_samples, temperature, top_p, num_steps)
    return self._unmask(block_params_list, shared_params, np.tile(prompt_ids, (num_samples, 1)),
                        seed, temperature, top_p, num_steps)

  def continue_prompts(self, block_params_list, shared_params, prompts, length, seed=0,
                       temperature=0.0, top_p=1.0, num_steps=None):
    """Every prompt's row at once (one batch, one key): the whole sequence is unmasked,
    as in `generate`, and its first `length` ids returned."""
    prompts = self.checked_prompts(prompts, length, temperature, top_p, num_steps)
    return self._unmask(block_params_list, shared_params, prompts, seed, temperature, top_p,
                        num_steps)[:, :length]

  def _unmask(self, block_params_list, shared_params, prompts, seed, temperature, top_p,
              num_steps):
    levels, blocks = unmasking_plan(num_steps or self.net.seq_len, self.num_blocks)
    return np.asarray(_generate(self, stack_params(block_params_list), shared_params,
                                jnp.asarray(prompts, jnp.int32), jax.random.key(seed),
                                jnp.asarray(levels, jnp.float32), jnp.asarray(blocks, jnp.int32),
                                float(temperature), float(top_p)))

  def generation_steps(self, config):
    return config.language.sample_steps or None


def masking_boundaries(num_blocks: int) -> np.ndarray:
  """B + 1 ascending masking levels 0, 1/B, .., 1 (MD4's linear schedule: uniform t)."""
  return np.linspace(0.0, 1.0, num_blocks + 1)


def masking_owner(numerator, denominator: int, num_blocks: int):
  """The block that owns masking level t = numerator / denominator, in exact integer
  arithmetic: block b owns (1 - (b+1)/B, 1 - b/B], so t on a boundary belongs to the
  block whose upper end it is (as noise.block_of_sigma). Float grids cannot be used:
  np.linspace(1, 0, 4)[1] is one ulp above np.linspace(0, 1, 4)[2], which sent that step
  to the block above."""
  numerator = np.asarray(numerator)
  interval = np.maximum(-(-numerator * num_blocks // denominator) - 1, 0)  # ceil(t B) - 1
  return num_blocks - 1 - interval


def masked_logits(task, net, embedding, tokens, masked, t) -> jax.Array:
  """MD4 denoiser: logits (N, T, V) of every position, masked ones given as blank."""
  return net(clean_vectors(task, embedding, tokens), jnp.arange(tokens.shape[1]), t,
             blank=masked)


def stratified_uniform(key, n: int, lo, hi) -> jax.Array:
  """n values in [lo, hi], one in each of n equal strata in random order: lower
  variance than independent draws (MD4 draws its t the same way)."""
  u = (jax.random.uniform(key) + jnp.arange(n)) / n
  return lo + (hi - lo) * jax.random.permutation(jax.random.fold_in(key, 1), u)


def masked_elbo_terms(task, net, embedding, tokens, key, lo, hi):
  """Per-sequence (hi - lo) / t * sum_masked CE / T with t ~ U(lo, hi): an unbiased
  estimate of the part of the MD4 negative ELBO (nats per token) from t in [lo, hi].
  Returns (terms (N,), (logits, per-token CE, the mask)) for the metrics."""
  n, length = tokens.shape
  key_t, key_mask = jax.random.split(key)
  t = jnp.maximum(stratified_uniform(key_t, n, lo, hi), MIN_MASKING)
  masked = jax.random.uniform(key_mask, tokens.shape) < t[:, None]
  logits = masked_logits(task, net, embedding, tokens, masked, t)
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
  terms = (hi - lo) / t * jnp.sum(jnp.where(masked, cross_entropy, 0.0), axis=1) / length
  return terms, (logits, cross_entropy, masked)


def elbo_strata(num_blocks: int, at_least: int = 12) -> np.ndarray:
  """(K + 1,) ascending masking levels: K >= at_least equal strata, K a multiple of B,
  so each stratum lies inside one block's range."""
  return np.linspace(0.0, 1.0, num_blocks * -(-at_least // num_blocks) + 1)


@functools.partial(jax.jit, static_argnames=("task",))
def _masked_elbo_stratum(task, stacked_params, shared_params, tokens, key, lo, hi, block):
  net = task.network(block_params(stacked_params, block))
  terms, _ = masked_elbo_terms(task, net, token_embedding(shared_params), tokens, key, lo, hi)
  return terms


def unmasking_plan(num_steps: int, num_blocks: int):
  """MD4 sampling grid: levels (num_steps + 1,) from t = 1 down to 0, and the block of
  each step, the one owning the step's start t = (num_steps - i) / num_steps (routed in
  exact fractions, `masking_owner`). With num_steps = k B every block runs k steps."""
  levels = np.linspace(1.0, 0.0, num_steps + 1)
  return levels, masking_owner(num_steps - np.arange(num_steps), num_steps, num_blocks)


@functools.partial(jax.jit, static_argnames=("task", "temperature", "top_p"))
def _generate(task, stacked_params, shared_params, prompts, key, levels, blocks, temperature,
              top_p):
  """MD4 ancestral sampling of sequences that start with `prompts` (N, P): from t to
  s < t each masked token is unmasked with probability (t - s) / t, its value drawn from
  the block's prediction."""
  num_samples, prompt_length = prompts.shape
  length = task.net.seq_len
  embedding = token_embedding(shared_params)
  given = jnp.broadcast_to(jnp.arange(length) < prompt_length, (num_samples, length))
  tokens = jnp.pad(prompts, ((0, 0), (0, length - prompt_length)))

  def step(carry, xs):
    tokens, masked = carry
    t, s, block, index = xs
    key_token, key_unmask = jax.random.split(jax.random.fold_in(key, index))
    net = task.network(block_params(stacked_params, block))
    logits = masked_logits(task, net, embedding, tokens, masked,
                           jnp.full((num_samples,), t))
    drawn = sample_token(key_token, logits, temperature, top_p)
    unmask = masked & (jax.random.uniform(key_unmask, masked.shape) < (t - s) / t)
    return (jnp.where(unmask, drawn, tokens), masked & ~unmask), None

  xs = (levels[:-1], levels[1:], blocks, jnp.arange(blocks.shape[0]))
  (tokens, _), _ = jax.lax.scan(step, (tokens, ~given), xs)
  return tokens


