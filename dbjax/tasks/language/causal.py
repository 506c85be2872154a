"""The end-to-end baseline of the autoregressive LM: a causal transformer LM of all L
layers (input [blank, x_0 .. x_{T-2}], logits for x_0 .. x_{T-1}), plain cross-entropy,
one call per token at generation with a key-value cache."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dbjax.nets import attention
from dbjax.sampling import stack_params
from dbjax.tasks.language.common import (LanguageTask, block_params, clean_vectors,
                                         empty_cache, sample_token, token_embedding,
                                         token_metrics, write_cache)


@dataclasses.dataclass(frozen=True, eq=False)
class CausalLM(LanguageTask):
  """One causal transformer of all L layers; the shared token embedding is its input."""

  def loss(self, params, shared_params, batch, key, interval):
    del key, interval
    (tokens,) = batch
    logits = causal_logits(self, self.network(params), token_embedding(shared_params), tokens)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    return jnp.mean(cross_entropy), token_metrics(logits, cross_entropy, tokens,
                                                  "batch_accuracy")

  def sequence_nats(self, stacked_params, shared_params, tokens, key, num_steps=None,
                    num_chains=0):
    """{"headline": the cross-entropy of each sequence}."""
    del key, num_steps, num_chains
    return {"headline": _causal_cross_entropy(self, stacked_params, shared_params,
                                              jnp.asarray(tokens))}

  def generate(self, block_params_list, shared_params, prompt_ids, num_samples, seed=0,
               temperature=0.0, top_p=1.0, num_steps=None):
    """One call per token with a key-value cache (num_steps is unused)."""
    prompt_ids = self.checked_prompt(prompt_ids, num_samples, temperature, top_p, num_steps)
    return np.asarray(_generate(self, stack_params(block_params_list), shared_params,
                                jnp.asarray(prompt_ids), jax.random.key(seed), num_samples,
                                float(temperature), float(top_p)))


def causal_logits(task, net, embedding, tokens) -> jax.Array:
  """End-to-end causal LM: logits (N, T, V) of x_i from [blank, x_0 .. x_{i-1}]."""
  return net.head(*causal_hidden(task, net, embedding, tokens))


def causal_hidden(task, net, embedding, tokens):
  """(the last layer's output (N, T, D) at each position i, which reads [blank, x_0 ..
  x_{i-1}]; the conditioning): what causal_logits' head maps to the logits of x_i."""
  n, t = tokens.shape
  inputs = jnp.pad(clean_vectors(task, embedding, tokens[:, :-1]), ((0, 0), (1, 0), (0, 0)))
  blank = jnp.zeros((n, t), bool).at[:, 0].set(True)
  return net.hidden(inputs, jnp.arange(t), jnp.zeros((n,)), mask=attention.CAUSAL,
                    blank=blank)


@functools.partial(jax.jit, static_argnames=("task",))
def _causal_cross_entropy(task, stacked_params, shared_params, tokens):
  net = task.network(block_params(stacked_params, 0))
  logits = causal_logits(task, net, token_embedding(shared_params), tokens)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens), 1)


@functools.partial(jax.jit, static_argnames=("task", "num_samples", "temperature", "top_p"))
def _generate(task, stacked_params, shared_params, prompt, key, num_samples,
                     temperature, top_p):
  """The end-to-end causal LM's generation: one call per position with a KV cache."""
  length = task.net.seq_len
  embedding = token_embedding(shared_params)
  net = task.network(block_params(stacked_params, 0))
  num_prompt = prompt.shape[0]
  prompt = jnp.pad(prompt, (0, length - num_prompt))

  def position_step(carry, position):
    tokens, previous, cache = carry
    vectors = clean_vectors(task, embedding, previous)[:, None]
    blank = jnp.full((num_samples, 1), position == 0)
    logits, new = net.decode(vectors, position, jnp.zeros((num_samples,)), cache,
                             jnp.arange(length) < position, blank)
    drawn = sample_token(jax.random.fold_in(key, position), logits[:, 0], temperature, top_p)
    token = jnp.where(position < num_prompt, prompt[position], drawn)
    return (tokens.at[:, position].set(token), token, write_cache(cache, new, position)), None

  cache = tuple(c[0] for c in empty_cache(task, 1, num_samples, length))
  start = (jnp.zeros((num_samples, length), jnp.int32), jnp.zeros((num_samples,), jnp.int32),
           cache)
  (tokens, _, _), _ = jax.lax.scan(position_step, start, jnp.arange(length))
  return tokens


