"""dbjax.nets.fused: the modulated LayerNorm and the tanh GELU equal their plain forms,
values and gradients, and keep only their inputs for the backward pass."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dbjax.engine import profiling
from dbjax.nets import fused
from tests.conftest import plain_modulated_norm


def inputs(dtype=jnp.float32, per_segment=False):
  rng = np.random.default_rng(0)
  x = 3 * rng.standard_normal((2, 2, 5, 16)) + 1
  cond_shape = (2, 2, 1, 16) if per_segment else (2, 1, 1, 16)
  shift, scale = rng.standard_normal(cond_shape), rng.standard_normal(cond_shape)
  return tuple(jnp.asarray(a, dtype) for a in (x, shift, scale))


def weighted_sum(fn, shape):
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
  return lambda *args: jnp.sum(weights * fn(*args).astype(jnp.float32))


@pytest.mark.parametrize("per_segment", [False, True])
def test_modulated_layer_norm_equals_flax_layer_norm_then_modulation(per_segment):
  x, shift, scale = inputs(per_segment=per_segment)
  np.testing.assert_allclose(fused.modulated_layer_norm(x, shift, scale),
                             plain_modulated_norm(x, shift, scale), atol=1e-5)
  ours = jax.grad(weighted_sum(fused.modulated_layer_norm, x.shape), (0, 1, 2))(x, shift, scale)
  plain = jax.grad(weighted_sum(plain_modulated_norm, x.shape), (0, 1, 2))(x, shift, scale)
  for name, a, b in zip(("x", "shift", "scale"), ours, plain):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


def test_gelu_equals_jax_gelu_tanh():
  x = jnp.linspace(-6, 6, 301)
  np.testing.assert_allclose(fused.gelu_tanh(x), jax.nn.gelu(x, approximate=True), atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(fused.gelu_tanh))(x),
                             jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=True)))(x),
                             atol=1e-6)


def test_bfloat16_in_bfloat16_out_with_float32_statistics():
  x, shift, scale = inputs(jnp.bfloat16)
  out = fused.modulated_layer_norm(x, shift, scale)
  assert out.dtype == jnp.bfloat16 and fused.gelu_tanh(x).dtype == jnp.bfloat16
  reference = plain_modulated_norm(*(a.astype(jnp.float32) for a in (x, shift, scale)))
  np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=0.1)
  grads = jax.grad(weighted_sum(fused.modulated_layer_norm, x.shape), (0, 1, 2))(x, shift, scale)
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3


def test_each_keeps_only_its_input_and_two_statistics():
  x, shift, scale = inputs()
  kept = profiling.residuals_of(lambda x: jnp.sum(fused.gelu_tanh(x)), x)
  assert kept == []   # the input is the argument itself
  kept = [shape for shape, _, _ in profiling.residuals_of(
      lambda x, shift, scale: jnp.sum(fused.modulated_layer_norm(x, shift, scale)),
      x, shift, scale)]
  assert kept == [x.shape[:-1] + (1,)] * 2, kept   # the mean and 1 / std; x is an argument
  plain = [shape for shape, _, _ in profiling.residuals_of(
      lambda x, shift, scale: jnp.sum(plain_modulated_norm(x, shift, scale)), x, shift, scale)]
  assert plain.count(x.shape) >= 2   # what the plain form keeps beside x


def plain_dense(y, kernel, bias):
  return y @ kernel + bias


@pytest.mark.parametrize("piece", ["norm", "gelu"])
def test_dense_of_equals_the_piece_then_a_linear_and_keeps_only_the_pieces_inputs(piece):
  x, shift, scale = inputs(per_segment=True)
  rng = np.random.default_rng(2)
  kernel = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(8), jnp.float32)
  fn, plain_fn, args = ((fused.modulated_layer_norm, plain_modulated_norm, (x, shift, scale))
                        if piece == "norm" else
                        (fused.gelu_tanh, lambda v: jax.nn.gelu(v, approximate=True), (x,)))
  ours = lambda kernel, bias, *args: fused.dense_of(fn, args, kernel, bias)
  plain = lambda kernel, bias, *args: plain_dense(plain_fn(*args), kernel, bias)
  np.testing.assert_allclose(ours(kernel, bias, *args), plain(kernel, bias, *args),
                             atol=1e-5, rtol=1e-5)
  shape = x.shape[:-1] + (8,)
  argnums = tuple(range(2 + len(args)))
  for a, b in zip(jax.grad(weighted_sum(ours, shape), argnums)(kernel, bias, *args),
                  jax.grad(weighted_sum(plain, shape), argnums)(kernel, bias, *args)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
  # Nothing of the token's size beyond the arguments themselves: fn's output is recomputed.
  kept = profiling.residuals_of(lambda *a: jnp.sum(ours(*a)), kernel, bias, *args)
  assert [shape for shape, _, _ in kept if shape[:-1] == x.shape[:-1]] == [], kept
  plain_kept = profiling.residuals_of(lambda *a: jnp.sum(plain(*a)), kernel, bias, *args)
  assert [shape for shape, _, _ in plain_kept if shape == x.shape]   # the piece's output


def _multiplies_by_zero(lowered_text: str) -> int:
  """How many multiplies by a scalar 0.0 constant a lowered StableHLO module holds (the
  tie of after_cotangent; nothing else in a dense_of backward multiplies by zero)."""
  zeros = re.findall(r"(%\S+) = stablehlo.constant dense<0.000000e\+00> : tensor<f32>",
                     lowered_text)
  return sum(len(re.findall(rf"stablehlo.multiply %\S+, {re.escape(z)}\b", lowered_text))
             for z in zeros)


def test_the_cotangent_tie_is_lowered_for_the_cpu_alone():
  """after_cotangent's 0 x cotangent tie is in a program lowered for the CPU, and absent
  from one lowered for a GPU, where the barrier alone keeps recomputation after the
  cotangent; the CPU's gradients are the plain ones."""
  x, shift, scale = inputs()
  kernel = jnp.asarray(np.random.default_rng(2).standard_normal((16, 8)), jnp.float32)
  loss = lambda kernel, x: jnp.sum(jnp.sin(fused.dense_of(fused.modulated_layer_norm,
                                                          (x, shift, scale), kernel, 0.0)))
  traced = jax.jit(jax.grad(loss, (0, 1))).trace(kernel, x)
  on_cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
  on_gpu = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert _multiplies_by_zero(on_cpu) >= 1 and _multiplies_by_zero(on_gpu) == 0
  assert "optimization_barrier" in on_gpu
  plain = lambda kernel, x: jnp.sum(jnp.sin(plain_dense(plain_modulated_norm(x, shift, scale),
                                                        kernel, 0.0)))
  for a, b in zip(jax.grad(loss, (0, 1))(kernel, x), jax.grad(plain, (0, 1))(kernel, x)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_dense_of_in_bfloat16_gives_bfloat16_gradients():
  x, _, _ = inputs(jnp.bfloat16)
  kernel, bias = jnp.ones((16, 8), jnp.bfloat16), jnp.ones(8, jnp.bfloat16)
  out = fused.dense_of(fused.gelu_tanh, (x,), kernel, bias)
  assert out.dtype == jnp.bfloat16
  grads = jax.grad(lambda x, k, b: jnp.sum(fused.dense_of(fused.gelu_tanh, (x,), k, b)
                                           .astype(jnp.float32)), (0, 1, 2))(x, kernel, bias)
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
  reference = jax.grad(lambda x: jnp.sum(plain_dense(jax.nn.gelu(x, approximate=True),
                                                     kernel.astype(jnp.float32), 1.0)))(
      x.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(grads[0], np.float32), reference, rtol=0.05, atol=0.05)


def test_dense_of_multiplies_in_the_kernels_dtype_as_nnx_linear_does():
  """float32 tokens into a bfloat16 layer: the product and the output are bfloat16, as
  nnx.Linear(dtype=bfloat16) gives (they were float32, so a bfloat16 block saved its
  q, k, v and fc1 outputs in float32); the tokens' gradient keeps their dtype."""
  x, _, _ = inputs(jnp.float32)
  kernel, bias = jnp.ones((16, 8), jnp.bfloat16), jnp.ones(8, jnp.bfloat16)
  linear = nnx.Linear(16, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert linear(fused.gelu_tanh(x)).dtype == jnp.bfloat16
  out = fused.dense_of(fused.gelu_tanh, (x,), kernel, bias)
  assert out.dtype == jnp.bfloat16
  grads = jax.grad(lambda x, k: jnp.sum(fused.dense_of(fused.gelu_tanh, (x,), k, bias)
                                        .astype(jnp.float32)), (0, 1))(x, kernel)
  assert [g.dtype for g in grads] == [jnp.float32, jnp.bfloat16]


def mlp_stack_memory(fused_matmul: bool, layers=6, rows=1024, width=64) -> int:
  """Compiled bytes of the gradient of a stack of residual MLPs, x + gelu(x W1) W2."""
  rng = np.random.default_rng(3)
  params = [tuple(jnp.asarray(rng.standard_normal(shape) / 8, jnp.float32)
                  for shape in ((width, 4 * width), (4 * width, width))) for _ in range(layers)]
  x = jnp.asarray(rng.standard_normal((rows, width)), jnp.float32)

  def loss(params, x):
    for w1, w2 in params:
      hidden = x @ w1
      x = x + (fused.dense_of(fused.gelu_tanh, (hidden,), w2, jnp.zeros(width))
               if fused_matmul else fused.gelu_tanh(hidden) @ w2)
    return jnp.sum(x**2)
  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
  return profiling.compiled_memory(compiled)["step_bytes"]


def test_dense_of_lowers_the_compiled_memory_by_the_recomputed_output():
  """What the compiler allocates follows the program: without the GELU's output each
  layer keeps 5 widths of 9. This fails if the recomputation runs in the forward pass,
  as XLA's CPU compiler scheduled it behind an optimization barrier alone (0.95)."""
  fused_bytes, plain_bytes = mlp_stack_memory(True), mlp_stack_memory(False)
  assert fused_bytes < 0.8 * plain_bytes, (fused_bytes, plain_bytes)   # 0.70; 0.95 untied
