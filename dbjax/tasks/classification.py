"""DiffusionBlocks for classification: B ViT blocks that denoise a label embedding.

The target is y = E[label], a row of a learnable label embedding E (C, D) whose rows are
L2-normalised (paper, Sec. 5.2). Block b trains on sigmas from its own interval:

  z = y + sigma eps,   logits = F_b(images, c_in z, c_noise),
  loss = mean_i w(sigma_i) CE_i                  (paper, Eq. 6: "per_example"), or
  loss = mean_i w(sigma_i) * mean_i CE_i         (the released code: "batch_mean"),

with the EDM c_in, c_noise and w(sigma) = 1 / c_out^2 of dbjax.edm. Inference is a
chain of N denoising calls down the same sigma grid as image sampling, one block per
call (`noise.block_of_sigma`, so with N = B block b runs once, at call b). Between calls
the Euler step z <- z + (s' - s)(z - x0)/s moves z toward the estimate x0: the argmax
row E[argmax logits] (keeps the unit norm) or the expected row softmax(logits) @ E
(shrinks toward the centroid when unsure). The prediction is the
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

End-to-end baseline (`PlainClassifier`): the same ViT with all L layers, a learnable
[CLS] token in place of the noisy label, constant conditioning, plain cross-entropy, one
call at inference. It keeps the (frozen, unused) label embedding as its shared state, so
both methods save the same items.
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

from dbjax import checks, edm, noise
from dbjax.config import (check_choices, check_field, check_positive_integers,
                          num_trained_blocks, shared_updates)
from dbjax.data import images as image_data
from dbjax.engine.state import make_optimizer, shared_optimizer
from dbjax.nets.vit import ViT, ViTConfig
from dbjax.progress import progress_bar
from dbjax.sampling import embedding_chain, fixed_size_batches, stack_params, unit_rows
from dbjax.tasks.base import NoisePlan, Task, noise_plan, sampling_plan
from dbjax.tasks.images import (  # the same image sets: this task's load_data
    check_image_batch, check_training_images, example_images, load_data, resolve)

# Network modules that classifier.shared_modules="shared" keeps in one shared copy.
SHAREABLE_MODULES = ("patch_embed", "cls_token", "sigma_embed", "head")


def in_shared_group(shared_modules):
  """nnx filter: whether a network parameter belongs to the shared group."""
  return lambda path, _: path[0] in shared_modules


# ------------------------------------------------------------------------ config

CLASSIFIER_CHOICES = {
    "target_token": ("class_token", "concat"),
    "loss_weighting": ("per_example", "batch_mean"),
    "bridge": ("argmax", "expected"),
    "label_embedding": ("joint", "frozen"),
    "shared_modules": ("per_block", "shared"),
}


def config_sections() -> dict:
  """This task's own config section and its defaults (dbjax.config.default_config adds
  it to the fields every run has)."""
  return {"classifier": ml_collections.ConfigDict(dict(
      # Where the noisy label enters: as the [CLS] token (released code), or beside a
      # learnable [CLS] token (paper's text). "concat" by default: it learns from the
      # image sooner, as the read-out token cannot simply copy the noisy label
      # (docs/classification.md, Options).
      target_token="concat",
      # Eq. 6 per example (paper), or mean(w) * mean(CE) over the batch (released code).
      loss_weighting="per_example",
      # Estimate the Euler step moves toward: the argmax label's embedding row, or the
      # expected row softmax(logits) @ E (shrinks its norm when unsure).
      bridge="argmax",
      # The label embedding: trained with whichever block is active ("joint", the
      # released code), or "frozen" at its random initialisation. Frozen by default:
      # as accurate on digits (docs/classification.md, Options) and the blocks stay independent.
      label_embedding="frozen",
      # Patch embedding, sigma embedder and head: one copy per block, or one shared
      # copy trained with whichever block is active. Per block by default: more
      # accurate on digits (docs/classification.md, Options) and no communication between blocks.
      shared_modules="per_block",
      augment=False,             # random flip and crop of training images
      # dbjax's addition, not the paper's: the fraction of training examples whose noisy
      # label token is built from a uniformly random class while the target stays the
      # true one. At inference block b > 0 reads the label of block b-1's answer, which is
      # sometimes wrong; trained only on true labels it trusts the token (docs/classification.md,
      # "Classification"). 0 = the paper's training.
      token_corruption=0.0,
      inference_steps=(1, 2, 3, 6, 12),  # chain lengths for accuracy against steps
  ))}


def validate_config(config):
  """ConfigError naming the first bad field of this task's section."""
  c = config.classifier
  check_choices(config, "classifier", CLASSIFIER_CHOICES)
  check_positive_integers(c.inference_steps, "classifier.inference_steps")
  check_field(0.0 <= c.token_corruption < 1.0, "classifier.token_corruption",
              c.token_corruption, "in [0, 1)")


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Classification(Task):
  """What both methods share: the ViT of one block, its split into a block part and a
  shared part, the label embedding, prediction in batches and the evaluation."""
  vit: ViTConfig                # the network of ONE block (num_layers / B deep)
  shared_modules: tuple         # network modules in the shared group
  train_label_embedding: bool
  augment: bool
  graphdef: nnx.GraphDef        # merges (shared network part, block part)

  curve_metric = "cross_entropy"
  headline_metric = "accuracy"
  summary_metrics = ("accuracy", "accuracy_by_steps")
  evaluate_flags = {"num_steps": "classifier.inference_steps", "bridge": "classifier.bridge",
                    "max_test_examples": "eval.max_test_examples"}

  def write_run_files(self, workdir, train_data):
    image_data.write_class_names(workdir, train_data)

  @property
  def network_config(self) -> ViTConfig:
    """The config of one block's network."""
    return self.vit

  @property
  def is_shared(self):
    """nnx filter of the shared group's network parameters."""
    return in_shared_group(self.shared_modules)

  def split_network(self, key):
    """(shared part, block part) of a freshly initialised network."""
    _, shared, own = nnx.split(ViT(self.vit, rngs=nnx.Rngs(params=key)), self.is_shared, ...)
    return shared, own

  def new_network(self, key) -> ViT:
    """A freshly initialised network of one block."""
    return ViT(self.vit, rngs=nnx.Rngs(params=key))

  def network(self, block_params, shared_params) -> ViT:
    """The ViT of one block: its own params merged with the shared network part."""
    return nnx.merge(self.graphdef, shared_params["network"], block_params)

  def init_block_params(self, key):
    return self.split_network(key)[1]

  def init_shared_params(self, key):
    """The label embedding (C, D) and the shared network modules."""
    key_net, key_embed = jax.random.split(key)
    return {"network": self.split_network(key_net)[0],
            "label_embedding": jax.random.normal(key_embed, (self.vit.num_classes,
                                                             self.vit.hidden_size))}

  def check_train_data(self, config, train_data):
    check_training_images(config, train_data)

  def check_batch(self, batch):
    return check_image_batch(self.vit, batch)

  def target_embedding(self, shared_params):
    return label_embedding(shared_params)

  def example_batch(self, batch_size, rng=None):
    return example_images(self.vit, batch_size, rng)

  def inference_steps(self, config) -> list[int]:
    """The chain lengths evaluated; the first is the headline."""
    raise NotImplementedError

  def chain_logits(self, stacked_params, shared_params, images, num_steps: int, key):
    """Logits of every call of the inference chain, (calls, batch, C)."""
    raise NotImplementedError

  def sample(self, block_params, shared_params, key, inputs, num_steps):
    """Predicted labels (N,) of images `inputs` after a num_steps-call chain."""
    checks.check_sample_call(block_params, self.num_blocks, key, num_steps)
    vit = self.vit
    checks.check_images("images", inputs, (vit.image_size, vit.image_size, vit.channels))
    logits = self.chain_logits(stack_params(block_params), shared_params,
                               jnp.asarray(inputs), num_steps, key)
    return jnp.argmax(logits[-1], axis=-1)

  def evaluate(self, config, workdir, states, shared, data, prefix=""):
    if not config.eval.enabled:
      return {}
    return classify_and_evaluate(self, config, workdir, states, shared, data.test, prefix)

  def evaluation_name(self, config):
    asked = config.classifier.inference_steps  # one N asked (evaluate --num_steps), or B
    steps = asked[0] if len(asked) == 1 else self.num_blocks
    return f"eval_steps_{steps}_{config.classifier.bridge}"


