"""The autoregressive DiffusionBlocks LM (paper, App. E; docs/method.md).

Block b denoises y_i = E[x_i] given the clean tokens before i. The input is
[clean stream (T); noisy stream (T)] under the block-diffusion mask
(`autoregressive_mask`): clean row i sees clean columns <= i, noisy row i sees clean
columns < i and itself. The clean stream is presented as if at sigma_min
(c_in(sigma_min) E[x], conditioned on c_noise(sigma_min)), so its keys and values depend
on the block alone and are cached at generation. Noisy rows carry c_in z with
z = y + sigma eps, sigma drawn from the block's interval as for images;
loss = mean_n w(sigma_n) mean_i CE_ni (paper, Eq. 6, per example). Generation makes N
denoising calls per token (N = B: each block once, `noise.block_of_sigma`), moving z
between calls by the Euler step toward the argmax (or expected) embedding row, and draws
the token from the last call's logits.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dbjax import edm, noise
from dbjax.nets import attention
from dbjax.sampling import embedding_chain, mixture_log_probs, stack_params
from dbjax.tasks.base import NoisePlan, sampling_plan
from dbjax.tasks.language.common import (LanguageTask, block_params, clean_vectors,
                                         empty_cache, sample_token, token_embedding,
                                         token_metrics, write_cache)


@dataclasses.dataclass(frozen=True, eq=False)
class AutoregressiveDenoiser(LanguageTask):
  """B blocks, each denoising the next token's embedding over its own noise interval."""
  noise: NoisePlan
  bridge: str                   # "argmax" or "expected"
  sigma_max_share: float        # block 0's sequences drawn at sigma_max (dbjax's option)
  remat_clean_stream: bool = False  # the clean stream's pass first, rematerialised

  evaluate_flags = {**LanguageTask.evaluate_flags, "num_steps": "language.inference_steps",
                    "bridge": "language.bridge", "mixture_chains": "language.mixture_chains"}
  sample_flags = {**LanguageTask.sample_flags, "num_steps": "language.inference_steps",
                  "bridge": "language.bridge"}

  def loss(self, params, shared_params, batch, key, interval):
    """(loss, metrics) of one block on token sequences (N, T)."""
    (tokens,) = batch
    embedding = token_embedding(shared_params)
    net = self.network(params)
    loss, logits, cross_entropy = denoising_cross_entropy(
        self, lambda z, sigma: denoiser_logits(self, net, embedding, tokens, z, sigma),
        embedding, tokens, key, interval, self.sigma_max_share)
    return loss, token_metrics(logits, cross_entropy, tokens, "denoising_accuracy")

  def sequence_nats(self, stacked_params, shared_params, tokens, key, num_steps=None,
                    num_chains=0):
    """{"headline": CE of the first call (block 0 at sigma_max, where z carries nothing:
    the task's predictive distribution), "fixed_seed_chain": CE of the last call of one
    N-call chain (default N = B) with a fixed noise seed, which is no likelihood (its last
    call is near-certain of where the chain ended, so it is far above the entropy even
    for the exact denoiser; tests/test_sampling.py), and with num_chains > 0
    "chain_mixture": CE of the mixture of num_chains chains' last calls, the chain's
    likelihood as a sampler}, nats per token of each sequence."""
    tokens = jnp.asarray(tokens)
    sigmas, blocks = sampling_plan(self.noise, num_steps or self.num_blocks)
    sigmas, blocks = jnp.asarray(sigmas, jnp.float32), jnp.asarray(blocks, jnp.int32)
    per_call = _chain_cross_entropy(self, stacked_params, shared_params, tokens, key, sigmas,
                                    blocks)
    nats = {"headline": per_call[0], "fixed_seed_chain": per_call[-1]}
    if num_chains:
      nats["chain_mixture"] = _chain_mixture_nats(
          self, stacked_params, shared_params, tokens, jax.random.fold_in(key, 1), sigmas,
          blocks, num_chains)
    return nats

  def generate(self, block_params_list, shared_params, prompt_ids, num_samples, seed=0,
               temperature=0.0, top_p=1.0, num_steps=None):
    """num_steps (default B) denoising calls per token against each block's cache."""
    prompt_ids = self.checked_prompt(prompt_ids, num_samples, temperature, top_p, num_steps)
    sigmas, blocks = sampling_plan(self.noise, num_steps or self.num_blocks)
    return np.asarray(_generate(self, stack_params(block_params_list), shared_params,
                                jnp.asarray(prompt_ids), jax.random.key(seed),
                                jnp.asarray(sigmas, jnp.float32), jnp.asarray(blocks, jnp.int32),
                                num_samples, float(temperature), float(top_p)))

  def generation_steps(self, config):
    return config.language.inference_steps or None

  def evaluation_settings(self, config):
    lang = config.language
    settings = {"inference_steps": lang.inference_steps or self.num_blocks}
    if lang.mixture_chains:
      settings["mixture_chains"] = lang.mixture_chains
    return settings

  def evaluation_name(self, config):
    return (f"eval_steps_{config.language.inference_steps or self.num_blocks}"
            f"_{config.language.bridge}")


# ------------------------------------------------------------------------ the masks


