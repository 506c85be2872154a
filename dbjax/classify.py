"""DiffusionBlocks for classification: B ViT blocks that denoise a label embedding.

The target is y = E[label], a row of a learnable label embedding E (C, D) whose rows are
L2-normalised (METHOD.md, task table). Block b trains on sigmas from its own interval:

  z = y + sigma eps,   logits = F_b(images, c_in z, c_noise),
  loss = mean_i w(sigma_i) CE_i                  (paper, Eq. 6: "per_example"), or
  loss = mean_i w(sigma_i) * mean_i CE_i         (the released code: "batch_mean"),

with the EDM c_in, c_noise and w(sigma) = 1 / c_out^2 of dbjax.edm. Inference is a
chain of N denoising calls down the same sigma grid as image sampling, one block per
call (`noise.block_of_sigma`, so with N = B block b runs once, at call b). Between calls
the Euler step z <- z + (s' - s)(z - x0)/s moves z toward the estimate x0: the argmax
row E[argmax logits] (keeps the unit norm) or the expected row softmax(logits) @ E
(shrinks toward the centroid when unsure: METHOD.md, pitfalls). The prediction is the
argmax of the last call's logits.

The chain hands block b the label of block b-1's answer, which is sometimes wrong, while
the paper trains every block on noisy true labels only. token_corruption > 0 (dbjax's
option, off by default) builds that fraction of training tokens from a random class and
keeps the true label as the target, so a block learns how far to trust its token.

Parameters come in two groups. Each block owns its layers (and, with
shared_modules="per_block", its own patch embedding, [CLS] token, sigma embedder and
head). The shared group holds the label embedding and, with shared_modules="shared",
one copy of those modules; it has its own optimizer and steps with every iteration,
whichever block is active (the released code's joint training). With
label_embedding="frozen" and shared_modules="per_block" nothing shared is trained and
the blocks are independent, as for images; otherwise they are coupled through the
shared group (the driver then keeps the interleaved order, and blocks on separate
devices would have to all-reduce its gradients).

End-to-end baseline: the same ViT with all L layers, a learnable [CLS] token in place of
the noisy label, constant conditioning, plain cross-entropy. Its "shared group" is
empty, so every run has the same state layout.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from dbjax import edm, noise
from dbjax.blocks import (BlockState, abstract_with_shared, init_with_shared_on_host,
                          make_optimizer, noise_plan, no_reduction, shared_optimizer,
                          train_step_with_shared)
from dbjax.config import num_trained_blocks, shared_updates
from dbjax.sampling import (bridge_estimate, embedding_chain, fixed_size_batches,
                            sampling_plan, stack_params, unit_rows)
from dbjax.vit import ViT, ViTConfig

# Network modules that classifier.shared_modules="shared" keeps in one shared copy.
SHAREABLE_MODULES = ("patch_embed", "cls_token", "sigma_embed", "head")


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class ClassifierModel:
  """Everything fixed about a classification run; built once from the config by `build`."""
  vit: ViTConfig                # the network of ONE block (num_layers / B deep)
  num_blocks: int
  denoising: bool               # False: the end-to-end plain classifier
  dist: noise.NoiseDistribution
  boundaries: np.ndarray
  intervals: np.ndarray
  sigma_data: float
  loss_weighting: str           # "per_example" (paper, Eq. 6) or "batch_mean" (code)
  bridge: str                   # "argmax" or "expected"
  augment: bool
  token_corruption: float       # fraction of label tokens drawn from a random class
  shared_modules: tuple[str, ...]
  train_label_embedding: bool
  graphdef: nnx.GraphDef        # merges (shared network part, block part)
  block_optimizer: optax.GradientTransformation
  shared_optimizer: optax.GradientTransformation
  partition: str = "equiprobable"  # of the noise levels (noise.PARTITIONS)

  @property
  def network_config(self):
    """The config of one block's network."""
    return self.vit

  @property
  def couples_blocks(self) -> bool:
    """Whether blocks share trained parameters (so their iterations cannot be reordered)."""
    return self.denoising and (self.train_label_embedding or bool(self.shared_modules))

  def is_shared(self, path, value) -> bool:
    """Whether the network parameter at `path` belongs to the shared group."""
    return in_shared_group(self.shared_modules)(path, value)


def in_shared_group(shared_modules):
  """nnx filter: whether a network parameter belongs to the shared group."""
  return lambda path, _: path[0] in shared_modules


