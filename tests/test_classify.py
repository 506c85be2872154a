"""Classification: label embedding, chain routing, loss weighting, shared parameters,
augmentation, the driver's order with coupled blocks, and accuracy after a short run."""
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dbjax import config as config_lib, data, edm, engine, noise, sampling, train
from dbjax.tasks import classification as classify
from dbjax.tasks.base import sampling_plan
from dbjax.errors import ConfigError, DataError
from tests.conftest import tiny_config


def classify_config(**overrides):
  return tiny_config(task="classification", **overrides)


@pytest.fixture(scope="module")
def digits():
  return data.load_images("digits", "train")


def test_label_embedding_rows_have_unit_norm():
  raw = 3.0 * jax.random.normal(jax.random.key(0), (10, 32))
  embedding = classify.label_embedding({"label_embedding": raw})
  np.testing.assert_allclose(jnp.linalg.norm(embedding, axis=1), 1.0, rtol=1e-6)
  # Direction kept: each row is a positive multiple of the raw row.
  cosine = jnp.sum(embedding * raw, 1) / jnp.linalg.norm(raw, axis=1)
  np.testing.assert_allclose(cosine, 1.0, rtol=1e-6)


def constant_logit_blocks(model, key=0):
  """Block b's network outputs the logits 10 * onehot(b), whatever its input: the head's
  kernel is zero at initialisation, so its bias is the output."""
  params = []
  for b in range(model.num_blocks):
    state = engine.init_block(model, jax.random.key(key + b)).params
    bias = state["head"]["out"]["bias"]
    bias.value = 10.0 * jax.nn.one_hot(b, bias.value.shape[0])
    params.append(state)
  return params


@pytest.mark.parametrize("num_blocks,num_steps,expected", [
    (3, 3, [0, 1, 2]),              # N = B: block b runs once, at call b
    (3, 6, [0, 0, 1, 1, 2, 2]),
    (2, 1, [0]),
])
def test_chain_runs_block_b_at_step_b(num_blocks, num_steps, expected):
  config = classify_config(**{"diffusion__num_blocks": num_blocks, "model__num_layers": 6})
  model = classify.build(config)
  shared = engine.init_shared(model, jax.random.key(9)).params
  stacked = sampling.stack_params(constant_logit_blocks(model))
  images = jnp.zeros((4, 8, 8, 1))
  logits = model.chain_logits(stacked, shared, images, num_steps, jax.random.key(1))
  chex.assert_shape(logits, (num_steps, 4, 10))
  ran = np.argmax(np.asarray(logits), axis=-1)  # block b's logits say "class b"
  np.testing.assert_array_equal(ran, np.repeat(np.array(expected)[:, None], 4, axis=1))
  np.testing.assert_array_equal(noise.block_of_sigma(
      noise.sampling_sigmas(num_steps, model.noise.dist)[:-1], model.noise.boundaries), expected)


def test_euler_bridge_moves_toward_the_argmax_row():
  """With every call saying 'class c', the chain's z moves to E[c] in closed form:
  z_{i+1} - x0 = (s_{i+1}/s_i)(z_i - x0), so |z_i - x0| = (s_i/s_0)|z_0 - x0|. Each call
  reports |z - E[c]| in its logits (below class c's, so the argmax stays c)."""
  config = classify_config(**{"diffusion__num_blocks": 2})
  model = classify.build(config)
  embedding = classify.label_embedding(engine.init_shared(model, jax.random.key(9)).params)
  sigmas, blocks = sampling_plan(model.noise, 4)
  target = embedding[7]

  def logits_of(z, sigma, block, step):
    distance = jnp.linalg.norm(z - target, axis=-1)
    return jnp.where(jnp.arange(10) == 7, 10.0, -100.0 - distance[:, None])

  z0 = noise.pure_noise(jax.random.key(3), (2, embedding.shape[1]), model.noise.dist)
  logits = sampling.embedding_chain(logits_of, z0, jnp.asarray(sigmas, jnp.float32),
                                    jnp.asarray(blocks), embedding, "argmax")
  assert np.all(np.argmax(logits, -1) == 7)
  distances = -100.0 - np.asarray(logits[:, :, 0])              # (calls, batch)
  expected = sigmas[:-1, None] / sigmas[0] * np.linalg.norm(z0 - target, axis=-1)
  np.testing.assert_allclose(distances, expected, rtol=1e-4)
  # The last Euler step, to sigma_min, shrinks that by s_N / s_{N-1}: z ends within 5% of
  # the unit-norm E[c], from hundreds away.
  assert distances[-1].max() * sigmas[-1] / sigmas[-2] < 0.05 and distances[0].min() > 100


