"""The recurrent-depth task: Huginn's iteration counts and truncated backprop, the tied
core, the K-step chain, both trainings end to end, and config errors."""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dbjax
import dbjax.train
from dbjax import config as config_lib, engine, sampling, tasks
from dbjax.errors import ConfigError
from dbjax.tasks import recurrent
from dbjax.tasks.language.common import token_embedding
from experiments.cli import set_flags
from tests.conftest import assert_rows_follow_their_own_prompts, shrink_model
from tests.test_experiments import load_config, run_cli


def recurrent_config(method="diffusion_blocks", **fields):
  """The Shakespeare recurrent config, shrunk: d = 32, sequences of 16, tiny loops."""
  config = shrink_model(load_config("shakespeare_recurrent"))
  config.method = method
  config.train.num_steps, config.train.batch_size = 4, 4
  config.train.checkpoint_every = 4
  config.language.seq_len, config.language.num_samples, config.language.prompt = 16, 1, ""
  config.recurrent.update(mean_iterations=3, backprop_iterations=2, mixture_chains=2,
                          sample_iterations=2, inference_iterations=(1, 2, 4))
  for field, value in fields.items():
    section, name = field.split("__")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def data_and_configs():
  config, data = tasks.load_data(config_lib.validate(recurrent_config()))
  return config, data


def test_iteration_counts_follow_the_formula():
  """r = Poisson(lambda) + 1, lambda ~ LogNormal(ln m - s^2/2, s): E[r] = m + 1 and
  Var[r] = m + m^2 (exp(s^2) - 1)."""
  m, s = 8.0, 0.5
  r = np.asarray(recurrent.iteration_counts(jax.random.key(0), (200_000,), m, s))
  assert r.min() >= 1 and r.dtype.kind == "i"
  assert r.mean() == pytest.approx(m + 1, rel=0.01)
  assert r.var() == pytest.approx(m + m**2 * (np.exp(s**2) - 1), rel=0.03)


def _huginn(data_and_configs, **fields):
  config, _ = data_and_configs
  task = tasks.build(config_lib.variant(config, "end_to_end", **fields))
  params = engine.init_on_host(task, 0)[0][0].params
  return task, task.network(perturbed(params))


@jax.jit  # eager, the ops of each parameter's shape would compile apart
def perturbed(params):
  """The parameters with the adaLN gates moved off zero, so each core iteration changes
  the state."""
  return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                      params)


def test_truncated_backprop_stops_gradients_through_the_early_iterations(data_and_configs):
  """unroll's value and gradients, with respect to s_0, the input e and every parameter,
  equal a hand unroll's that stops the first r - k iterations' gradients (k = 2)."""
  task, net = _huginn(data_and_configs)
  graphdef, params = nnx.split(net)
  e = jax.random.normal(jax.random.key(2), (2, 16, 32))
  s0 = jax.random.normal(jax.random.key(3), (2, 16, 32))

  def by_unroll(params, e, s0, iterations):
    return jnp.sum(recurrent.unroll(nnx.merge(graphdef, params), e, s0, iterations, 2) ** 2)

  def by_hand(params, e, s0, iterations):  # the first r - k iterations frozen, the last k not
    net, zeros, s = nnx.merge(graphdef, params), jnp.zeros(2), s0
    for i in range(iterations):
      step = net.iterate(s, e, zeros)
      s = jax.lax.stop_gradient(step) if i < iterations - 2 else step
    return jnp.sum(s ** 2)

  arguments = (0, 1, 2)  # parameters, e, s_0
  unrolled = jax.jit(jax.value_and_grad(by_unroll, arguments))  # one program for every r
  hand_unrolled = jax.jit(jax.value_and_grad(by_hand, arguments), static_argnums=3)
  for r in (2, 3):  # r = k: every iteration's gradient; r > k: the first r - k stopped
    value, grads = unrolled(params, e, s0, jnp.int32(r))
    want, want_grads = hand_unrolled(params, e, s0, r)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, atol=1e-5, rtol=1e-4)
    # Through the no-gradient iterations nothing flows back to s_0, exactly; the
    # parameters always get a gradient from the last min(r, k) iterations.
    assert bool(jnp.all(grads[2] == 0)) == (r > 2)
    assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads[0]))


def test_the_core_is_one_set_of_weights_however_many_iterations(data_and_configs):
  few, _ = _huginn(data_and_configs, recurrent__mean_iterations=2,
                   recurrent__backprop_iterations=1)
  many, _ = _huginn(data_and_configs, recurrent__mean_iterations=32,
                    recurrent__backprop_iterations=8)
  shapes = lambda task: jax.tree.map(lambda x: x.shape, engine.abstract_states(task)[0].params)
  chex.assert_trees_all_equal(shapes(few), shapes(many))
  core = engine.abstract_states(few)[0].params["core"]
  assert {leaf.shape[0] for leaf in jax.tree.leaves(core)} == {4}  # core_layers, not m


def test_k_step_inference_is_k_calls_of_the_chain_step(data_and_configs):
  config, data = data_and_configs
  task = tasks.build(config)
  states, shared = engine.init_on_host(task, 0)
  params = perturbed(states[0].params)
  net, embedding = task.network(params), token_embedding(shared.params)
  tokens = jnp.asarray(data.test.tokens[:2])
  sigmas, _ = recurrent.sampling_plan(task.noise, 3)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  key = jax.random.key(5)
  chain = recurrent.chain_logits(task, net, embedding, tokens, key, sigmas)
  chex.assert_shape(chain, (3, 2, 16, config.data.vocab_size))
  e = task.context(net, embedding, tokens)
  z = dbjax.noise.pure_noise(key, tokens.shape + (embedding.shape[1],), task.noise.dist)
  assert task.bridge == "expected"  # the config's: the probability-flow ODE
  for k in range(3):  # by hand: a call, then the Euler step toward its expected embedding
    logits = recurrent.two_stream_logits(task, net, e, embedding, tokens, z, sigmas[k],
                                         jax.random.fold_in(key, k + 1))
    np.testing.assert_allclose(chain[k], logits, rtol=1e-4, atol=1e-4)
    z = sampling.euler_step(z, jax.nn.softmax(logits) @ embedding,
                            sigmas[k], sigmas[k + 1])


def train_run(method, workdir, **fields):
  """(config, results, per-step metric rows, workdir) of a run in `workdir`, evaluated at
  K = 1, 2, 4, whose curve and samples it asserts are there."""
  config = recurrent_config(method, eval__enabled=True, eval__max_test_examples=4, **fields)
  results = dbjax.train_and_evaluate(config, str(workdir))
  assert (workdir / "bpc_vs_iterations.png").exists() and (workdir / "samples.txt").exists()
  with open(workdir / "train_metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  return config, results, rows, workdir


@pytest.fixture(scope="module")
def denoiser_run(tmp_path_factory):
  """DiffusionBlocks' training, long enough for its loss to fall: shared by two tests."""
  return train_run("diffusion_blocks", tmp_path_factory.mktemp("denoiser"),
                   train__num_steps=60, train__checkpoint_every=60, train__batch_size=16,
                   train__learning_rate=3e-3)


@pytest.mark.parametrize("method", [
    "diffusion_blocks",
    pytest.param("end_to_end", marks=pytest.mark.slow)])  # Huginn's own programs: 100 s
def test_both_trainings_run_and_plot_the_curve(method, request, tmp_path):
  config, results, rows, _ = (request.getfixturevalue("denoiser_run")
                           if method == "diffusion_blocks" else train_run(method, tmp_path))
  steps = config.train.num_steps
  assert results["iterations"] == steps and results["num_blocks"] == 1
  curve = results["bits_per_character_by_iterations"]
  assert set(curve) == {"1", "2", "4"} and results["bits_per_character"] == min(curve.values())
  assert all(0 < bits < 10 for bits in curve.values())
  forward, backward = results["core_passes_per_step"].values()
  if method == "diffusion_blocks":
    assert (forward, backward) == (1.0, 1.0)
  else:  # E[r] = m + 1 = 4 forward; min(r, k = 2) backward, between 1 and 2
    assert forward == 4.0 and 1.0 < backward < 2.0
    assert "iterations" in rows[0]  # each step draws its own number of iterations
  assert results["train_core_layer_evaluations"] == (
      steps * config.recurrent.core_layers * (forward + backward))


def test_huginns_training_loss_falls(tmp_path):
  """Huginn's own training (random unrolling, truncated backprop), in the default set:
  its cross-entropy falls over 40 steps."""
  config = recurrent_config("end_to_end", train__num_steps=40, train__checkpoint_every=40,
                            train__batch_size=16, train__learning_rate=3e-3)
  _, _, _, history = dbjax.train.train(config, str(tmp_path))
  ce = [r["cross_entropy"] for r in history]
  assert len(ce) == 40 and np.mean(ce[-5:]) < 0.8 * np.mean(ce[:5])


def test_the_denoiser_loss_falls(denoiser_run):
  _, _, rows, _ = denoiser_run
  ce = [r["cross_entropy"] for r in rows]
  assert len(ce) == 60 and np.mean(ce[-10:]) < 0.8 * np.mean(ce[:5])


@pytest.mark.parametrize("fields,message", [
    ({"recurrent__backprop_iterations": 9}, r"recurrent.backprop_iterations=9 .*k <= m"),
    ({"recurrent__mean_iterations": 0}, r"recurrent.mean_iterations=0 .*positive integer"),
    ({"recurrent__inference_iterations": (1, 0)}, r"recurrent.inference_iterations"),
    ({"diffusion__num_blocks": 3}, r"diffusion.num_blocks=3 .*1 for task='recurrent_depth'"),
])
def test_config_errors_are_named(fields, message):
  with pytest.raises(ConfigError, match=message) as error:
    config_lib.validate(recurrent_config(**fields))
  assert "\n" not in str(error.value)


def test_evaluate_flags_pick_one_k_and_the_number_of_chains(denoiser_run):
  """experiments.evaluate's --num_steps=K scores that K alone, --mixture_chains the
  mixture's size; the output's name says both. By Jensen the mixture of more chains
  scores lower on average: at K = 2, 32 chains against 1."""
  workdir = str(denoiser_run[3])
  config, task, states, shared = dbjax.train.restore_run(workdir)
  config, data = dbjax.train.load_run_data(config, workdir)

  def evaluated(chains):
    flagged = set_flags(config, task, task.evaluate_flags,
                        {"num_steps": 2, "mixture_chains": chains}, "experiments.evaluate")
    flagged_task = tasks.build(flagged)
    results = flagged_task.evaluate(flagged, workdir, states, shared, data, prefix="x_")
    return flagged_task.evaluation_name(flagged), results["bits_per_character_by_iterations"]

  name, one_chain = evaluated(1)
  assert name == "eval_iterations_2_chains1_expected" and set(one_chain) == {"2"}
  assert evaluated(32)[1]["2"] < one_chain["2"]
  with pytest.raises(ConfigError, match="--mixture_chains does not apply .*HuginnLM"):
    set_flags(config_lib.variant(config, "end_to_end"), tasks.build(
        config_lib.variant(config, "end_to_end")), recurrent.HuginnLM.evaluate_flags,
              {"mixture_chains": 4}, "experiments.evaluate")


@pytest.mark.slow  # a command line: 30 s
def test_chain_probe_scores_every_cell_and_more_chains_score_lower(denoiser_run, tmp_path):
  """studies.probe_recurrent_chains: one row per (bridge, chains, K). At K = 1 the
  only call is the first, which no bridge touches, so both bridges score the same; at
  K = 2 the mixture of 16 chains scores below one chain's last call (Jensen)."""
  out = tmp_path / "chains.json"
  run_cli("studies.probe_recurrent_chains", f"--workdir={denoiser_run[3]}",
          "--chains=1,16", "--iterations=1,2", "--test_examples=4", f"--out={out}")
  cells = {(r["bridge"], r["chains"], r["K"]): r["bits_per_character"]
           for r in json.loads(out.read_text())["rows"]}
  assert len(cells) == 8 and (tmp_path / "chains.png").exists()
  for chains in (1, 16):
    assert cells["argmax", chains, 1] == pytest.approx(cells["expected", chains, 1], rel=1e-6)
  for bridge in ("argmax", "expected"):
    assert cells[bridge, 16, 2] < cells[bridge, 1, 2]


@pytest.mark.parametrize("method", ["diffusion_blocks", "end_to_end"])
def test_prompts_continued_at_once_each_follow_their_own_prompt(data_and_configs, method):
  """continue_prompts (text quality's sampler) continues N different prompts in one batch
  to any length: each row starts with its prompt and depends on it alone (another
  prompt in row 0 leaves rows 1 and 2 as they were), the same seed the same rows."""
  config, data = data_and_configs
  task = tasks.build(config_lib.variant(config, method))
  states, shared = engine.init_on_host(task, 0)
  params = [perturbed(states[0].params)]
  prompts = np.asarray(data.test.tokens[:3, :5])
  continued = lambda prompts, seed: task.continue_prompts(params, shared.params, prompts, 9,
                                                         seed, 1.0, 1.0, num_steps=2)
  chex.assert_shape(assert_rows_follow_their_own_prompts(continued, prompts,
                                                         config.data.vocab_size), (3, 9))
  with pytest.raises(dbjax.errors.DataError, match="length=17: expected above"):
    task.continue_prompts(params, shared.params, prompts, 17)