def build(config, layer=None) -> ClassifierModel:
  """The ClassifierModel of a validated classification config; layer: a user's layer
  factory in the place of the DiT's (dbjax.dit.DiTConfig.layer)."""
  m, c, data = config.model, config.classifier, config.data
  denoising = config.method == "diffusion_blocks"
  num_blocks = num_trained_blocks(config)
  vit = ViTConfig(image_size=data.image_size, channels=data.channels,
                  patch_size=m.patch_size, hidden_size=m.hidden_size,
                  num_layers=m.num_layers // num_blocks, num_heads=m.num_heads,
                  mlp_ratio=m.mlp_ratio, num_classes=data.num_classes,
                  frequency_dim=m.frequency_dim, remat=m.remat, layer=layer,
                  target_token=c.target_token if denoising else "none")
  dist, boundaries, intervals = noise_plan(config)
  shared_modules = SHAREABLE_MODULES if denoising and c.shared_modules == "shared" else ()
  train_label_embedding = denoising and c.label_embedding == "joint"
  graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: ViT(vit, rngs=nnx.Rngs(0))),
                             in_shared_group(shared_modules), ...)
  shared_optim = shared_optimizer(
      config.train, shared_updates(config),
      lambda params: {"label_embedding": "train" if train_label_embedding else "frozen",
                      "network": jax.tree.map(lambda _: "train", params["network"])})
  return ClassifierModel(
      vit=vit, num_blocks=num_blocks, denoising=denoising, dist=dist,
      boundaries=boundaries, intervals=intervals, sigma_data=config.diffusion.sigma_data,
      loss_weighting=c.loss_weighting, bridge=c.bridge, augment=c.augment,
      token_corruption=c.token_corruption,
      shared_modules=shared_modules, train_label_embedding=train_label_embedding,
      graphdef=graphdef, block_optimizer=make_optimizer(config.train),
      shared_optimizer=shared_optim, partition=config.diffusion.partition)


# ----------------------------------------------------------------------------- state


def split_network(model: ClassifierModel, key):
  """(shared part, block part) of a freshly initialised network."""
  _, shared, own = nnx.split(ViT(model.vit, rngs=nnx.Rngs(params=key)), model.is_shared, ...)
  return shared, own


def init_block(model: ClassifierModel, key) -> BlockState:
  """A fresh block: its part of the ViT, its own optimizer state, step 0."""
  _, params = split_network(model, key)
  return BlockState(params, model.block_optimizer.init(params), jnp.zeros((), jnp.int32))


def init_shared(model: ClassifierModel, key) -> BlockState:
  """The shared group: label embedding (C, D) and the shared network modules."""
  key_net, key_embed = jax.random.split(key)
  network, _ = split_network(model, key_net)
  params = {"network": network,
            "label_embedding": jax.random.normal(
                key_embed, (model.vit.num_classes, model.vit.hidden_size))}
  return BlockState(params, model.shared_optimizer.init(params), jnp.zeros((), jnp.int32))


def init_on_host(model: ClassifierModel, seed: int) -> tuple[list[BlockState], BlockState]:
  """All blocks' states and the shared state, made one at a time into host memory."""
  return init_with_shared_on_host(model, seed, init_block, init_shared)


def abstract_states(model: ClassifierModel):
  """(one block's state, the shared state) as shapes and dtypes, allocating nothing."""
  return abstract_with_shared(model, init_block, init_shared)


# ------------------------------------------------------------------------------ loss


def label_embedding(shared_params) -> jax.Array:
  """E with unit-norm rows: the target space (METHOD.md, task table)."""
  return unit_rows(shared_params["label_embedding"])


def network(model: ClassifierModel, block_params, shared_params) -> ViT:
  """The ViT of one block: its own params merged with the shared network part."""
  return nnx.merge(model.graphdef, shared_params["network"], block_params)


def weighted_cross_entropy(cross_entropy, weight, weighting: str) -> jax.Array:
  """Eq. 6 weighting of per-example CE: mean(w CE) ("per_example", the paper) or
  mean(w) mean(CE) ("batch_mean", the released code)."""
  if weighting == "per_example":
    return jnp.mean(weight * cross_entropy)
  return jnp.mean(weight) * jnp.mean(cross_entropy)


