"""A class-conditional DiT (Peebles & Xie 2023) in Flax NNX, with adaLN-Zero layers.

DiffusionBlocks trains B of these, each `num_layers / B` deep, as independent denoisers;
end-to-end training uses one, `num_layers` deep. Every layer starts as the identity
(its gates come from a zero-initialised Linear), so a freshly built block is a pure skip
connection and D(z; sigma) = c_skip z at initialisation.

The layers are built stacked (leading axis = layer) and applied with jax.lax.scan over
that axis: one layer definition, parameters as one pytree per block. With remat the
scan stays a loop, so jax.checkpoint on its body really rematerialises (an unrolled loop
lets XLA fold the recomputation away); without remat it is unrolled (see __call__).
"""
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dbjax.nets import attention, fused


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  image_size: int = 8
  channels: int = 1
  patch_size: int = 2
  hidden_size: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  num_classes: int = 10
  frequency_dim: int = 128
  remat: bool = False
  # The computation's dtype ("float32" or "bfloat16"); parameters stay float32 (see
  # compute_dtype).
  dtype: str = "float32"
  # How the layers attend: one of dbjax.nets.attention.IMPLEMENTATIONS.
  attention: str = "auto"
  # A user's layer in the place of DiTLayer: make_layer(rngs) -> an nnx.Module mapping
  # (x (N, T, D), cond (N, D)) -> x (see dbjax.wrap). None: DiTLayer.
  layer: Callable[[nnx.Rngs], nnx.Module] | None = None

  @property
  def num_patches(self) -> int:
    """Tokens per image: (image_size / patch_size)^2."""
    return (self.image_size // self.patch_size)**2

  @property
  def null_label(self) -> int:
    """The extra label id meaning 'no class', for classifier-free guidance."""
    return self.num_classes


def sincos_position_embedding(hidden_size: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, (grid_size^2, hidden_size) (DiT, MAE)."""
  def one_axis(dim, positions):
    omega = 1.0 / 10000**(np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.outer(positions, omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  half = hidden_size // 2
  return np.concatenate([one_axis(half, rows.ravel()), one_axis(half, cols.ravel())],
                        axis=1).astype(np.float32)


def sinusoidal_features(c_noise: jax.Array, dim: int, scale: float = 1000.0) -> jax.Array:
  """Sinusoidal features of the noise label c_noise = ln(sigma) / 4.

  DiT embeds integer timesteps in [0, 1000); c_noise spans about [-1.6, 1.1], so it is
  scaled by 1000 first to use the same range of frequencies.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = scale * c_noise[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _per_segment(x, fn, *conditioning):
  """fn(tokens, *conditioning) with conditioning given per example (N, D) or per segment
  (N, G, D): G equal runs of tokens, e.g. a clean and a noisy stream (dbjax.tasks.language).
  Reshaped, not repeated, so no (N, S, D) copy of the conditioning is made."""
  n, s, d = x.shape
  g = 1 if conditioning[0].ndim == 2 else conditioning[0].shape[1]
  out = fn(x.reshape(n, g, s // g, d), *(c.reshape(n, g, 1, d) for c in conditioning))
  return out.reshape(n, s, d)


def norm_and_modulate(x, shift, scale):
  """LayerNorm(x) * (1 + scale) + shift (adaLN), per example or per segment (see
  _per_segment); keeps only x and two statistics per token for the backward pass
  (dbjax.nets.fused)."""
  return _per_segment(x, fused.modulated_layer_norm, shift, scale)


def linear_of(layer: nnx.Linear, fn, *args, rematerialised: bool = False):
  """layer(fn(*args)), keeping args rather than fn's output for the backward pass
  (dbjax.nets.fused.dense_of): behind the modulated norm and the GELU, where recomputing
  fn is elementwise work and the copy it saves is a width (a norm) or four (the GELU).

  rematerialised: the layer runs under jax.checkpoint, whose backward pass recomputes
  all of it and keeps its residuals only while that runs; there the plain Linear needs
  less (the authors' 64x64 block with model.remat, compiled on a CPU: 3,934 against
  4,611 MiB; docs/design.md, "Attention, in one place")."""
  if rematerialised:
    return layer(fn(*args))
  kernel, bias = (p[...].astype(layer.dtype) for p in (layer.kernel, layer.bias))
  return fused.dense_of(fn, args, kernel, bias)


def gate(x, gate_values):
  """gate_values * x, per example or per segment."""
  return _per_segment(x, lambda x, g: g * x, gate_values)


def rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (RoFormer, Su et al. 2021; as in Llama): rotate each pair
  (x_j, x_{j + d/2}) of queries or keys x (N, T, heads, d) by positions (T,) x base^(-2j/d).

  The score q_i . k_j then depends on i - j however q was formed. That matters for a
  noisy row at sigma_max: its input is noise, so a position added to it is drowned, but
  a query made of the conditioning's shift alone still attends by distance.
  """
  half = x.shape[-1] // 2
  angles = positions[:, None] * base ** (-jnp.arange(half) / half)  # (T, d/2)
  cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]      # over heads
  first, second = x[..., :half], x[..., half:]
  return jnp.concatenate([first * cos - second * sin, first * sin + second * cos],
                         -1).astype(x.dtype)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(N, H, W, C) -> (N, H/p * W/p, p * p * C), patches in row-major order."""
  n, h, w, c = images.shape
  p = patch_size
  x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """Inverse of patchify."""
  n, t, _ = tokens.shape
  g, p = int(math.isqrt(t)), patch_size
  x = tokens.reshape(n, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, g * p, g * p, channels)


def compute_dtype(cfg) -> jnp.dtype:
  """The dtype a network of `cfg` computes in. With bfloat16 the matmuls, the residual
  stream and the saved activations are bfloat16 (half the bytes, and the fast path of
  TPUs and tensor cores), while the parameters, their gradients and the optimizer
  state stay float32 (param_dtype), so small updates are not lost to rounding. What
  leaves the network is float32 again (FinalLayer): the losses, EDM's preconditioning
  and the samplers work there (see dbjax.edm and the tasks' losses)."""
  return jnp.dtype(cfg.dtype)


# The logical axis names dbjax's own networks give their parameters' dimensions.
LOGICAL_NAMES = ("embed", "mlp", "heads", "vocab", "layers")


def named(initializer, names: tuple):
  """`initializer` whose parameter carries logical axis names, one per dimension
  ("embed", "mlp", "heads", "vocab"; None: never split), which config.parallel.rules
  map to mesh axes (dbjax.engine.mesh). Flax's eager sharding is off: a network is
  built under jit with the run's out_shardings, or with no mesh at all."""
  return nnx.with_partitioning(initializer, names, eager_sharding=False)


def dense(d_in: int, d_out: int, dtype, *, rngs: nnx.Rngs, names: tuple | None = None,
          kernel_init=nnx.nn.linear.default_kernel_init) -> nnx.Linear:
  """A Linear computing in `dtype`, its parameters float32, its kernel's dimensions
  named `names` (see `named`) and its bias's as the kernel's output."""
  bias_init = nnx.nn.linear.default_bias_init
  if names is not None:
    kernel_init, bias_init = named(kernel_init, names), named(bias_init, names[-1:])
  return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)


def embedding(num: int, d: int, dtype, *, rngs: nnx.Rngs) -> nnx.Embed:
  """A table of `num` vectors initialised N(0, 0.02^2), looked up in `dtype`; its
  width is "embed" (the rows, class labels or positions, are never split)."""
  return nnx.Embed(num, d, embedding_init=named(nnx.initializers.normal(0.02), (None, "embed")),
                   dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _zero_linear(d_in, d_out, dtype, rngs, names):
  return dense(d_in, d_out, dtype, kernel_init=nnx.initializers.zeros_init(), rngs=rngs,
               names=names)


class SigmaEmbedder(nnx.Module):
  """sinusoidal(c_noise) -> Linear -> SiLU -> Linear (DiT's TimestepEmbedder)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    init, dtype = nnx.initializers.normal(0.02), compute_dtype(cfg)
    self.frequency_dim = cfg.frequency_dim
    # The features of ln(sigma) / 4 are made in float32 (sigma spans 0.002 to 80) and
    # are cos and sin values, which bfloat16 then holds to 3 digits.
    self.fc1 = dense(cfg.frequency_dim, cfg.hidden_size, dtype, kernel_init=init,
                     names=(None, "embed"), rngs=rngs)
    self.fc2 = dense(cfg.hidden_size, cfg.hidden_size, dtype, kernel_init=init,
                     names=("embed", None), rngs=rngs)

  def __call__(self, c_noise):
    return self.fc2(nnx.silu(self.fc1(sinusoidal_features(c_noise, self.frequency_dim))))


class DiTLayer(nnx.Module):
  """Pre-norm transformer layer whose norms are modulated by the conditioning (adaLN-Zero)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d, dtype = cfg.hidden_size, compute_dtype(cfg)
    self.num_heads, self.attention_implementation = cfg.num_heads, cfg.attention
    self.qkv = dense(d, 3 * d, dtype, names=("embed", "heads"), rngs=rngs)
    self.proj = dense(d, d, dtype, names=("heads", "embed"), rngs=rngs)
    hidden = int(d * cfg.mlp_ratio)
    self.fc1 = dense(d, hidden, dtype, names=("embed", "mlp"), rngs=rngs)
    self.fc2 = dense(hidden, d, dtype, names=("mlp", "embed"), rngs=rngs)
    # Zero-initialised: all six shift/scale/gate vectors start at 0, so gates are 0
    # and the layer is the identity (DiT, Sec. 3.2, "adaLN-Zero").
    self.modulation = _zero_linear(d, 6 * d, dtype, rngs, names=("embed", None))

  def heads(self, x, shift, scale, rematerialised=False):
    """Queries, keys and values (N, T, heads, head_dim) of tokens x after the modulated
    norm."""
    n, t, d = x.shape
    qkv = linear_of(self.qkv, norm_and_modulate, x, shift, scale,
                    rematerialised=rematerialised)
    q, k, v = jnp.split(qkv.reshape(n, t, 3, self.num_heads, d // self.num_heads), 3, axis=2)
    return q[:, :, 0], k[:, :, 0], v[:, :, 0]

  def __call__(self, x, cond, mask=None, context=None, positions=None,
               rematerialised=False):
    """x (N, T, D) conditioned on cond (N, D) or (N, G, D) (per segment).

    mask: which columns each row attends to: None (all), a structured mask of
      dbjax.nets.attention (causal, the block-diffusion masks), or a (T, C + T) boolean
      array (the key-value cache's valid columns; attention.attend says which keep no
      (T, T) matrix for the backward pass).
    context: optional (keys, values) (N, C, heads, head_dim) of earlier tokens that
      every row may attend to (subject to mask), placed before the row's own columns:
      the key-value cache of dbjax.tasks.language. Returns (x, (keys, values) of x).
    positions: optional (T,) positions of x's rows: queries and keys are rotated by them
      (`rotary`), so the returned keys are rotated too and a cache of them stays valid.
    rematerialised: whether the layer runs under jax.checkpoint (see `linear_of`).
    """
    (shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp,
     gate_mlp) = jnp.split(self.modulation(nnx.silu(cond)), 6, axis=-1)
    q, k, v = self.heads(x, shift_attn, scale_attn, rematerialised)
    if positions is not None:
      q, k = rotary(q, positions), rotary(k, positions)
    keys, values = (k, v) if context is None else ((context[0], k), (context[1], v))
    out = attention.attend(q, keys, values, mask, self.attention_implementation)
    x = x + gate(self.proj(out.reshape(x.shape)), gate_attn)
    hidden = linear_of(self.fc1, norm_and_modulate, x, shift_mlp, scale_mlp,
                       rematerialised=rematerialised)
    mlp = linear_of(self.fc2, fused.gelu_tanh, hidden, rematerialised=rematerialised)
    return x + gate(mlp, gate_mlp), (k, v)


class UserLayer(nnx.Module):
  """A user's residual layer, (x, cond) -> x, behind DiTLayer's interface. It takes no
  mask and no key-value context, so it serves the image and label targets, whose
  attention is unmasked, and dbjax.wrap's token target, whose layers are causal."""

  def __init__(self, layer: nnx.Module):
    self.layer = layer

  def __call__(self, x, cond, mask=None, context=None, positions=None,
               rematerialised=False):
    del rematerialised  # a user's layer is differentiated as written
    if any(a is not None for a in (mask, context, positions)):
      raise ValueError("a user layer (x, cond) -> x cannot take an attention mask, a "
                       "key-value cache or rotary positions")
    return self.layer(x, cond), None


def in_compute_dtype(layer_state, dtype):
  """A user's layer parameters, float32, cast to the compute dtype for one call.

  Flax's modules compute in the promoted dtype of their inputs and parameters unless
  given a `dtype`, so a plain nnx.Linear fed bfloat16 with float32 weights multiplies in
  float32. Casting the weights where they are used (mixed precision as in jmp and
  maxtext) makes it multiply in bfloat16 as DiTLayer does, while the parameters, their
  gradients (the cast's transpose casts back) and the optimizer state stay float32.
  Flax's norms still take their mean and variance in float32."""
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating)
                      else p, layer_state)


def stacked_layers(cfg, rngs: nnx.Rngs) -> DiTLayer | UserLayer:
  """cfg.num_layers layers (DiTLayer, or cfg.layer's) as one module whose parameters
  have a leading layer axis."""
  layer_keys = jax.random.split(rngs.params(), cfg.num_layers)
  # The stacked axis is named "layers" on every named leaf (config.parallel.rules
  # leaves it whole: a scan step reads one layer).
  stack = functools.partial(nnx.vmap, transform_metadata={nnx.PARTITION_NAME: "layers"})
  if cfg.layer is None:
    return stack(lambda key: DiTLayer(cfg, rngs=nnx.Rngs(key)))(layer_keys)
  return stack(lambda key: UserLayer(cfg.layer(nnx.Rngs(key))))(layer_keys)


def apply_layers(layers: DiTLayer, tokens: jax.Array, cond: jax.Array, remat: bool,
                 mask=None, positions=None):
  """Run `stacked_layers` over tokens in order, each conditioned on cond (N, D) or
  (N, G, D), attending where mask allows (everywhere if None; see DiTLayer), with
  rotary positions (T,) if given."""
  layer_graph, layer_states = nnx.split(layers)
  cast = isinstance(layers, UserLayer) and tokens.dtype != jnp.float32

  def apply_layer(tokens, layer_state):
    if cast:  # a user's layer computes in the stream's dtype (see in_compute_dtype)
      layer_state = in_compute_dtype(layer_state, tokens.dtype)
    layer = nnx.merge(layer_graph, layer_state)
    out = layer(tokens, cond, mask, positions=positions, rematerialised=remat)[0]
    return out.astype(tokens.dtype), None  # a user's layer may promote to float32

  if remat:  # Keep only each layer's input; recompute the rest in the backward pass.
    apply_layer = jax.checkpoint(apply_layer)
  # Without remat the loop is unrolled: XLA's while loop holds one extra iteration's
  # residuals (measured: 80 MiB on the Fashion-MNIST DiT, 18% of the 12-layer step), a
  # fixed cost that would also blur the 1/B saving. With remat it must stay a loop, or
  # XLA's CPU compiler folds the recomputation back into the forward pass (187 against
  # 1275 MiB measured).
  tokens, _ = jax.lax.scan(apply_layer, tokens, layer_states, unroll=not remat)
  return tokens


class FinalLayer(nnx.Module):
  """adaLN then a zero-initialised projection: to patches (DiT) or to logits (ViT)."""

  def __init__(self, hidden_size: int, out_features: int, dtype=jnp.float32, *,
               rngs: nnx.Rngs, out_name: str | None = None):
    d = hidden_size
    self.modulation = _zero_linear(d, 2 * d, dtype, rngs, names=("embed", None))
    self.out = _zero_linear(d, out_features, dtype, rngs, names=("embed", out_name))

  def __call__(self, x, cond):
    """Float32 whatever the network computes in: a denoiser's output is scaled by
    c_out and added to c_skip z (edm.denoise), and logits go through a softmax and a
    log-sum-exp, all of which need float32's range and precision."""
    shift, scale = jnp.split(self.modulation(nnx.silu(cond)), 2, axis=-1)
    return linear_of(self.out, norm_and_modulate, x, shift, scale).astype(jnp.float32)


class DiT(nnx.Module):
  """The raw network F(c_in z, c_noise, label) of one denoiser (see dbjax.edm.denoise)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dtype = cfg.hidden_size, compute_dtype(cfg)
    self.patch_embed = dense(cfg.patch_size**2 * cfg.channels, d, dtype,
                             names=(None, "embed"), rngs=rngs)
    self.sigma_embed = SigmaEmbedder(cfg, rngs=rngs)
    self.label_embed = embedding(cfg.num_classes + 1, d, dtype, rngs=rngs)
    self.layers = stacked_layers(cfg, rngs)
    self.final = FinalLayer(d, cfg.patch_size**2 * cfg.channels, dtype, rngs=rngs)

  def __call__(self, x: jax.Array, c_noise: jax.Array, labels: jax.Array) -> jax.Array:
    cfg = self.cfg
    position = sincos_position_embedding(cfg.hidden_size, cfg.image_size // cfg.patch_size)
    tokens = (self.patch_embed(patchify(x, cfg.patch_size)) + position).astype(cfg.dtype)
    cond = self.sigma_embed(c_noise) + self.label_embed(labels)
    tokens = apply_layers(self.layers, tokens, cond, cfg.remat)
    return unpatchify(self.final(tokens, cond), cfg.patch_size, cfg.channels)
