"""What the language tasks share: the token embedding (the target space, shared by the
blocks), the token network of one block (dbjax.nets.lm), text data, bits per character
and generated text.

The target space is a learnable token embedding E (V, D) with unit-norm rows, shared by
all blocks (frozen at its random initialisation, or trained jointly with whichever block
is active: language.token_embedding). Each block owns the rest of its network: input
map, blank vector, positions, sigma embedder, layers and head. Tokens given as input are
presented as the denoiser sees a token at sigma_min: c_in(sigma_min) E[x].

Each model is its own task class (LanguageTask), in its own module:
  autoregressive.AutoregressiveDenoiser   DiffusionBlocks, [clean; noisy] streams
  causal.CausalLM                         its end-to-end baseline, a causal transformer
  masked.MaskedDiffusion                  MD4, DiffusionBlocks or end to end (B = 1)
  single_stream.SingleStreamDenoiser      dbjax.wrap's token target, a user's layers
"""
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dbjax import checks, edm
from dbjax.data import text, tokenizers
from dbjax.nets.lm import LMConfig, LMNet
from dbjax.errors import ConfigError, DataError
from dbjax.progress import progress_bar
from dbjax.sampling import fixed_size_batches, stack_params, unit_rows
from dbjax.tasks.base import Task

SAMPLES_FILE = "samples.txt"


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class LanguageTask(Task):
  """The base of the language tasks: one block's token network and the shared token
  embedding; subclasses give the loss, sequence_nats and generate."""
  net: LMConfig                 # the network of ONE block (num_layers / B deep)
  graphdef: nnx.GraphDef
  train_token_embedding: bool
  clean_sigma: float            # the noise level clean input tokens are presented at
  sigma_data: float

  curve_metric = "cross_entropy"
  headline_metric = "bits_per_character"
  summary_metrics = ("bits_per_character", "generated_chars_per_second")
  evaluate_flags = {"max_test_examples": "eval.max_test_examples"}
  sample_flags = {"prompt": "language.prompt", "temperature": "language.temperature",
                  "top_p": "language.top_p", "num_samples": "language.num_samples"}

  def check_sample_flags(self, given: dict):
    acting = {"temperature": 0.0, "top_p": 1.0}  # the values a near-greedy sampler takes
    for flag, neutral in acting.items():
      if near_greedy(self) and given.get(flag, neutral) != neutral:
        raise ConfigError(f"--{flag}={given[flag]:g} changes nothing with "
                          "language.bridge='argmax' (a near-greedy decoder: every "
                          "temperature and top-p give the greedy text); add "
                          "--bridge=expected")

  @property
  def network_config(self) -> LMConfig:
    """The config of one block's network."""
    return self.net

  @property
  def couples_blocks(self) -> bool:
    """Whether blocks share trained parameters (a jointly trained token embedding)."""
    return self.num_blocks > 1 and self.train_token_embedding

  def new_network(self, key) -> nnx.Module:
    """A freshly initialised network of one block."""
    return LMNet(self.net, rngs=nnx.Rngs(params=key))

  def network(self, block_params, shared_params=None):
    """The network of one block's params."""
    del shared_params
    return nnx.merge(self.graphdef, block_params)

  def init_block_params(self, key):
    return nnx.state(self.new_network(key))

  def init_shared_params(self, key):
    """The token embedding (V, D)."""
    return {"token_embedding": jax.random.normal(key, (self.net.vocab_size,
                                                       self.net.hidden_size))}

  def target_embedding(self, shared_params):
    return token_embedding(shared_params)

  def example_batch(self, batch_size, rng=None):
    """A batch of token ids: zeros, or uniform ids from `rng`."""
    shape = (batch_size, self.net.seq_len)
    if rng is None:
      return (jnp.zeros(shape, jnp.int32),)
    return (jnp.asarray(rng.integers(0, self.net.vocab_size, shape).astype(np.int32)),)

  def sequence_nats(self, stacked_params, shared_params, tokens, key,
                    num_steps: int | None = None, num_chains: int = 0) -> dict:
    """Nats per token of each test sequence (N,): {"headline": the honest figure, ...}."""
    raise NotImplementedError

  def check_batch(self, batch) -> tuple:
    """(tokens,), DataError unless tokens are ids (N, T) of this vocabulary, T <= seq_len."""
    (tokens,) = checks.check_batch("batch", batch, 1, "(tokens,)")
    checks.check_tokens("batch tokens", tokens, self.net.vocab_size, self.net.seq_len)
    return (tokens,)

  def checked_prompt(self, prompt_ids, num_samples, temperature, top_p, num_steps=None):
    """The prompt as int32 ids; DataError, naming the argument, unless the prompt is ids
    of this vocabulary shorter than a sequence and the sampling settings are in range."""
    checks.check_sampling(temperature, top_p, num_samples, num_steps)
    return checks.check_prompt(prompt_ids, self.net.vocab_size, self.net.seq_len)

  def checked_prompts(self, prompts, length: int, temperature, top_p, num_steps=None):
    """Prompts (N, P) as int32 ids; DataError unless they are ids of this vocabulary and
    P < length <= seq_len, with the sampling settings in range."""
    checks.check_sampling(temperature, top_p, 1, num_steps)
    prompts = checks.check_ids("prompts", prompts, self.net.vocab_size, 2,
                               f"integer token ids (N, P) in [0, {self.net.vocab_size})",
                               "vocab_size")
    if not prompts.shape[1] < length <= self.net.seq_len:
      raise DataError(f"length={length}: expected above the prompts' {prompts.shape[1]} "
                      f"characters and at most seq_len={self.net.seq_len}")
    return np.asarray(prompts, np.int32)

  def generate(self, block_params, shared_params, prompt_ids, num_samples: int,
               seed: int = 0, temperature: float = 0.0, top_p: float = 1.0,
               num_steps: int | None = None) -> np.ndarray:
    """num_samples sequences of seq_len token ids, each starting with prompt_ids."""
    raise NotImplementedError

  def continue_prompts(self, block_params, shared_params, prompts, length: int, seed: int = 0,
                       temperature: float = 0.0, top_p: float = 1.0,
                       num_steps: int | None = None) -> np.ndarray:
    """Sequences (N, length): row i continues prompts[i] (N rows of P ids), one sample
    each. By default one `generate` call per prompt, row i with seed (seed, i); a task
    with a batched sampler (the recurrent ones) continues them all at once."""
    prompts = self.checked_prompts(prompts, length, temperature, top_p, num_steps)
    return np.stack([self.generate(block_params, shared_params, prompt, 1,
                                   seed=seed * 1_000_003 + i, temperature=temperature,
                                   top_p=top_p, num_steps=num_steps)[0, :length]
                     for i, prompt in enumerate(prompts)])

  def generation_steps(self, config) -> int | None:
    """The config's steps for `generate` (None = the default)."""
    return None

  def evaluation_settings(self, config) -> dict:
    """The settings an evaluation ran with, for metrics.json."""
    return {}

  def sample(self, block_params, shared_params, key, inputs, num_steps, num_samples=1,
             temperature=0.0, top_p=1.0):
    """Token ids (num_samples, T) continuing the prompt ids `inputs`."""
    checks.check_sample_call(block_params, self.num_blocks, key, num_steps)
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    return self.generate(block_params, shared_params, inputs, num_samples, seed, temperature,
                         top_p, num_steps)

  def write_run_files(self, workdir, train_data):
    """The run's tokenizer (vocabulary.json: the characters in id order, or
    tokenizer.json), so prompts and test text are encoded the same way by later
    commands."""
    train_data.vocabulary.save_to(workdir)

  def evaluate(self, config, workdir, states, shared, data, prefix=""):
    results = {"kind": config.language.kind}
    if config.eval.enabled:
      results.update(evaluate_language(self, config, workdir, states, shared, data.test,
                                       prefix))
    return results

  def evaluation_name(self, config):
    return f"eval_steps_{self.generation_steps(config) or self.num_blocks}"

  def write_samples(self, config, workdir, states, shared, data, seed, path=None):
    """Texts with config.language's prompt, temperature and top-p, written to `path`
    (default <workdir>/generated_<seed>.txt)."""
    lang = config.language
    path = path or os.path.join(workdir, f"generated_{seed}.txt")
    vocabulary = data.train.vocabulary
    temperature, top_p = (0.0, 1.0) if near_greedy(self) else (lang.temperature, lang.top_p)
    ids = self.generate([s.params for s in states], shared.params,
                        vocabulary.encode(lang.prompt, "config.language.prompt"),
                        lang.num_samples, seed, temperature, top_p,
                        self.generation_steps(config))
    title = (next(iter(sampling_settings(self, config))) if near_greedy(self)
             else f"temperature {temperature:g}, top-p {top_p:g}")
    write_texts(path, {title: [vocabulary.decode(r) for r in ids]})
    return path


def token_embedding(shared_params) -> jax.Array:
  """E with unit-norm rows: the target space."""
  return unit_rows(shared_params["token_embedding"])


def clean_vectors(task: LanguageTask, embedding, tokens) -> jax.Array:
  """Clean tokens as the denoiser sees a token at sigma_min: c_in(sigma_min) E[x]."""
  return edm.preconditioning(task.clean_sigma, task.sigma_data).c_in * embedding[tokens]


def token_metrics(logits, cross_entropy, tokens, accuracy_name: str) -> dict:
  """Mean cross-entropy (unweighted) and accuracy of every position's prediction on the
  training batch, named `accuracy_name`: "denoising_accuracy" for a denoiser, which
  reads a noisy copy of the true token at its training sigma (near 1 at low sigma, far
  above what generation achieves), "batch_accuracy" for a plain language model."""
  return {"cross_entropy": jnp.mean(cross_entropy),
          accuracy_name: jnp.mean(jnp.argmax(logits, -1) == tokens)}


def block_params(stacked_params, block):
  """One block's params out of `stack_params` of all."""
  return jax.tree.map(lambda p: p[block], stacked_params)


def sample_token(key, logits, temperature: float, top_p: float) -> jax.Array:
  """Token ids from logits (..., V): argmax if temperature == 0, else a draw from
  softmax(logits / temperature) restricted to the smallest set of tokens whose
  probability reaches top_p (nucleus sampling; top_p = 1 keeps all)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the first token always stays
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1)


def empty_cache(task: LanguageTask, num_blocks: int, batch: int, length: int):
  """Zero key-value caches (keys, values), each (blocks, layers, N, length, heads, hd)."""
  shape = (num_blocks, task.net.num_layers, batch, length, task.net.num_heads,
           task.net.head_dim)
  dtype = task.net.dtype  # the keys and values the layers make
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def write_cache(cache, keys_values, position):
  """Write (keys, values) (..., N, 1, H, hd) into the cache at `position`."""
  return tuple(jax.lax.dynamic_update_slice_in_dim(c, kv, position, axis=c.ndim - 3)
               for c, kv in zip(cache, keys_values))


def bits_per_character(task: LanguageTask, block_params_list, shared_params, tokens,
                       seed: int = 0, num_steps: int | None = None, batch_size: int = 64,
                       progress: bool = False, num_chains: int = 0) -> dict:
  """Test bits per token of each figure of task.sequence_nats (per character for a
  character run; evaluate_language divides by characters per token), over fixed-size
  batches with a fixed noise seed."""
  stacked = stack_params(block_params_list)
  key = jax.random.key(seed)
  totals = {}
  batches = fixed_size_batches(np.asarray(tokens, np.int32), batch_size)
  for i, batch in enumerate(progress_bar(batches, desc="bits per character",
                                         disable=not progress, leave=False)):
    keep = min(batch_size, len(tokens) - i * batch_size)  # drop the padding rows
    nats = task.sequence_nats(stacked, shared_params, batch, jax.random.fold_in(key, i),
                              num_steps, num_chains)
    for name, values in nats.items():
      totals[name] = totals.get(name, 0.0) + float(jnp.sum(values[:keep]))
  return {name: total / len(tokens) / np.log(2) for name, total in totals.items()}


def near_greedy(task) -> bool:
  """Whether the task samples through the argmax Euler bridge: its chain's last call,
  at sigma_min, is then near-certain of the token the chain ends on, so every temperature
  and top-p give the greedy text (docs/language.md, Results: MAUVE 0.13 to 0.15 against
  0.79 with the expected bridge)."""
  return getattr(task, "bridge", None) == "argmax"


def sampling_settings(task, config) -> dict:
  """The generation settings a language run is shown with: {name: (temperature,
  top_p)}; greedy alone for a near-greedy sampler, which the others would only repeat."""
  lang = config.language
  if near_greedy(task):
    return {"greedy (the argmax bridge is near-greedy at any temperature)": (0.0, 1.0)}
  return {"greedy": (0.0, 1.0), f"temperature {lang.temperature:g}": (lang.temperature, 1.0),
          f"top-p {lang.top_p:g}": (1.0, lang.top_p)}


def generate_text(task: LanguageTask, config, states, shared, vocabulary: text.Vocabulary,
                  seed: int = 0, progress: bool = False) -> tuple[dict, float]:
  """({setting name: [texts]}, generated characters per second) of a language run,
  each text starting with config.language.prompt. The speed is of the greedy setting's
  second call, after compilation."""
  lang = config.language
  prompt = vocabulary.encode(lang.prompt, "config.language.prompt")
  params = [s.params for s in states]
  steps = task.generation_steps(config)
  texts, speed = {}, None
  for name, (temperature, top_p) in progress_bar(sampling_settings(task, config).items(),
                                                 desc="generating", disable=not progress,
                                                 leave=False):
    generate = lambda: task.generate(params, shared.params, prompt, lang.num_samples, seed,
                                     temperature, top_p, steps)
    ids = generate()
    if speed is None:
      start = time.perf_counter()
      generate()
      speed = lang.num_samples * (task.net.seq_len - len(prompt)) / (
          time.perf_counter() - start)
    texts[name] = [vocabulary.decode(row) for row in ids]
  return texts, speed


def write_texts(path: str, texts: dict):
  """Write generated texts, each under a title naming its sampling setting."""
  with open(path, "w", encoding="utf-8") as f:
    for name, samples in texts.items():
      for i, sample in enumerate(samples):
        f.write(f"===== {name}, sample {i} =====\n{sample}\n\n")


def evaluate_language(task: LanguageTask, config, workdir: str, states, shared, test_data,
                      prefix: str = "") -> dict:
  """Test bits per character (the headline of task.sequence_nats, and the others under
  descriptive names) and generated text, written to <workdir>/<prefix>samples.txt."""
  count = config.eval.max_test_examples or test_data.num_examples
  tokens = test_data.tokens[:count]
  lang = config.language
  # Bits per token over the characters each token stands for: total bits over
  # characters, so character and subword runs compare (dbjax.data.tokenizers).
  per_token = tokenizers.characters_per_token(test_data.vocabulary, tokens)
  bits = {name: value / per_token for name, value in bits_per_character(
      task, [s.params for s in states], shared.params, tokens, config.seed,
      lang.inference_steps or None, progress=config.train.progress,
      num_chains=lang.mixture_chains).items()}
  results = {"bits_per_character": bits.pop("headline"), "test_sequences": int(len(tokens)),
             "test_tokens": int(tokens.size),
             "test_characters": int(round(tokens.size * per_token)),
             "characters_per_token": per_token, **tokenizers.describe(test_data.vocabulary)}
  results.update({f"bits_per_character_{name}": value for name, value in bits.items()})
  results.update(task.evaluation_settings(config))
  texts, speed = generate_text(task, config, states, shared, test_data.vocabulary,
                               config.seed, config.train.progress)
  write_texts(os.path.join(workdir, f"{prefix}{SAMPLES_FILE}"), texts)
  results["generated_chars_per_second"] = speed
  return results
