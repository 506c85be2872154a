"""DiffusionBlocks for language: autoregressive and masked-diffusion (MD4) LMs.

The target space is a learnable token embedding E (V, D) with unit-norm rows, shared by
all blocks (frozen at its random initialisation, or trained jointly with whichever block
is active: language.token_embedding). Each block owns the rest of its network
(dbjax.lm_net): input map, blank vector, positions, sigma embedder, layers and head.

Autoregressive (METHOD.md, task table). Block b denoises y_i = E[x_i] given the clean
tokens before i. The input is [clean stream (T); noisy stream (T)] under the
block-diffusion mask (`autoregressive_mask`): clean row i sees clean columns <= i, noisy
row i sees clean columns < i and itself. The clean stream is presented as if at
sigma_min (c_in(sigma_min) E[x], conditioned on c_noise(sigma_min)), so its keys and
values depend on the block alone and are cached at generation. Noisy rows carry
c_in z with z = y + sigma eps, sigma drawn from the block's interval as for images;
loss = mean_n w(sigma_n) mean_i CE_ni (paper, Eq. 6, per example). Generation makes N
denoising calls per token (N = B: each block once, `noise.block_of_sigma`), moving z
between calls by the Euler step toward the argmax (or expected) embedding row, and
draws the token from the last call's logits.

Masked diffusion (MD4, Shi et al. 2024, linear schedule alpha_t = 1 - t). Each token is
masked with probability t; the negative ELBO per token is
  L = int_0^1 (1/t) E[sum_{masked i} -log p(x_i | x_t)] dt / T,
and block b owns t in [1 - (b+1)/B, 1 - b/B] (block 0 the most masked), training
(hi - lo) / t * sum_masked CE / T with t ~ U(lo, hi): the blocks' losses sum to L.
Sampling unmasks from t = 1 to 0, each step by the block owning its t.

End-to-end baselines, same layers in one block: a causal transformer LM (input
[blank, x_0 .. x_{T-2}], logits for x_0 .. x_{T-1}) and MD4 over the whole t range.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from dbjax import edm, noise, text
from dbjax.blocks import (BlockState, abstract_with_shared, init_with_shared_on_host,
                          make_optimizer, noise_plan, no_reduction, shared_optimizer,
                          train_step_with_shared)
from dbjax.config import num_trained_blocks, shared_updates
from dbjax.lm_net import LMConfig, LMNet
from dbjax.sampling import (embedding_chain, fixed_size_batches, mixture_log_probs,
                            sampling_plan, stack_params, unit_rows)

KINDS = ("autoregressive", "masked")
# The smallest masking level drawn: bounds the 1/t weight. Masking with probability t
# and weighting by 1/t at the same t keeps the estimate unbiased for t >= MIN_MASKING;
# the part of the integral below it is under 1e-3 nats per token.
MIN_MASKING = 1e-3


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class LanguageModel:
  """Everything fixed about a language run; built once from the config by `build`."""
  net: LMConfig                 # the network of ONE block (num_layers / B deep)
  kind: str                     # "autoregressive" or "masked"
  num_blocks: int
  denoising: bool               # False: end-to-end (causal LM, or MD4 over all t)
  dist: noise.NoiseDistribution
  boundaries: np.ndarray        # autoregressive: sigmas; masked: masking levels t
  intervals: np.ndarray         # (B, 2) each block's training interval (sigma or t)
  sigma_data: float
  bridge: str
  sigma_max_share: float        # autoregressive: block 0's sequences drawn at sigma_max
  train_token_embedding: bool
  graphdef: nnx.GraphDef
  block_optimizer: optax.GradientTransformation
  shared_optimizer: optax.GradientTransformation
  partition: str = "equiprobable"  # of the noise levels (noise.PARTITIONS)

  @property
  def network_config(self):
    """The config of one block's network."""
    return self.net

  @property
  def couples_blocks(self) -> bool:
    """Whether blocks share trained parameters (a jointly trained token embedding)."""
    return self.num_blocks > 1 and self.train_token_embedding

  @property
  def clean_sigma(self) -> float:
    """The noise level the clean stream is presented at."""
    return self.dist.sigma_min


