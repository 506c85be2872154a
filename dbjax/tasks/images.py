"""Class-conditional image generation with DiT blocks (paper, Sec. 5.1).

A block is a whole denoiser: a DiT `num_layers / B` deep (dbjax.nets.dit) with its own
patch, sigma and label embeddings and its own head. The target space (images) is fixed,
so blocks share nothing and never communicate (the shared state is empty). End-to-end
training is the same task with B = 1 and all `num_layers` layers in that one block.

Loss (paper, Eq. 6): z = x + sigma eps with sigma from the block's interval,
w(sigma) |D(z; sigma, label) - x|^2, labels dropped to the null label at
model.label_dropout for classifier-free guidance. Sampling: Euler or Heun on the
probability-flow ODE, each step by the block owning its sigma. Evaluation: a sample grid
and the Frechet distance in a cached classifier's feature space (dbjax.eval.features).
"""
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
from flax import nnx

from dbjax import checks, edm, noise
from dbjax.config import check_field, num_trained_blocks, validate
from dbjax.data import images as image_data, latents
from dbjax.engine.state import make_optimizer
from dbjax.errors import ConfigError, DataError
from dbjax.nets.dit import DiT, DiTConfig
from dbjax.progress import progress_bar
from dbjax.sampling import euler_step, fixed_size_batches, stack_params
from dbjax.tasks.base import NoisePlan, RunData, Task, noise_plan, sampling_plan


# ------------------------------------------------------------------------ config

SOLVERS = ("euler", "heun")


def config_sections() -> dict:
  """This task's own config sections and their defaults (dbjax.config.default_config
  adds them to the fields every run has)."""
  return {"sample": ml_collections.ConfigDict(dict(
      num_steps=30, solver="euler",
      guidance_scale=2.0,    # classifier-free guidance; 1.0 = none
      grid_size=10,          # the PNG grid is grid_size x grid_size
      # "": one class per row of the grid; a class's name (a folder's subfolder) or
      # index: every image of the grid of that class.
      class_label="",
  ))}


