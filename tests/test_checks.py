"""dbjax.checks: what a user hands the Python API (a wrapped model's init, train_step and
sample, a loaded run's sample, every task's sample) is refused in one line naming the
argument, in the place of a silent wrong result or a broadcasting error from inside JAX."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dbjax
from dbjax import data, engine, tasks
from dbjax.config import with_task
from dbjax.errors import DataError, WorkdirError
from dbjax.tasks import language
from dbjax.train import LoadedRun
from tests.conftest import tiny_config
from tests.test_language import lm_config

WIDTH = 16


class Mlp(nnx.Module):
  """A residual MLP layer: the smallest layer wrap takes."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x, cond):
    return x + nnx.gelu(self.linear(x)) * cond[:, None]


@pytest.fixture(scope="module")
def image_model():
  db = dbjax.wrap(Mlp, num_layers=2, hidden_size=WIDTH, num_blocks=2, target="image",
                  image_shape=(8, 8, 1), num_classes=10)
  digits = data.load_images("digits", "train")
  return db, db.init(jax.random.key(0)), (digits.images[:8], digits.labels[:8])


@pytest.mark.parametrize("change,message", [
    (lambda x, y: (((x + 1) * 127.5).astype(np.uint8), y), "batch images: got dtype uint8"),
    (lambda x, y: ((x + 1) * 127.5, y), r"values span \[0, 255\].*images / 127.5 - 1"),
    (lambda x, y: (np.zeros((8, 16, 16, 1), np.float32), y), r"shape \(8, 16, 16, 1\)"),
    (lambda x, y: (x, y[:4]), r"leading sizes disagree: \[8, 4\]"),
    (lambda x, y: (x, y + 5), r"batch labels: ids span \[7, 11\]; allowed is \[0, 10\)"),
    (lambda x, y: (x, y.astype(np.float32)), "batch labels: got dtype float32"),
    (lambda x, y: (x,), "batch: got tuple of 1; expected \\(images, labels\\)"),
])
def test_a_bad_image_batch_is_one_line_naming_the_array(image_model, change, message):
  db, states, (images, labels) = image_model
  bad = change(images, labels)
  with pytest.raises(DataError, match=message) as error:
    db.train_step(states[0], bad, jax.random.key(1), 0)
  assert "\n" not in str(error.value)  # one line
  with pytest.raises(DataError, match=message):
    db.jit_train_step()(states[0], bad, jax.random.key(1), 0)  # values: on the host


def test_shapes_are_checked_also_while_jit_traces_and_a_good_batch_trains(image_model):
  db, states, (images, labels) = image_model
  step = jax.jit(db.train_step)
  with pytest.raises(DataError, match=r"batch images: got shape \(8, 16, 16, 1\)"):
    step(states[0], (np.zeros((8, 16, 16, 1), np.float32), labels), jax.random.key(1), 0)
  # A good batch passes the checks unchanged: the jitted step's loss is the eager one's,
  # and steps on it lower its loss.
  state, metrics = step(states[0], (images, labels), jax.random.key(1), 0)
  _, eager = db.train_step(states[0], (images, labels), jax.random.key(1), 0)
  np.testing.assert_allclose(metrics["loss"], eager["loss"], rtol=1e-5)
  for _ in range(30):
    state, later = step(state, (images, labels), jax.random.key(1), 0)
  assert later["loss"] < 0.8 * metrics["loss"], (metrics["loss"], later["loss"])


def test_a_bad_block_key_or_state_count_is_named(image_model):
  db, states, (images, labels) = image_model
  with pytest.raises(DataError, match=r"block=2: expected an integer block index in \[0, 2\)"):
    db.train_step(states[0], (images, labels), jax.random.key(1), 2)
  with pytest.raises(DataError, match="key: got 0; expected one PRNG key"):
    db.init(0)
  with pytest.raises(DataError, match="key: got shape"):
    db.train_step(states[0], (images, labels), jnp.zeros(3), 0)
  with pytest.raises(DataError, match="got 1 block states; expected num_blocks=2"):
    db.save("never_written", states[:1])


def test_labels_past_the_last_class_are_refused_not_sampled_as_nan(image_model):
  db, states, _ = image_model
  params = [s.params for s in states]
  with pytest.raises(DataError, match=r"labels: ids span \[0, 11\]; allowed is \[0, 10\)"):
    db.sample(params, jax.random.key(0), jnp.arange(12))
  with pytest.raises(DataError, match="block_params: got 1 blocks' params"):
    db.sample(params[:1], jax.random.key(0), jnp.arange(10))
  images = db.sample(params, jax.random.key(0), jnp.arange(10), num_steps=2)
  assert images.shape == (10, 8, 8, 1) and np.all(np.isfinite(images))