def masking_boundaries(num_blocks: int) -> np.ndarray:
  """B + 1 ascending masking levels 0, 1/B, .., 1 (MD4's linear schedule: uniform t)."""
  return np.linspace(0.0, 1.0, num_blocks + 1)


def masking_owner(numerator, denominator: int, num_blocks: int):
  """The block that owns masking level t = numerator / denominator, in exact integer
  arithmetic: block b owns (1 - (b+1)/B, 1 - b/B], so t on a boundary belongs to the
  block whose upper end it is (as noise.block_of_sigma). Float grids cannot be used:
  np.linspace(1, 0, 4)[1] is one ulp above np.linspace(0, 1, 4)[2], which sent that step
  to the block above."""
  numerator = np.asarray(numerator)
  interval = np.maximum(-(-numerator * num_blocks // denominator) - 1, 0)  # ceil(t B) - 1
  return num_blocks - 1 - interval


def build(config) -> LanguageModel:
  """The LanguageModel of a validated language config whose data.num_classes holds the
  vocabulary size (`with_vocabulary`)."""
  m, lang = config.model, config.language
  num_blocks = num_trained_blocks(config)
  net = LMConfig(vocab_size=config.data.num_classes, seq_len=lang.seq_len,
                 hidden_size=m.hidden_size, num_layers=m.num_layers // num_blocks,
                 num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                 frequency_dim=m.frequency_dim, remat=m.remat, positions=lang.positions)
  dist, boundaries, intervals = noise_plan(config)
  if lang.kind == "masked":
    boundaries = masking_boundaries(num_blocks)
    intervals = np.array([noise.block_interval(boundaries, b) for b in range(num_blocks)],
                         np.float32)
  train_embedding = lang.token_embedding == "joint"
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LMNet(net, rngs=nnx.Rngs(0))))
  shared_optim = shared_optimizer(config.train, shared_updates(config),
                                  {"token_embedding": "train" if train_embedding else "frozen"})
  return LanguageModel(
      net=net, kind=lang.kind, num_blocks=num_blocks,
      denoising=config.method == "diffusion_blocks", dist=dist, boundaries=boundaries,
      intervals=intervals, sigma_data=config.diffusion.sigma_data, bridge=lang.bridge,
      sigma_max_share=lang.sigma_max_share,
      train_token_embedding=train_embedding, graphdef=graphdef,
      block_optimizer=make_optimizer(config.train), shared_optimizer=shared_optim,
      partition=config.diffusion.partition)


# ------------------------------------------------------------------------------ data


def with_vocabulary(config, vocabulary: text.Vocabulary):
  """A copy of config with data.num_classes = the vocabulary size."""
  config = config.copy_and_resolve_references()
  config.data.num_classes = vocabulary.size
  return config


def resolve_vocabulary(config):
  """config with data.num_classes = the vocabulary size, reading the text if it is 0."""
  if config.data.num_classes:
    return config
  train_data, _ = load_data(config)
  return with_vocabulary(config, train_data.vocabulary)


def load_data(config, vocabulary: text.Vocabulary | None = None):
  """(train, test) TextData of the config's data set (dbjax.text)."""
  d = config.data
  return text.load_text(d.name, config.language.seq_len, d.data_dir, d.max_chars, vocabulary)


# ----------------------------------------------------------------------------- state


def init_block(model: LanguageModel, key) -> BlockState:
  """A fresh block: its LMNet params, its own optimizer state, step 0."""
  params = nnx.state(LMNet(model.net, rngs=nnx.Rngs(params=key)))
  return BlockState(params, model.block_optimizer.init(params), jnp.zeros((), jnp.int32))


def init_shared(model: LanguageModel, key) -> BlockState:
  """The shared group: the token embedding (V, D)."""
  params = {"token_embedding": jax.random.normal(key, (model.net.vocab_size,
                                                       model.net.hidden_size))}
  return BlockState(params, model.shared_optimizer.init(params), jnp.zeros((), jnp.int32))


def init_on_host(model: LanguageModel, seed: int) -> tuple[list[BlockState], BlockState]:
  """All blocks' states and the shared state, made one at a time into host memory."""
  return init_with_shared_on_host(model, seed, init_block, init_shared)


