"""Recurrent depth (paper, App. E.5): a Huginn-style looped LM trained as one denoiser,
against Huginn's own training (Geiping et al. 2025, arXiv 2502.05171).

The network (dbjax.nets.recurrent): prelude P reads the text once, e = P(x); a core R with
tied weights updates a state, s' = R(adapter([s; e])); a coda C and head read logits.

DiffusionBlocks (`RecurrentDenoiser`, B = 1): the core is an adaLN sigma-conditioned EDM
denoiser of the next token's embedding. A training step draws one sigma per sequence from
the whole log-normal, z = E[x] + sigma eps at every position, runs P, then R once on
adapter([c_in z; e]), then C; loss w(sigma) CE (paper, Eq. 6). One pass of the core per
step, with gradients through one pass. The recurrence appears at inference only: K Euler
steps of the embedding chain, each one pass of R and C (P runs once).

Huginn (`HuginnLM`, the baseline): s_0 random (truncated normal), r = Poisson(lambda) + 1
iterations with lambda ~ LogNormal(ln m - s^2/2, s) (so E[r] = m + 1), the first
max(r - k, 0) without gradients and the last min(r, k) with (truncated backprop); CE at
the coda. Evaluated after K iterations from a random s_0.

What is scored at each K, for both (`bits_per_character_by_iterations`), is a plain
estimate of the next-token distribution, teacher-forced, in bits per character:
- Huginn: softmax of the coda's logits after K iterations of the core.
- DiffusionBlocks: the mixture of `mixture_chains` independent K-step chains' last calls
  (dbjax.sampling.mixture_log_probs), the chain's predictive distribution as a sampler
  (one chain's last call is near-certain of where that chain ends, so it is no estimate;
  docs/language.md). Each chain row i runs against the true earlier tokens re-noised at
  the step's sigma, as in training: two streams [re-noised truth; chain] under the
  block-diffusion attention (tasks.language.autoregressive), so every position's chain
  runs at once.
The headline `bits_per_character` is the best over K.
"""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
from flax import nnx

from dbjax import edm, noise
from dbjax.data import tokenizers
from dbjax.config import check_field, check_positive_integers, shared_updates
from dbjax.engine.state import make_optimizer, shared_optimizer
from dbjax.errors import ConfigError
from dbjax.nets.recurrent import RecurrentConfig, RecurrentLM
from dbjax.progress import progress_bar
from dbjax.sampling import embedding_chain, fixed_size_batches, mixture_log_probs, stack_params
from dbjax.tasks.base import NoisePlan, noise_plan, sampling_plan
from dbjax.tasks import language
from dbjax.tasks.language import load_data, resolve  # the language task's text data
from dbjax.tasks.language.autoregressive import denoising_cross_entropy
from dbjax.tasks.language.common import (SAMPLES_FILE, LanguageTask, block_params,
                                         sample_token, sampling_settings, token_embedding,
                                         token_metrics, write_texts)

__all__ = ["build", "load_data", "resolve", "RecurrentDenoiser", "HuginnLM", "iteration_counts"]


# ------------------------------------------------------------------------ config


def config_sections() -> dict:
  """This task's config sections and their defaults: the language task's (the text, its
  prompt and sampling) and its own, `recurrent`."""
  return {**language.config_sections(), "recurrent": ml_collections.ConfigDict(dict(
      # task="recurrent_depth" (dbjax.tasks.recurrent; paper, App. E.5): prelude, a core
      # with tied weights iterated at inference, coda (the paper's 2/4/2 layers).
      prelude_layers=2, core_layers=4, coda_layers=2,
      # Huginn's training (method="end_to_end"): r = Poisson(lambda) + 1 iterations with
      # lambda ~ LogNormal(ln m - s^2/2, s), gradients through the last k. Huginn uses
      # m = 32 and k = 8; a 2-core CPU affords m = 8, k = 4 (a step costs about m + 1
      # core passes forward and k backward).
      mean_iterations=8, backprop_iterations=4, iteration_spread=0.5,
      state_std=0.056,       # s_0's truncated normal: Huginn's init std sqrt(2 / 5d), d = 128
      inference_iterations=(1, 2, 4, 8, 16, 32),  # the K of the test curve
      sample_iterations=8,   # K for generated text
      mixture_chains=16,     # DiffusionBlocks: chains whose mixture is scored at each K
  ))}