def test_bridge_estimates():
  embedding = classify.label_embedding(
      {"label_embedding": jax.random.normal(jax.random.key(0), (5, 16))})
  logits = jnp.array([[0.0, 3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
  argmax = sampling.bridge_estimate(logits, embedding, "argmax")
  np.testing.assert_allclose(argmax[0], embedding[1])
  np.testing.assert_allclose(jnp.linalg.norm(argmax, axis=1), 1.0, rtol=1e-6)
  expected = sampling.bridge_estimate(logits, embedding, "expected")
  np.testing.assert_allclose(expected[1], embedding.mean(0), rtol=1e-5, atol=1e-6)
  assert jnp.linalg.norm(expected[1]) < 1.0  # the soft readout shrinks when unsure


def test_weighting_options_match_their_formulas():
  ce = jnp.array([0.5, 2.0, 1.0])
  w = jnp.array([10.0, 1.0, 100.0])
  np.testing.assert_allclose(classify.weighted_cross_entropy(ce, w, "per_example"),
                             (5.0 + 2.0 + 100.0) / 3, rtol=1e-6)
  np.testing.assert_allclose(classify.weighted_cross_entropy(ce, w, "batch_mean"),
                             (111.0 / 3) * (3.5 / 3), rtol=1e-6)


@pytest.mark.parametrize("weighting", ["per_example", "batch_mean"])
def test_block_loss_weights_cross_entropy_by_edm_weight(weighting):
  """block_loss = the chosen formula of w(sigma_i) and CE_i, with sigma_i drawn in the
  block's interval; logits are constant (head bias), so CE_i depends on the label only."""
  config = classify_config(**{"classifier__loss_weighting": weighting})
  model = classify.build(config)
  state = engine.init_block(model, jax.random.key(0)).params
  bias = jnp.linspace(-1.0, 1.0, 10)
  state["head"]["out"]["bias"].value = bias
  shared = engine.init_shared(model, jax.random.key(1)).params
  labels = jnp.arange(16) % 10
  key, interval = jax.random.key(4), jnp.asarray(model.intervals[1])
  loss, metrics = model.loss(state, shared, (jnp.zeros((16, 8, 8, 1)), labels), key,
                             interval)
  sigma = noise.sample_sigma(jax.random.split(key, 3)[0], (16,), interval[0], interval[1])
  assert np.all((sigma >= interval[0]) & (sigma <= interval[1]))
  ce = optax.softmax_cross_entropy_with_integer_labels(jnp.broadcast_to(bias, (16, 10)), labels)
  w = edm.loss_weight(sigma)
  want = np.mean(w * ce) if weighting == "per_example" else np.mean(w) * np.mean(ce)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["cross_entropy"], np.mean(ce), rtol=1e-6)


def test_corrupt_labels_replaces_the_given_fraction_uniformly():
  labels = jnp.arange(40000) % 10
  assert jnp.array_equal(classify.corrupt_labels(jax.random.key(0), labels, 10, 0.0), labels)
  corrupted = classify.corrupt_labels(jax.random.key(0), labels, 10, 0.4)
  # A replacement draws the true class one time in ten: 0.4 * 0.9 of the labels change.
  np.testing.assert_allclose(jnp.mean(corrupted != labels), 0.36, atol=0.01)
  changed = corrupted[corrupted != labels]
  np.testing.assert_allclose(np.bincount(changed, minlength=10) / changed.size, 0.1, atol=0.01)


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_token_corruption_changes_the_token_not_the_target(monkeypatch, rate):
  """With a network whose logits are the token's similarity to each label row, a near-clean
  token is read back as the class it was built from: right for all examples without
  corruption, for about 1 - 0.9 rate with it; the loss is always against the true label."""
  config = classify_config(**{"classifier__token_corruption": rate})
  model = classify.build(config)
  shared = engine.init_shared(model, jax.random.key(1)).params
  embedding = classify.label_embedding(shared)
  monkeypatch.setattr(classify.LabelDenoising, "network",
                      lambda *_: lambda images, token, c_noise: 100.0 * token @ embedding.T)
  labels = jnp.arange(4000) % 10
  interval = jnp.array([0.002, 0.0021])
  _, metrics = model.loss(None, shared, (jnp.zeros((4000, 8, 8, 1)), labels),
                          jax.random.key(2), interval)
  np.testing.assert_allclose(metrics["denoising_accuracy"], 1.0 - 0.9 * rate, atol=0.025)
  if rate == 0.0:
    assert metrics["cross_entropy"] < 1e-3


@pytest.mark.parametrize("shared_modules", ["per_block", "shared"])
def test_parameter_groups(shared_modules):
  model = classify.build(classify_config(**{"classifier__shared_modules": shared_modules}))
  block, shared = engine.abstract_states(model)
  in_block = set(block.params.keys())
  in_shared = set(shared.params["network"].keys())
  assert "layers" in in_block and "layers" not in in_shared
  modules = {"patch_embed", "sigma_embed", "head"}
  if shared_modules == "shared":
    assert modules <= in_shared and not modules & in_block
  else:
    assert modules <= in_block and not in_shared
  assert shared.params["label_embedding"].shape == (10, 32)
  # The network of one block still has all of them once the groups are merged.
  net = model.network(engine.init_block(model, jax.random.key(0)).params,
                      engine.init_shared(model, jax.random.key(1)).params)
  chex.assert_shape(net(jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 32)), jnp.zeros(2)), (2, 10))