def abstract_states(model: LanguageModel):
  """(one block's state, the shared state) as shapes and dtypes, allocating nothing."""
  return abstract_with_shared(model, init_block, init_shared)


# ------------------------------------------------------------------------ the masks


def autoregressive_mask(seq_len: int) -> np.ndarray:
  """(2T, 2T) block-diffusion mask over [clean; noisy], True where a row may attend:
  clean row i -> clean columns j <= i; noisy row i -> clean columns j < i and noisy
  column i (itself)."""
  causal = np.tri(seq_len, dtype=bool)
  strictly_causal = np.tri(seq_len, k=-1, dtype=bool)
  return np.block([[causal, np.zeros_like(causal)],
                   [strictly_causal, np.eye(seq_len, dtype=bool)]])


def causal_mask(seq_len: int) -> np.ndarray:
  """(T, T) lower-triangular mask of the end-to-end causal LM."""
  return np.tri(seq_len, dtype=bool)


def block_diffusion_attention(q, k, v) -> jax.Array:
  """Attention under `autoregressive_mask`, without its empty half.

  q, k, v: (N, 2T, heads, head_dim) over [clean; noisy]. Clean rows attend causally to
  clean columns; noisy row i to clean columns < i and to its own key. That is 2T^2 + T
  scores per head where the dense masked form computes (2T)^2 (measured in README:
  less memory and time per step, same values to float tolerance).
  """
  t, head_dim = q.shape[1] // 2, q.shape[-1]
  (q_clean, q_noisy), (k_clean, k_noisy), (v_clean, v_noisy) = (
      jnp.split(a, 2, axis=1) for a in (q, k, v))
  clean = jax.nn.dot_product_attention(q_clean, k_clean, v_clean, is_causal=True)
  scale = 1.0 / np.sqrt(head_dim)
  earlier = jnp.einsum("nqhd,nkhd->nhqk", q_noisy, k_clean) * scale
  earlier = jnp.where(jnp.tri(t, k=-1, dtype=bool), earlier, jnp.finfo(earlier.dtype).min)
  own = jnp.einsum("nqhd,nqhd->nhq", q_noisy, k_noisy)[..., None] * scale
  weights = jax.nn.softmax(jnp.concatenate([earlier, own], axis=-1), axis=-1)
  noisy = (jnp.einsum("nhqk,nkhd->nqhd", weights[..., :t], v_clean)
           + jnp.einsum("nhq,nqhd->nqhd", weights[..., t], v_noisy))
  return jnp.concatenate([clean, noisy], axis=1)


# ------------------------------------------------------------------------------ loss


def token_embedding(shared_params) -> jax.Array:
  """E with unit-norm rows: the target space."""
  return unit_rows(shared_params["token_embedding"])


def network(model: LanguageModel, block_params) -> LMNet:
  """The LMNet of one block's params."""
  return nnx.merge(model.graphdef, block_params)


def clean_vectors(model: LanguageModel, embedding, tokens) -> jax.Array:
  """Clean tokens as the denoiser sees a token at sigma_min: c_in(sigma_min) E[x]."""
  return edm.preconditioning(model.clean_sigma, model.sigma_data).c_in * embedding[tokens]


def denoiser_logits(model, net, embedding, tokens, z, sigma) -> jax.Array:
  """Logits (N, T, V) of the noisy stream z (N, T, D) at sigma (N,), given the clean
  tokens (N, T) under the block-diffusion mask."""
  n, t = tokens.shape
  c = edm.preconditioning(sigma, model.sigma_data)
  clean_c_noise = edm.preconditioning(model.clean_sigma).c_noise
  vectors = jnp.concatenate([clean_vectors(model, embedding, tokens),
                             c.c_in[:, None, None] * z], axis=1)
  c_noise = jnp.stack([jnp.full((n,), clean_c_noise), c.c_noise], axis=1)  # per stream
  positions = jnp.concatenate([jnp.arange(t), jnp.arange(t)])
  logits = net(vectors, positions, c_noise, attention=block_diffusion_attention)
  return logits[:, t:]