def label_embedding(shared_params) -> jax.Array:
  """E with unit-norm rows: the target space (paper, Sec. 5.2)."""
  return unit_rows(shared_params["label_embedding"])


@dataclasses.dataclass(frozen=True, eq=False)
class LabelDenoising(Classification):
  """DiffusionBlocks: B ViT blocks, each a denoiser of the label embedding over its own
  noise interval (see the module docstring)."""
  noise: NoisePlan
  loss_weighting: str           # "per_example" (paper, Eq. 6) or "batch_mean" (code)
  bridge: str                   # "argmax" or "expected"
  token_corruption: float       # fraction of label tokens drawn from a random class

  @property
  def couples_blocks(self) -> bool:
    """Blocks share trained parameters with a joint label embedding or shared modules."""
    return self.train_label_embedding or bool(self.shared_modules)

  def loss(self, params, shared_params, batch, key, interval):
    """(loss, metrics) of one block on (images, labels); interval = its (lo, hi)."""
    images, labels = batch
    key_sigma, key_noise, key_augment = jax.random.split(key, 3)
    if self.augment:
      images = augment_images(key_augment, images)
    net = self.network(params, shared_params)
    size = images.shape[0]
    sigma = noise.sample_sigma(key_sigma, (size,), interval[0], interval[1],
                               self.noise.dist.p_mean, self.noise.dist.p_std)
    token_labels = labels
    if self.token_corruption:  # its own key, so runs without it keep their random stream
      token_labels = corrupt_labels(jax.random.fold_in(key, 1), labels, self.vit.num_classes,
                                    self.token_corruption)
    target = label_embedding(shared_params)[token_labels]
    noisy = target + sigma[:, None] * jax.random.normal(key_noise, target.shape)
    c = edm.preconditioning(sigma, self.noise.sigma_data)
    logits = net(images, c.c_in[:, None] * noisy, c.c_noise)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = weighted_cross_entropy(cross_entropy, edm.loss_weight(sigma, self.noise.sigma_data),
                                  self.loss_weighting)
    return loss, classification_metrics(logits, cross_entropy, labels, "denoising_accuracy")

  def inference_steps(self, config):
    # N = B runs each block once (docs/method.md, "Sampling").
    return sorted({self.num_blocks, *config.classifier.inference_steps})

  def chain_logits(self, stacked_params, shared_params, images, num_steps, key):
    """Logits of every call of an N-step denoising chain, (num_steps, batch, C); the
    prediction is the argmax of the last row."""
    sigmas, blocks = sampling_plan(self.noise, num_steps)
    return _chain_logits(self, stacked_params, shared_params, images, key,
                         jnp.asarray(sigmas, jnp.float32), jnp.asarray(blocks, jnp.int32))


