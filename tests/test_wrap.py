"""dbjax.wrap: a user's own layers as DiffusionBlocks, for each target, and the move
to and from the end-to-end network of the same layers."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dbjax
from dbjax import data, sampling
from dbjax.tasks.language import single_stream
from dbjax.errors import ConfigError, ConfigWarning

WIDTH = 32


class Attention(nnx.Module):
  """A pre-norm attention and MLP layer, each gated by a Linear of the conditioning."""
  causal = False

  def __init__(self, rngs, width=WIDTH):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(2, width, decode=False, keep_rngs=False,
                                            rngs=rngs)
    self.mlp = nnx.Linear(width, width, rngs=rngs)
    self.gates = nnx.Linear(width, 2 * width, rngs=rngs)

  def __call__(self, x, cond):
    gate_attention, gate_mlp = jnp.split(self.gates(cond)[:, None], 2, axis=-1)
    mask = nnx.make_causal_mask(x[..., 0]) if self.causal else None
    x = x + gate_attention * self.attention(self.norm(x), mask=mask)
    return x + gate_mlp * nnx.gelu(self.mlp(self.norm(x)))


class CausalAttention(Attention):
  causal = True


def train(db, batches, steps):
  """Round-robin over blocks; each block's mean cross-entropy over its first and last 5
  updates (the weighted loss swings with w(sigma) from batch to batch)."""
  states = db.init(jax.random.key(0))
  step = jax.jit(db.train_step, donate_argnums=0)
  losses = [[] for _ in range(db.num_blocks)]
  for i in range(steps):
    block = i % db.num_blocks
    states[block], metrics = step(states[block], batches(i), jax.random.key(i), block)
    losses[block].append(float(metrics["cross_entropy"]))
  assert step._cache_size() == 1  # one compiled step for every block
  return states, [(np.mean(l[:5]), np.mean(l[-5:])) for l in losses]


@pytest.fixture(scope="module")
def digits():
  return data.load_images("digits", "train")


def test_label_target_learns_and_predicts(digits):
  db = dbjax.wrap(Attention, num_layers=4, hidden_size=WIDTH, num_blocks=2, target="label",
                  image_shape=(8, 8, 1), patch_size=4, num_classes=10)
  def batches(i):
    rows = np.random.default_rng(i).integers(0, 1000, 64)
    return digits.images[rows], digits.labels[rows]
  states, losses = train(db, batches, 140)
  for first, last in losses:
    assert last < 0.5 * first
  predicted = db.sample([s.params for s in states], jax.random.key(0), digits.images[1000:1200])
  chex.assert_shape(predicted, (200,))
  assert np.mean(np.asarray(predicted) == digits.labels[1000:1200]) > 0.5  # chance: 0.1


def periodic_text(i, batch=32, length=16, period=4):
  """Sequences of 0 1 2 3 0 1 2 3 ... from random offsets."""
  offsets = np.random.default_rng(i).integers(0, period, (batch, 1))
  return (jnp.asarray((offsets + np.arange(length)) % period, jnp.int32),)


def test_token_target_learns_a_periodic_text_and_continues_it():
  db = dbjax.wrap(CausalAttention, num_layers=2, hidden_size=WIDTH, num_blocks=2,
                  target="token", vocab_size=6, seq_len=16, gamma=0.1)
  states, losses = train(db, periodic_text, 300)
  for first, last in losses:
    assert last < 0.5 * first
  ids = db.sample([s.params for s in states], jax.random.key(0), jnp.array([2, 3]),
                  num_steps=4, num_samples=3)
  chex.assert_shape(ids, (3, 16))
  np.testing.assert_array_equal(ids[:, :2], [[2, 3]] * 3)  # the prompt stays
  assert np.mean(np.asarray(ids) == (2 + np.arange(16)) % 4) > 0.9
  # Teacher-forced, one chain per position: every token after the first follows from the
  # one before it, so the chain's cross-entropy is far below the uniform ln 6 per token.
  tokens, = periodic_text(10_000, batch=4)
  first, last = single_stream.chain_nats(db.task, sampling.stack_params(
      [s.params for s in states]), db.target_embedding, tokens,
      jax.random.key(1), num_steps=2)
  assert float(last) / tokens.size < 0.5 < np.log(6)
  assert float(first) / tokens.size < 0.5  # block 0 alone already reads the prefix
  # ... but nothing tells it the first token (a random offset): about ln 4 for each of
  # the 4 sequences, so the chain does not read the token it predicts.
  assert float(first) > 0.8 * 4 * np.log(4)


TARGETS = {"image": dict(target="image", image_shape=(8, 8, 1), patch_size=2),
           "label": dict(target="label", image_shape=(8, 8, 1), patch_size=2),
           "token": dict(target="token", vocab_size=7, seq_len=8,
                         make_layer=CausalAttention)}


def wrapped(target: str, **arguments):
  """A small model of each target: 4 layers in 2 blocks."""
  arguments = {"make_layer": Attention, "num_layers": 4, "hidden_size": WIDTH,
               "num_blocks": 2, **TARGETS[target], **arguments}
  return dbjax.wrap(arguments.pop("make_layer"), **arguments)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_end_to_end_conversion_is_a_true_round_trip(target):
  db = wrapped(target)
  blocks = [s.params for s in db.init(jax.random.key(0))]
  e2e = db.to_end_to_end(blocks)
  # Bit for bit, each block with its own adapters (the blocks' init keys differ, so
  # their embeddings and heads do).
  chex.assert_trees_all_equal(db.from_end_to_end(e2e), blocks)
  first, last = e2e.block_adapters
  assert any(not np.array_equal(first[k], last[k]) for k in first)
  # Block b's layer j is the end-to-end network's layer 2b + j; the network's adapters
  # are the last block's.
  for b, params in enumerate(blocks):
    chex.assert_trees_all_equal(params["layers"],
                                jax.tree.map(lambda p: p[2 * b:2 * b + 2], e2e.params["layers"]))
  chex.assert_trees_all_equal(
      {k: v for k, v in e2e.params.items() if k != "layers"},
      {k: v for k, v in blocks[-1].items() if k != "layers"})
  # Plain end-to-end params (a network trained end to end) give every block a copy of
  # their adapters, and the same layers.
  copied = db.from_end_to_end(e2e.params)
  chex.assert_trees_all_equal(copied[0]["layers"], blocks[0]["layers"])
  chex.assert_trees_all_equal({k: v for k, v in copied[0].items() if k != "layers"},
                              {k: v for k, v in blocks[-1].items() if k != "layers"})


def test_image_target_end_to_end_network_trains_and_samples():
  db = wrapped("image")
  e2e = db.to_end_to_end([s.params for s in db.init(jax.random.key(0))]).params
  # The end-to-end model is the same network with all four layers: it trains and samples.
  plain = db.end_to_end()
  assert plain.num_blocks == 1 and tuple(plain.intervals[0]) == (0.002, 80.0)
  state, = plain.init(jax.random.key(1))
  chex.assert_trees_all_equal_shapes(state.params, e2e)
  labels = jnp.arange(4)
  state, metrics = jax.jit(plain.train_step)(state._replace(params=e2e),
                                             (jnp.zeros((4, 8, 8, 1)), labels),
                                             jax.random.key(2), 0)
  assert np.isfinite(metrics["loss"])
  sample = jax.jit(plain.sample, static_argnames="num_steps")  # jittable as a whole
  chex.assert_shape(sample([e2e], jax.random.key(0), labels, num_steps=2), (4, 8, 8, 1))


def image_batch(n=4, scale=1.0):
  rng = np.random.default_rng(0)
  return (scale * rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32), np.arange(n) % 10)


def test_default_schedule_follows_the_updates_the_user_trains():
  db = wrapped("image", learning_rate=1e-2, num_steps=10, warmup_steps=2)
  assert "AdamW 0.01, warmup 2 + cosine over 10 updates per block, clip 1" in repr(db)
  state = db.init_block(jax.random.key(0))
  step = jax.jit(db.train_step)
  rates = []
  for i in range(12):
    state, metrics = step(state, image_batch(), jax.random.key(i), 0)
    rates.append(float(metrics["learning_rate"]))
  # Warmup 0 -> 1e-2 over 2 updates, then a cosine to a tenth at update 10.
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10, 1e-3)
  np.testing.assert_allclose(rates, [schedule(i) for i in range(12)], rtol=1e-6)
  assert rates[-1] == pytest.approx(1e-3)


def test_a_users_optimizer_keeps_clipping_and_the_nan_guard():
  db = wrapped("image", optimizer=optax.sgd(1.0))
  assert "optimizer: yours, clip 1, NaN guard" in repr(db)
  state = db.init_block(jax.random.key(0))
  step = jax.jit(db.train_step)
  moved, metrics = step(state, image_batch(scale=100.0), jax.random.key(0), 0)
  assert float(metrics["grad_norm"]) > 1.0  # the raw gradient ...
  change = optax.global_norm(jax.tree.map(jnp.subtract, moved.params, state.params))
  assert float(change) == pytest.approx(1.0, rel=1e-4)  # ... was clipped to norm 1
  # A NaN in the batch: the update is not applied, parameters unchanged.
  images, labels = image_batch()
  images[0, 0, 0, 0] = np.nan
  after, metrics = step(moved, (images, labels), jax.random.key(1), 0)
  assert float(metrics["skipped"]) == 1.0
  chex.assert_trees_all_equal(after.params, moved.params)
  # grad_clip=None: the user's optimizer alone (still NaN-guarded).
  free = wrapped("image", optimizer=optax.sgd(1.0), grad_clip=None)
  moved, _ = jax.jit(free.train_step)(state, image_batch(scale=100.0), jax.random.key(0), 0)
  change = optax.global_norm(jax.tree.map(jnp.subtract, moved.params, state.params))
  assert float(change) > 1.5


def test_block_states_save_and_load_with_orbax(tmp_path):
  db = wrapped("label")
  states = db.init(jax.random.key(0))
  states[1], _ = jax.jit(db.train_step)(states[1], image_batch(), jax.random.key(0), 1)
  path = str(tmp_path / "blocks")
  db.save(path, states)
  loaded = db.load(path)
  chex.assert_trees_all_equal(loaded, states)
  assert type(loaded[1]) is type(states[1]) and int(loaded[1].step) == 1
  # A model of other shapes refuses the checkpoint rather than misreading it.
  wider = wrapped("label", hidden_size=2 * WIDTH,
                  make_layer=lambda rngs: Attention(rngs, 2 * WIDTH))
  with pytest.raises(ConfigError,
                     match=r"another model: 0/params/cls_token/value has shape \(1, 1, 32\)"):
    wider.load(path)


def test_overwriting_a_save_never_loses_both(tmp_path, monkeypatch):
  """db.save(overwrite=True) killed while it writes keeps the old checkpoint (orbax's
  force=True deleted it first, so both were lost), and killed between its renames
  leaves the new one, which load reads."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  db = wrapped("image")
  old = db.init(jax.random.key(0))
  new = db.init(jax.random.key(1))
  path = str(tmp_path / "blocks")
  db.save(path, old)
  real_save = ocp.StandardCheckpointHandler.async_save

  def killed(*args, **kwargs):
    raise KeyboardInterrupt  # a kill while the arrays are written
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", killed)
  with pytest.raises(KeyboardInterrupt):
    db.save(path, new, overwrite=True)
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", real_save)
  chex.assert_trees_all_equal(db.load(path), old)
  real_rename = os.rename

  def killed_between(source, destination):
    if str(source).endswith(".saving") and str(destination) == path:
      raise KeyboardInterrupt  # after path -> path.replaced, before the new one is in
    real_rename(source, destination)
  monkeypatch.setattr(os, "rename", killed_between)
  with pytest.raises(KeyboardInterrupt):
    db.save(path, new, overwrite=True)
  monkeypatch.setattr(os, "rename", real_rename)
  chex.assert_trees_all_equal(db.load(path), new)
  db.save(path, old, overwrite=True)  # and it recovers from there
  chex.assert_trees_all_equal(db.load(path), old)