def augment_images(key, images) -> jax.Array:
  """Random horizontal flip, then a random crop of the image padded by size/8 (>= 1 px)
  with the background value -1."""
  n, h, w, c = images.shape
  key_flip, key_crop = jax.random.split(key)
  flip = jax.random.bernoulli(key_flip, 0.5, (n, 1, 1, 1))
  images = jnp.where(flip, images[:, :, ::-1], images)
  pad = max(1, h // 8)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(key_crop, (n, 2), 0, 2 * pad + 1)
  crop = lambda image, at: jax.lax.dynamic_slice(image, (at[0], at[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def corrupt_labels(key, labels, num_classes: int, rate: float) -> jax.Array:
  """labels with each replaced, with probability `rate`, by a uniformly random class (which
  may be the true one): the classes whose embeddings build the noisy token."""
  key_which, key_class = jax.random.split(key)
  replace = jax.random.bernoulli(key_which, rate, labels.shape)
  return jnp.where(replace, jax.random.randint(key_class, labels.shape, 0, num_classes), labels)


def block_loss(model: ClassifierModel, block_params, shared_params, images, labels, key,
               interval):
  """(loss, metrics) of one block on a batch; interval = the block's (lo, hi), traced."""
  key_sigma, key_noise, key_augment = jax.random.split(key, 3)
  if model.augment:
    images = augment_images(key_augment, images)
  net = network(model, block_params, shared_params)
  batch = images.shape[0]
  if not model.denoising:
    logits = net(images, None, jnp.zeros((batch,)))
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = jnp.mean(cross_entropy)
  else:
    sigma = noise.sample_sigma(key_sigma, (batch,), interval[0], interval[1],
                               model.dist.p_mean, model.dist.p_std)
    token_labels = labels
    if model.token_corruption:  # its own key, so runs without it keep their random stream
      token_labels = corrupt_labels(jax.random.fold_in(key, 1), labels, model.vit.num_classes,
                                    model.token_corruption)
    target = label_embedding(shared_params)[token_labels]
    noisy = target + sigma[:, None] * jax.random.normal(key_noise, target.shape)
    c = edm.preconditioning(sigma, model.sigma_data)
    logits = net(images, c.c_in[:, None] * noisy, c.c_noise)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = weighted_cross_entropy(cross_entropy, edm.loss_weight(sigma, model.sigma_data),
                                  model.loss_weighting)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, {"cross_entropy": jnp.mean(cross_entropy), "accuracy": accuracy}


def train_step(model: ClassifierModel, state: BlockState, shared: BlockState, images, labels,
               key, interval, reduce=no_reduction):
  """(block state, shared state, batch, key) -> (block state, shared state, metrics);
  see blocks.train_step_with_shared."""
  return train_step_with_shared(functools.partial(block_loss, model), model.block_optimizer,
                                model.shared_optimizer, state, shared, (images, labels), key,
                                interval, reduce)


def jit_train_step(model: ClassifierModel):
  """train_step compiled once for all blocks; the block's and shared buffers are donated."""
  return jax.jit(functools.partial(train_step, model), donate_argnums=(0, 1))


# The driver's names for them (see dbjax.train and dbjax.parallel).
jit_run_step, run_step = jit_train_step, train_step


# ------------------------------------------------------------------------- inference


@functools.partial(jax.jit, static_argnames=("model",))
def _chain_logits(model, stacked_params, shared_params, images, key, sigmas, blocks):
  embedding = label_embedding(shared_params)
  z = noise.pure_noise(key, (images.shape[0], embedding.shape[1]), model.dist)

  def logits_of(z, sigma, block, step):
    del step
    params = jax.tree.map(lambda p: p[block], stacked_params)
    c = edm.preconditioning(sigma, model.sigma_data)
    c_noise = jnp.full((images.shape[0],), c.c_noise)
    return network(model, params, shared_params)(images, c.c_in * z, c_noise)

  return embedding_chain(logits_of, z, sigmas, blocks, embedding, model.bridge)


@functools.partial(jax.jit, static_argnames=("model",))
def _plain_logits(model, stacked_params, shared_params, images):
  params = jax.tree.map(lambda p: p[0], stacked_params)
  return network(model, params, shared_params)(images, None, jnp.zeros((images.shape[0],)))


def chain_logits(model: ClassifierModel, stacked_params, shared_params, images, num_steps: int,
                 key) -> jax.Array:
  """Logits of every call of an N-step denoising chain, (num_steps, batch, C).

  The prediction is the argmax of the last row. stacked_params: `stack_params` of the
  blocks' params. The end-to-end classifier makes one call whatever num_steps is.
  """
  if not model.denoising:
    return _plain_logits(model, stacked_params, shared_params, images)[None]
  sigmas, blocks = sampling_plan(model, num_steps)
  return _chain_logits(model, stacked_params, shared_params, images, key,
                       jnp.asarray(sigmas, jnp.float32), jnp.asarray(blocks, jnp.int32))


def predict(model, block_params, shared_params, images, num_steps: int, seed: int = 0,
            batch_size: int = 500, progress: bool = False) -> np.ndarray:
  """Predicted labels (N,) of images after an N-step chain, in fixed-size batches."""
  stacked = stack_params(block_params)
  key = jax.random.key(seed)
  predictions = []
  batches = fixed_size_batches(np.asarray(images, np.float32), batch_size)
  for i, batch in enumerate(tqdm(batches, desc=f"predicting ({num_steps} steps)",
                                 disable=not progress, leave=False)):
    logits = chain_logits(model, stacked, shared_params, jnp.asarray(batch), num_steps,
                          jax.random.fold_in(key, i))
    predictions.append(np.asarray(jnp.argmax(logits[-1], axis=-1)))
  return np.concatenate(predictions)[:len(images)]


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  """counts[true, predicted]."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts
