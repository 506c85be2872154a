"""Your own residual layers as a DiffusionBlocks model: `dbjax.wrap`.

    db = dbjax.wrap(MyLayer, num_layers=12, hidden_size=64, target="image",
                    image_shape=(8, 8, 1), num_classes=10)

MyLayer(rngs) must build one residual layer, an nnx.Module mapping (x, cond) -> x with
x (N, T, D) and cond (N, D), D = hidden_size (the sigma embedding, plus the class
embedding for images). dbjax adds what the target needs around the layers (input
embedding, sigma embedder, adaLN head, EDM preconditioning, METHOD.md) and cuts the
num_layers layers into num_blocks blocks, each a whole denoiser over its own noise
interval. The returned `DiffusionBlocks` gives pure, jittable functions:

    init_block(key) -> BlockState(params, opt_state, step), with its own optax state
    loss(params, batch, key, block) -> (loss, metrics)
    train_step(state, batch, key, block) -> (state, metrics)       (block may be traced)
    sample(block_params, key, inputs, num_steps) -> images | labels | token ids

and moves weights between the blocks and the plain end-to-end network built from the
same num_layers layers: `to_end_to_end`, `from_end_to_end`, `end_to_end()`.

Targets (METHOD.md, task table):
- "image": the DiT of dbjax.dit with your layers; batch (images, labels); each block
  owns its embeddings and head (a fixed target space, so blocks share nothing).
- "label": the ViT classifier of dbjax.vit/classify with your layers; batch
  (images, labels); the target is a frozen unit-norm label embedding, fixed by `seed`,
  which every block shares without training it.
- "token": a language model whose target is the next token's (frozen, unit-norm)
  embedding; batch (tokens,). The paper's input is [clean; noisy] (2T) under a
  block-diffusion mask, which a layer (x, cond) -> x cannot take, so with your layers
  the token target is single-stream: position i reads the clean token i-1 and the
  noisy z_i, and your layers must be causal (checked when wrapping). Every position of
  the sequence is noised at the block's sigma; generation re-noises the prefix at each
  call's sigma, so it sees what training saw. Unlike dbjax.language there is no
  key-value cache: generation recomputes the prefix at each call.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dbjax import blocks, classify, edm, language, noise, sampling
from dbjax.blocks import BlockState
from dbjax.config import default_config, validate
from dbjax.dit import DiT, FinalLayer, SigmaEmbedder, apply_layers, stacked_layers
from dbjax.errors import ConfigError
from dbjax.lm_net import LMConfig
from dbjax.vit import ViT

TARGETS = ("image", "label", "token")
PARTITIONS = ("equiprobable", "uniform_log")
# Parameters under this top-level name are the layers (leading axis = layer); the rest
# (embeddings, sigma embedder, head) are the adapters of the target around them.
LAYERS = "layers"


# ---------------------------------------------------------------- the token target


class CausalTokenNet(nnx.Module):
  """F(previous tokens, c_in z, c_noise) -> logits (N, T, V), single-stream: position i
  reads the clean embedding of token i-1 (a learned start vector at i = 0) and the
  scaled noisy embedding c_in z_i, through causal layers."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, init = cfg.hidden_size, nnx.initializers.normal(0.02)
    self.previous_in = nnx.Linear(d, d, rngs=rngs)
    self.noisy_in = nnx.Linear(d, d, rngs=rngs)
    self.start = nnx.Param(init(rngs.params(), (d,)))
    self.position = nnx.Embed(cfg.seq_len, d, embedding_init=init, rngs=rngs)
    self.sigma_embed = SigmaEmbedder(cfg, rngs=rngs)
    self.layers = stacked_layers(cfg, rngs)
    self.head = FinalLayer(d, cfg.vocab_size, rngs=rngs)

  def __call__(self, clean: jax.Array, noisy: jax.Array, c_noise: jax.Array) -> jax.Array:
    """clean (N, T, D): the clean embedding of every position's token (the input at i is
    that of i-1); noisy (N, T, D) = c_in z; c_noise (N,)."""
    n, t, d = noisy.shape
    previous = jnp.concatenate([jnp.broadcast_to(self.start.value, (n, 1, d)),
                                clean[:, :-1]], axis=1)
    x = self.previous_in(previous) + self.noisy_in(noisy) + self.position(jnp.arange(t))
    cond = self.sigma_embed(c_noise)
    return self.head(apply_layers(self.layers, x, cond, self.cfg.remat), cond)