def autoregressive_mask(seq_len: int) -> np.ndarray:
  """(2T, 2T) block-diffusion mask over [clean; noisy], True where a row may attend:
  clean row i -> clean columns j <= i; noisy row i -> clean columns j < i and noisy
  column i (itself). The layers never build it: they attend under
  attention.BLOCK_DIFFUSION, whose pairs these are."""
  return np.asarray(attention.dense_mask(attention.BLOCK_DIFFUSION, 2 * seq_len, 2 * seq_len))


def two_stream_logits(net, clean_vectors, noisy_vectors, c_noise):
  """Logits (N, T, V) of the noisy stream: what `net` computes on [clean; noisy] under
  attention.BLOCK_DIFFUSION, as two passes over the layers: the clean stream alone
  (its rows see only clean columns), then the noisy stream, each layer against the clean
  keys and values of that layer. c_noise: (N, 2), the clean stream's and the noisy
  stream's.

  The clean pass is rematerialised in the backward pass, so the step keeps the noisy
  stream's T rows of activations and, of the clean stream, only each layer's input, keys
  and values (docs/method.md, "The autoregressive LM's memory"). The clean pass is a loop
  of layers each under jax.checkpoint (unrolled, XLA folds the recomputation away; see
  dbjax.nets.dit.apply_layers). Its backward loop takes every layer's key and value
  cotangents, so it runs after the whole noisy backward pass, which has freed the noisy
  activations by then. The noisy pass recomputes nothing (unless model.remat), so it is
  unrolled as end-to-end's layers are (no loop's extra iteration of residuals)."""
  t = clean_vectors.shape[1]
  positions = jnp.arange(t)
  cond = net.condition(c_noise)
  cond_clean, cond_noisy = cond[:, 0], cond[:, 1]
  rotary = net.rotary_positions(positions)
  graph, layer_states = nnx.split(net.layers)

  @jax.checkpoint
  def clean_layer(clean, layer_state):
    new_clean, keys_values = nnx.merge(graph, layer_state)(
        clean, cond_clean, attention.CAUSAL, positions=rotary, rematerialised=True)
    return new_clean.astype(clean.dtype), keys_values

  def noisy_layer(noisy, layer_state_and_keys_values):
    layer_state, keys_values = layer_state_and_keys_values
    new_noisy, _ = nnx.merge(graph, layer_state)(noisy, cond_noisy, attention.NOISY_STREAM,
                                                 context=keys_values, positions=rotary,
                                                 rematerialised=net.cfg.remat)
    return new_noisy.astype(noisy.dtype), None

  if net.cfg.remat:
    noisy_layer = jax.checkpoint(noisy_layer)
  _, keys_values = jax.lax.scan(clean_layer, net.embed(clean_vectors, positions),
                                layer_states)
  noisy, _ = jax.lax.scan(noisy_layer, net.embed(noisy_vectors, positions),
                          (layer_states, keys_values), unroll=not net.cfg.remat)
  return net.head(noisy, cond_noisy)


# ------------------------------------------------------------------------------ loss


def denoiser_logits(task, net, embedding, tokens, z, sigma) -> jax.Array:
  """Logits (N, T, V) of the noisy stream z (N, T, D) at sigma (N,), given the clean
  tokens (N, T) under the block-diffusion mask."""
  n, t = tokens.shape
  c = edm.preconditioning(sigma, task.sigma_data)
  clean_c_noise = edm.preconditioning(task.clean_sigma).c_noise
  c_noise = jnp.stack([jnp.full((n,), clean_c_noise), c.c_noise], axis=1)  # per stream
  clean, noisy = clean_vectors(task, embedding, tokens), c.c_in[:, None, None] * z
  if task.remat_clean_stream:
    return two_stream_logits(net, clean, noisy, c_noise)
  vectors = jnp.concatenate([clean, noisy], axis=1)
  positions = jnp.concatenate([jnp.arange(t), jnp.arange(t)])
  logits = net(vectors, positions, c_noise, mask=attention.BLOCK_DIFFUSION)
  return logits[:, t:]


def denoising_cross_entropy(task, logits_of, embedding, tokens, key, interval,
                            sigma_max_share: float = 0.0):
  """(loss, logits, per-token CE) of next-token-embedding denoising: z = E[x] + sigma eps
  with one sigma per sequence from the block's interval, logits = logits_of(z, sigma),
  loss = mean_n w(sigma_n) mean_i CE_ni (paper, Eq. 6, per example). Shared with the
  single-stream form (tasks.language.single_stream) and the recurrent-depth denoiser.

  sigma_max_share (dbjax's option, not the paper's): in the block whose interval reaches
  sigma_max, that fraction of sequences is drawn at sigma_max itself. The first call of
  every chain runs there, and with N = B it is block 0's only call, but the log-normal
  puts 0.2% of its mass above sigma = 10."""
  key_sigma, key_noise = jax.random.split(key)
  sigma = noise.sample_sigma(key_sigma, (tokens.shape[0],), interval[0], interval[1],
                             task.noise.dist.p_mean, task.noise.dist.p_std)
  if sigma_max_share > 0:  # its own key: the paper's stream is unchanged without it
    at_top = jax.random.bernoulli(jax.random.fold_in(key, 2), sigma_max_share, sigma.shape)
    top_block = interval[1] >= task.noise.dist.sigma_max
    sigma_max = jnp.asarray(task.noise.dist.sigma_max, sigma.dtype)
    sigma = jnp.where(at_top & top_block, sigma_max, sigma)
  target = embedding[tokens]
  z = target + sigma[:, None, None] * jax.random.normal(key_noise, target.shape)
  logits = logits_of(z, sigma)
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
  loss = jnp.mean(edm.loss_weight(sigma, task.sigma_data) * jnp.mean(cross_entropy, 1))
  return loss, logits, cross_entropy


def _teacher_forced(task, stacked_params, embedding, tokens):
  """logits_of for `embedding_chain`: every position's call at once, each noisy row
  reading the clean (true) tokens before it."""
  def logits_of(z, sigma, block, step):
    del step
    net = task.network(block_params(stacked_params, block))
    return denoiser_logits(task, net, embedding, tokens, z, jnp.full(tokens.shape[:1], sigma))
  return logits_of


@functools.partial(jax.jit, static_argnames=("task",))
def _chain_cross_entropy(task, stacked_params, shared_params, tokens, key, sigmas, blocks):
  """Per-call mean CE (calls, N) of the teacher-forced autoregressive chain: every
  position runs its N calls at once, as each noisy row sees only clean columns and
  itself."""
  embedding = token_embedding(shared_params)
  z = noise.pure_noise(key, tokens.shape + (embedding.shape[1],), task.noise.dist)

  def mean_cross_entropy(logits):  # kept per call instead of (N, T, V) logits
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens), 1)

  return embedding_chain(_teacher_forced(task, stacked_params, embedding, tokens), z, sigmas,
                         blocks, embedding, task.bridge, keep=mean_cross_entropy)


@functools.partial(jax.jit, static_argnames=("task", "num_chains"))
def _chain_mixture_nats(task, stacked_params, shared_params, tokens, key, sigmas, blocks,
                        num_chains):
  """Nats per token (N,) of the mixture of num_chains independent teacher-forced chains'
  last calls (sampling.mixture_log_probs), chains run one after another."""
  embedding = token_embedding(shared_params)

  logits_of = _teacher_forced(task, stacked_params, embedding, tokens)

  def of_true_token(logits):  # (N, T), kept per call instead of (N, T, V) logits
    return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]

  def true_log_prob(chain_key):
    z = noise.pure_noise(chain_key, tokens.shape + (embedding.shape[1],), task.noise.dist)
    return embedding_chain(logits_of, z, sigmas, blocks, embedding, task.bridge,
                           keep=of_true_token)[-1]

  log_probs = jax.lax.map(true_log_prob, jax.random.split(key, num_chains))
  return -jnp.mean(mixture_log_probs(log_probs), 1)


@functools.partial(jax.jit, static_argnames=("task", "num_samples", "temperature", "top_p"))
def _generate(task, stacked_params, shared_params, prompt, key, sigmas, blocks,
                             num_samples, temperature, top_p):
  """Token ids (num_samples, T) led by `prompt`: per position N denoising calls
  against each block's cache of the clean stream, then one call per block that
  writes the chosen token's keys and values into that block's cache."""
  length = task.net.seq_len
  embedding = token_embedding(shared_params)
  clean = edm.preconditioning(task.clean_sigma, task.sigma_data)
  cache = empty_cache(task, task.num_blocks, num_samples, length)
  num_prompt = prompt.shape[0]
  prompt = jnp.pad(prompt, (0, length - num_prompt))

  def decode(params, vectors, position, c_noise, block_cache):
    return task.network(params).decode(vectors, position, jnp.full((num_samples,), c_noise),
                                         block_cache, jnp.arange(length) < position)

  def position_step(carry, position):
    tokens, cache = carry
    key_noise, key_token = jax.random.split(jax.random.fold_in(key, position))
    z = noise.pure_noise(key_noise, (num_samples, 1, embedding.shape[1]), task.noise.dist)

    def logits_of(z, sigma, block, step):
      del step
      c = edm.preconditioning(sigma, task.sigma_data)
      block_cache = tuple(c_[block] for c_ in cache)
      logits, _ = decode(block_params(stacked_params, block), c.c_in * z, position,
                         c.c_noise, block_cache)
      return logits

    logits = embedding_chain(logits_of, z, sigmas, blocks, embedding, task.bridge)
    drawn = sample_token(key_token, logits[-1][:, 0], temperature, top_p)
    token = jnp.where(position < num_prompt, prompt[position], drawn)
    vectors = clean.c_in * embedding[token][:, None]
    _, new = jax.vmap(lambda p, k, v: decode(p, vectors, position, clean.c_noise, (k, v)))(
        stacked_params, *cache)
    return (tokens.at[:, position].set(token), write_cache(cache, new, position)), None

  tokens = jnp.zeros((num_samples, length), jnp.int32)
  (tokens, _), _ = jax.lax.scan(position_step, (tokens, cache), jnp.arange(length))
  return tokens