@pytest.mark.parametrize("target_token", ["class_token", "concat"])
def test_target_token_options(target_token):
  model = classify.build(classify_config(**{"classifier__target_token": target_token}))
  block = engine.init_block(model, jax.random.key(0)).params
  assert ("cls_token" in block) == (target_token == "concat")
  shared = engine.init_shared(model, jax.random.key(1)).params
  # The noisy label is an input: at init the head is zero, so perturb it to see it matter.
  block["head"]["out"]["kernel"].value = jax.random.normal(jax.random.key(2), (32, 10))
  block["head"]["modulation"]["bias"].value = jnp.ones(64)
  net = model.network(block, shared)
  images = jnp.zeros((2, 8, 8, 1))
  a, b = (net(images, jax.random.normal(jax.random.key(k), (2, 32)), jnp.zeros(2))
          for k in (3, 4))
  # class_token: the noisy label token is the one read out, so it moves the logits even
  # through identity layers; concat reads the [CLS] token, which sees the label only
  # through attention, absent at initialisation (zero gates).
  assert np.allclose(a, b) == (target_token == "concat")


def test_end_to_end_is_a_plain_classifier():
  config = classify_config(method="end_to_end")
  model = classify.build(config)
  assert isinstance(model, classify.PlainClassifier)
  assert model.num_blocks == 1 and not model.couples_blocks
  assert model.vit.num_layers == config.model.num_layers
  block, shared = engine.abstract_states(model)
  assert "cls_token" in block.params and not shared.params["network"]


def test_augmentation_is_a_flip_and_shifted_crop():
  images = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
  out = np.asarray(classify.augment_images(jax.random.key(1), images))
  padded = np.pad(np.asarray(images), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1)
  for i in range(6):
    candidates = [np.pad(img, ((1, 1), (1, 1), (0, 0)), constant_values=-1)[y:y + 8, x:x + 8]
                  for img in (np.asarray(images[i]), np.asarray(images[i])[:, ::-1])
                  for y in range(3) for x in range(3)]
    assert any(np.array_equal(out[i], c) for c in candidates)
  assert padded.shape == (6, 10, 10, 1) and not np.array_equal(out, np.asarray(images))


def interleaved_reference(config, train_data):
  """The paper's order, one iteration at a time, with the shared state carried along."""
  model = classify.build(config)
  states, shared = engine.init_on_host(model, config.seed)
  step_fn = engine.jit_train_step(model)
  for step in range(config_lib.total_iterations(config)):
    b = train.block_for_step(config.seed, step, model.num_blocks)
    index = data.batch_indices(config.seed, step, len(train_data.labels),
                               config.train.batch_size)
    new, shared, _ = step_fn(jax.device_put(states[b]), jax.device_put(shared),
                             (train_data.images[index], train_data.labels[index]),
                             train.step_key(config.seed, step, b),
                             jnp.asarray(model.intervals[b]))
    states[b], shared = jax.device_get((new, shared))
  return states, shared


@pytest.mark.parametrize("label_embedding,shared_modules", [
    ("joint", "per_block"), ("frozen", "shared"),
    pytest.param("frozen", "per_block", marks=pytest.mark.slow)])  # couples nothing