def validate_config(config):
  """ConfigError naming the first bad field of this task's sections."""
  s = config.sample
  for field in ("num_steps", "grid_size"):
    check_field(isinstance(s[field], int) and s[field] >= 1, f"sample.{field}", s[field],
                "a positive integer")
  check_field(s.solver in SOLVERS, "sample.solver", s.solver, f"one of {SOLVERS}")
  check_field(s.guidance_scale >= 0, "sample.guidance_scale", s.guidance_scale,
              ">= 0 (1 means no guidance)")


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class ImageGeneration(Task):
  """B DiT blocks, each a class-conditional denoiser of its own noise interval."""
  dit: DiTConfig                 # the network of ONE block (num_layers / B deep)
  noise: NoisePlan
  label_dropout: float
  graphdef: nnx.GraphDef

  headline_metric = "frechet_distance"
  summary_metrics = ("frechet_distance", "class_accuracy")
  evaluate_flags = {"num_steps": "sample.num_steps", "solver": "sample.solver",
                    "guidance_scale": "sample.guidance_scale",
                    "num_samples": "eval.num_samples"}
  sample_flags = {"num_steps": "sample.num_steps", "solver": "sample.solver",
                  "guidance_scale": "sample.guidance_scale", "class": "sample.class_label"}

  @property
  def network_config(self) -> DiTConfig:
    """The config of one block's network."""
    return self.dit

  def new_network(self, key) -> DiT:
    """A freshly initialised network of one block."""
    return DiT(self.dit, rngs=nnx.Rngs(params=key))

  def network(self, params, shared_params=None) -> DiT:
    """The DiT of one block's params (images share nothing)."""
    del shared_params
    return nnx.merge(self.graphdef, params)

  def init_block_params(self, key):
    return nnx.state(self.new_network(key))

  def loss(self, params, shared_params, batch, key, interval):
    """Mean weighted denoising loss of one block on (images, labels) (paper, Eq. 6)."""
    del shared_params
    images, labels = batch
    key_sigma, key_noise, key_drop = jax.random.split(key, 3)
    size = images.shape[0]
    sigma = noise.sample_sigma(key_sigma, (size,), interval[0], interval[1],
                               self.noise.dist.p_mean, self.noise.dist.p_std)
    noisy = images + sigma[:, None, None, None] * jax.random.normal(key_noise, images.shape)
    # Classifier-free guidance: train on the null label for a fraction of examples.
    dropped = jax.random.bernoulli(key_drop, self.label_dropout, (size,))
    labels = jnp.where(dropped, self.dit.null_label, labels)
    network = self.network(params)
    denoised = edm.denoise(lambda x, c_noise: network(x, c_noise, labels), noisy, sigma,
                           self.noise.sigma_data)
    return jnp.mean(edm.weighted_l2_loss(denoised, images, sigma, self.noise.sigma_data)), {}

  def check_train_data(self, config, train_data):
    check_training_images(config, train_data)

  def write_run_files(self, workdir, train_data):
    image_data.write_class_names(workdir, train_data)

  def check_batch(self, batch):
    return check_image_batch(self.dit, batch)

  def example_batch(self, batch_size, rng=None):
    return example_images(self.dit, batch_size, rng)

  def sample(self, block_params, shared_params, key, inputs, num_steps, solver="euler",
             guidance_scale=1.0):
    """Images (N, H, W, C) for class labels `inputs` (N,); see `sample`. The ODE's end,
    unclipped (it overshoots [-1, 1] a little; `viewable` clips what is shown, the
    Frechet distance scores it as it is)."""
    del shared_params
    checks.check_sample_call(block_params, self.num_blocks, key, num_steps)
    checks.check_labels("labels", inputs, self.dit.num_classes)
    return sample(self, stack_params(block_params), key, jnp.asarray(inputs), num_steps,
                  solver, guidance_scale)

  def evaluate(self, config, workdir, states, shared, data, prefix=""):
    """Sample grid <workdir>/<prefix or "">samples.png and, if config.eval.enabled,
    Frechet distance metrics."""
    return generate_and_evaluate(self, config, workdir, states, data,
                                 grid_name=f"{prefix or ''}samples.png")

  def evaluation_name(self, config):
    s = config.sample
    return f"eval_{s.solver}_{s.num_steps}_cfg{s.guidance_scale:g}"

  def write_samples(self, config, workdir, states, shared, data, seed, path=None):
    """A grid of config.sample.grid_size^2 images, one class per row, as a PNG (default
    <workdir>/samples_<solver>_<steps>.png)."""
    from dbjax.eval import plots  # pylint: disable=g-import-not-at-top
    s = config.sample
    path = path or os.path.join(workdir, f"samples_{s.solver}_{s.num_steps}.png")
    grid_classes = grid_labels(config, getattr(data.train, "class_names", ()))
    images = sample_in_batches(self, stack_params([st.params for st in states]),
                               jax.random.key(seed), grid_classes,
                               s.num_steps, s.solver, s.guidance_scale, batch_size=s.grid_size**2,
                               progress=config.train.progress)
    plots.save_image_grid(viewable(data.train, images), path, rows=s.grid_size,
                          row_labels=grid_row_labels(config, data.train))
    return path


def build(config, layer=None) -> ImageGeneration:
  """The task of a validated generation config; layer: a user's layer factory in the
  place of the DiT's (dbjax.nets.dit.DiTConfig.layer, dbjax.wrap)."""
  m, data = config.model, config.data
  num_blocks = num_trained_blocks(config)
  dit = DiTConfig(image_size=data.image_size, channels=data.channels,
                  patch_size=m.patch_size, hidden_size=m.hidden_size,
                  num_layers=m.num_layers // num_blocks, num_heads=m.num_heads,
                  mlp_ratio=m.mlp_ratio, num_classes=data.num_classes,
                  frequency_dim=m.frequency_dim, remat=m.remat, dtype=m.dtype,
                  attention=m.attention, layer=layer)
  plan, intervals = noise_plan(config, num_blocks)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiT(dit, rngs=nnx.Rngs(0))))
  return ImageGeneration(num_blocks=num_blocks, intervals=intervals,
                         optimizer=make_optimizer(config.train),
                         shared_optimizer=optax.set_to_zero(), dit=dit, noise=plan,
                         label_dropout=m.label_dropout, graphdef=graphdef)


