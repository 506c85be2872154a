"""Your own residual layers as a DiffusionBlocks model: `dbjax.wrap`.

    db = dbjax.wrap(MyLayer, num_layers=12, hidden_size=64, target="image",
                    image_shape=(8, 8, 1), num_classes=10)

MyLayer(rngs) must build one residual layer, an nnx.Module mapping (x, cond) -> x with
x (N, T, D) and cond (N, D), D = hidden_size (the sigma embedding, plus the class
embedding for images). dbjax adds what the target needs around the layers (input
embedding, sigma embedder, adaLN head, EDM preconditioning) and cuts the
num_layers layers into num_blocks blocks, each a whole denoiser over its own noise
interval. The returned `DiffusionBlocks` gives pure, jittable functions:

    init_block(key) -> BlockState(params, opt_state, step), with its own optax state
    loss(params, batch, key, block) -> (loss, metrics)
    train_step(state, batch, key, block) -> (state, metrics)       (block may be traced)
    jit_train_step() -> train_step compiled once for all blocks, each batch checked
    sample(block_params, key, inputs, num_steps) -> images | labels | token ids

and moves weights between the blocks and the plain end-to-end network built from the
same num_layers layers: `to_end_to_end`, `from_end_to_end`, `end_to_end()`. Block
states save and load as an orbax checkpoint (a StandardCheckpointer directory):

    db.save("/abs/or/relative/path", states)       # overwrite=True replaces a saved one
    states = db.load("/abs/or/relative/path")

Batches: (images, labels) for "image" and "label", images float32 (N, H, W, C) scaled to
[-1, 1] (dbjax.data.load_images gives them so; EDM's sigma_data = 0.5 assumes that
range) and labels int (N,); (tokens,) for "token", int ids (N, seq_len).

Optimizer: by default each block's is dbjax's AdamW, learning_rate warmed up over
warmup_steps and decayed by a cosine to a tenth over num_steps (the updates each block
gets: set it to yours), clipped at grad_clip. A user's own optax optimizer is used as
given but behind the same clipping (grad_clip=None to leave it out) and the NaN guard
(an update with a NaN or inf gradient is not applied). `print(db)` shows which.

Targets (paper, Sec. 5):
- "image": the DiT of dbjax.nets.dit with your layers; batch (images, labels); each block
  owns its embeddings and head (a fixed target space, so blocks share nothing).
- "label": the ViT classifier of dbjax.nets.vit and dbjax.tasks.classification with your
  layers; batch (images, labels); the target is a frozen unit-norm label embedding, fixed by `seed`,
  which every block shares without training it.
- "token": a language model whose target is the next token's (frozen, unit-norm)
  embedding; batch (tokens,), single-stream through your causal layers
  (dbjax.tasks.language.single_stream).

Each target is a dbjax.tasks Task built around your layers, the same objects the
command-line runs train; `DiffusionBlocks.task` is it.
"""
import dataclasses
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dbjax import checks, noise, tasks
from dbjax.config import default_config, validate, warn_if_warmup_outlasts
from dbjax.engine import state as state_lib
from dbjax.engine.state import BlockState
from dbjax.engine.step import apply_step
from dbjax.errors import ConfigError, DataError, WorkdirError, require
from dbjax.nets.dit import LOGICAL_NAMES

# Parameters under this top-level name are the layers (leading axis = layer); the rest
# (embeddings, sigma embedder, head) are the adapters of the target around them.
LAYERS = "layers"


# ------------------------------------------------------------------ checking layers


def _require(ok: bool, argument: str, value, allowed: str):
  require(ok, f"dbjax.wrap: {argument}", value, allowed)


