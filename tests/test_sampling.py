"""Samplers: shapes, and block routing plus Euler/Heun updates against a closed form."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dbjax import edm, engine, noise, sampling, tasks
from dbjax.tasks import images
from dbjax.tasks.base import sampling_plan
from studies.exact_posteriors import exact_posterior_chain
from tests.conftest import tiny_config


def constant_output_blocks(model, values):
  """Stacked params where block b's network F outputs the constant values[b].

  A fresh DiT outputs zeros (zero-initialised head); setting the head's bias makes F
  constant, so D(z; s) = c_skip(s) z + c_out(s) values[b] in closed form.
  """
  params = []
  for b, v in enumerate(values):
    state = engine.init_block(model, jax.random.key(b)).params
    state["final"]["out"]["bias"].value = jnp.full_like(state["final"]["out"]["bias"].value, v)
    params.append(state)
  return sampling.stack_params(params)


def reference_sample(z, model, values, num_steps, solver):
  """The sampler written out in numpy float64 with the rule of docs/method.md, "Sampling"
  (paper, Sec. 3): block 0 runs at the highest sigmas, each step by the block that owns
  its starting sigma."""
  sigmas = noise.sampling_sigmas(num_steps, model.noise.dist)
  owner = noise.block_of_sigma(sigmas, model.noise.boundaries)
  z = np.asarray(z, np.float64)

  def denoise(z, s, b):
    c = edm.preconditioning(np.float64(s))
    return float(c.c_skip) * z + float(c.c_out) * values[b]
  for i in range(num_steps):
    s, s_next, b = sigmas[i], sigmas[i + 1], owner[i]
    slope = (z - denoise(z, s, b)) / s
    z_next = z + (s_next - s) * slope
    if solver == "heun":
      z_next = z + (s_next - s) * 0.5 * (slope + (z_next - denoise(z_next, s_next, b)) / s_next)
    z = z_next
  return denoise(z, sigmas[-1], owner[-1])


@pytest.fixture(scope="module")
def model():
  config = tiny_config()
  config.diffusion.num_blocks = 2
  return tasks.build(config)


@pytest.mark.parametrize("solver,num_steps", [("euler", 2), ("euler", 6), ("heun", 4)])
def test_sampler_matches_closed_form_with_block_routing(model, solver, num_steps):
  values = [0.7, -0.3]  # block 0 pulls towards +, block 1 towards -
  stacked = constant_output_blocks(model, values)
  labels = jnp.arange(3)
  key = jax.random.key(5)
  out = images.sample(model, stacked, key, labels, num_steps, solver)
  z0 = model.noise.dist.sigma_max * jax.random.normal(key, out.shape)
  expected = reference_sample(z0, model, values, num_steps, solver)
  np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)
  # Swapping the blocks' roles changes the result: routing is really by sigma.
  swapped = images.sample(model, constant_output_blocks(model, values[::-1]), key, labels,
                            num_steps, solver)
  assert not np.allclose(out, swapped, atol=1e-3)


def test_one_step_per_block_runs_each_block_once_in_order(model):
  sigmas, owners = sampling_plan(model.noise, model.num_blocks)
  np.testing.assert_array_equal(owners[:-1], np.arange(model.num_blocks))
  assert owners[-1] == model.num_blocks - 1  # the final D at sigma_min


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_sample_shapes_and_finiteness(model, solver, guidance_scale):
  states = [engine.init_block(model, jax.random.key(b)) for b in range(model.num_blocks)]
  stacked = sampling.stack_params([s.params for s in states])
  out = images.sample(model, stacked, jax.random.key(0), jnp.arange(5) % 10, 3, solver,
                        guidance_scale)
  chex.assert_shape(out, (5, 8, 8, 1))
  chex.assert_tree_all_finite(out)


def test_guidance_zero_is_unconditional(model):
  """w = 0 gives D_uncond: labels must not matter; at w = 1 they must."""
  params = [engine.init_block(model, jax.random.key(b)).params for b in range(2)]
  leaves, tree = jax.tree.flatten(sampling.stack_params(params))
  keys = jax.random.split(jax.random.key(9), len(leaves))
  stacked = jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape)
                                      for l, k in zip(leaves, keys)])
  key = jax.random.key(1)
  run = lambda labels, w: images.sample(model, stacked, key, jnp.array(labels), 3,
                                          guidance_scale=w)
  np.testing.assert_allclose(run([1, 2], 0.0), run([7, 8], 0.0), atol=1e-5)
  assert not np.allclose(run([1, 2], 1.0), run([7, 8], 1.0), atol=1e-3)


def test_sample_in_batches_pads_and_trims(model):
  stacked = constant_output_blocks(model, [0.0, 0.0])
  out = images.sample_in_batches(model, stacked, jax.random.key(0), np.arange(7) % 10, 2,
                                   batch_size=4)
  assert out.shape == (7, 8, 8, 1)


def test_unknown_solver_is_refused(model):
  with pytest.raises(ValueError, match="solver"):
    images.sample(model, constant_output_blocks(model, [0, 0]), jax.random.key(0),
                    jnp.arange(2), 2, solver="rk4")


# ------------------------------------------- the chain over an embedded categorical target


KEY = jax.random.key(0)


def rows_of(probs, count=4000):
  """One chain per row: the same log prior repeated."""
  return jnp.tile(jnp.log(probs), (count, 1))


@pytest.fixture(scope="module")
def categorical():
  probs = jnp.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
  raw = jax.random.normal(jax.random.key(1), (6, 32))
  return probs, sampling.unit_rows(raw)


def cross_entropy(probs, logits):
  """E_{y ~ probs} -log softmax(logits)[y], averaged over the chains (rows of logits)."""
  return float(-jnp.mean(jax.nn.log_softmax(logits) @ probs))


def test_exact_denoiser_chain_first_call_is_the_predictive_distribution(categorical):
  """At sigma_max = 80 the exact posterior is the prior: the first call's cross-entropy is
  the entropy of y. This is the likelihood the autoregressive LM's first call reports."""
  probs, embedding = categorical
  logits = exact_posterior_chain(rows_of(probs, 2000), embedding, 4, 4, "argmax", KEY)
  entropy = float(-jnp.sum(probs * jnp.log(probs)))
  assert cross_entropy(probs, logits[0]) == pytest.approx(entropy, abs=1e-3)


