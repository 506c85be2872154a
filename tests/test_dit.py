"""The DiT: shapes, identity at initialisation, patchify round trip, remat equivalence,
rotary positions, its layer against the plain layer and what the layer keeps."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dbjax.engine import profiling
from dbjax.nets.dit import (DiT, DiTConfig, DiTLayer, patchify, rotary,
                            sincos_position_embedding, unpatchify)
from tests.conftest import plain_modulated_norm

CFG = DiTConfig(image_size=8, channels=1, patch_size=2, hidden_size=32, num_layers=3,
                num_heads=2, frequency_dim=32)


def _inputs(batch=4, cfg=CFG):
  x = jax.random.normal(jax.random.key(0), (batch, cfg.image_size, cfg.image_size, cfg.channels))
  return x, jnp.linspace(-1.5, 1.0, batch), jnp.arange(batch) % cfg.num_classes


def test_patchify_round_trip():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  tokens = patchify(x, 4)
  chex.assert_shape(tokens, (2, 4, 48))
  np.testing.assert_array_equal(unpatchify(tokens, 4, 3), x)


def test_layers_are_stacked_and_output_is_zero_at_init():
  """adaLN-Zero: every gate and the output projection start at zero."""
  net = DiT(CFG, rngs=nnx.Rngs(0))
  chex.assert_shape(net.layers.qkv.kernel.value, (3, 32, 96))
  out = net(*_inputs())
  chex.assert_shape(out, (4, 8, 8, 1))
  np.testing.assert_array_equal(out, 0.0)


def test_output_depends_on_sigma_and_label_once_trained_away_from_zero():
  net = DiT(CFG, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(net)
  # Perturb every parameter so that zero-initialised paths carry signal.
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  state = jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape)
                                    for l, k in zip(leaves, keys)])
  net = nnx.merge(graphdef, state)
  x, c_noise, labels = _inputs()
  base = net(x, c_noise, labels)
  assert not np.allclose(base, net(x, c_noise + 0.5, labels))
  assert not np.allclose(base, net(x, c_noise, (labels + 1) % 10))


def test_remat_gives_the_same_values_and_gradients():
  x, c_noise, labels = _inputs()
  results = []
  for remat in (False, True):
    net = DiT(dataclasses.replace(CFG, remat=remat), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(net)
    state = jax.tree.map(lambda p: p + 0.01, state)
    loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(x, c_noise, labels)**2)
    results.append(jax.value_and_grad(loss)(state))
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_position_embedding_is_distinct_per_patch():
  emb = sincos_position_embedding(32, 4)
  chex.assert_shape(emb, (16, 32))
  assert len({tuple(np.round(r, 5)) for r in emb}) == 16


def test_rotary_scores_depend_only_on_the_offset_and_norms_are_kept():
  """q_i . k_j after rotation by positions i and j is a function of i - j alone (RoFormer,
  Eq. 16); position 0 is the identity; every row keeps its norm."""
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))

  def score(i, j):
    return float(jnp.sum(rotary(q, jnp.array([i])) * rotary(k, jnp.array([j]))))

  for offset in (0, 1, 5, 40):
    np.testing.assert_allclose([score(i + offset, i) for i in (0, 3, 17)],
                               score(offset, 0), rtol=1e-4, atol=1e-4)
  assert abs(score(1, 0) - score(5, 0)) > 1e-2  # and it does depend on the offset
  np.testing.assert_array_equal(rotary(q, jnp.array([0])), q)
  x = jnp.asarray(rng.standard_normal((2, 7, 3, 16)), jnp.float32)
  np.testing.assert_allclose(jnp.linalg.norm(rotary(x, jnp.arange(7.0)), axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def plain_dit_layer(layer: DiTLayer, x, cond):
  """DiT's layer as written in its paper (Peebles & Xie 2023, Sec. 3.2), with flax's and
  jax's own pieces: LayerNorm without affine, adaLN modulation, dense attention, GELU."""
  shift1, scale1, gate1, shift2, scale2, gate2 = (
      m[:, None] for m in jnp.split(layer.modulation(nnx.silu(cond)), 6, axis=-1))
  n, t, d = x.shape
  qkv = layer.qkv(plain_modulated_norm(x, shift1, scale1)).reshape(n, t, 3, layer.num_heads, -1)
  out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
  x = x + gate1 * layer.proj(out.reshape(n, t, d))
  hidden = jax.nn.gelu(layer.fc1(plain_modulated_norm(x, shift2, scale2)), approximate=True)
  return x + gate2 * layer.fc2(hidden)


def perturbed_layer(cfg=CFG):
  graph, state = nnx.split(DiTLayer(cfg, rngs=nnx.Rngs(0)))
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  return graph, jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape)
                                          for l, k in zip(leaves, keys)])


def test_dit_layer_equals_the_plain_layer_values_and_gradients():
  """The fused pieces (norm, GELU, the Linear behind each, the recomputing attention)
  give the plain layer's values and gradients, parameters and input alike."""
  graph, state = perturbed_layer()
  x = jax.random.normal(jax.random.key(5), (2, 7, CFG.hidden_size))
  cond = jax.random.normal(jax.random.key(6), (2, CFG.hidden_size))
  ours = lambda state, x: nnx.merge(graph, state)(x, cond)[0]
  plain = lambda state, x: plain_dit_layer(nnx.merge(graph, state), x, cond)
  np.testing.assert_allclose(ours(state, x), plain(state, x), atol=1e-5)
  weights = jax.random.normal(jax.random.key(7), x.shape)
  grads = [jax.grad(lambda s, x: jnp.sum(weights * fn(s, x)), (0, 1))(state, x)
           for fn in (ours, plain)]
  chex.assert_trees_all_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_a_dit_layer_keeps_the_mlp_input_and_neither_the_gelu_output_nor_normalised_copies():
  """Of the MLP's width only fc1's output is kept (GELU's output is recomputed), and of
  the model's width eight numbers a token at most: the input, q, k, v, the attention's
  output, the proj and fc2 outputs for the gates' gradients, the second norm's input."""
  graph, state = perturbed_layer()
  n, t, d = 2, 7, CFG.hidden_size
  x, cond = jnp.ones((n, t, d)), jnp.ones((n, d))
  kept = profiling.residuals_of(
      lambda state, x: jnp.sum(nnx.merge(graph, state)(x * 1, cond)[0]), state, x)
  per_token = [int(np.prod(shape)) // (n * t) for shape, _, _ in kept
               if shape[0] == n and t in shape]
  assert per_token.count(4 * d) == 1, per_token
  # jax lists the attention's output twice (kept by the attention, and its reshape by
  # proj), one buffer in XLA: nine entries of width d, eight arrays.
  assert sorted(w for w in per_token if w != 4 * d) == [CFG.num_heads] + [d] * 9, per_token