def validate_config(config):
  """ConfigError naming the first bad field of this task's sections."""
  language.validate_config(config)
  rec = config.recurrent
  for field in ("prelude_layers", "core_layers", "coda_layers", "mean_iterations",
                "backprop_iterations", "sample_iterations", "mixture_chains"):
    check_field(isinstance(rec[field], int) and rec[field] >= 1, f"recurrent.{field}",
                rec[field], "a positive integer")
  check_field(rec.backprop_iterations <= rec.mean_iterations, "recurrent.backprop_iterations",
              rec.backprop_iterations,
              f"at most recurrent.mean_iterations={rec.mean_iterations} (k <= m)")
  check_field(rec.iteration_spread > 0, "recurrent.iteration_spread", rec.iteration_spread,
              "positive")
  check_field(rec.state_std > 0, "recurrent.state_std", rec.state_std, "positive")
  check_positive_integers(rec.inference_iterations, "recurrent.inference_iterations")
  check_field(config.diffusion.num_blocks == 1, "diffusion.num_blocks",
              config.diffusion.num_blocks,
              "1 for task='recurrent_depth' (one core, trained over all sigmas)")


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class RecurrentDepth(LanguageTask):
  """What both trainings share: the network, the frozen token embedding (the target
  space; also the input vectors), the K curve and its plot, generated text."""
  inference_iterations: tuple   # the K of the evaluation curve
  sample_iterations: int        # K for generated text

  headline_metric = "bits_per_character"
  summary_metrics = ("bits_per_character", "bits_per_character_by_iterations",
                     "train_core_layer_evaluations")
  # --num_steps=K evaluates at that K alone (the field is a tuple: set_flags makes it (K,))
  evaluate_flags = {"max_test_examples": "eval.max_test_examples",
                    "num_steps": "recurrent.inference_iterations"}
  sample_flags = {**LanguageTask.sample_flags, "num_steps": "recurrent.sample_iterations"}

  def new_network(self, key) -> RecurrentLM:
    return RecurrentLM(self.net, rngs=nnx.Rngs(params=key))

  def context(self, net, embedding, tokens):
    """e = P(the tokens' unit-norm embeddings): position i reads tokens < i."""
    return net.read(embedding[tokens])

  def sequence_nats(self, stacked_params, shared_params, tokens, key, num_steps=None,
                    num_chains=0):
    """{"headline": nats per token of each sequence after num_steps iterations}."""
    raise NotImplementedError

  def generate(self, block_params_list, shared_params, prompt_ids, num_samples, seed=0,
               temperature=0.0, top_p=1.0, num_steps=None):
    """num_samples continuations of one prompt: continue_prompts of it repeated."""
    prompt_ids = self.checked_prompt(prompt_ids, num_samples, temperature, top_p, num_steps)
    return self.continue_prompts(block_params_list, shared_params,
                                 np.tile(prompt_ids, (num_samples, 1)), self.net.seq_len, seed,
                                 temperature, top_p, num_steps)

  def core_passes_per_step(self) -> tuple[float, float]:
    """(forward, backward) passes of the core in one training step, on average."""
    raise NotImplementedError

  def evaluate(self, config, workdir, states, shared, data, prefix=""):
    forward, backward = self.core_passes_per_step()
    # Training compute in core-layer evaluations, forward and backward (a backward pass
    # counted as one evaluation, as the forward): the unit of matched budget.
    results = {"kind": "recurrent_depth",
               "core_passes_per_step": {"forward": forward, "backward": backward},
               "train_core_layer_evaluations": config.train.num_steps * self.net.core_layers
                                               * (forward + backward)}
    if config.eval.enabled:
      results.update(evaluate_iterations(self, config, workdir, states, shared, data.test,
                                         prefix))
    return results

  def generation_steps(self, config):
    return config.recurrent.sample_iterations

  def evaluation_name(self, config):
    return "eval_iterations_" + "-".join(map(str, config.recurrent.inference_iterations))