def token_logits(net: CausalTokenNet, embedding, tokens, z, sigma, sigma_data) -> jax.Array:
  """Logits (N, T, V) of every position's token from the clean tokens before it and
  its noisy embedding z (N, T, D) at sigma (N,)."""
  c = edm.preconditioning(sigma, sigma_data)
  return net(embedding[tokens], c.c_in[:, None, None] * z, c.c_noise)


def token_loss(model, params, embedding, tokens, key, interval):
  """(loss, metrics): language.denoising_cross_entropy with the single-stream logits."""
  net = nnx.merge(model.graphdef, params)
  loss, logits, cross_entropy = language.denoising_cross_entropy(
      model, lambda z, sigma: token_logits(net, embedding, tokens, z, sigma, model.sigma_data),
      embedding, tokens, key, interval)
  return loss, language.token_metrics(logits, cross_entropy, tokens)


def position_chain(model, stacked_params, embedding, tokens, position, key, sigmas, owners):
  """Logits (calls, N, V) of the denoising chain of token `position` given the tokens
  before it: z ~ N(0, sigma_max^2), one call per grid step by the block owning its sigma
  (noise.block_of_sigma), the prefix re-noised at that sigma (what training saw), Euler
  steps toward the argmax embedding row between calls. Tokens at and after `position`
  are not read: the layers are causal."""
  batch, length = tokens.shape
  width = embedding.shape[1]
  z = noise.pure_noise(key, (batch, width), model.dist)

  def logits_of(z, sigma, block, step):
    prefix = embedding[tokens] + sigma * jax.random.normal(
        jax.random.fold_in(key, step + 1), (batch, length, width))
    net = nnx.merge(model.graphdef, jax.tree.map(lambda p: p[block], stacked_params))
    return token_logits(net, embedding, tokens, prefix.at[:, position].set(z),
                        jnp.full((batch,), sigma), model.sigma_data)[:, position]

  return sampling.embedding_chain(logits_of, z, sigmas, owners, embedding, "argmax")


def _plan(model, num_steps: int):
  """The sampling grid and each step's block, computed on the host in float64."""
  sigmas, owners = sampling.sampling_plan(model, num_steps)
  return jnp.asarray(sigmas, jnp.float32), jnp.asarray(owners, jnp.int32)


def generate_tokens(model, stacked_params, embedding, prompt, key, num_samples: int,
                    num_steps: int, temperature: float = 0.0, top_p: float = 1.0):
  """Token ids (num_samples, T) led by `prompt`; each next token drawn from the last
  call of its `position_chain` (num_steps calls)."""
  return _generate_tokens(model, stacked_params, embedding, prompt, key,
                          *_plan(model, num_steps), num_samples, float(temperature),
                          float(top_p))


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "temperature", "top_p"))
def _generate_tokens(model, stacked_params, embedding, prompt, key, sigmas, owners,
                     num_samples, temperature, top_p):
  tokens = jnp.zeros((num_samples, model.net.seq_len), jnp.int32).at[:, :len(prompt)].set(prompt)

  def position_step(position, tokens):
    key_position = jax.random.fold_in(key, position)
    logits = position_chain(model, stacked_params, embedding, tokens, position,
                            key_position, sigmas, owners)
    choice = language.sample_token(jax.random.fold_in(key_position, 0), logits[-1],
                                   temperature, top_p)
    return tokens.at[:, position].set(choice)

  return jax.lax.fori_loop(len(prompt), model.net.seq_len, position_step, tokens)


def chain_nats(model, stacked_params, embedding, tokens, key, num_steps: int):
  """Teacher-forced cross-entropy (nats) summed over all tokens (N, T), of the first
  call and of the last call of each token's num_steps-call `position_chain`. Exact, one
  chain per position, so it costs T times a parallel evaluation."""
  return _chain_nats(model, stacked_params, embedding, tokens, key, *_plan(model, num_steps))


@functools.partial(jax.jit, static_argnames=("model",))
def _chain_nats(model, stacked_params, embedding, tokens, key, sigmas, owners):
  def position_step(position, totals):
    logits = position_chain(model, stacked_params, embedding, tokens, position,
                            jax.random.fold_in(key, position), sigmas, owners)
    nats = optax.softmax_cross_entropy_with_integer_labels(
        logits[jnp.array([0, -1])], tokens[None, :, position])
    return totals + jnp.sum(nats, axis=1)

  first, last = jax.lax.fori_loop(0, tokens.shape[1], position_step, jnp.zeros(2))
  return first, last


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class TokenModel:
  """Everything fixed about the token target's blocks (the fields samplers read)."""
  net: LMConfig                  # the network of ONE block
  num_blocks: int
  dist: noise.NoiseDistribution
  boundaries: np.ndarray
  intervals: np.ndarray
  sigma_data: float
  graphdef: nnx.GraphDef
  partition: str = "equiprobable"  # of the noise levels (noise.PARTITIONS)