def test_driver_matches_interleaved_training(tmp_path, digits, label_embedding, shared_modules):
  config = classify_config(**{"classifier__label_embedding": label_embedding,
                              "classifier__shared_modules": shared_modules,
                              "train__num_steps": 4})
  model = classify.build(config)
  assert model.couples_blocks == (label_embedding == "joint" or shared_modules == "shared")
  _, states, shared, _ = train.train(config, str(tmp_path), digits)
  want_states, want_shared = interleaved_reference(config, digits)
  chex.assert_trees_all_equal(states, want_states)
  chex.assert_trees_all_equal(shared, want_shared)
  initial = engine.init_on_host(model, config.seed)[1].params["label_embedding"]
  moved = not np.array_equal(shared.params["label_embedding"], initial)
  assert moved == (label_embedding == "joint")  # frozen means bit-identical
  assert int(shared.step) == config_lib.total_iterations(config)


def test_resume_with_shared_state_equals_uninterrupted_run(tmp_path, digits):
  config = classify_config(**{"train__num_steps": 5, "classifier__label_embedding": "joint"})
  _, straight, straight_shared, _ = train.train(config, str(tmp_path / "a"), digits)
  workdir = str(tmp_path / "b")
  train.train(config, workdir, digits)
  # Drop the final checkpoint: the run resumes from the one before and redoes the rest.
  checkpoints = os.path.join(workdir, "checkpoints")
  shutil.rmtree(os.path.join(checkpoints, max(os.listdir(checkpoints), key=int)))
  _, resumed, resumed_shared, history = train.train(config, workdir, digits)
  chex.assert_trees_all_equal((straight, straight_shared), (resumed, resumed_shared))
  assert [r["step"] for r in history] == list(range(10))


@pytest.mark.parametrize("labels,message", [
    (lambda n: np.full(n, 10, np.int32), "labels span"),
    (lambda n: np.full(n, -1, np.int32), "labels span"),
    (lambda n: np.zeros(n, np.float32), "dtype"),
])
def test_bad_labels_are_refused_by_name(tmp_path, digits, labels, message):
  bad = data.ImageData(digits.images, labels(len(digits.labels)), 10)
  with pytest.raises(DataError, match=message):
    train.train(classify_config(), str(tmp_path), bad)


def test_bad_classifier_option_is_named():
  with pytest.raises(ConfigError, match="classifier.bridge"):
    config_lib.validate(classify_config(**{"classifier__bridge": "soft"}))
  with pytest.raises(ConfigError, match="classifier.inference_steps"):
    config_lib.validate(classify_config(**{"classifier__inference_steps": (0, 3)}))
  with pytest.raises(ConfigError, match="classifier.token_corruption.*in \\[0, 1\\)"):
    config_lib.validate(classify_config(**{"classifier__token_corruption": 1.0}))


@pytest.mark.slow  # 60 s; the other runs here train the classifier too
def test_short_run_is_well_above_chance(tmp_path):
  """Six layers, B = 3, 150 updates per block on digits: several times the 10% of chance,
  with accuracy against steps reported for every N asked for."""
  config = classify_config(**{"eval__enabled": True, "model__num_layers": 6,
                              "model__hidden_size": 64, "model__num_heads": 4,
                              "model__frequency_dim": 64, "diffusion__num_blocks": 3,
                              "train__num_steps": 150, "train__batch_size": 64,
                              "train__learning_rate": 2e-3, "train__checkpoint_every": 450,
                              "classifier__inference_steps": (1, 2, 4)})
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["accuracy"] > 0.5, results
  assert set(results["accuracy_by_steps"]) == {"1", "2", "3", "4"}
  assert (tmp_path / "confusion.png").exists() and (tmp_path / "accuracy_vs_steps.png").exists()


def test_resume_refuses_other_parameter_groups_but_not_for_end_to_end(tmp_path, digits):
  train.train(classify_config(**{"train__num_steps": 1}), str(tmp_path / "db"), digits)
  with pytest.raises(ConfigError, match="classifier.shared_modules"):
    train.train(classify_config(**{"train__num_steps": 2,
                                   "classifier__shared_modules": "shared"}),
                str(tmp_path / "db"), digits)
  # The end-to-end ViT has no label token and no shared group: these options do not apply.
  train.train(classify_config(method="end_to_end", **{"train__num_steps": 1}),
              str(tmp_path / "e2e"), digits)
  _, _, _, history = train.train(
      classify_config(method="end_to_end", **{"train__num_steps": 2,
                                              "classifier__target_token": "class_token"}),
      str(tmp_path / "e2e"), digits)
  assert [r["step"] for r in history] == [0, 1]