@pytest.mark.parametrize("arguments,message", [
    (dict(target="video"), "target='video' is invalid: one of"),
    (dict(num_layers=5), "num_layers=5 is invalid: a multiple of num_blocks=3"),
    (dict(gamma=1.5), "gamma=1.5 is invalid"),
    (dict(partition="linear"), "partition='linear' is invalid"),
    (dict(patch_size=3), "patch_size=3 is invalid: a divisor of the image size 8"),
    (dict(target="token", vocab_size=10), "seq_len=0 is invalid"),
    (dict(target="token", vocab_size=10, seq_len=8, make_layer=Attention),
     "target='token' needs causal layers"),
    (dict(make_layer=lambda rngs: nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)),
     "make_layer(rngs)(x, cond) failed"),
    (dict(make_layer=lambda rngs: nnx.Dropout(0.1, rngs=rngs)), "only nnx.Param variables"),
    (dict(optimizer=optax.sgd(0.1), learning_rate=0.1),
     "learning_rate=0.1 is invalid: only for dbjax's default optimizer"),
    (dict(optimizer="adam"), "optimizer='adam' is invalid: an optax.GradientTransformation"),
    (dict(grad_clip=0.0), "grad_clip=0.0 is invalid: positive, or None"),
    (dict(num_steps=0), "num_steps=0 is invalid: a positive integer"),
])
def test_bad_arguments_are_named(arguments, message):
  arguments = {"make_layer": Attention, "num_layers": 6, "hidden_size": WIDTH,
               "target": "image", **arguments}
  with pytest.raises(ConfigError, match="dbjax.wrap.*" + message.replace("(", r"\(")
                     .replace(")", r"\)")):
    dbjax.wrap(arguments.pop("make_layer"), **arguments)


def test_a_warmup_longer_than_the_updates_warns_in_one_line():
  with pytest.warns(ConfigWarning, match="warmup_steps=50 is not below num_steps=30"):
    wrapped("image", num_steps=30)