# ------------------------------------------------------------------ checking layers


def _require(ok: bool, argument: str, value, allowed: str):
  if not ok:
    raise ConfigError(f"dbjax.wrap: {argument}={value!r} is invalid: {allowed}")


def _probe_layer(make_layer, hidden_size: int, causal: bool):
  """Build one layer and run it on a small input: it must map (x, cond) -> x, and for the
  token target be causal (with random weights, so a zero-initialised gate cannot hide
  attention to later positions)."""
  layer = nnx.eval_shape(lambda: make_layer(nnx.Rngs(0)))  # shapes only: weights below
  _require(isinstance(layer, nnx.Module), "make_layer", make_layer,
           f"a callable (rngs) -> nnx.Module; it returned {type(layer).__name__}")
  others = jax.tree_util.tree_leaves_with_path(nnx.state(layer, nnx.Not(nnx.Param)))
  _require(not others, "make_layer", make_layer,
           "its layer may hold only nnx.Param variables (no RNG state or batch "
           "statistics; e.g. nnx.MultiHeadAttention(..., keep_rngs=False)), found "
           + ", ".join(jax.tree_util.keystr(path) for path, _ in others[:3]))
  graph, state = nnx.split(layer)
  x_shape = (2, 5, hidden_size)
  # Random weights and inputs drawn on the host: per-leaf PRNG draws under jit would cost
  # seconds of compile time.
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda p: (0.3 * rng.standard_normal(p.shape)).astype(p.dtype)
                       if jnp.issubdtype(p.dtype, jnp.floating) else p, state)
  x, cond = rng.standard_normal(x_shape), rng.standard_normal(x_shape[::2])

  @jax.jit
  def outputs(state, x, cond):
    """The layer's output on x, and on x with its last position changed."""
    layer = nnx.merge(graph, state)
    return layer(x, cond), layer(x.at[:, -1].set(-2.0 * x[:, -1]), cond)

  try:
    out, changed = outputs(state, x.astype(np.float32), cond.astype(np.float32))
  except Exception as e:  # the user's code: say which call failed, keep the cause
    raise ConfigError(f"dbjax.wrap: make_layer(rngs)(x, cond) failed with x {x_shape} and "
                      f"cond {x_shape[::2]} (hidden_size={hidden_size}): {e}") from e
  _require(getattr(out, "shape", None) == x_shape, "make_layer", make_layer,
           f"its layer must map x {x_shape} to the same shape; it returned "
           f"{getattr(out, 'shape', type(out).__name__)}")
  if causal:
    _require(bool(jnp.allclose(out[:, :-1], changed[:, :-1], rtol=0, atol=1e-6)), "make_layer",
             make_layer, "target='token' needs causal layers, but changing the last "
             "position of x changed the output at earlier positions")


