"""Two layer pieces whose backward pass keeps only their inputs.

Differentiated as written, each keeps copies that PyTorch's autograd does not:
- DiT's LayerNorm then adaLN modulation, x_hat (1 + scale) + shift with x_hat =
  (x - mean) / sqrt(var + eps): flax's LayerNorm keeps two float32 copies of x (x^2 for
  the variance and x - mean), and the modulation the normalised x_hat, three (N, T, D)
  arrays for one that the backward pass needs.
- the tanh approximation of GELU (used by DiT): tanh, x^3 and their products, five
  (N, T, 4D) arrays for the one input.

Here each is a custom_vjp that keeps its input (in the compute dtype) and, for the norm,
two float32 numbers per token, and recomputes the rest in the backward pass: the same
values and gradients to float32 rounding (tests/test_fused.py). As in
dbjax.nets.attention, the recomputation sits behind an optimization barrier with the
incoming cotangent, so XLA can neither hoist it into the forward pass nor share it with
the forward pass's copy.
"""
import jax
import jax.numpy as jnp
import numpy as np

LAYER_NORM_EPSILON = 1e-6  # DiT's


def _sum_to_shape(g, shape):
  """Sum g over the axes that broadcasting expanded from `shape`."""
  axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
  return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


def _statistics(x):
  """Mean and 1 / sqrt(var + eps) over the last axis, float32, (..., 1)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return mean, jax.lax.rsqrt(variance + LAYER_NORM_EPSILON)


@jax.custom_vjp
def modulated_layer_norm(x, shift, scale):
  """LayerNorm(x) (1 + scale) + shift, no learned affine (DiT's adaLN, Peebles & Xie 2023,
  Sec. 3.2); statistics in float32, the result in x's dtype. shift and scale (one dtype,
  as one Linear makes them) broadcast against x (per example or per segment;
  dbjax.nets.dit.norm_and_modulate)."""
  return _norm_forward(x, shift, scale)[0]


def _norm_forward(x, shift, scale):
  mean, rstd = _statistics(x)
  out = ((x.astype(jnp.float32) - mean) * rstd * (1 + scale.astype(jnp.float32))
         + shift.astype(jnp.float32)).astype(x.dtype)
  return out, (x, mean, rstd, scale)


def _norm_backward(residuals, d_out):
  x, mean, rstd, scale, d_out = jax.lax.optimization_barrier((*residuals, d_out))
  g = d_out.astype(jnp.float32)
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  d_shift = _sum_to_shape(g, scale.shape).astype(scale.dtype)
  d_scale = _sum_to_shape(g * x_hat, scale.shape).astype(scale.dtype)
  d_x_hat = g * (1 + scale.astype(jnp.float32))
  # The LayerNorm's own backward: dx = rstd (dx_hat - mean(dx_hat) - x_hat mean(dx_hat x_hat)).
  d_x = rstd * (d_x_hat - jnp.mean(d_x_hat, -1, keepdims=True)
                - x_hat * jnp.mean(d_x_hat * x_hat, -1, keepdims=True))
  return d_x.astype(x.dtype), d_shift, d_scale


modulated_layer_norm.defvjp(_norm_forward, _norm_backward)

_GELU_C = float(np.sqrt(2.0 / np.pi))
_GELU_A = 0.044715


@jax.custom_vjp
def gelu_tanh(x):
  """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the tanh approximation of GELU
  (Hendrycks & Gimpel 2016; jax.nn.gelu(approximate=True)), computed in float32."""
  return _gelu(x)


def _gelu(x):
  f = x.astype(jnp.float32)
  return (0.5 * f * (1 + jnp.tanh(_GELU_C * (f + _GELU_A * f**3)))).astype(x.dtype)


def _gelu_forward(x):
  return _gelu(x), x


def _gelu_backward(x, d_out):
  x, d_out = jax.lax.optimization_barrier((x, d_out))
  f = x.astype(jnp.float32)
  t = jnp.tanh(_GELU_C * (f + _GELU_A * f**3))
  slope = 0.5 * (1 + t) + 0.5 * f * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * f * f)
  return ((d_out.astype(jnp.float32) * slope).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_forward, _gelu_backward)