def causal_logits(model, net, embedding, tokens) -> jax.Array:
  """End-to-end causal LM: logits (N, T, V) of x_i from [blank, x_0 .. x_{i-1}]."""
  n, t = tokens.shape
  inputs = jnp.pad(clean_vectors(model, embedding, tokens[:, :-1]), ((0, 0), (1, 0), (0, 0)))
  blank = jnp.zeros((n, t), bool).at[:, 0].set(True)
  return net(inputs, jnp.arange(t), jnp.zeros((n,)), mask=jnp.asarray(causal_mask(t)),
             blank=blank)


def masked_logits(model, net, embedding, tokens, masked, t) -> jax.Array:
  """MD4 denoiser: logits (N, T, V) of every position, masked ones given as blank."""
  return net(clean_vectors(model, embedding, tokens), jnp.arange(tokens.shape[1]), t,
             blank=masked)


def stratified_uniform(key, n: int, lo, hi) -> jax.Array:
  """n values in [lo, hi], one in each of n equal strata in random order: lower
  variance than independent draws (MD4 draws its t the same way)."""
  u = (jax.random.uniform(key) + jnp.arange(n)) / n
  return lo + (hi - lo) * jax.random.permutation(jax.random.fold_in(key, 1), u)


def masked_elbo_terms(model, net, embedding, tokens, key, lo, hi):
  """Per-sequence (hi - lo) / t * sum_masked CE / T with t ~ U(lo, hi): an unbiased
  estimate of the part of the MD4 negative ELBO (nats per token) from t in [lo, hi].
  Returns (terms (N,), (logits, per-token CE, the mask)) for the metrics."""
  n, length = tokens.shape
  key_t, key_mask = jax.random.split(key)
  t = jnp.maximum(stratified_uniform(key_t, n, lo, hi), MIN_MASKING)
  masked = jax.random.uniform(key_mask, tokens.shape) < t[:, None]
  logits = masked_logits(model, net, embedding, tokens, masked, t)
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
  terms = (hi - lo) / t * jnp.sum(jnp.where(masked, cross_entropy, 0.0), axis=1) / length
  return terms, (logits, cross_entropy, masked)


def block_loss(model: LanguageModel, block_params, shared_params, tokens, key, interval):
  """(loss, metrics) of one block on a batch of token sequences (N, T)."""
  embedding = token_embedding(shared_params)
  net = network(model, block_params)
  if model.kind == "masked":
    terms, (logits, cross_entropy, masked) = masked_elbo_terms(
        model, net, embedding, tokens, key, interval[0], interval[1])
    hits = jnp.where(masked, jnp.argmax(logits, -1) == tokens, False)
    count = jnp.maximum(jnp.sum(masked), 1)
    return jnp.mean(terms), {
        "cross_entropy": jnp.sum(jnp.where(masked, cross_entropy, 0.0)) / count,
        "accuracy": jnp.sum(hits) / count}
  if model.denoising:
    loss, logits, cross_entropy = denoising_cross_entropy(
        model, lambda z, sigma: denoiser_logits(model, net, embedding, tokens, z, sigma),
        embedding, tokens, key, interval, model.sigma_max_share)
  else:
    logits = causal_logits(model, net, embedding, tokens)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    loss = jnp.mean(cross_entropy)
  return loss, token_metrics(logits, cross_entropy, tokens)


def denoising_cross_entropy(model, logits_of, embedding, tokens, key, interval,
                            sigma_max_share: float = 0.0):
  """(loss, logits, per-token CE) of next-token-embedding denoising: z = E[x] + sigma eps
  with one sigma per sequence from the block's interval, logits = logits_of(z, sigma),
  loss = mean_n w(sigma_n) mean_i CE_ni (paper, Eq. 6, per example). Shared with the
  single-stream form of dbjax.user_layers.

  sigma_max_share (dbjax's option, not the paper's): in the block whose interval reaches
  sigma_max, that fraction of sequences is drawn at sigma_max itself. The first call of
  every chain runs there, and with N = B it is block 0's only call, but the log-normal
  puts 0.2% of its mass above sigma = 10 (README, Language)."""
  key_sigma, key_noise = jax.random.split(key)
  sigma = noise.sample_sigma(key_sigma, (tokens.shape[0],), interval[0], interval[1],
                             model.dist.p_mean, model.dist.p_std)
  if sigma_max_share > 0:  # its own key: the paper's stream is unchanged without it
    at_top = jax.random.bernoulli(jax.random.fold_in(key, 2), sigma_max_share, sigma.shape)
    top_block = interval[1] >= model.dist.sigma_max
    sigma = jnp.where(at_top & top_block, jnp.asarray(model.dist.sigma_max, sigma.dtype), sigma)
  target = embedding[tokens]
  z = target + sigma[:, None, None] * jax.random.normal(key_noise, target.shape)
  logits = logits_of(z, sigma)
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
  loss = jnp.mean(edm.loss_weight(sigma, model.sigma_data) * jnp.mean(cross_entropy, 1))
  return loss, logits, cross_entropy