# -------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class DiffusionBlocks:
  """A user's layers as B block denoisers; made by `wrap`. All methods are pure and
  jittable (`sample` with num_steps and its options static)."""
  target: str
  model: Any            # blocks.BlockModel | classify.ClassifierModel | TokenModel
  optimizer: optax.GradientTransformation
  shared_params: Any    # the frozen target embedding (label, token); None for images
  arguments: dict       # wrap's arguments, for end_to_end()

  @property
  def num_blocks(self) -> int:
    """B, the number of blocks."""
    return self.model.num_blocks

  @property
  def intervals(self) -> np.ndarray:
    """(B, 2) training noise interval of each block; block 0 owns the highest noise."""
    return self.model.intervals

  @property
  def target_embedding(self):
    """The frozen target space E (rows of unit norm) of the label and token targets."""
    if self.target == "label":
      return classify.label_embedding(self.shared_params)
    return language.token_embedding(self.shared_params)

  def new_network(self, key) -> nnx.Module:
    """A fresh network of one block (its layers and the target's adapters)."""
    rngs = nnx.Rngs(params=key)
    if self.target == "image":
      return DiT(self.model.dit, rngs=rngs)
    if self.target == "label":
      return ViT(self.model.vit, rngs=rngs)
    return CausalTokenNet(self.model.net, rngs=rngs)

  def network(self, params) -> nnx.Module:
    """The nnx.Module of one block's (or the end-to-end network's) params."""
    if self.target == "label":
      return classify.network(self.model, params, self.shared_params)
    return nnx.merge(self.model.graphdef, params)

  def init_block(self, key) -> BlockState:
    """A fresh block: parameters, the optimizer's state for them, step 0."""
    if self.target == "label":  # the network minus the shared group (empty here)
      params = classify.split_network(self.model, key)[1]
    else:
      params = nnx.state(self.new_network(key))
    return BlockState(params, self.optimizer.init(params), jnp.zeros((), jnp.int32))

  def init(self, key) -> list[BlockState]:
    """All B blocks, block b from fold_in(key, b)."""
    init = jax.jit(self.init_block)  # compiled once for all blocks
    return [init(jax.random.fold_in(key, b)) for b in range(self.num_blocks)]

  def loss(self, params, batch: tuple, key, block):
    """(loss, metrics) of block `block` (an int or a traced scalar) on a batch: its
    weighted denoising loss with sigma drawn from its own interval (paper, Eq. 6)."""
    interval = jnp.asarray(self.intervals, jnp.float32)[block]
    batch = batch if isinstance(batch, tuple) else (batch,)
    if self.target == "image":
      return blocks.block_loss(self.model, params, *batch, key, interval), {}
    if self.target == "label":
      return classify.block_loss(self.model, params, self.shared_params, *batch, key,
                                 interval)
    return token_loss(self.model, params, self.target_embedding, *batch, key,
                      interval)

  def train_step(self, state: BlockState, batch: tuple, key, block):
    """(state, batch, key, block) -> (state, metrics): one optimizer step of one block.
    Jit it once for all blocks, donating the state: jax.jit(db.train_step, donate_argnums=0)."""
    (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state.params, batch, key, block)
    return (blocks.update(self.optimizer, state, grads),
            blocks.step_metrics(loss, grads, **metrics))

  def sample(self, block_params: list, key, inputs, num_steps: int | None = None,
             **options):
    """Run the B blocks as one sampler, num_steps calls (default B: each block once).

    image: inputs = class labels (N,) -> images (N, H, W, C); options solver
      ("euler", "heun") and guidance_scale.
    label: inputs = images (N, H, W, C) -> predicted labels (N,).
    token: inputs = prompt ids (P,) -> token ids (num_samples, T); options num_samples,
      temperature (0 = greedy), top_p.
    """
    num_steps = num_steps or self.num_blocks
    stacked = sampling.stack_params(block_params)
    if self.target == "image":
      return sampling.sample(self.model, stacked, key, jnp.asarray(inputs), num_steps,
                             **options)
    if self.target == "label":
      logits = classify.chain_logits(self.model, stacked, self.shared_params,
                                     jnp.asarray(inputs), num_steps, key)
      return jnp.argmax(logits[-1], axis=-1)
    return generate_tokens(self.model, stacked, self.target_embedding,
                           jnp.asarray(inputs, jnp.int32), key, num_steps=num_steps,
                           **{"num_samples": 1, **options})

  # ---------------------------------------------------- moving to and from end to end

  def end_to_end(self) -> "DiffusionBlocks":
    """The same layers and target as one network over all noise levels (B = 1): the
    plain end-to-end model that to_end_to_end's params belong to."""
    return wrap(**{**self.arguments, "num_blocks": 1, "gamma": 0.0})

  def to_end_to_end(self, block_params: list, adapters_from: int = -1):
    """Params of the end-to-end network: the blocks' layers in order (block 0's first),
    and the adapters (embeddings, sigma embedder, head) of block `adapters_from`
    (default: the last block, which produces the clean output)."""
    if len(block_params) != self.num_blocks:
      raise ValueError(f"to_end_to_end: got {len(block_params)} blocks' params, "
                       f"expected num_blocks={self.num_blocks}")
    return jax.tree_util.tree_map_with_path(
        lambda path, *leaves: (jnp.concatenate(leaves) if _is_layer(path)
                               else leaves[adapters_from]), *block_params)

  def from_end_to_end(self, params) -> list:
    """Each block's params from the end-to-end network's: block b gets layers
    [b L/B, (b+1) L/B) and a copy of the adapters (inverse of to_end_to_end)."""
    per_block = self.arguments["num_layers"] // self.num_blocks

    def block_slice(b):
      return jax.tree_util.tree_map_with_path(
          lambda path, p: p[b * per_block:(b + 1) * per_block] if _is_layer(path) else p,
          params)
    return [block_slice(b) for b in range(self.num_blocks)]