def _own_names_left_whole():
  """flax's logical axis rules, extended so that dbjax's own parameter names
  (dbjax.nets.dit.LOGICAL_NAMES) which the user's rules (nnx.logical_axis_rules) do
  not map are left whole under the user's jax.set_mesh, whose axes are the user's."""
  from flax.core import spmd  # pylint: disable=g-import-not-at-top
  rules = dict(spmd.get_logical_axis_rules())
  rules.update({name: None for name in LOGICAL_NAMES if name not in rules})
  return nnx.logical_axis_rules(tuple(rules.items()))


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


class EndToEnd(NamedTuple):
  """What to_end_to_end gives: `params`, the end-to-end network's (all layers, the
  adapters of one block), and each block's own adapters, so that from_end_to_end gives
  the blocks back bit for bit. block_adapters[b] maps a path (jax.tree_util.keystr) to
  block b's leaf there."""
  params: Any
  block_adapters: list


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class DiffusionBlocks:
  """A user's layers as B block denoisers; made by `wrap`. All methods are pure and
  jittable (`sample` with num_steps and its options static)."""
  target: str
  task: Any             # the dbjax.tasks Task around the user's layers
  shared_params: Any    # the frozen target embedding (label, token); {} for images
  arguments: dict       # wrap's arguments, for end_to_end()

  def __repr__(self) -> str:
    a = self.arguments
    return (f"DiffusionBlocks(target={self.target!r}, {a['num_layers']} layers of width "
            f"{a['hidden_size']} in {self.num_blocks} blocks, computing in {a['dtype']} "
            f"(parameters and optimizer state float32), optimizer: "
            f"{describe_optimizer(a)})")

  @property
  def num_blocks(self) -> int:
    """B, the number of blocks."""
    return self.task.num_blocks

  @property
  def intervals(self) -> np.ndarray:
    """(B, 2) training noise interval of each block; block 0 owns the highest noise."""
    return self.task.intervals

  @property
  def optimizer(self) -> optax.GradientTransformation:
    """Each block's own optimizer."""
    return self.task.optimizer

  @property
  def target_embedding(self):
    """The frozen target space E (rows of unit norm) of the label and token targets."""
    return self.task.target_embedding(self.shared_params)

  def new_network(self, key) -> nnx.Module:
    """A fresh network of one block (its layers and the target's adapters)."""
    return self.task.new_network(key)

  def network(self, params) -> nnx.Module:
    """The nnx.Module of one block's (or the end-to-end network's) params."""
    return self.task.network(params, self.shared_params)

  def init_block(self, key) -> BlockState:
    """A fresh block: parameters, the optimizer's state for them, step 0."""
    checks.check_key("key", key)
    return state_lib.init_block(self.task, key)

  def abstract_states(self) -> list[BlockState]:
    """Every block's state as shapes and dtypes (jax.ShapeDtypeStruct), allocating
    nothing: the target orbax restores saved states into."""
    return [state_lib.abstract_states(self.task)[0]] * self.num_blocks

  def save(self, path: str, states: list[BlockState], overwrite: bool = False):
    """Write every block's state to the orbax checkpoint directory `path`, and wait until
    it is on disk (each host its own shards). A `path` that exists is refused (a
    WorkdirError) unless overwrite=True, which replaces it without ever leaving neither:
    the new checkpoint is written whole beside it (<path>.saving) and only then renamed
    into its place (orbax's own force=True deletes the old one first, so a kill during
    the write lost both). `load` reads <path>.saving if a kill fell between the renames."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
      raise WorkdirError(f"db.save: {path} exists; pass overwrite=True to replace it")
    if len(states) != self.num_blocks:
      raise DataError(f"states: got {len(states)} block states; expected num_blocks="
                      f"{self.num_blocks}")
    target = path + SAVING if os.path.exists(path) else path
    with ocp.StandardCheckpointer() as checkpointer:
      # force: only a stale <path>.saving of an earlier killed save is replaced
      checkpointer.save(target, list(states), force=True)
    if target != path:
      replace_directory(target, path)

  def load(self, path: str) -> list[BlockState]:
    """The block states `save` wrote to `path`. Under a jax.set_mesh each leaf is read
    onto that mesh with the partition spec it was saved with (a user's
    nnx.with_partitioning annotation; others whole on every device), each host
    reading its own shards.
    A checkpoint of another model (other shapes, blocks or optimizer) is refused with a
    ConfigError naming the first differing leaf, before any array is read."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    from dbjax.engine import checkpoint  # pylint: disable=g-import-not-at-top
    path, target = os.path.abspath(path), self.abstract_states()
    if not os.path.exists(path) and os.path.exists(path + SAVING):  # see `save`
      path += SAVING
    with ocp.StandardCheckpointer() as checkpointer:
      saved = checkpointer.metadata(path).item_metadata
      difference = checkpoint.first_difference(checkpoint.tree_signature(saved.tree),
                                               checkpoint.tree_signature(target))
      if difference is not None:
        raise ConfigError(f"dbjax.wrap: {path} holds block states of another model: "
                          f"{difference}")
      mesh = jax.sharding.get_mesh()
      if not mesh.empty:
        target = on_mesh(target, saved.tree, mesh)
      return checkpointer.restore(path, target)

  def init(self, key) -> list[BlockState]:
    """All B blocks, block b from fold_in(key, b)."""
    checks.check_key("key", key)
    init = jax.jit(self.init_block)  # compiled once for all blocks
    return [init(jax.random.fold_in(key, b)) for b in range(self.num_blocks)]

  def loss(self, params, batch: tuple, key, block):
    """(loss, metrics) of block `block` (an int or a traced scalar) on a batch: its
    weighted denoising loss with sigma drawn from its own interval (paper, Eq. 6).
    A batch, key or block that does not fit is a one-line DataError (dbjax.checks):
    shapes and dtypes always, values where they are concrete (not under jax.jit)."""
    return self._loss(params, self._checked(batch, key, block), key, block)

  def _checked(self, batch, key, block) -> tuple:
    """The batch as a tuple, once it, the key and the block index pass dbjax.checks."""
    batch = self.task.check_batch(batch)
    checks.check_key("key", key)
    checks.check_block(block, self.num_blocks)
    return batch

  def _loss(self, params, batch: tuple, key, block):
    interval = jnp.asarray(self.intervals, jnp.float32)[block]
    return self.task.loss(params, self.shared_params, batch, key, interval)

  def train_step(self, state: BlockState, batch: tuple, key, block):
    """(state, batch, key, block) -> (state, metrics): one optimizer step of one block,
    its inputs checked as `loss` checks them. jit_train_step() compiles it once for all
    blocks, donating the state; jax.jit(db.train_step, donate_argnums=0) does too, but
    sees only the batch's shapes and dtypes, not its values."""
    (loss, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(
        state.params, self._checked(batch, key, block), key, block)
    return apply_step(self.optimizer, state, grads, loss, metrics)

  def jit_train_step(self) -> Callable:
    """train_step compiled once for every block, donating the state it is given, behind
    a host-side check of each batch given as numpy arrays (their range and labels: what
    jax.jit(train_step) cannot see, its batch being traced). A batch already on the
    device is checked for shapes and dtypes only, so checking never moves it back."""
    step = jax.jit(self.train_step, donate_argnums=0)

    def checked_step(state: BlockState, batch, key, block):
      if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(batch)):
        batch = self.task.check_batch(batch)
      checks.check_block(block, self.num_blocks)
      return step(state, batch, key, block)
    return checked_step

  def sample(self, block_params: list, key, inputs, num_steps: int | None = None,
             **options):
    """Run the B blocks as one sampler, num_steps calls (default B: each block once).

    image: inputs = class labels (N,) -> images (N, H, W, C); options solver
      ("euler", "heun") and guidance_scale.
    label: inputs = images (N, H, W, C) -> predicted labels (N,).
    token: inputs = prompt ids (P,) -> token ids (num_samples, T); options num_samples,
      temperature (0 = greedy), top_p.
    """
    return self.task.sample(block_params, self.shared_params, key, inputs,
                            num_steps or self.num_blocks, **options)

  # ---------------------------------------------------- moving to and from end to end

  def end_to_end(self) -> "DiffusionBlocks":
    """The same layers and target as one network over all noise levels (B = 1): the
    plain end-to-end model that to_end_to_end's params belong to."""
    return wrap(**{**self.arguments, "num_blocks": 1, "gamma": 0.0})

  def to_end_to_end(self, block_params: list, adapters_from: int = -1) -> EndToEnd:
    """The end-to-end network's params (`.params`): the blocks' layers in order (block
    0's first) and the adapters (embeddings, sigma embedder, head) of block
    `adapters_from` (default: the last block, which produces the clean output); and
    every block's adapters (`.block_adapters`), which from_end_to_end puts back."""
    if len(block_params) != self.num_blocks:
      raise ValueError(f"to_end_to_end: got {len(block_params)} blocks' params, "
                       f"expected num_blocks={self.num_blocks}")
    params = jax.tree_util.tree_map_with_path(
        lambda path, *leaves: (jnp.concatenate(leaves) if _is_layer(path)
                               else leaves[adapters_from]), *block_params)
    return EndToEnd(params, [_adapters(p) for p in block_params])

  def from_end_to_end(self, end_to_end) -> list:
    """Each block's params from the end-to-end network's: block b gets layers
    [b L/B, (b+1) L/B) and its own adapters. Given to_end_to_end's EndToEnd this is its
    exact inverse; given plain params (a network trained end to end), every block gets
    a copy of their adapters."""
    if isinstance(end_to_end, EndToEnd):
      params, adapters = end_to_end
    else:
      params, adapters = end_to_end, [_adapters(end_to_end)] * self.num_blocks
    per_block = self.arguments["num_layers"] // self.num_blocks

    def block_slice(b):
      return jax.tree_util.tree_map_with_path(
          lambda path, p: (p[b * per_block:(b + 1) * per_block] if _is_layer(path)
                           else adapters[b][jax.tree_util.keystr(path)]), params)
    return [block_slice(b) for b in range(self.num_blocks)]


