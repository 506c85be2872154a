"""A recurrent-depth token network (Huginn, Geiping et al. 2025, arXiv 2502.05171):
prelude P, a weight-tied core R iterated any number of times, coda C.

  e = P(previous tokens)                 read once (causal, constant conditioning)
  s' = R(adapter([input; e]), cond)      one iteration of the core; input is the state s_k
                                         (Huginn) or c_in z, the scaled noisy embedding of
                                         the next token (DiffusionBlocks)
  logits = head(C(s, cond), cond)

Every part is made of the DiT's adaLN-Zero layers (dbjax.nets.dit) under a causal mask,
with rotary positions; `cond` is the sigma embedding of c_noise (a constant c_noise = 0
for Huginn's core and for every prelude). The core's layers exist once: iterating it
reuses the same parameters (the weights are tied).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dbjax.nets import attention
from dbjax.nets.dit import (FinalLayer, SigmaEmbedder, apply_layers, compute_dtype, dense,
                           stacked_layers)
from dbjax.nets.lm import LMConfig


@dataclasses.dataclass(frozen=True)
class RecurrentConfig(LMConfig):
  """An LMConfig (width, heads, vocabulary, sequence length, positions) and the depth of
  each part; num_layers is their sum (the layers of one pass through the network)."""
  prelude_layers: int = 2
  core_layers: int = 4
  coda_layers: int = 2

  def part(self, num_layers: int) -> LMConfig:
    """The config of a stack of num_layers layers."""
    return dataclasses.replace(self, num_layers=num_layers)


class RecurrentLM(nnx.Module):
  """Prelude, adapter, tied core, coda and head; see the module docstring."""

  def __init__(self, cfg: RecurrentConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, init, dtype = cfg.hidden_size, nnx.initializers.normal(0.02), compute_dtype(cfg)
    self.token_in = dense(d, d, dtype, names=(None, "embed"), rngs=rngs)
    self.start = nnx.Param(init(rngs.params(), (d,)))   # the input before the first token
    self.sigma_embed = SigmaEmbedder(cfg, rngs=rngs)
    self.prelude = stacked_layers(cfg.part(cfg.prelude_layers), rngs)
    self.adapter = dense(2 * d, d, dtype, names=(None, "embed"), rngs=rngs)
    self.core = stacked_layers(cfg.part(cfg.core_layers), rngs)
    self.coda = stacked_layers(cfg.part(cfg.coda_layers), rngs)
    self.head = FinalLayer(d, cfg.vocab_size, dtype, rngs=rngs, out_name="vocab")

  def condition(self, c_noise: jax.Array) -> jax.Array:
    """Sigma embedding (N, D) of c_noise (N,)."""
    return self.sigma_embed(c_noise)

  def _layers(self, layers, x, cond, two_streams=False):
    """Causal layers over x, or, with two_streams, over [clean; noisy] halves under the
    block-diffusion mask (each half at positions 0 .. T/2 - 1)."""
    t = x.shape[1]
    positions = jnp.tile(jnp.arange(t // 2), 2) if two_streams else jnp.arange(t)
    rotary = positions if self.cfg.positions == "rotary" else None
    mask = attention.BLOCK_DIFFUSION if two_streams else attention.CAUSAL
    # In the compute dtype: the loop's float32 state would otherwise carry every layer's
    # residual stream, and what the backward pass saves of it, in float32.
    return apply_layers(layers, x.astype(compute_dtype(self.cfg)), cond, self.cfg.remat,
                        mask, rotary)

  def read(self, previous: jax.Array) -> jax.Array:
    """e (N, T, D) = P(previous tokens' vectors (N, T, D)): position i reads tokens < i."""
    n, _, d = previous.shape
    dtype = compute_dtype(self.cfg)  # what the backward pass saves of the inputs, too
    inputs = jnp.concatenate([jnp.broadcast_to(self.start.value.astype(dtype), (n, 1, d)),
                              previous[:, :-1].astype(dtype)], axis=1)
    return self._layers(self.prelude, self.token_in(inputs), self.condition(jnp.zeros((n,))))

  def iterate(self, state: jax.Array, e: jax.Array, c_noise: jax.Array,
              two_streams: bool = False) -> jax.Array:
    """One iteration of the core, R(adapter([state; e])) conditioned on c_noise (N,);
    two_streams: state is [clean; noisy] under the block-diffusion mask (see _layers)."""
    dtype = compute_dtype(self.cfg)
    h = self.adapter(jnp.concatenate([state.astype(dtype), e.astype(dtype)], axis=-1))
    # In the state's dtype: a loop over iterations carries one dtype.
    return self._layers(self.core, h, self.condition(c_noise),
                        two_streams).astype(state.dtype)

  def logits(self, state: jax.Array, c_noise: jax.Array, two_streams: bool = False):
    """head(C(state)) (N, T, V), conditioned on c_noise (N,)."""
    cond = self.condition(c_noise)
    return self.head(self._layers(self.coda, state, cond, two_streams), cond)