def _is_layer(path) -> bool:
  return getattr(path[0], "key", None) == LAYERS


def _run_config(target, num_layers, hidden_size, num_blocks, partition, gamma,
                image_shape, patch_size, num_classes):
  """A dbjax config holding wrap's settings, so the built-in models are built from it."""
  config = default_config()
  config.task = {"image": "generation", "label": "classification"}.get(target, "generation")
  config.model.update(num_layers=num_layers, hidden_size=hidden_size, num_heads=1,
                      patch_size=patch_size)
  config.diffusion.update(num_blocks=num_blocks, partition=partition, overlap_gamma=gamma)
  height, width, channels = image_shape
  config.data.update(image_size=height, channels=channels, num_classes=num_classes)
  return validate(config)


def wrap(make_layer: Callable[[nnx.Rngs], nnx.Module], *, num_layers: int, hidden_size: int,
         target: str, num_blocks: int = 3, partition: str = "equiprobable",
         gamma: float = 0.05, optimizer: optax.GradientTransformation | None = None,
         image_shape: tuple = (8, 8, 1), patch_size: int = 2, num_classes: int = 10,
         vocab_size: int = 0, seq_len: int = 0, seed: int = 0) -> DiffusionBlocks:
  """DiffusionBlocks over a user's layers (see the module docstring).

  make_layer(rngs) -> one residual layer (x (N, T, D), cond (N, D)) -> x.
  num_layers: total depth L, cut into num_blocks blocks of L / B layers.
  target: "image", "label" or "token". partition: "equiprobable" (the paper) or
  "uniform_log". gamma: overlap of neighbouring blocks' training intervals (paper
  default 0.05, 0.1 for text). optimizer: each block's own (default: dbjax's AdamW,
  clip 1.0, warmup + cosine). image_shape (H, W, C), patch_size, num_classes: the
  image and label targets. vocab_size, seq_len: the token target. seed: the frozen
  label or token embedding.
  """
  arguments = dict(locals())
  _require(target in TARGETS, "target", target, f"one of {TARGETS}")
  _require(callable(make_layer), "make_layer", make_layer, "a callable (rngs) -> nnx.Module")
  for name in ("num_layers", "hidden_size", "num_blocks"):
    _require(isinstance(arguments[name], int) and arguments[name] >= 1, name,
             arguments[name], "a positive integer")
  _require(num_layers % num_blocks == 0, "num_layers", num_layers,
           f"a multiple of num_blocks={num_blocks}")
  _require(partition in PARTITIONS, "partition", partition, f"one of {PARTITIONS}")
  _require(0 <= gamma < 1, "gamma", gamma, "in [0, 1)")
  if target == "token":
    _require(isinstance(vocab_size, int) and vocab_size >= 2, "vocab_size", vocab_size,
             "an integer >= 2 for target='token'")
    _require(isinstance(seq_len, int) and seq_len >= 2, "seq_len", seq_len,
             "an integer >= 2 for target='token'")
  else:
    _require(len(image_shape) == 3 and image_shape[0] == image_shape[1], "image_shape",
             image_shape, "(size, size, channels): square images")
    _require(image_shape[0] % patch_size == 0, "patch_size", patch_size,
             f"a divisor of the image size {image_shape[0]}")
  _probe_layer(make_layer, hidden_size, causal=target == "token")
  config = _run_config(target, num_layers, hidden_size, num_blocks, partition, gamma,
                       image_shape, patch_size, num_classes)
  optimizer = optimizer or blocks.make_optimizer(config.train)
  key = jax.random.key(seed)
  if target == "image":
    model, shared = blocks.build(config, layer=make_layer), None
  elif target == "label":
    model = classify.build(config, layer=make_layer)
    shared = jax.device_get(classify.init_shared(model, key).params)
  else:
    net = LMConfig(vocab_size=vocab_size, seq_len=seq_len, hidden_size=hidden_size,
                   num_layers=num_layers // num_blocks, layer=make_layer)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: CausalTokenNet(net, rngs=nnx.Rngs(0))))
    dist, boundaries, intervals = blocks.noise_plan(config)
    model = TokenModel(net=net, num_blocks=num_blocks, dist=dist, boundaries=boundaries,
                       intervals=intervals, sigma_data=config.diffusion.sigma_data,
                       graphdef=graphdef, partition=partition)
    shared = {"token_embedding": jax.device_get(jax.random.normal(key, (vocab_size,
                                                                        hidden_size)))}
  return DiffusionBlocks(target=target, model=model, optimizer=optimizer,
                         shared_params=shared, arguments=arguments)