def _is_layer(path) -> bool:
  return getattr(path[0], "key", None) == LAYERS


def _adapters(params) -> dict:
  """{keystr(path): leaf} of every parameter that is not one of the layers."""
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(params) if not _is_layer(path)}


# wrap's target -> the config.task whose module builds the task around the layers.
TARGET_TASKS = {"image": "generation", "label": "classification", "token": "language"}


def _run_config(target, num_layers, hidden_size, num_blocks, partition, gamma,
                image_shape, patch_size, num_classes, vocab_size, seq_len, dtype):
  """A dbjax config holding wrap's settings, so the built-in models are built from it."""
  config = default_config(TARGET_TASKS[target])
  config.model.update(num_layers=num_layers, hidden_size=hidden_size, num_heads=1,
                      patch_size=patch_size, dtype=dtype)
  config.diffusion.update(num_blocks=num_blocks, partition=partition, overlap_gamma=gamma)
  height, width, channels = image_shape
  config.data.update(image_size=height, channels=channels, num_classes=num_classes)
  if target == "token":
    config.data.vocab_size, config.language.seq_len = vocab_size, seq_len
  return validate(config)


# The default optimizer's settings: the config's (config.train), which the runs in
# the docs' results tables used.
OPTIMIZER_DEFAULTS = {name: default_config().train[name]
                      for name in ("learning_rate", "num_steps", "warmup_steps")}