def token_metrics(logits, cross_entropy, tokens) -> dict:
  """Mean cross-entropy and accuracy of every position's prediction."""
  return {"cross_entropy": jnp.mean(cross_entropy),
          "accuracy": jnp.mean(jnp.argmax(logits, -1) == tokens)}


def train_step(model: LanguageModel, state: BlockState, shared: BlockState, tokens, key,
               interval, reduce=no_reduction):
  """(block state, shared state, tokens, key) -> (block state, shared state, metrics)."""
  return train_step_with_shared(functools.partial(block_loss, model), model.block_optimizer,
                                model.shared_optimizer, state, shared, (tokens,), key, interval,
                                reduce)


def jit_run_step(model: LanguageModel):
  """The driver's step; the block's and shared buffers are donated."""
  return jax.jit(functools.partial(train_step, model), donate_argnums=(0, 1))


run_step = train_step  # the driver's name for the un-jitted step (see dbjax.parallel)


def example_batch(model: LanguageModel, batch_size: int, rng=None):
  """A batch of token ids: zeros, or uniform ids from `rng` (for profiling)."""
  shape = (batch_size, model.net.seq_len)
  if rng is None:
    return (jnp.zeros(shape, jnp.int32),)
  return (jnp.asarray(rng.integers(0, model.net.vocab_size, shape).astype(np.int32)),)


# ------------------------------------------------------------------------ evaluation


def _block_params(stacked_params, block):
  return jax.tree.map(lambda p: p[block], stacked_params)


def _teacher_forced(model, stacked_params, embedding, tokens):
  """logits_of for `embedding_chain`: every position's call at once, each noisy row
  reading the clean (true) tokens before it."""
  def logits_of(z, sigma, block, step):
    del step
    net = network(model, _block_params(stacked_params, block))
    return denoiser_logits(model, net, embedding, tokens, z, jnp.full(tokens.shape[:1], sigma))
  return logits_of


@functools.partial(jax.jit, static_argnames=("model",))
def _chain_cross_entropy(model, stacked_params, shared_params, tokens, key, sigmas, blocks):
  """Per-call mean CE (calls, N) of the teacher-forced autoregressive chain: every
  position runs its N calls at once, as each noisy row sees only clean columns and
  itself."""
  embedding = token_embedding(shared_params)
  z = noise.pure_noise(key, tokens.shape + (embedding.shape[1],), model.dist)

  def mean_cross_entropy(logits):  # kept per call instead of (N, T, V) logits
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens), 1)

  return embedding_chain(_teacher_forced(model, stacked_params, embedding, tokens), z, sigmas,
                         blocks, embedding, model.bridge, keep=mean_cross_entropy)


@functools.partial(jax.jit, static_argnames=("model", "num_chains"))
def _chain_mixture_nats(model, stacked_params, shared_params, tokens, key, sigmas, blocks,
                        num_chains):
  """Nats per token (N,) of the mixture of num_chains independent teacher-forced chains'
  last calls (sampling.mixture_log_probs), chains run one after another."""
  embedding = token_embedding(shared_params)

  logits_of = _teacher_forced(model, stacked_params, embedding, tokens)

  def of_true_token(logits):  # (N, T), kept per call instead of (N, T, V) logits
    return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]

  def true_log_prob(chain_key):
    z = noise.pure_noise(chain_key, tokens.shape + (embedding.shape[1],), model.dist)
    return embedding_chain(logits_of, z, sigmas, blocks, embedding, model.bridge,
                           keep=of_true_token)[-1]

  log_probs = jax.lax.map(true_log_prob, jax.random.split(key, num_chains))
  return -jnp.mean(mixture_log_probs(log_probs), 1)


