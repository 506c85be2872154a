"""The DiT: shapes, identity at initialisation, patchify round trip, remat equivalence,
rotary positions."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dbjax.nets.dit import (DiT, DiTConfig, patchify, rotary, sincos_position_embedding,
                       unpatchify)

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