def _check_optimizer(arguments: dict):
  """The optimizer arguments: a schedule for dbjax's AdamW, or the user's optimizer."""
  optimizer, clip = arguments["optimizer"], arguments["grad_clip"]
  _require(optimizer is None or isinstance(optimizer, optax.GradientTransformation),
           "optimizer", optimizer, "an optax.GradientTransformation, or None for dbjax's AdamW")
  _require(clip is None or clip > 0, "grad_clip", clip, "positive, or None for no clipping")
  if optimizer is not None:
    for name in OPTIMIZER_DEFAULTS:
      _require(arguments[name] is None, name, arguments[name], "only for dbjax's default "
               "optimizer; with optimizer= given, put the schedule in your own")
    return
  settings = {name: OPTIMIZER_DEFAULTS[name] if arguments[name] is None else arguments[name]
              for name in OPTIMIZER_DEFAULTS}
  _require(settings["learning_rate"] > 0, "learning_rate", settings["learning_rate"],
           "positive")
  for name in ("num_steps", "warmup_steps"):
    _require(isinstance(settings[name], int) and settings[name] >= (name == "num_steps"),
             name, settings[name], "a positive integer" if name == "num_steps" else ">= 0")
  warn_if_warmup_outlasts(("dbjax.wrap: warmup_steps", settings["warmup_steps"]),
                          ("num_steps", settings["num_steps"]), stacklevel=5)
  arguments.update(settings)


def describe_optimizer(arguments: dict) -> str:
  """Each block's optimizer as `wrap`'s arguments make it, in words."""
  clip = ("no clipping" if arguments["grad_clip"] is None
          else f"clip {arguments['grad_clip']:g}")
  if arguments["optimizer"] is not None:
    return f"yours, {clip}, NaN guard"
  return (f"AdamW {arguments['learning_rate']:g}, warmup {arguments['warmup_steps']} + "
          f"cosine over {arguments['num_steps']} updates per block, {clip}, NaN guard")


def _block_optimizer(arguments: dict) -> optax.GradientTransformation:
  if arguments["optimizer"] is not None:
    return state_lib.guarded(arguments["optimizer"], arguments["grad_clip"])
  config = default_config()  # AdamW's moments and decay: dbjax's defaults
  schedule = state_lib.learning_rate_schedule(
      arguments["learning_rate"], arguments["warmup_steps"], arguments["num_steps"])
  return state_lib.guarded(state_lib.adamw(config.train, schedule), arguments["grad_clip"])


def wrap(make_layer: Callable[[nnx.Rngs], nnx.Module], *, num_layers: int, hidden_size: int,
         target: str, num_blocks: int = 3, partition: str = "equiprobable",
         gamma: float = 0.05, optimizer: optax.GradientTransformation | None = None,
         learning_rate: float | None = None, num_steps: int | None = None,
         warmup_steps: int | None = None, grad_clip: float | None = 1.0,
         image_shape: tuple = (8, 8, 1), patch_size: int = 2, num_classes: int = 10,
         vocab_size: int = 0, seq_len: int = 0, dtype: str = "float32",
         seed: int = 0) -> DiffusionBlocks:
  """DiffusionBlocks over a user's layers (see the module docstring).

  make_layer(rngs) -> one residual layer (x (N, T, D), cond (N, D)) -> x.
  num_layers: total depth L, cut into num_blocks blocks of L / B layers.
  target: "image", "label" or "token". partition: "equiprobable" (the paper) or
  "uniform_log". gamma: overlap of neighbouring blocks' training intervals (paper
  default 0.05, 0.1 for text).
  optimizer: each block's own optax optimizer, or None for dbjax's AdamW with peak
  learning_rate (default 3e-3), warmup_steps (50) and a cosine over num_steps (600:
  the updates each block gets; set yours). Either way it is wrapped in clipping at
  grad_clip (None: none) and the NaN guard.
  image_shape (H, W, C), patch_size, num_classes: the image and label targets.
  vocab_size, seq_len: the token target. dtype: the computation's, "float32" or
  "bfloat16". With "bfloat16" a user's layer gets bfloat16 inputs and, for each call,
  its float32 parameters cast to bfloat16 (dbjax.nets.dit.in_compute_dtype), so a
  plain nnx.Linear multiplies in bfloat16; parameters, gradients and optimizer state
  stay float32. A softmax inside the user's layer runs in what that layer says: for
  float32 scores and no saved (T, T) matrix, attend with dbjax.nets.attention.attend.
  seed: the frozen label or token embedding.
  """
  arguments = {"make_layer": make_layer, "num_layers": num_layers, "hidden_size": hidden_size,
               "target": target, "num_blocks": num_blocks, "partition": partition,
               "gamma": gamma, "optimizer": optimizer, "learning_rate": learning_rate,
               "num_steps": num_steps, "warmup_steps": warmup_steps, "grad_clip": grad_clip,
               "image_shape": image_shape, "patch_size": patch_size,
               "num_classes": num_classes, "vocab_size": vocab_size, "seq_len": seq_len,
               "dtype": dtype, "seed": seed}  # what end_to_end() rebuilds it from
  _require(target in TARGET_TASKS, "target", target, f"one of {tuple(TARGET_TASKS)}")
  _require(callable(make_layer), "make_layer", make_layer, "a callable (rngs) -> nnx.Module")
  for name in ("num_layers", "hidden_size", "num_blocks"):
    _require(isinstance(arguments[name], int) and arguments[name] >= 1, name,
             arguments[name], "a positive integer")
  _require(num_layers % num_blocks == 0, "num_layers", num_layers,
           f"a multiple of num_blocks={num_blocks}")
  _require(partition in noise.PARTITIONS, "partition", partition,
           f"one of {noise.PARTITIONS}")
  _require(0 <= gamma < 1, "gamma", gamma, "in [0, 1)")
  _require(dtype in ("float32", "bfloat16"), "dtype", dtype, "'float32' or 'bfloat16'")
  _check_optimizer(arguments)
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
                       image_shape, patch_size, num_classes, vocab_size, seq_len, dtype)
  with _own_names_left_whole():
    task = tasks.build(config, layer=make_layer)
  # The target embedding stays frozen.
  task = dataclasses.replace(task, optimizer=_block_optimizer(arguments),
                             shared_optimizer=optax.set_to_zero())
  shared = jax.device_get(task.init_shared_params(jax.random.key(seed)))
  return DiffusionBlocks(target=target, task=task, shared_params=shared, arguments=arguments)