# (image size, channels, classes) of the built-in sets, known without reading them.
BUILT_IN_SHAPES = {"digits": (8, 1, 10), "fashion_mnist": (28, 1, 10)}


def resolve(config):
  """config with the data's shape and classes, where no data needs to be read to know
  them (profiling, which trains nothing): the built-in sets' from BUILT_IN_SHAPES; the
  user's own (folder:, arrays:, latents:) read from the data; a tfds set's as its config
  gives them (reading it may need a download)."""
  if config.data.name.startswith("tfds:"):
    return config
  if config.data.name in BUILT_IN_SHAPES:
    config = config.copy_and_resolve_references()
    d = config.data
    d.image_size, d.channels, d.num_classes = BUILT_IN_SHAPES[config.data.name]
    return validate(config)
  return load_data(config)[0]


def with_data_shape(config, train: image_data.ImageData):
  """A copy of config with data.image_size, channels and num_classes those of the
  training data: a config names its data, not the data's shape."""
  config = config.copy_and_resolve_references()
  config.data.image_size, _, config.data.channels = train.images.shape[1:]
  config.data.num_classes = train.num_classes
  return validate(config)


def load_data(config, workdir=None):
  """(config with the data's shape and classes, RunData) of the config's image data set."""
  del workdir  # an image set reads the same wherever the run is
  d = config.data
  train, test = (image_data.load_images(d.name, split, d.data_dir, d.resize, d.cache_bytes,
                                         d.center_crop) for split in ("train", "test"))
  config = with_data_shape(config, train)
  check_training_images(config, train)
  return config, RunData(train, test)


def example_images(net: DiTConfig, batch_size: int, rng=None) -> tuple:
  """Images and labels of a network's shapes (its image_size, channels, num_classes):
  zeros, or random values from `rng`."""
  shape = (batch_size, net.image_size, net.image_size, net.channels)
  if rng is None:
    return jnp.zeros(shape, jnp.float32), jnp.zeros((batch_size,), jnp.int32)
  return (jnp.asarray(0.5 * rng.standard_normal(shape).astype(np.float32)),
          jnp.asarray(rng.integers(0, net.num_classes, batch_size).astype(np.int32)))


def check_image_batch(net, batch) -> tuple:
  """(images, labels), DataError unless they are the network's images and classes
  (dbjax.checks)."""
  images, labels = checks.check_batch("batch", batch, 2, "(images, labels)")
  checks.check_images("batch images", images, (net.image_size, net.image_size, net.channels))
  checks.check_labels("batch labels", labels, net.num_classes)
  return images, labels


def check_training_images(config, train):
  """DataError unless the training images fit config.data."""
  image_data.check_images(train.images, train.labels, config.data.image_size,
                          config.data.channels, config.data.num_classes, "training images")


# -------------------------------------------------------------------------- sampling


def guided_denoiser(task: ImageGeneration, params, labels, guidance_scale: float):
  """D(z; sigma) of one block, with classifier-free guidance when guidance_scale != 1:
  D = D_uncond + w (D_cond - D_uncond)."""
  network = task.network(params)
  sigma_data = task.noise.sigma_data
  if guidance_scale == 1.0:
    return lambda z, sigma: edm.denoise(lambda x, c: network(x, c, labels), z, sigma,
                                        sigma_data)
  null = jnp.full_like(labels, task.dit.null_label)

  def denoise(z, sigma):
    both = edm.denoise(lambda x, c: network(x, c, jnp.concatenate([labels, null])),
                       jnp.concatenate([z, z]), jnp.concatenate([sigma, sigma]), sigma_data)
    cond, uncond = jnp.split(both, 2)
    return uncond + guidance_scale * (cond - uncond)
  return denoise


