"""dbjax.wrap's token target: the next token's embedding denoised single-stream, through
a user's causal layers.

The paper's input is [clean; noisy] (2T) under a block-diffusion mask, which a layer
(x, cond) -> x cannot take, so with a user's layers the token target is single-stream:
position i reads the clean token i-1 and the noisy z_i, and the layers must be causal
(dbjax.wrap checks). Every position of the sequence is noised at the block's sigma;
generation re-noises the prefix at each call's sigma, so it sees what training saw.
There is no key-value cache: generation recomputes the prefix at each call. This form is
dbjax's, not the paper's; it uses T tokens instead of 2T.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dbjax import checks, edm, noise, sampling
from dbjax.nets.dit import (FinalLayer, SigmaEmbedder, apply_layers, compute_dtype, dense,
                           embedding, stacked_layers)
from dbjax.nets.lm import LMConfig
from dbjax.tasks.base import NoisePlan, noise_plan, sampling_plan
from dbjax.tasks.language.autoregressive import denoising_cross_entropy
from dbjax.tasks.language.common import (LanguageTask, sample_token, token_embedding,
                                         token_metrics)


class CausalTokenNet(nnx.Module):
  """F(previous tokens, c_in z, c_noise) -> logits (N, T, V), single-stream: position i
  reads the clean embedding of token i-1 (a learned start vector at i = 0) and the
  scaled noisy embedding c_in z_i, through causal layers."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, init, dtype = cfg.hidden_size, nnx.initializers.normal(0.02), compute_dtype(cfg)
    self.previous_in = dense(d, d, dtype, names=(None, "embed"), rngs=rngs)
    self.noisy_in = dense(d, d, dtype, names=(None, "embed"), rngs=rngs)
    self.start = nnx.Param(init(rngs.params(), (d,)))
    self.position = embedding(cfg.seq_len, d, dtype, rngs=rngs)
    self.sigma_embed = SigmaEmbedder(cfg, rngs=rngs)
    self.layers = stacked_layers(cfg, rngs)
    self.head = FinalLayer(d, cfg.vocab_size, dtype, rngs=rngs)

  def __call__(self, clean: jax.Array, noisy: jax.Array, c_noise: jax.Array) -> jax.Array:
    """clean (N, T, D): the clean embedding of every position's token (the input at i is
    that of i-1); noisy (N, T, D) = c_in z; c_noise (N,)."""
    n, t, d = noisy.shape
    previous = jnp.concatenate([jnp.broadcast_to(self.start.value, (n, 1, d)),
                                clean[:, :-1]], axis=1)
    x = self.previous_in(previous) + self.noisy_in(noisy) + self.position(jnp.arange(t))
    x = x.astype(self.cfg.dtype)
    cond = self.sigma_embed(c_noise)
    return self.head(apply_layers(self.layers, x, cond, self.cfg.remat), cond)


def token_logits(net: CausalTokenNet, embedding, tokens, z, sigma, sigma_data) -> jax.Array:
  """Logits (N, T, V) of every position's token from the clean tokens before it and
  its noisy embedding z (N, T, D) at sigma (N,)."""
  c = edm.preconditioning(sigma, sigma_data)
  return net(embedding[tokens], c.c_in[:, None, None] * z, c.c_noise)


@dataclasses.dataclass(frozen=True, eq=False)
class SingleStreamDenoiser(LanguageTask):
  """B blocks of a user's causal layers, each denoising the next token's embedding over
  its own noise interval, single-stream (see the module docstring)."""
  noise: NoisePlan

  def new_network(self, key) -> CausalTokenNet:
    return CausalTokenNet(self.net, rngs=nnx.Rngs(params=key))

  def loss(self, params, shared_params, batch, key, interval):
    """(loss, metrics): autoregressive.denoising_cross_entropy with the single-stream
    logits."""
    (tokens,) = batch
    net = self.network(params)
    embedding = token_embedding(shared_params)
    loss, logits, cross_entropy = denoising_cross_entropy(
        self, lambda z, sigma: token_logits(net, embedding, tokens, z, sigma, self.sigma_data),
        embedding, tokens, key, interval)
    return loss, token_metrics(logits, cross_entropy, tokens, "denoising_accuracy")

  def sample(self, block_params, shared_params, key, inputs, num_steps, num_samples=1,
             temperature=0.0, top_p=1.0):
    """Token ids (num_samples, T) led by the prompt ids `inputs`."""
    checks.check_sample_call(block_params, self.num_blocks, key, num_steps)
    prompt = self.checked_prompt(inputs, num_samples, temperature, top_p)
    return generate_tokens(self, sampling.stack_params(block_params),
                           token_embedding(shared_params), jnp.asarray(prompt), key,
                           num_samples, num_steps, temperature, top_p)