@dataclasses.dataclass(frozen=True, eq=False)
class RecurrentDenoiser(RecurrentDepth):
  """DiffusionBlocks' recurrent depth: one core trained as a sigma-conditioned denoiser."""
  noise: NoisePlan
  bridge: str
  mixture_chains: int
  sigma_max_share: float        # language.sigma_max_share: sequences drawn at sigma_max

  evaluate_flags = {**RecurrentDepth.evaluate_flags, "mixture_chains": "recurrent.mixture_chains",
                    "bridge": "language.bridge"}
  sample_flags = {**RecurrentDepth.sample_flags, "bridge": "language.bridge"}

  def loss(self, params, shared_params, batch, key, interval):
    """(loss, metrics): w(sigma) CE after one pass of the core, sigma drawn from the whole
    log-normal (interval = [sigma_min, sigma_max]), one per sequence; with
    sigma_max_share (dbjax's option, as for the autoregressive LM) that share of
    sequences at sigma_max itself, where every chain's first call runs."""
    (tokens,) = batch
    net = self.network(params)
    embedding = token_embedding(shared_params)
    e = self.context(net, embedding, tokens)

    def logits_of(z, sigma):
      c = edm.preconditioning(sigma, self.sigma_data)
      return net.logits(net.iterate(c.c_in[:, None, None] * z, e, c.c_noise), c.c_noise)

    loss, logits, cross_entropy = denoising_cross_entropy(
        self, logits_of, embedding, tokens, key, interval, self.sigma_max_share)
    return loss, token_metrics(logits, cross_entropy, tokens, "denoising_accuracy")

  def core_passes_per_step(self):
    return 1.0, 1.0

  def sequence_nats(self, stacked_params, shared_params, tokens, key, num_steps=None,
                    num_chains=0):
    """{"headline": CE of the mixture of mixture_chains num_steps-step chains' last calls}."""
    sigmas, _ = sampling_plan(self.noise, num_steps or self.sample_iterations)
    return {"headline": _mixture_nats(self, stacked_params, shared_params, jnp.asarray(tokens),
                                      key, jnp.asarray(sigmas, jnp.float32),
                                      num_chains or self.mixture_chains)}

  def evaluation_name(self, config):
    return (f"{super().evaluation_name(config)}_chains{config.recurrent.mixture_chains}"
            f"_{config.language.bridge}")

  def continue_prompts(self, block_params_list, shared_params, prompts, length, seed=0,
                       temperature=0.0, top_p=1.0, num_steps=None):
    """Each next token from the last call of its num_steps-step chain, against the
    re-noised earlier tokens (no key-value cache: each call recomputes the prefix); every
    prompt's row at once (one batch, one key)."""
    prompts = self.checked_prompts(prompts, length, temperature, top_p, num_steps)
    sigmas, _ = sampling_plan(self.noise, num_steps or self.sample_iterations)
    return np.asarray(_generate_denoiser(
        self, stack_params(block_params_list), shared_params, jnp.asarray(prompts, jnp.int32),
        jax.random.key(seed), jnp.asarray(sigmas, jnp.float32), length, float(temperature),
        float(top_p)))


@dataclasses.dataclass(frozen=True, eq=False)
class HuginnLM(RecurrentDepth):
  """The baseline: Huginn's randomly unrolled recurrence with truncated backprop."""
  mean_iterations: int          # m
  backprop_iterations: int      # k
  iteration_spread: float       # s, of the log-normal lambda
  state_std: float              # s_0's truncated normal (Huginn: the init std)

  def loss(self, params, shared_params, batch, key, interval):
    """(loss, metrics): CE at the coda after r iterations, gradients through the last
    min(r, k) of them."""
    del interval
    (tokens,) = batch
    net = self.network(params)
    embedding = token_embedding(shared_params)
    key_count, key_state = jax.random.split(key)
    r = iteration_counts(key_count, (), self.mean_iterations, self.iteration_spread)
    e = self.context(net, embedding, tokens)
    state = unroll(net, e, self.initial_state(key_state, e.shape), r,
                   self.backprop_iterations)
    logits = net.logits(state, jnp.zeros(tokens.shape[:1]))
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    metrics = token_metrics(logits, cross_entropy, tokens, "batch_accuracy")
    return jnp.mean(cross_entropy), dict(metrics, iterations=r.astype(jnp.float32))

  def core_passes_per_step(self):
    """E[r] = m + 1 forward, E[min(r, k)] backward (the latter by 100000 draws)."""
    r = iteration_counts(jax.random.key(0), (100_000,), self.mean_iterations,
                         self.iteration_spread)
    return (float(self.mean_iterations + 1),
            float(jnp.mean(jnp.minimum(r, self.backprop_iterations))))

  def initial_state(self, key, shape):
    """s_0: a truncated normal (two standard deviations) of std state_std."""
    return self.state_std * jax.random.truncated_normal(key, -2.0, 2.0, shape)

  def sequence_nats(self, stacked_params, shared_params, tokens, key, num_steps=None,
                    num_chains=0):
    """{"headline": CE of the coda after num_steps iterations from a random s_0}."""
    del num_chains
    return {"headline": _huginn_nats(self, stacked_params, shared_params, jnp.asarray(tokens),
                                     key, num_steps or self.mean_iterations)}

  def continue_prompts(self, block_params_list, shared_params, prompts, length, seed=0,
                       temperature=0.0, top_p=1.0, num_steps=None):
    """Each next token from the coda after num_steps iterations (no key-value cache);
    every prompt's row at once (one batch, one key)."""
    prompts = self.checked_prompts(prompts, length, temperature, top_p, num_steps)
    return np.asarray(_generate_huginn(
        self, stack_params(block_params_list), shared_params, jnp.asarray(prompts, jnp.int32),
        jax.random.key(seed), num_steps or self.sample_iterations, length, float(temperature),
        float(top_p)))