def test_a_loaded_runs_sample_checks_its_inputs():
  """LoadedRun.sample, as load_run gives it (here around fresh states: the checks run
  before any block is read)."""
  config = tiny_config()
  task = tasks.build(config)
  states, shared = engine.init_on_host(task, seed=0)
  run = LoadedRun(config, task, [s.params for s in states], shared.params, 0, states)
  with pytest.raises(DataError, match=r"labels: ids span \[0, 10\]"):
    run.sample(jax.random.key(0), jnp.arange(11))
  with pytest.raises(DataError, match="num_steps=-1: expected an integer >= 1"):
    run.sample(jax.random.key(0), jnp.arange(3), num_steps=-1)
  with pytest.raises(DataError, match="solver='rk4': expected one of"):
    run.sample(jax.random.key(0), jnp.arange(3), solver="rk4")
  config = with_task(config, "classification")
  task = tasks.build(config)
  states, shared = engine.init_on_host(task, seed=0)
  with pytest.raises(DataError, match=r"images: got shape \(3, 8, 8\)"):
    task.sample([s.params for s in states], shared.params, jax.random.key(0),
                jnp.zeros((3, 8, 8)), 2)


@pytest.mark.parametrize("kind,method", [("autoregressive", "diffusion_blocks"),
                                         ("masked", "diffusion_blocks"),
                                         ("autoregressive", "end_to_end")])
def test_a_prompt_out_of_vocabulary_or_longer_than_the_context_is_named(kind, method):
  model = language.build(lm_config(kind, method))
  states, shared = engine.init_on_host(model, seed=0)
  params, vocab = [s.params for s in states], model.net.vocab_size
  sample = lambda prompt, **options: model.sample(params, shared.params, jax.random.key(0),
                                                  prompt, None, **options)
  with pytest.raises(DataError, match=rf"prompt: ids span \[0, {vocab}\]; allowed is "
                                      rf"\[0, {vocab}\) \(vocab_size={vocab}\)"):
    sample(np.array([0, vocab]))
  with pytest.raises(DataError, match="prompt: 16 tokens; it must be shorter than a "
                                      "sequence, seq_len=16"):
    sample(np.zeros(16, np.int32))
  with pytest.raises(DataError, match=r"top_p=0: expected in \(0, 1\]"):
    sample(np.zeros(2, np.int32), top_p=0)
  with pytest.raises(DataError, match="num_samples=0"):
    sample(np.zeros(2, np.int32), num_samples=0)
  with pytest.raises(DataError, match=rf"batch tokens: ids span \[0, {vocab}\]"):
    model.check_batch((np.array([[0, vocab]]),))
  with pytest.raises(DataError, match=r"batch tokens: got shape \(1, 17\)"):
    model.check_batch((np.zeros((1, 17), np.int32),))


def test_a_wrapped_token_models_batch_and_prompt_are_checked():
  class CausalMlp(Mlp):  # position-wise, hence causal
    pass
  db = dbjax.wrap(CausalMlp, num_layers=2, hidden_size=WIDTH, num_blocks=2, target="token",
                  vocab_size=5, seq_len=8)
  states = db.init(jax.random.key(0))
  with pytest.raises(DataError, match=r"batch tokens: ids span \[0, 7\]"):
    db.train_step(states[0], (np.arange(8)[None],), jax.random.key(1), 0)
  with pytest.raises(DataError, match="prompt: 8 tokens"):
    db.sample([s.params for s in states], jax.random.key(0), np.zeros(8, np.int32))
  tokens = db.sample([s.params for s in states], jax.random.key(0), np.array([1, 2]))
  assert tokens.shape == (1, 8) and tokens.max() < 5


def test_saving_twice_needs_overwrite(image_model, tmp_path):
  db, states, _ = image_model
  path = str(tmp_path / "blocks")
  db.save(path, states)
  with pytest.raises(WorkdirError, match="exists; pass overwrite=True to replace it"):
    db.save(path, states)
  others = db.init(jax.random.key(1))
  db.save(path, others, overwrite=True)
  loaded = db.load(path)
  np.testing.assert_array_equal(jax.tree.leaves(loaded[1].params)[0],
                                jax.tree.leaves(others[1].params)[0])