def position_chain(task, stacked_params, embedding, tokens, position, key, sigmas, owners):
  """Logits (calls, N, V) of the denoising chain of token `position` given the tokens
  before it: z ~ N(0, sigma_max^2), one call per grid step by the block owning its sigma
  (noise.block_of_sigma), the prefix re-noised at that sigma (what training saw), Euler
  steps toward the argmax embedding row between calls. Tokens at and after `position`
  are not read: the layers are causal."""
  batch, length = tokens.shape
  width = embedding.shape[1]
  z = noise.pure_noise(key, (batch, width), task.noise.dist)

  def logits_of(z, sigma, block, step):
    prefix = embedding[tokens] + sigma * jax.random.normal(
        jax.random.fold_in(key, step + 1), (batch, length, width))
    net = task.network(jax.tree.map(lambda p: p[block], stacked_params))
    return token_logits(net, embedding, tokens, prefix.at[:, position].set(z),
                        jnp.full((batch,), sigma), task.sigma_data)[:, position]

  return sampling.embedding_chain(logits_of, z, sigmas, owners, embedding, "argmax")


def _plan(task, num_steps: int):
  """The sampling grid and each step's block, computed on the host in float64."""
  sigmas, owners = sampling_plan(task.noise, num_steps)
  return jnp.asarray(sigmas, jnp.float32), jnp.asarray(owners, jnp.int32)


def generate_tokens(task, stacked_params, embedding, prompt, key, num_samples: int,
                    num_steps: int, temperature: float = 0.0, top_p: float = 1.0):
  """Token ids (num_samples, T) led by `prompt`; each next token drawn from the last
  call of its `position_chain` (num_steps calls)."""
  return _generate_tokens(task, stacked_params, embedding, prompt, key,
                          *_plan(task, num_steps), num_samples, float(temperature),
                          float(top_p))


@functools.partial(jax.jit, static_argnames=("task", "num_samples", "temperature", "top_p"))
def _generate_tokens(task, stacked_params, embedding, prompt, key, sigmas, owners,
                     num_samples, temperature, top_p):
  tokens = jnp.zeros((num_samples, task.net.seq_len), jnp.int32).at[:, :len(prompt)].set(prompt)

  def position_step(position, tokens):
    key_position = jax.random.fold_in(key, position)
    logits = position_chain(task, stacked_params, embedding, tokens, position,
                            key_position, sigmas, owners)
    choice = sample_token(jax.random.fold_in(key_position, 0), logits[-1],
                                   temperature, top_p)
    return tokens.at[:, position].set(choice)

  return jax.lax.fori_loop(len(prompt), task.net.seq_len, position_step, tokens)


def chain_nats(task, stacked_params, embedding, tokens, key, num_steps: int):
  """Teacher-forced cross-entropy (nats) summed over all tokens (N, T), of the first
  call and of the last call of each token's num_steps-call `position_chain`. Exact, one
  chain per position, so it costs T times a parallel evaluation."""
  return _chain_nats(task, stacked_params, embedding, tokens, key, *_plan(task, num_steps))


@functools.partial(jax.jit, static_argnames=("task",))
def _chain_nats(task, stacked_params, embedding, tokens, key, sigmas, owners):
  def position_step(position, totals):
    logits = position_chain(task, stacked_params, embedding, tokens, position,
                            jax.random.fold_in(key, position), sigmas, owners)
    nats = optax.softmax_cross_entropy_with_integer_labels(
        logits[jnp.array([0, -1])], tokens[None, :, position])
    return totals + jnp.sum(nats, axis=1)

  first, last = jax.lax.fori_loop(0, tokens.shape[1], position_step, jnp.zeros(2))
  return first, last


def build(config, layer) -> SingleStreamDenoiser:
  """B blocks of the user's causal `layer` (dbjax.wrap's token target) over a validated
  language config: data.vocab_size, language.seq_len, the model's width and depth. No
  config schema of its own: the language configs build the two-stream
  AutoregressiveDenoiser."""
  num_blocks = config.diffusion.num_blocks
  net = LMConfig(vocab_size=config.data.vocab_size, seq_len=config.language.seq_len,
                 hidden_size=config.model.hidden_size,
                 num_layers=config.model.num_layers // num_blocks, dtype=config.model.dtype,
                 attention=config.model.attention, layer=layer)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: CausalTokenNet(net, rngs=nnx.Rngs(0))))
  plan, intervals = noise_plan(config, num_blocks)
  return SingleStreamDenoiser(
      num_blocks=num_blocks, intervals=intervals, optimizer=optax.identity(),
      shared_optimizer=optax.set_to_zero(), net=net, graphdef=graphdef,
      train_token_embedding=False, clean_sigma=config.diffusion.sigma_min,
      sigma_data=config.diffusion.sigma_data, noise=plan)