def iteration_counts(key, shape, mean: float, spread: float) -> jax.Array:
  """r = Poisson(lambda) + 1 with lambda ~ LogNormal(ln mean - spread^2/2, spread)
  (Huginn): E[lambda] = mean, so E[r] = mean + 1 and
  Var[r] = mean + mean^2 (exp(spread^2) - 1)."""
  key_rate, key_count = jax.random.split(key)
  rate = jnp.exp(jnp.log(mean) - spread**2 / 2 + spread * jax.random.normal(key_rate, shape))
  return jax.random.poisson(key_count, rate, shape) + 1


def unroll(net, e, state, iterations, backprop_iterations: int):
  """The state after `iterations` (traced) iterations of the core from `state`: the first
  max(iterations - k, 0) with their inputs' gradients stopped, so nothing flows back
  through them, then min(iterations, k) with gradients (k = backprop_iterations, a scan of
  k steps whose surplus ones keep the state as it is)."""
  no_grad = jnp.maximum(iterations - backprop_iterations, 0)
  frozen_net, frozen_e = jax.lax.stop_gradient((net, e))
  zeros = jnp.zeros(e.shape[:1])
  frozen = jax.lax.stop_gradient(jax.lax.fori_loop(
      0, no_grad, lambda _, s: frozen_net.iterate(s, frozen_e, zeros), state))
  state = jnp.where(no_grad > 0, frozen, state)  # with none run, state keeps its gradient

  def with_grad(state, index):
    new = net.iterate(state, e, zeros)
    return jnp.where(no_grad + index < iterations, new, state), None

  state, _ = jax.lax.scan(with_grad, state, jnp.arange(backprop_iterations))
  return state


# --------------------------------------------------------------------- inference


def two_stream_logits(task, net, e, embedding, tokens, z, sigma, key):
  """Logits (N, T, V) of every position's chain state z (N, T, D) at sigma (scalar), each
  reading the true earlier tokens re-noised at sigma, as training did: two streams
  [truth + sigma eps; z] under the block-diffusion attention."""
  n, t = tokens.shape
  c = edm.preconditioning(sigma, task.sigma_data)
  truth = embedding[tokens] + sigma * jax.random.normal(key, z.shape)
  inputs = c.c_in * jnp.concatenate([truth, z], axis=1)
  c_noise = jnp.full((n,), c.c_noise)
  state = net.iterate(inputs, jnp.concatenate([e, e], axis=1), c_noise, two_streams=True)
  return net.logits(state, c_noise, two_streams=True)[:, t:]


def chain_logits(task, net, embedding, tokens, key, sigmas):
  """Logits (K, N, T, V) of every call of one K-step chain per position (K + 1 sigmas),
  the prelude read once; z starts as pure noise."""
  e = task.context(net, embedding, tokens)
  z = noise.pure_noise(key, tokens.shape + (embedding.shape[1],), task.noise.dist)

  def logits_of(z, sigma, block, step):
    del block
    return two_stream_logits(task, net, e, embedding, tokens, z, sigma,
                             jax.random.fold_in(key, step + 1))

  blocks = jnp.zeros(sigmas.shape, jnp.int32)  # B = 1: one core
  return embedding_chain(logits_of, z, sigmas, blocks, embedding, task.bridge)