def on_mesh(abstract, saved, mesh):
  """Abstract leaves placed on the concrete `mesh` in scope, each with the partition
  spec it was saved with where the mesh has its axes (a user's annotations, kept by
  wrap's step), else whole on every device. (flax's own abstract leaves carry the
  abstract mesh, which orbax cannot read into.)"""
  from dbjax.engine.checkpoint import leaf_path  # pylint: disable=g-import-not-at-top
  saved_by_path = {leaf_path(path): leaf for path, leaf in
                   jax.tree_util.tree_flatten_with_path(saved)[0]}

  def place(path, leaf):
    metadata = saved_by_path.get(leaf_path(path))
    spec = getattr(getattr(metadata, "sharding", None), "partition_spec", None) or ()
    named = {a for entry in spec if entry for a in (entry if isinstance(entry, tuple)
                                                     else (entry,))}
    spec = jax.sharding.PartitionSpec(*spec) if named <= set(mesh.axis_names) else \
        jax.sharding.PartitionSpec()
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=jax.sharding.NamedSharding(mesh, spec))
  return jax.tree_util.tree_map_with_path(place, abstract)


# Where db.save(overwrite=True) writes the new checkpoint before it takes the old one's
# place; the old one waits at <path>.replaced until the new one is in.
SAVING, REPLACED = ".saving", ".replaced"


def replace_directory(new: str, path: str):
  """Put the complete directory `new` in the place of `path`, on process 0, then wait for
  every process: path -> path.replaced, new -> path, the old one removed. A kill between
  the two renames leaves `new` complete, which load reads."""
  import shutil  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    old = path + REPLACED
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"db.save replaced {path}")