@functools.partial(jax.jit, static_argnames=("model",))
def _causal_cross_entropy(model, stacked_params, shared_params, tokens):
  net = network(model, _block_params(stacked_params, 0))
  logits = causal_logits(model, net, token_embedding(shared_params), tokens)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens), 1)


@functools.partial(jax.jit, static_argnames=("model",))
def _masked_elbo_stratum(model, stacked_params, shared_params, tokens, key, lo, hi, block):
  net = network(model, _block_params(stacked_params, block))
  terms, _ = masked_elbo_terms(model, net, token_embedding(shared_params), tokens, key, lo, hi)
  return terms


def elbo_strata(num_blocks: int, at_least: int = 12) -> np.ndarray:
  """(K + 1,) ascending masking levels: K >= at_least equal strata, K a multiple of B,
  so each stratum lies inside one block's range."""
  return np.linspace(0.0, 1.0, num_blocks * -(-at_least // num_blocks) + 1)


def sequence_nats(model: LanguageModel, stacked_params, shared_params, tokens, key,
                  num_steps: int | None = None, num_chains: int = 0) -> dict:
  """Nats per token of each test sequence (N,), by kind; "headline" is the honest figure:
  - autoregressive DiffusionBlocks: {"headline": CE of the first call (block 0 at
    sigma_max, where z carries nothing: the model's predictive distribution),
    "fixed_seed_chain": CE of the last call of one N-call chain (default N = B) with a
    fixed noise seed, which is no likelihood (its last call is near-certain of where the
    chain ended, so it is far above the entropy even for the exact denoiser;
    tests/test_sampling.py), and with num_chains > 0 "chain_mixture": CE of the mixture
    of num_chains chains' last calls, the chain's likelihood as a sampler};
  - causal LM: {"headline": its CE};
  - masked: {"headline": the MD4 negative ELBO, stratified over t}.
  """
  tokens = jnp.asarray(tokens)
  if model.kind == "masked":
    levels = elbo_strata(model.num_blocks)
    terms = [_masked_elbo_stratum(
        model, stacked_params, shared_params, tokens, jax.random.fold_in(key, k),
        jnp.float32(lo), jnp.float32(hi),
        int(masking_owner(k + 1, len(levels) - 1, model.num_blocks)))
        for k, (lo, hi) in enumerate(zip(levels[:-1], levels[1:]))]
    return {"headline": sum(terms)}
  if not model.denoising:
    return {"headline": _causal_cross_entropy(model, stacked_params, shared_params, tokens)}
  sigmas, blocks = sampling_plan(model, num_steps or model.num_blocks)
  per_call = _chain_cross_entropy(model, stacked_params, shared_params, tokens, key,
                                  jnp.asarray(sigmas, jnp.float32),
                                  jnp.asarray(blocks, jnp.int32))
  nats = {"headline": per_call[0], "fixed_seed_chain": per_call[-1]}
  if num_chains:
    nats["chain_mixture"] = _chain_mixture_nats(
        model, stacked_params, shared_params, tokens, jax.random.fold_in(key, 1),
        jnp.asarray(sigmas, jnp.float32), jnp.asarray(blocks, jnp.int32), num_chains)
  return nats


def bits_per_character(model, block_params, shared_params, tokens, seed: int = 0,
                       num_steps: int | None = None, batch_size: int = 64,
                       progress: bool = False, num_chains: int = 0) -> dict:
  """Test bits per character (see `sequence_nats`), over fixed-size batches with a
  fixed noise seed."""
  stacked = stack_params(block_params)
  key = jax.random.key(seed)
  totals = {}
  batches = fixed_size_batches(np.asarray(tokens, np.int32), batch_size)
  for i, batch in enumerate(tqdm(batches, desc="bits per character", disable=not progress,
                                 leave=False)):
    keep = min(batch_size, len(tokens) - i * batch_size)  # drop the padding rows
    nats = sequence_nats(model, stacked, shared_params, batch, jax.random.fold_in(key, i),
                         num_steps, num_chains)
    for name, values in nats.items():
      totals[name] = totals.get(name, 0.0) + float(jnp.sum(values[:keep]))
  return {name: total / len(tokens) / np.log(2) for name, total in totals.items()}


# ------------------------------------------------------------------------ generation


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


def _empty_cache(model, num_blocks: int, batch: int, length: int):
  shape = (num_blocks, model.net.num_layers, batch, length, model.net.num_heads,
           model.net.head_dim)
  return jnp.zeros(shape), jnp.zeros(shape)


def _write(cache, keys_values, position):
  """Write (keys, values) (..., N, 1, H, hd) into the cache at `position`."""
  return tuple(jax.lax.dynamic_update_slice_in_dim(c, kv, position, axis=c.ndim - 3)
               for c, kv in zip(cache, keys_values))


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "temperature", "top_p"))
def _generate_autoregressive(model, stacked_params, shared_params, prompt, key, sigmas, blocks,
                             num_samples, temperature, top_p):
  """Token ids (num_samples, T) led by `prompt`: per position N denoising calls
  against each block's cache of the clean stream, then one call per block that
  writes the chosen token's keys and values into that block's cache."""
  length = model.net.seq_len
  embedding = token_embedding(shared_params)
  clean = edm.preconditioning(model.clean_sigma, model.sigma_data)
  cache = _empty_cache(model, model.num_blocks, num_samples, length)
  num_prompt = prompt.shape[0]
  prompt = jnp.pad(prompt, (0, length - num_prompt))

  def decode(params, vectors, position, c_noise, block_cache):
    return network(model, params).decode(vectors, position, jnp.full((num_samples,), c_noise),
                                         block_cache, jnp.arange(length) < position)

  def position_step(carry, position):
    tokens, cache = carry
    key_noise, key_token = jax.random.split(jax.random.fold_in(key, position))
    z = noise.pure_noise(key_noise, (num_samples, 1, embedding.shape[1]), model.dist)

    def logits_of(z, sigma, block, step):
      del step
      c = edm.preconditioning(sigma, model.sigma_data)
      block_cache = tuple(c_[block] for c_ in cache)
      logits, _ = decode(_block_params(stacked_params, block), c.c_in * z, position,
                         c.c_noise, block_cache)
      return logits

    logits = embedding_chain(logits_of, z, sigmas, blocks, embedding, model.bridge)
    drawn = sample_token(key_token, logits[-1][:, 0], temperature, top_p)
    token = jnp.where(position < num_prompt, prompt[position], drawn)
    vectors = clean.c_in * embedding[token][:, None]
    _, new = jax.vmap(lambda p, k, v: decode(p, vectors, position, clean.c_noise, (k, v)))(
        stacked_params, *cache)
    return (tokens.at[:, position].set(token), _write(cache, new, position)), None

  tokens = jnp.zeros((num_samples, length), jnp.int32)
  (tokens, _), _ = jax.lax.scan(position_step, (tokens, cache), jnp.arange(length))
  return tokens


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "temperature", "top_p"))
def _generate_causal(model, stacked_params, shared_params, prompt, key, num_samples,
                     temperature, top_p):
  """The end-to-end causal LM's generation: one call per position with a KV cache."""
  length = model.net.seq_len
  embedding = token_embedding(shared_params)
  net = network(model, _block_params(stacked_params, 0))
  num_prompt = prompt.shape[0]
  prompt = jnp.pad(prompt, (0, length - num_prompt))

  def position_step(carry, position):
    tokens, previous, cache = carry
    vectors = clean_vectors(model, embedding, previous)[:, None]
    blank = jnp.full((num_samples, 1), position == 0)
    logits, new = net.decode(vectors, position, jnp.zeros((num_samples,)), cache,
                             jnp.arange(length) < position, blank)
    drawn = sample_token(jax.random.fold_in(key, position), logits[:, 0], temperature, top_p)
    token = jnp.where(position < num_prompt, prompt[position], drawn)
    return (tokens.at[:, position].set(token), token, _write(cache, new, position)), None

  cache = tuple(c[0] for c in _empty_cache(model, 1, num_samples, length))
  start = (jnp.zeros((num_samples, length), jnp.int32), jnp.zeros((num_samples,), jnp.int32),
           cache)
  (tokens, _, _), _ = jax.lax.scan(position_step, start, jnp.arange(length))
  return tokens


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "temperature", "top_p"))
def _generate_masked(model, stacked_params, shared_params, prompt, key, levels, blocks,
                     num_samples, temperature, top_p):
  """MD4 ancestral sampling: from t to s < t each masked token is unmasked with
  probability (t - s) / t, its value drawn from the block's prediction."""
  length = model.net.seq_len
  embedding = token_embedding(shared_params)
  prompt = jnp.pad(prompt, (0, length - prompt.shape[0]), constant_values=-1)
  given = jnp.broadcast_to(prompt >= 0, (num_samples, length))
  tokens = jnp.broadcast_to(jnp.maximum(prompt, 0), (num_samples, length))

  def step(carry, xs):
    tokens, masked = carry
    t, s, block, index = xs
    key_token, key_unmask = jax.random.split(jax.random.fold_in(key, index))
    net = network(model, _block_params(stacked_params, block))
    logits = masked_logits(model, net, embedding, tokens, masked,
                           jnp.full((num_samples,), t))
    drawn = sample_token(key_token, logits, temperature, top_p)
    unmask = masked & (jax.random.uniform(key_unmask, masked.shape) < (t - s) / t)
    return (jnp.where(unmask, drawn, tokens), masked & ~unmask), None

  xs = (levels[:-1], levels[1:], blocks, jnp.arange(blocks.shape[0]))
  (tokens, _), _ = jax.lax.scan(step, (tokens, ~given), xs)
  return tokens