@functools.partial(jax.jit, static_argnames=("task", "num_chains"))
def _mixture_nats(task, stacked_params, shared_params, tokens, key, sigmas, num_chains):
  net = task.network(block_params(stacked_params, 0))
  embedding = token_embedding(shared_params)

  def true_log_prob(chain_key):
    last = chain_logits(task, net, embedding, tokens, chain_key, sigmas)[-1]
    return jnp.take_along_axis(jax.nn.log_softmax(last), tokens[..., None], -1)[..., 0]

  log_probs = jax.lax.map(true_log_prob, jax.random.split(key, num_chains))
  return -jnp.mean(mixture_log_probs(log_probs), 1)


def huginn_logits(task, net, embedding, tokens, key, num_iterations: int):
  """Logits (N, T, V) of the coda after num_iterations iterations of the core from a
  random s_0 (key), the prelude reading `tokens`."""
  e = task.context(net, embedding, tokens)
  zeros = jnp.zeros(tokens.shape[:1])
  state = jax.lax.fori_loop(0, num_iterations, lambda _, s: net.iterate(s, e, zeros),
                            task.initial_state(key, e.shape))
  return net.logits(state, zeros)


@functools.partial(jax.jit, static_argnames=("task", "num_iterations"))
def _huginn_nats(task, stacked_params, shared_params, tokens, key, num_iterations):
  logits = huginn_logits(task, task.network(block_params(stacked_params, 0)),
                         token_embedding(shared_params), tokens, key, num_iterations)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens), 1)


@functools.partial(jax.jit, static_argnames=("task", "length", "temperature", "top_p"))
def _generate_denoiser(task, stacked_params, shared_params, prompts, key, sigmas, length,
                       temperature, top_p):
  """Sequences (N, length), each continuing its row of prompts (N, P)."""
  net = task.network(block_params(stacked_params, 0))
  embedding = token_embedding(shared_params)
  tokens = jnp.zeros((len(prompts), length), jnp.int32).at[:, :prompts.shape[1]].set(prompts)

  def position_step(position, tokens):
    key_position = jax.random.fold_in(key, position)
    last = chain_logits(task, net, embedding, tokens, key_position, sigmas)[-1]
    choice = sample_token(jax.random.fold_in(key_position, 0), last[:, position],
                          temperature, top_p)
    return tokens.at[:, position].set(choice)

  return jax.lax.fori_loop(prompts.shape[1], length, position_step, tokens)


@functools.partial(jax.jit, static_argnames=("task", "num_iterations", "length",
                                             "temperature", "top_p"))
def _generate_huginn(task, stacked_params, shared_params, prompts, key, num_iterations,
                     length, temperature, top_p):
  """Sequences (N, length), each continuing its row of prompts (N, P)."""
  net = task.network(block_params(stacked_params, 0))
  embedding = token_embedding(shared_params)
  tokens = jnp.zeros((len(prompts), length), jnp.int32).at[:, :prompts.shape[1]].set(prompts)

  def position_step(position, tokens):
    state_key, draw_key = jax.random.split(jax.random.fold_in(key, position))
    logits = huginn_logits(task, net, embedding, tokens, state_key, num_iterations)
    return tokens.at[:, position].set(sample_token(draw_key, logits[:, position],
                                                   temperature, top_p))

  return jax.lax.fori_loop(prompts.shape[1], length, position_step, tokens)


# -------------------------------------------------------------------- evaluation


def bits_by_iterations(task, states, shared, tokens, seed: int, batch_size: int = 16,
                       progress: bool = False) -> dict:
  """{K: test bits per token after K iterations} for each K of the curve (per
  character for a character run; evaluate_iterations divides by characters per token)."""
  stacked = stack_params([s.params for s in states])
  batches = fixed_size_batches(np.asarray(tokens, np.int32), batch_size)
  curve = {}
  for k in progress_bar(task.inference_iterations, desc="bits per character by K",
                        disable=not progress, leave=False):
    total = 0.0
    for i, batch in enumerate(batches):
      keep = min(batch_size, len(tokens) - i * batch_size)
      nats = task.sequence_nats(stacked, shared.params, batch,
                                jax.random.fold_in(jax.random.key(seed), i), k)["headline"]
      total += float(jnp.sum(nats[:keep]))
    curve[k] = total / len(tokens) / np.log(2)
  return curve


