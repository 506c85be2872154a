"""Frechet distance of generated images in the feature space of a small classifier.

FID uses Inception-v3 features, whose weights cannot be downloaded here, and which
mean little on 8x8 digits anyway. dbjax trains a small CNN classifier once per data
set, caches it (orbax) and uses its penultimate layer as the feature space; the
Frechet distance between Gaussians fitted to generated and test features is then
computed exactly as FID is (Heusel et al. 2017):

  FD = |mu_1 - mu_2|^2 + Tr(C_1 + C_2 - 2 (C_1 C_2)^(1/2)).

Numbers are comparable between runs on the same data set and cache, not with FIDs
reported elsewhere. The classifier also scores whether a sample shows the class it was
asked for ("class accuracy").
"""
import hashlib
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import scipy.linalg
from flax import nnx

from dbjax.data import ImageData, batch_indices
from dbjax.errors import warn
from dbjax.progress import progress_bar

FEATURE_DIM = 64
# Below this many test images the Frechet distance is mostly the noise of estimating a
# 64 x 64 covariance (FEATURE_DIM) from them: with fewer images than dimensions it is
# rank-deficient, and Chong and Forsyth (2020, "Effectively unbiased FID") show the
# estimate's bias falls only as 1 / N. A warning, not an error: a small folder still
# gets a figure to compare its own runs by.
MIN_FRECHET_TEST_IMAGES = 4 * FEATURE_DIM


class FeatureNet(nnx.Module):
  """conv-conv-pool-dense classifier; `features` is the penultimate layer."""

  def __init__(self, channels: int, num_classes: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), strides=(2, 2), rngs=rngs)
    self.dense = nnx.Linear(64, FEATURE_DIM, rngs=rngs)
    self.head = nnx.Linear(FEATURE_DIM, num_classes, rngs=rngs)

  def features(self, images):
    """The penultimate activations (N, feature_dim) the Frechet distance is computed in."""
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(images))))
    return nnx.relu(self.dense(jnp.mean(x, axis=(1, 2))))

  def __call__(self, images):
    return self.head(self.features(images))


def _cache_path(cache_dir: str, dataset_name: str, train: ImageData, steps: int) -> str:
  # Keyed by the data itself, so a changed data set never reuses a stale classifier.
  digest = hashlib.sha1(train.images[:256].tobytes() + str(
      (train.images.shape, steps)).encode()).hexdigest()[:12]
  safe_name = dataset_name.replace(":", "_").replace("/", "_")
  return os.path.join(cache_dir, f"feature_net_{safe_name}_{digest}")


def default_cache_dir() -> str:
  """Where feature classifiers are cached: $DBJAX_CACHE, else ~/.cache/dbjax."""
  return os.environ.get("DBJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dbjax"))


def train_feature_net(train: ImageData, steps: int, seed: int = 0,
                      batch_size: int = 128, progress: bool = False) -> FeatureNet:
  """Train the feature classifier on a data set's training split; return the network."""
  net = FeatureNet(train.images.shape[-1], train.num_classes, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(net)
  optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for i in progress_bar(range(steps), desc="feature classifier", disable=not progress,
                        leave=False):
    index = batch_indices(seed, i, len(train.labels), batch_size)
    params, opt_state = step(params, opt_state, train.images[index], train.labels[index])
  return nnx.merge(graphdef, params)


def load_or_train_feature_net(dataset_name: str, train: ImageData, steps: int,
                              cache_dir: str = "", progress: bool = False) -> FeatureNet:
  """The cached feature classifier of this data set, trained and saved on first use."""
  path = _cache_path(os.path.abspath(cache_dir or default_cache_dir()), dataset_name, train,
                     steps)
  abstract = nnx.eval_shape(lambda: FeatureNet(train.images.shape[-1], train.num_classes,
                                               rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract)
  checkpointer = ocp.StandardCheckpointer()
  if os.path.isdir(path):
    return nnx.merge(graphdef, checkpointer.restore(path, abstract_params))
  net = train_feature_net(train, steps, progress=progress)
  checkpointer.save(path, nnx.state(net))
  checkpointer.wait_until_finished()
  return net


def batched_apply(fn, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
  """fn over `images` in batches of batch_size, results concatenated (numpy)."""
  return np.concatenate([np.asarray(fn(images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to two (N, D) feature sets (float64)."""
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  with warnings.catch_warnings():  # a singular product is handled just below
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
  if not np.all(np.isfinite(covmean)):  # singular product: regularise, as FID code does
    offset = 1e-6 * np.eye(len(mu_a))
    covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
  covmean = np.real(covmean)  # drop round-off imaginary parts
  return float(np.sum((mu_a - mu_b)**2) + np.trace(cov_a + cov_b - 2.0 * covmean))


def evaluate_samples(net: FeatureNet, samples: np.ndarray, sample_labels: np.ndarray,
                     test: ImageData) -> dict:
  """Frechet distance to the test set (with the number of test images it is measured
  against; a ConfigWarning below MIN_FRECHET_TEST_IMAGES), and how often samples show
  the asked-for class."""
  if test.num_examples < MIN_FRECHET_TEST_IMAGES:
    warn(f"the Frechet distance is measured against {test.num_examples} test images; below "
         f"{MIN_FRECHET_TEST_IMAGES} it is mostly estimation noise (compare runs on the "
         "same split only, or give the data a larger test split)")
  features = jax.jit(net.features)
  logits = jax.jit(net)
  fd = frechet_distance(batched_apply(features, samples), batched_apply(features, test.images))
  class_accuracy = float(np.mean(batched_apply(logits, samples).argmax(-1) == sample_labels))
  test_accuracy = float(np.mean(batched_apply(logits, test.images).argmax(-1) == test.labels))
  return {"frechet_distance": fd, "frechet_test_images": test.num_examples,
          "class_accuracy": class_accuracy,
          "feature_net_test_accuracy": test_accuracy}
