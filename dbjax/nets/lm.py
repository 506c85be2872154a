"""A token transformer with adaLN-Zero layers: the raw network of one language block.

The layers are the DiT's (dbjax.nets.dit), conditioned per example or per segment of the
sequence, with an attention mask. One network serves three roles (dbjax.tasks.language):
- the autoregressive DiffusionBlocks denoiser: [clean stream; noisy stream] under the
  block-diffusion mask, the clean stream conditioned as if at sigma_min;
- the masked-diffusion (MD4) denoiser: bidirectional, masked positions replaced by the
  learned `blank` vector, conditioned on the masking level t;
- the end-to-end causal LM: a causal mask, `blank` as the start-of-text input.

Inputs are vectors in the token-embedding space (the target space of DiffusionBlocks),
so the shared token embedding stays outside the network; `token_in` maps them into the
model. `decode` runs one token against a key-value cache, for generation.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dbjax.nets.dit import (FinalLayer, SigmaEmbedder, apply_layers, compute_dtype, dense,
                           embedding, stacked_layers)


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int = 84
  seq_len: int = 128
  hidden_size: int = 128
  num_layers: int = 3
  num_heads: int = 4
  mlp_ratio: float = 4.0
  frequency_dim: int = 128
  remat: bool = False
  # "learned": an embedding added to the input; "rotary": queries and keys rotated in
  # every layer (dbjax.nets.dit.rotary; the paper's Llama-style blocks).
  positions: str = "learned"
  dtype: str = "float32"   # the computation's (dbjax.nets.dit.compute_dtype)
  attention: str = "auto"  # how the layers attend (dbjax.nets.attention)
  # A user's layer (dbjax.nets.dit.DiTConfig.layer).
  layer: Callable[[nnx.Rngs], nnx.Module] | None = None

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.hidden_size // self.num_heads


class LMNet(nnx.Module):
  """F(vectors, positions, c_noise) -> logits (N, S, vocab_size)."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, init, dtype = cfg.hidden_size, nnx.initializers.normal(0.02), compute_dtype(cfg)
    self.token_in = dense(d, d, dtype, names=(None, "embed"), rngs=rngs)
    # The input of a position whose token is not given: masked (MD4), or the start of
    # the text (the causal LM's first position).
    self.blank = nnx.Param(init(rngs.params(), (d,)))
    if cfg.positions == "learned":
      self.position = embedding(cfg.seq_len, d, dtype, rngs=rngs)
    self.sigma_embed = SigmaEmbedder(cfg, rngs=rngs)
    self.layers = stacked_layers(cfg, rngs)
    self.head = FinalLayer(d, cfg.vocab_size, dtype, rngs=rngs, out_name="vocab")

  def condition(self, c_noise: jax.Array) -> jax.Array:
    """Sigma embedding of c_noise (N,) or (N, G) -> (N, D) or (N, G, D)."""
    flat = self.sigma_embed(c_noise.reshape(-1))
    return flat.reshape(c_noise.shape + (self.cfg.hidden_size,))

  def embed(self, vectors, positions, blank=None):
    """Input vectors (blank where `blank` is True) mapped into the model, plus learned
    positions."""
    # In the compute dtype before anything else: what the backward pass saves of the
    # inputs (token_in's operand, the blank selection's) is then 16-bit too.
    dtype = compute_dtype(self.cfg)
    vectors = vectors.astype(dtype)
    if blank is not None:
      vectors = jnp.where(blank[..., None], self.blank.value.astype(dtype), vectors)
    if self.cfg.positions == "rotary":
      return self.token_in(vectors).astype(self.cfg.dtype)
    return (self.token_in(vectors) + self.position(positions)).astype(self.cfg.dtype)

  def rotary_positions(self, positions):
    """The positions the layers rotate queries and keys by, or None."""
    return positions if self.cfg.positions == "rotary" else None

  def __call__(self, vectors: jax.Array, positions: jax.Array, c_noise: jax.Array,
               mask=None, blank: jax.Array | None = None) -> jax.Array:
    """vectors (N, S, D); positions (S,); c_noise (N,) or (N, G) for G equal segments;
    mask: where rows attend (dbjax.nets.attention: None for every column, CAUSAL,
    BLOCK_DIFFUSION); blank (N, S), True where the input is the blank vector."""
    return self.head(*self.hidden(vectors, positions, c_noise, mask, blank))

  def hidden(self, vectors, positions, c_noise, mask=None, blank=None):
    """(the last layer's output (N, S, D), before the adaLN head; the conditioning)."""
    cond = self.condition(c_noise)
    x = apply_layers(self.layers, self.embed(vectors, positions, blank), cond,
                     self.cfg.remat, mask, self.rotary_positions(positions))
    return x, cond

  def decode(self, vectors, position, c_noise, cache, valid, blank=None):
    """One position per sequence against a key-value cache.

    vectors (N, 1, D) at `position` (scalar); c_noise (N,); cache = (keys, values),
    each (layers, N, C, heads, head_dim); valid (C,), True for the cache columns that
    hold earlier tokens. Returns (logits (N, 1, V), (keys, values) of this position,
    each (layers, N, 1, heads, head_dim)) for the caller to write into the cache.
    """
    cond = self.condition(c_noise)
    positions = jnp.reshape(position, (1,))
    x = self.embed(vectors, positions, blank)
    mask = jnp.concatenate([valid, jnp.ones((1,), bool)])[None]  # (1, C + 1)
    graph, states = nnx.split(self.layers)

    def layer(x, xs):
      state, keys, values = xs
      return nnx.merge(graph, state)(x, cond, mask, (keys, values),
                                     positions=self.rotary_positions(positions))

    x, own_keys_values = jax.lax.scan(layer, x, (states, *cache))
    return self.head(x, cond), own_keys_values
