"""Layer pieces whose backward pass keeps only their inputs.

Differentiated as written, each keeps copies that PyTorch's autograd does not:
- DiT's LayerNorm then adaLN modulation, x_hat (1 + scale) + shift with x_hat =
  (x - mean) / sqrt(var + eps): flax's LayerNorm keeps two float32 copies of x (x^2 for
  the variance and x - mean), and the modulation the normalised x_hat, three (N, T, D)
  arrays for one that the backward pass needs.
- the tanh approximation of GELU (used by DiT): tanh, x^3 and their products, five
  (N, T, 4D) arrays for the one input.
- a Linear after either: it keeps its own input, the modulated x or GELU's output, beside
  the input of the piece that made it: one more (N, T, D) array after each norm and one
  (N, T, 4D) after the GELU.

Here each is a custom_vjp that keeps its input (in the compute dtype) and, for the norm,
two float32 numbers per token, and recomputes the rest in the backward pass: the same
values and gradients to float32 rounding (tests/test_fused.py). `dense_of` puts a Linear
behind either piece and recomputes the piece's output for the Linear's weight gradient
(elementwise work beside the matmuls), so a DiT layer keeps 12 widths per token where
PyTorch's autograd keeps 21 (benchmarks/bench_layer_residuals.py). Every recomputation
here and in dbjax.nets.attention starts from `after_cotangent`, so no compiler can run
it in the forward pass and keep its output until the backward pass.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

LAYER_NORM_EPSILON = 1e-6  # DiT's


def after_cotangent(residuals, cotangent):
  """(residuals, cotangent), the residuals' floating arrays made to depend on the
  cotangent, so that what a backward pass recomputes from them waits for it.

  jax.lax.optimization_barrier says so to XLA's GPU and TPU compilers, which drop the
  barrier only after scheduling. XLA's CPU compiler drops it before it schedules (its
  OptimizationBarrierExpander runs ahead of layout assignment), and then computed the
  recomputed GELU outputs and normalised inputs, transposed, during the forward pass and
  kept them for the backward pass. So on the CPU alone each array also gets 0 x one
  element of the cotangent (`_tied_to`), a dependency no compiler may drop (0 x a float
  is not folded: 0 x inf is nan). It costs what the barrier alone does not: a full-size
  add per array that cannot always fuse, and a non-finite cotangent element makes the
  whole gradient non-finite (which the optimizer's guard, dbjax.engine.step, skips as
  it would a partly non-finite one). A program lowered for a GPU or TPU keeps the
  barrier alone (jax.lax.platform_dependent picks the branch when it lowers).
  """
  residuals, cotangent = jax.lax.optimization_barrier((residuals, cotangent))
  return jax.lax.platform_dependent(residuals, cotangent, cpu=_tied_to,
                                    default=lambda residuals, cotangent: (residuals, cotangent))


def _tied_to(residuals, cotangent):
  """after_cotangent's CPU branch: each floating residual plus 0 x a cotangent element."""
  zero = jnp.ravel(cotangent)[0] * 0

  def tie(a):
    return a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
  return jax.tree.map(tie, residuals), cotangent


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
  (x, mean, rstd, scale), d_out = after_cotangent(residuals, d_out)
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
  x, d_out = after_cotangent(x, d_out)
  f = x.astype(jnp.float32)
  t = jnp.tanh(_GELU_C * (f + _GELU_A * f**3))
  slope = 0.5 * (1 + t) + 0.5 * f * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * f * f)
  return ((d_out.astype(jnp.float32) * slope).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_forward, _gelu_backward)


def dense_of(fn, args, kernel, bias):
  """fn(*args) @ kernel + bias over the last axis, keeping args (not fn's output) for
  the backward pass, which recomputes fn(*args) for the kernel's gradient. fn is an
  elementwise or per-token piece (modulated_layer_norm, gelu_tanh); kernel (D_in,
  D_out) and bias (D_out,) are in the compute dtype, as nnx.Linear(dtype=...) casts them."""
  # Under shard_map the kernel varies over fewer mesh axes than the tokens (the "data"
  # axis of dbjax.engine.parallel), and a custom_vjp's cotangents must have its inputs'
  # types. Autodiff casts the kernel so in a plain matmul, and the cast's transpose sums
  # its gradient over those axes: the same here, made explicit. The bias stays outside.
  missing = tuple(sorted(_varying_axes(args[0]) - _varying_axes(kernel)))
  return _matmul_of(fn, args, jax.lax.pcast(kernel, missing, to="varying")) + bias


def _varying_axes(x) -> frozenset:
  """The shard_map mesh axes x varies over (none outside shard_map)."""
  aval = jax.typeof(x)
  if hasattr(aval, "mat"):  # jax >= 0.10; before, the set was aval.vma
    return aval.mat.varying
  return getattr(aval, "vma", frozenset())


def _matmul(y, kernel):
  return jax.lax.dot_general(y, kernel, (((y.ndim - 1,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul_of(fn, args, kernel):
  # In the kernel's (compute) dtype, as nnx.Linear(dtype=...) casts its input: a
  # bfloat16 layer given float32 tokens multiplies, and returns, bfloat16.
  return _matmul(fn(*args).astype(kernel.dtype), kernel)


def _matmul_of_forward(fn, args, kernel):
  return _matmul_of(fn, args, kernel), (args, kernel)


def _matmul_of_backward(fn, residuals, d_out):
  args, kernel = residuals
  args, d_out = after_cotangent(args, d_out)
  y, fn_vjp = jax.vjp(fn, *args)
  rows = tuple(range(y.ndim - 1))
  d_kernel = jax.lax.dot_general(y.astype(kernel.dtype), d_out, ((rows, rows), ((), ())))
  d_y = jax.lax.dot_general(d_out, kernel, (((d_out.ndim - 1,), (1,)), ((), ())))
  return fn_vjp(d_y.astype(y.dtype)), d_kernel.astype(kernel.dtype)


_matmul_of.defvjp(_matmul_of_forward, _matmul_of_backward)