@functools.partial(jax.jit, static_argnames=("task", "solver", "guidance_scale"))
def _integrate(task, stacked_params, z, labels, sigmas, blocks, solver, guidance_scale):
  batch = z.shape[0]

  def denoiser(block):
    params = jax.tree.map(lambda p: p[block], stacked_params)
    return guided_denoiser(task, params, labels, guidance_scale)

  def step(z, xs):
    sigma, sigma_next, block = xs
    denoise = denoiser(block)
    denoised = denoise(z, jnp.full((batch,), sigma))
    z_next = euler_step(z, denoised, sigma, sigma_next)
    if solver == "heun":
      slope = (z - denoised) / sigma
      slope_next = (z_next - denoise(z_next, jnp.full((batch,), sigma_next))) / sigma_next
      z_next = z + (sigma_next - sigma) * 0.5 * (slope + slope_next)
    return z_next, None

  z, _ = jax.lax.scan(step, z, (sigmas[:-1], sigmas[1:], blocks[:-1]))
  return denoiser(blocks[-1])(z, jnp.full((batch,), sigmas[-1]))


def sample(task: ImageGeneration, stacked_params, key: jax.Array, labels: jax.Array,
           num_steps: int, solver: str = "euler", guidance_scale: float = 1.0) -> jax.Array:
  """Generate one image per label, (N, H, W, C) in the data's range (about [-1, 1]).

  Deterministic Euler (or Heun, which adds the trapezoidal correction with a second
  evaluation at s_{i+1} by the same block, so one step never mixes blocks) on the
  probability-flow ODE from z ~ N(0, sigma_max^2) down the sampling grid, each step by the
  block that owns its sigma; a last D at sigma_min gives the output (docs/method.md,
  "Sampling"). stacked_params: `stack_params` of all blocks' params.
  """
  if solver not in SOLVERS:
    raise DataError(f"solver={solver!r}: expected one of {SOLVERS}")
  sigmas, blocks = sampling_plan(task.noise, num_steps)
  shape = (labels.shape[0], task.dit.image_size, task.dit.image_size, task.dit.channels)
  z = noise.pure_noise(key, shape, task.noise.dist)
  return _integrate(task, stacked_params, z, labels, jnp.asarray(sigmas, jnp.float32),
                    jnp.asarray(blocks, jnp.int32), solver, float(guidance_scale))


def sample_in_batches(task, stacked_params, key, labels, num_steps, solver="euler",
                      guidance_scale=1.0, batch_size=500, progress=False) -> np.ndarray:
  """`sample` over many labels in fixed-size batches (one compile), returned as numpy."""
  labels = np.asarray(labels, np.int32)
  padded = fixed_size_batches(labels, batch_size)
  out = [np.asarray(sample(task, stacked_params, jax.random.fold_in(key, i), jnp.asarray(b),
                           num_steps, solver, guidance_scale))
         for i, b in enumerate(progress_bar(padded, desc="sampling", disable=not progress,
                                            leave=False))]
  return np.concatenate(out)[:len(labels)]


# ------------------------------------------------------------------------ evaluation


def class_index(config, class_names: tuple) -> int | None:
  """The class config.sample.class_label names (its name or index), None for "";
  ConfigError naming the label and the classes otherwise."""
  label, count = str(config.sample.class_label), config.data.num_classes
  if not label:
    return None
  if label in class_names:
    return class_names.index(label)
  if label.isdigit() and int(label) < count:
    return int(label)
  known = ", ".join(class_names) if class_names else f"indices 0 to {count - 1}"
  raise ConfigError(f"sample.class_label={label!r}: not a class of this run (its classes: "
                    f"{known})")


def grid_labels(config, class_names: tuple = ()) -> np.ndarray:
  """Labels of the sample grid: each row one class in turn, or every image of the class
  config.sample.class_label names."""
  n = config.sample.grid_size
  only = class_index(config, class_names)
  if only is not None:
    return np.full(n * n, only, np.int32)
  return np.repeat(np.arange(n) % config.data.num_classes, n).astype(np.int32)