def evaluate_iterations(task, config, workdir: str, states, shared, test_data,
                        prefix: str = "") -> dict:
  """The K curve of test bits per character (plotted to <prefix>bpc_vs_iterations.png),
  its best as the headline, and generated text (<prefix>samples.txt)."""
  from dbjax.eval import plots  # pylint: disable=g-import-not-at-top
  tokens = test_data.tokens[:config.eval.max_test_examples or None]
  # Bits per token over the characters each token stands for (dbjax.data.tokenizers).
  per_token = tokenizers.characters_per_token(test_data.vocabulary, tokens)
  curve = {k: bits / per_token for k, bits in bits_by_iterations(
      task, states, shared, tokens, config.seed, progress=config.train.progress).items()}
  best = min(curve, key=curve.get)
  plots.save_metric_vs_steps(curve, os.path.join(workdir, f"{prefix}bpc_vs_iterations.png"),
                             xlabel="inference iterations K", ylabel="test bits per character",
                             title=f"{config.method}: {type(task).__name__}")
  vocabulary = test_data.vocabulary
  prompt = vocabulary.encode(config.language.prompt, "config.language.prompt")
  texts = {name: [vocabulary.decode(row) for row in task.generate(
      [s.params for s in states], shared.params, prompt, config.language.num_samples,
      config.seed, temperature, top_p, task.sample_iterations)]
      for name, (temperature, top_p) in sampling_settings(task, config).items()}
  write_texts(os.path.join(workdir, f"{prefix}{SAMPLES_FILE}"), texts)
  return {"bits_per_character": curve[best], "best_iterations": best,
          "bits_per_character_by_iterations": {str(k): v for k, v in curve.items()},
          "test_sequences": int(len(tokens)), "test_tokens": int(tokens.size),
          "test_characters": int(round(tokens.size * per_token)),
          "characters_per_token": per_token,
          **tokenizers.describe(test_data.vocabulary)}


def build(config) -> RecurrentDepth:
  """The task of a validated recurrent_depth config whose data.vocab_size is set:
  RecurrentDenoiser, or HuginnLM for method="end_to_end"."""
  m, lang, rec = config.model, config.language, config.recurrent
  if not config.data.vocab_size:
    raise ConfigError("config.data.vocab_size=0 is unresolved: build the task from the "
                      "config that dbjax.tasks.load_data returns (it reads the text)")
  net = RecurrentConfig(vocab_size=config.data.vocab_size, seq_len=lang.seq_len,
                        hidden_size=m.hidden_size, num_heads=m.num_heads,
                        mlp_ratio=m.mlp_ratio, frequency_dim=m.frequency_dim,
                        remat=m.remat, dtype=m.dtype, attention=m.attention,
                        positions="rotary",
                        num_layers=rec.prelude_layers + rec.core_layers + rec.coda_layers,
                        prelude_layers=rec.prelude_layers, core_layers=rec.core_layers,
                        coda_layers=rec.coda_layers)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: RecurrentLM(net, rngs=nnx.Rngs(0))))
  plan, intervals = noise_plan(config, 1)
  common = dict(
      num_blocks=1, intervals=intervals, optimizer=make_optimizer(config.train),
      shared_optimizer=shared_optimizer(config.train, shared_updates(config),
                                        {"token_embedding": "frozen"}),
      net=net, graphdef=graphdef, train_token_embedding=False,
      clean_sigma=config.diffusion.sigma_min, sigma_data=config.diffusion.sigma_data,
      inference_iterations=tuple(rec.inference_iterations),
      sample_iterations=rec.sample_iterations)
  if config.method == "end_to_end":
    return HuginnLM(**common, mean_iterations=rec.mean_iterations,
                    backprop_iterations=rec.backprop_iterations,
                    iteration_spread=rec.iteration_spread, state_std=rec.state_std)
  return RecurrentDenoiser(**common, noise=plan, bridge=lang.bridge,
                           mixture_chains=rec.mixture_chains,
                           sigma_max_share=lang.sigma_max_share)