@dataclasses.dataclass(frozen=True, eq=False)
class PlainClassifier(Classification):
  """The end-to-end baseline: one ViT of all L layers trained with plain cross-entropy."""

  def loss(self, params, shared_params, batch, key, interval):
    del interval
    images, labels = batch
    if self.augment:
      images = augment_images(jax.random.split(key, 3)[2], images)
    logits = self.network(params, shared_params)(images, None, jnp.zeros((images.shape[0],)))
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(cross_entropy), classification_metrics(logits, cross_entropy, labels,
                                                           "batch_accuracy")

  def inference_steps(self, config):
    return [1]  # one call, whatever the chain length asked

  def chain_logits(self, stacked_params, shared_params, images, num_steps, key):
    del num_steps, key
    return _plain_logits(self, stacked_params, shared_params, images)[None]


def build(config, layer=None) -> Classification:
  """The task of a validated classification config: LabelDenoising, or PlainClassifier
  for method="end_to_end"; layer: a user's layer factory in the place of the DiT's."""
  m, c, data = config.model, config.classifier, config.data
  denoising = config.method == "diffusion_blocks"
  num_blocks = num_trained_blocks(config)
  vit = ViTConfig(image_size=data.image_size, channels=data.channels,
                  patch_size=m.patch_size, hidden_size=m.hidden_size,
                  num_layers=m.num_layers // num_blocks, num_heads=m.num_heads,
                  mlp_ratio=m.mlp_ratio, num_classes=data.num_classes,
                  frequency_dim=m.frequency_dim, remat=m.remat, dtype=m.dtype,
                  attention=m.attention, layer=layer,
                  target_token=c.target_token if denoising else "none")
  plan, intervals = noise_plan(config, num_blocks)
  shared_modules = SHAREABLE_MODULES if denoising and c.shared_modules == "shared" else ()
  train_label_embedding = denoising and c.label_embedding == "joint"
  graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: ViT(vit, rngs=nnx.Rngs(0))),
                             in_shared_group(shared_modules), ...)
  shared_optim = shared_optimizer(
      config.train, shared_updates(config),
      lambda params: {"label_embedding": "train" if train_label_embedding else "frozen",
                      "network": jax.tree.map(lambda _: "train", params["network"])})
  common = dict(num_blocks=num_blocks, intervals=intervals,
                optimizer=make_optimizer(config.train), shared_optimizer=shared_optim,
                vit=vit, shared_modules=shared_modules,
                train_label_embedding=train_label_embedding, augment=c.augment,
                graphdef=graphdef)
  if not denoising:
    return PlainClassifier(**common)
  return LabelDenoising(**common, noise=plan, loss_weighting=c.loss_weighting,
                        bridge=c.bridge, token_corruption=c.token_corruption)