def grid_row_labels(config, train: image_data.ImageData) -> list[str] | None:
  """The class name of each row of the sample grid, where the data names its classes."""
  if not train.class_names:
    return None
  rows = grid_labels(config, train.class_names)[::config.sample.grid_size]
  return [train.class_names[int(label)] for label in rows]


def viewable(train: image_data.ImageData, samples: np.ndarray) -> np.ndarray:
  """Samples as images in [-1, 1]: pixels clipped to it, latents decoded by their set's
  decoder, or, with no
  decoder, their first (up to three) channels, divided by 3 (about 3 standard deviations
  of unit-variance latents) and clipped to [-1, 1]."""
  info = train.latents
  if info is None:  # the ODE's end overshoots [-1, 1] a little; pixels stop there
    return np.clip(samples, -1, 1)
  if info.get("decoder"):
    return latents.decode(info, samples)
  return np.clip(samples[..., :3 if samples.shape[-1] >= 3 else 1] / 3, -1, 1)


def pixel_data(train: image_data.ImageData, test: image_data.ImageData,
               cache_bytes: int = image_data.CACHE_BYTES):
  """(name, train, test) of the images the Frechet distance compares in: the pixel data
  set latents were encoded from where their set has a decoder (so the figure is
  comparable with a pixel-space run's), read as it was read to be encoded (its data_dir,
  resize and center_crop), by rows where it is over cache_bytes, else the data as
  trained on."""
  info = train.latents
  if info is None or not info.get("decoder"):
    return None, train, test
  def read(split):
    return image_data.load_images(info["source"], split, info.get("data_dir", ""),
                                  info.get("resize", 0), cache_bytes,
                                  info.get("center_crop", False))
  return info["source"], read("train"), read("test")


def generate_and_evaluate(task, config, workdir: str, states, data: RunData,
                          grid_name: str = "samples.png") -> dict:
  """Sample grid PNG <workdir>/<grid_name> (latents decoded; rows named by class where the
  data names them) and, if config.eval.enabled, Frechet distance metrics: in pixel space
  for latents with a decoder, else in the space trained on."""
  from dbjax.eval import features, plots  # pylint: disable=g-import-not-at-top
  stacked = stack_params([s.params for s in states])
  key = jax.random.fold_in(jax.random.key(config.seed), 10**9)
  s = config.sample
  grid_classes = grid_labels(config, getattr(data.train, "class_names", ()))
  grid = sample_in_batches(task, stacked, key, grid_classes, s.num_steps, s.solver,
                           s.guidance_scale, batch_size=s.grid_size**2)
  plots.save_image_grid(viewable(data.train, grid), os.path.join(workdir, grid_name),
                        rows=s.grid_size, row_labels=grid_row_labels(config, data.train))
  results = {"sample_steps": s.num_steps, "solver": s.solver,
             "guidance_scale": s.guidance_scale}
  if not config.eval.enabled:
    return results
  source, train, test = pixel_data(data.train, data.test, config.data.cache_bytes)
  net = features.load_or_train_feature_net(
      source or config.data.name, train, config.eval.classifier_steps, config.eval.cache_dir,
      progress=config.train.progress)
  labels = np.arange(config.eval.num_samples, dtype=np.int32) % config.data.num_classes
  start = time.perf_counter()
  samples = sample_in_batches(task, stacked, jax.random.fold_in(key, 1), labels,
                              s.num_steps, s.solver, s.guidance_scale,
                              progress=config.train.progress)
  results["samples_per_second"] = len(labels) / (time.perf_counter() - start)
  if source is not None:
    samples = viewable(data.train, samples)
    results["frechet_distance_space"] = f"pixels of {source}, latents decoded"
  elif data.train.latents is not None:
    results["frechet_distance_space"] = "latents"
  results.update(features.evaluate_samples(net, samples, labels, test))
  return results
