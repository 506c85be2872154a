"""DiffusionBlocks as pure functional units: one block's state, loss and train step.

A block is a whole denoiser: a DiT `num_layers / B` deep with its own patch, sigma and
label embeddings and its own head. For images the target space is fixed, so blocks
share nothing and never communicate (METHOD.md, "Shared parameters"). End-to-end
training is the same code with B = 1 and all `num_layers` layers in that one block.

A block's state is a plain pytree, BlockState(params, opt_state, step), with its own
optax state: an inactive block gets no update, no momentum and no weight decay, and its
step count (which drives its learning-rate schedule) does not move.
"""
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dbjax import edm, noise
from dbjax.config import num_trained_blocks
from dbjax.dit import DiT, DiTConfig


class BlockState(NamedTuple):
  params: nnx.State
  opt_state: optax.OptState
  step: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class BlockModel:
  """Everything fixed about a run's blocks; built once from the config by `build`."""
  dit: DiTConfig                 # the network of ONE block (num_layers / B deep)
  num_blocks: int
  dist: noise.NoiseDistribution
  boundaries: np.ndarray         # (B + 1,) ascending partition of [sigma_min, sigma_max]
  intervals: np.ndarray          # (B, 2) widened training interval of each block
  sigma_data: float
  label_dropout: float
  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  partition: str = "equiprobable"  # of the noise levels (noise.PARTITIONS)

  # Image blocks share no trained parameters: the driver may regroup their iterations.
  couples_blocks = False

  @property
  def network_config(self):
    """The config of one block's network."""
    return self.dit

  def new_network(self, key) -> DiT:
    """A freshly initialised network of one block."""
    return DiT(self.dit, rngs=nnx.Rngs(params=key))


# optax.apply_if_finite applies the update anyway after this many non-finite ones in a
# row; the driver stops or counts long before (config train.on_nonfinite).
_NEVER = 2**31 - 1


def make_optimizer(train_cfg, num_updates: int | None = None) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and warmup + cosine decay over `num_updates` steps
  (default train.num_steps: about the updates each block gets). A step whose gradients
  hold a NaN or inf changes neither the parameters nor the AdamW state."""
  num_updates = train_cfg.num_steps if num_updates is None else num_updates
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate,
      warmup_steps=train_cfg.warmup_steps,
      decay_steps=max(num_updates, train_cfg.warmup_steps + 1),
      end_value=0.1 * train_cfg.learning_rate)
  return optax.apply_if_finite(optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
                  weight_decay=train_cfg.weight_decay)), max_consecutive_errors=_NEVER)


def noise_plan(config):
  """(noise distribution, partition boundaries, widened training intervals) of a run."""
  d, num_blocks = config.diffusion, num_trained_blocks(config)
  dist = noise.NoiseDistribution(d.p_mean, d.p_std, d.sigma_min, d.sigma_max)
  boundaries = noise.partition(d.partition, num_blocks, dist)
  # End-to-end training is one denoiser over the whole range: no overlap to add.
  gamma = d.overlap_gamma if num_blocks > 1 else 0.0
  return dist, boundaries, noise.training_intervals(boundaries, gamma, d.sigma_min,
                                                    d.sigma_max)


def build(config, layer=None) -> BlockModel:
  """The BlockModel of a validated config (see dbjax.config); layer: a user's layer
  factory in the place of the DiT's (dbjax.dit.DiTConfig.layer)."""
  m, d, data = config.model, config.diffusion, config.data
  num_blocks = num_trained_blocks(config)
  dit = DiTConfig(image_size=data.image_size, channels=data.channels,
                  patch_size=m.patch_size, hidden_size=m.hidden_size,
                  num_layers=m.num_layers // num_blocks, num_heads=m.num_heads,
                  mlp_ratio=m.mlp_ratio, num_classes=data.num_classes,
                  frequency_dim=m.frequency_dim, remat=m.remat, layer=layer)
  dist, boundaries, intervals = noise_plan(config)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiT(dit, rngs=nnx.Rngs(0))))
  return BlockModel(dit=dit, num_blocks=num_blocks, dist=dist, boundaries=boundaries,
                    intervals=intervals, sigma_data=d.sigma_data,
                    label_dropout=m.label_dropout, graphdef=graphdef,
                    optimizer=make_optimizer(config.train), partition=d.partition)


def init_block(model: BlockModel, key: jax.Array) -> BlockState:
  """A fresh block: parameters, its own optimizer state, step 0."""
  params = nnx.state(model.new_network(key))
  return BlockState(params, model.optimizer.init(params), jnp.zeros((), jnp.int32))


def abstract_block_state(model: BlockModel) -> BlockState:
  """Shapes and dtypes of one block's state, allocating nothing."""
  return jax.eval_shape(lambda: init_block(model, jax.random.key(0)))


def init_blocks_on_host(model, seed: int, init_fn=None) -> list[BlockState]:
  """All B blocks' states, created one at a time and kept in host memory (numpy).

  One compiled init serves every block, and each block goes to host memory before the
  next is made, so at most one block is ever on the accelerator. init_fn(model, key)
  makes one block (default: this module's init_block; dbjax.classify passes its own).
  """
  init = jax.jit(lambda key: (init_fn or init_block)(model, key))
  base = jax.random.key(seed)
  return [jax.device_get(init(jax.random.fold_in(base, b))) for b in range(model.num_blocks)]