# ------------------------------------------------------------------------------ loss


def classification_metrics(logits, cross_entropy, labels, accuracy_name: str) -> dict:
  """Mean cross-entropy (unweighted), and the accuracy of the call's argmax against the
  true label on the training batch, named `accuracy_name`: "denoising_accuracy" for a
  block, which reads a noisy copy of the true label at its own training sigma (near 1
  for the low-noise blocks, so far above the test chain's accuracy, which starts from
  pure noise), "batch_accuracy" for the plain classifier."""
  return {"cross_entropy": jnp.mean(cross_entropy),
          accuracy_name: jnp.mean(jnp.argmax(logits, -1) == labels)}


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


# ------------------------------------------------------------------------- inference


@functools.partial(jax.jit, static_argnames=("task",))
def _chain_logits(task, stacked_params, shared_params, images, key, sigmas, blocks):
  embedding = label_embedding(shared_params)
  z = noise.pure_noise(key, (images.shape[0], embedding.shape[1]), task.noise.dist)

  def logits_of(z, sigma, block, step):
    del step
    params = jax.tree.map(lambda p: p[block], stacked_params)
    c = edm.preconditioning(sigma, task.noise.sigma_data)
    c_noise = jnp.full((images.shape[0],), c.c_noise)
    return task.network(params, shared_params)(images, c.c_in * z, c_noise)

  return embedding_chain(logits_of, z, sigmas, blocks, embedding, task.bridge)


@functools.partial(jax.jit, static_argnames=("task",))
def _plain_logits(task, stacked_params, shared_params, images):
  params = jax.tree.map(lambda p: p[0], stacked_params)
  return task.network(params, shared_params)(images, None, jnp.zeros((images.shape[0],)))


def predict(task: Classification, block_params, shared_params, images, num_steps: int,
            seed: int = 0, batch_size: int = 500, progress: bool = False) -> np.ndarray:
  """Predicted labels (N,) of images after an N-step chain, in fixed-size batches."""
  stacked = stack_params(block_params)
  key = jax.random.key(seed)
  predictions = []
  batches = fixed_size_batches(np.asarray(images, np.float32), batch_size)
  for i, batch in enumerate(progress_bar(batches, desc=f"predicting ({num_steps} steps)",
                                         disable=not progress, leave=False)):
    logits = task.chain_logits(stacked, shared_params, jnp.asarray(batch), num_steps,
                               jax.random.fold_in(key, i))
    predictions.append(np.asarray(jnp.argmax(logits[-1], axis=-1)))
  return np.concatenate(predictions)[:len(images)]


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  """counts[true, predicted]."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def classify_and_evaluate(task: Classification, config, workdir: str, states, shared,
                          test_data, prefix: str = "") -> dict:
  """Test accuracy after the B-step chain and after each of
  config.classifier.inference_steps; writes <prefix>confusion.png and (DiffusionBlocks)
  <prefix>accuracy_vs_steps.png to workdir."""
  from dbjax.eval import plots  # pylint: disable=g-import-not-at-top
  image_data.check_images(test_data.images, test_data.labels, config.data.image_size,
                          config.data.channels, config.data.num_classes, "test images")
  count = config.eval.max_test_examples or len(test_data.labels)
  images, labels = test_data.images[:count], test_data.labels[:count]
  params = [s.params for s in states]
  steps = task.inference_steps(config)
  headline = task.num_blocks if task.num_blocks in steps else steps[0]
  accuracy = {}
  for num_steps in steps:
    predictions = predict(task, params, shared.params, images, num_steps, seed=config.seed,
                          progress=config.train.progress)
    accuracy[num_steps] = float(np.mean(predictions == labels))
    if num_steps == headline:
      confusion = confusion_matrix(labels, predictions, config.data.num_classes)
  plots.save_confusion_matrix(confusion, os.path.join(workdir, f"{prefix}confusion.png"),
                              title=f"{config.method}, {config.data.name}: accuracy "
                                    f"{accuracy[headline]:.3f}",
                              class_names=test_data.class_names)
  results = {"accuracy": accuracy[headline], "inference_steps": headline,
             "test_examples": int(count),
             "per_class_accuracy": (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist()}
  if isinstance(task, LabelDenoising):
    results["accuracy_by_steps"] = {str(n): a for n, a in accuracy.items()}
    plots.save_accuracy_vs_steps(accuracy, task.num_blocks,
                                 os.path.join(workdir, f"{prefix}accuracy_vs_steps.png"))
  return results