def unmasking_plan(num_steps: int, num_blocks: int):
  """MD4 sampling grid: levels (num_steps + 1,) from t = 1 down to 0, and the block of
  each step, the one owning the step's start t = (num_steps - i) / num_steps (routed in
  exact fractions, `masking_owner`). With num_steps = k B every block runs k steps."""
  levels = np.linspace(1.0, 0.0, num_steps + 1)
  return levels, masking_owner(num_steps - np.arange(num_steps), num_steps, num_blocks)


def generation_steps(config) -> int | None:
  """The config's steps for `generate`: denoising calls per token (autoregressive) or
  unmasking steps (masked); None = the default."""
  lang = config.language
  return (lang.sample_steps if lang.kind == "masked" else lang.inference_steps) or None


def generate(model: LanguageModel, block_params, shared_params, prompt_ids, num_samples: int,
             seed: int = 0, temperature: float = 0.0, top_p: float = 1.0,
             num_steps: int | None = None) -> np.ndarray:
  """num_samples sequences of seq_len token ids, each starting with prompt_ids.

  num_steps: autoregressive DiffusionBlocks, denoising calls per token (default B);
  masked, unmasking steps from t = 1 to 0 (default seq_len). Unused by the causal LM.
  """
  prompt_ids = np.asarray(prompt_ids, np.int32)
  if len(prompt_ids) >= model.net.seq_len:
    raise ValueError(f"the prompt has {len(prompt_ids)} tokens; it must be shorter than "
                     f"language.seq_len={model.net.seq_len}")
  stacked = stack_params(block_params)
  key = jax.random.key(seed)
  args = (float(temperature), float(top_p))
  if model.kind == "masked":
    steps = num_steps or model.net.seq_len
    levels, blocks = unmasking_plan(steps, model.num_blocks)
    out = _generate_masked(model, stacked, shared_params, jnp.asarray(prompt_ids), key,
                           jnp.asarray(levels, jnp.float32), jnp.asarray(blocks, jnp.int32),
                           num_samples, *args)
  elif model.denoising:
    sigmas, blocks = sampling_plan(model, num_steps or model.num_blocks)
    out = _generate_autoregressive(model, stacked, shared_params, jnp.asarray(prompt_ids), key,
                                   jnp.asarray(sigmas, jnp.float32),
                                   jnp.asarray(blocks, jnp.int32), num_samples, *args)
  else:
    out = _generate_causal(model, stacked, shared_params, jnp.asarray(prompt_ids), key,
                           num_samples, *args)
  return np.asarray(out)
