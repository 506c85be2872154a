"""dbjax.nets.fused: the modulated LayerNorm and the tanh GELU equal their plain forms,
values and gradients, and keep only their inputs for the backward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dbjax.engine import profiling
from dbjax.nets import fused


def plain_modulated_norm(x, shift, scale):
  norm = nnx.LayerNorm(x.shape[-1], epsilon=fused.LAYER_NORM_EPSILON, use_scale=False,
                       use_bias=False, rngs=nnx.Rngs(0))
  return norm(x) * (1 + scale) + shift


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