def init_with_shared_on_host(model, seed: int, init_fn, init_shared_fn):
  """(all blocks' host states, the shared state in host memory) for tasks whose blocks
  share a learned target space (dbjax.classify, dbjax.language). The shared state's
  key is block index B's, so it never repeats a block's."""
  blocks = init_blocks_on_host(model, seed, init_fn)
  shared = jax.device_get(jax.jit(lambda key: init_shared_fn(model, key))(
      jax.random.fold_in(jax.random.key(seed), model.num_blocks)))
  return blocks, shared


def abstract_with_shared(model, init_fn, init_shared_fn):
  """(one block's state, the shared state) as shapes and dtypes, allocating nothing."""
  return (jax.eval_shape(lambda: init_fn(model, jax.random.key(0))),
          jax.eval_shape(lambda: init_shared_fn(model, jax.random.key(0))))


def shared_optimizer(train_cfg, num_updates: int, trained: Any):
  """The shared group's optimizer: make_optimizer on the leaves `trained` labels
  "train", zero updates on those labelled "frozen" (a pytree prefix of the params, or a
  function of them, as optax.multi_transform takes)."""
  return optax.multi_transform({"train": make_optimizer(train_cfg, num_updates),
                                "frozen": optax.set_to_zero()}, trained)


def init_on_host(model: BlockModel, seed: int):
  """(all blocks' host states, shared state): image blocks share nothing, so None."""
  return init_blocks_on_host(model, seed), None


def abstract_states(model: BlockModel):
  """(one block's abstract state, abstract shared state = None)."""
  return abstract_block_state(model), None


def block_loss(model: BlockModel, params, images, labels, key, interval):
  """Mean weighted denoising loss of one block on a batch (paper, Eq. 6).

  interval = (lo, hi): the block's training noise interval, traced, so one compiled
  step serves all blocks.
  """
  key_sigma, key_noise, key_drop = jax.random.split(key, 3)
  batch = images.shape[0]
  sigma = noise.sample_sigma(key_sigma, (batch,), interval[0], interval[1],
                             model.dist.p_mean, model.dist.p_std)
  noisy = images + sigma[:, None, None, None] * jax.random.normal(key_noise, images.shape)
  # Classifier-free guidance: train on the null label for a fraction of examples.
  dropped = jax.random.bernoulli(key_drop, model.label_dropout, (batch,))
  labels = jnp.where(dropped, model.dit.null_label, labels)
  network = nnx.merge(model.graphdef, params)
  denoised = edm.denoise(lambda x, c_noise: network(x, c_noise, labels), noisy, sigma,
                         model.sigma_data)
  return jnp.mean(edm.weighted_l2_loss(denoised, images, sigma, model.sigma_data))


def no_reduction(tree):
  """The identity: a step on one device combines nothing across shards."""
  return tree


def train_step(model: BlockModel, state: BlockState, images, labels, key, interval,
               reduce=no_reduction):
  """(state, batch, key) -> (state, metrics) for one block; pure, jit it with donation.

  reduce((loss, grads)) combines them across data-parallel shards before the update:
  dbjax.parallel passes a mean over the mesh's "data" axis.
  """
  loss, grads = reduce(jax.value_and_grad(block_loss, argnums=1)(
      model, state.params, images, labels, key, interval))
  updates, opt_state = model.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return BlockState(params, opt_state, state.step + 1), step_metrics(loss, grads)


def step_metrics(loss, grads, **others) -> dict:
  """Loss, gradient norm and whether the update was skipped (a NaN or inf in the loss
  or the gradients; see make_optimizer)."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return dict(others, loss=loss, grad_norm=grad_norm,
              skipped=jnp.logical_not(finite).astype(jnp.float32))


def jit_train_step(model: BlockModel):
  """train_step compiled once for all blocks; the incoming state's buffers are donated."""
  return jax.jit(lambda state, images, labels, key, interval: train_step(
      model, state, images, labels, key, interval), donate_argnums=0)


def update(optimizer, state: BlockState, grads) -> BlockState:
  """One optimizer step of a state with its own optax state and step count."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return BlockState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)


def train_step_with_shared(loss_fn, block_optimizer, shared_optimizer, state: BlockState,
                           shared: BlockState, batch: tuple, key, interval,
                           reduce=no_reduction):
  """One block's step when the run also has a shared state (a label or token embedding):
  (block state, shared state) -> (block state, shared state, metrics).

  loss_fn(block params, shared params, *batch, key, interval) -> (loss, metrics). The
  block and the shared group each clip their own gradients and keep their own AdamW
  state; the shared group steps with every block's iterations. reduce: as in train_step.
  """
  (loss, metrics), (block_grads, shared_grads) = reduce(jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params, shared.params, *batch, key,
                                             interval))
  metrics = step_metrics(loss, block_grads, **metrics)
  return (update(block_optimizer, state, block_grads),
          update(shared_optimizer, shared, shared_grads), metrics)


def run_step(model: BlockModel, state, shared, images, labels, key, interval,
             reduce=no_reduction):
  """The driver's step, (state, shared, images, labels, key, interval) ->
  (state, shared, metrics), which image blocks serve with shared = None."""
  state, metrics = train_step(model, state, images, labels, key, interval, reduce)
  return state, shared, metrics


def jit_run_step(model: BlockModel):
  """run_step compiled once for all blocks; the block's state is donated."""
  return jax.jit(functools.partial(run_step, model), donate_argnums=0)