def test_fixed_seed_chain_is_no_likelihood_but_the_mixture_over_chains_is(categorical):
  """The exact denoiser's Euler chain, 4 calls over B = 4 blocks. Its last call is
  near-certain of the token the chain ends on, so the cross-entropy of one fixed-seed
  chain against y ~ probs is over 5 times the entropy (35.7 and 31.2 nats against 1.53
  here): it scores how often a chain ends on y, not a likelihood (docs/language.md). The
  argmax bridge ends on the mode far more often than p says (a near-greedy decoder); the
  expected bridge is the probability-flow ODE, whose end is distributed as y, and the
  mixture of its chains' last calls (`sampling.mixture_log_probs`) has the entropy as
  cross-entropy."""
  probs, embedding = categorical
  entropy = float(-jnp.sum(probs * jnp.log(probs)))
  greedy = exact_posterior_chain(rows_of(probs), embedding, 4, 4, "argmax", KEY)[-1]
  assert float(jnp.mean(jnp.argmax(greedy, -1) == 0)) > 0.7  # p(mode) = 0.4
  assert cross_entropy(probs, greedy) > 5 * entropy
  flow = exact_posterior_chain(rows_of(probs), embedding, 4, 4, "expected", KEY)[-1]
  assert cross_entropy(probs, flow) > 5 * entropy
  mixture = sampling.mixture_log_probs(jax.nn.log_softmax(flow))
  assert float(-mixture @ probs) == pytest.approx(entropy, abs=0.03)
  ends = jnp.bincount(jnp.argmax(flow, -1), length=6) / flow.shape[0]
  assert float(jnp.sum(jnp.abs(ends - probs))) / 2 < 0.1  # total variation


def test_mixture_log_probs_is_the_log_of_the_mean_probability():
  log_probs = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (5, 3, 7)))
  chex.assert_trees_all_close(sampling.mixture_log_probs(log_probs),
                              jnp.log(jnp.mean(jnp.exp(log_probs), 0)), atol=1e-6)


def test_exact_chain_of_a_classifier_loses_to_its_first_call():
  """A classifier whose every block is exact, p(y | image) calibrated at about 84% (the
  Fashion-MNIST regime; docs/classification.md), 10 unit-norm labels in 128 dimensions,
  B = N = 3. The first call at sigma_max is the Bayes classifier; the chain's second
  call, at sigma_1 = 0.50, sees its argmax row re-noised where a unit-norm label is only
  partly readable, and sometimes moves to another class: the last call's argmax is about
  one point less accurate. That cost is the chain's, not the blocks' training."""
  raw = jax.random.normal(jax.random.key(1), (10, 128))
  embedding = sampling.unit_rows(raw)
  log_posterior = jax.nn.log_softmax(7.0 * jax.random.normal(jax.random.key(2), (4000, 10)))
  labels = jax.random.categorical(jax.random.key(3), log_posterior)
  logits = exact_posterior_chain(log_posterior, embedding, 3, 3, "argmax", KEY)
  accuracy = [float(jnp.mean(jnp.argmax(l, -1) == labels)) for l in logits]
  bayes = float(jnp.mean(jnp.argmax(log_posterior, -1) == labels))
  assert accuracy[0] == pytest.approx(bayes, abs=2e-3) and 0.8 < bayes < 0.88
  assert 0.005 < bayes - accuracy[-1] < 0.03
  # Exact for tokens built from a random class half the time (classify.token_corruption),
  # the later calls trust the token less and lose a third as much (0.4 against 1.3 points).
  robust = exact_posterior_chain(log_posterior, embedding, 3, 3, "argmax", KEY,
                                          token_corruption=0.5)
  robust_accuracy = [float(jnp.mean(jnp.argmax(l, -1) == labels)) for l in robust]
  assert robust_accuracy[0] == pytest.approx(bayes, abs=2e-3)
  assert accuracy[-1] + 0.005 < robust_accuracy[-1] < bayes
