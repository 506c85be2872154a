r"""Train the small convolutional VAE (dbjax.nets.autoencoder) whose latents a latent run
trains on, and report its reconstruction error on the test split.

  python -m experiments.train_autoencoder --data=fashion_mnist --workdir=runs/vae_fashion_mnist
  python -m experiments.train_autoencoder --data=digits --workdir=runs/vae_digits --num_steps=500

Writes <workdir>/autoencoder.json (its config, the test reconstruction error and PSNR),
<workdir>/params/ (orbax) and <workdir>/reconstructions.png (test images above their
reconstructions). A --workdir that holds a trained autoencoder is refused unless
--overwrite is given: latents encoded by it record a hash of its weights, and refuse to
decode with others. Then:

  python -m experiments.encode_latents --data=fashion_mnist \
      --encoder=dbjax.nets.autoencoder:encode --checkpoint=runs/vae_fashion_mnist \
      --decoder=dbjax.nets.autoencoder:decode --out=runs/latents_fashion_mnist
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from dbjax.data import batch_indices, load_images
from dbjax.errors import ConfigError
from dbjax.eval import plots
from dbjax.nets import autoencoder
from dbjax.progress import progress_bar
from experiments.cli import print_table, run

_DATA = flags.DEFINE_string("data", "fashion_mnist", "any image data set dbjax reads "
                            "(config.data.name)")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "config.data.data_dir of --data")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the trained autoencoder is written")
_STEPS = flags.DEFINE_integer("num_steps", 3000, "optimizer steps")
_BATCH = flags.DEFINE_integer("batch_size", 128, "images per step")
_LATENT = flags.DEFINE_integer("latent_channels", 4, "channels of the latent")
_WIDTH = flags.DEFINE_integer("width", 64, "channels of the inner convolutions")
_KL = flags.DEFINE_float("kl_weight", 1e-3, "weight of the KL term per latent element")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "Adam's peak learning rate (cosine decay)")
_SEED = flags.DEFINE_integer("seed", 0, "initialisation and batch order")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an autoencoder already trained "
                               "in --workdir (latent sets encoded by it then refuse to "
                               "decode until encoded again)")
flags.mark_flags_as_required(["workdir"])


def reconstruction_error(model, images: np.ndarray, batch_size: int = 1000) -> dict:
  """Mean squared error per pixel (images in [-1, 1]) of the posterior mean's
  reconstruction, and the PSNR it makes (peak-to-peak 2)."""
  squared = []
  for start in range(0, len(images), batch_size):
    batch = jnp.asarray(images[start:start + batch_size])
    reconstructed = autoencoder.decode_with(model, autoencoder.encode_with(model, batch))
    squared.append(np.asarray(jnp.mean(jnp.square(reconstructed - batch), axis=(1, 2, 3))))
  mse = float(np.mean(np.concatenate(squared)))
  return {"test_reconstruction_mse": mse, "test_psnr_db": float(10 * np.log10(4.0 / mse))}


def main(argv):
  del argv
  for name, value in (("num_steps", _STEPS.value), ("batch_size", _BATCH.value),
                      ("latent_channels", _LATENT.value)):
    if value < 1:
      raise ConfigError(f"--{name}={value}: expected a positive integer")
  finished = os.path.join(_WORKDIR.value, autoencoder.CONFIG_FILE)
  if os.path.exists(finished) and not _OVERWRITE.value:
    raise ConfigError(f"--workdir={_WORKDIR.value}: holds a trained autoencoder already "
                      f"({finished}); latent sets encoded by it would no longer decode. "
                      "Choose another --workdir, or pass --overwrite")
  train, test = (load_images(_DATA.value, split, _DATA_DIR.value) for split in ("train", "test"))
  if train.latents is not None:
    raise ConfigError(f"--data={_DATA.value}: holds latents already; give the images")
  cfg = autoencoder.AutoencoderConfig(train.images.shape[-1], _LATENT.value, _WIDTH.value)
  model = autoencoder.Autoencoder(cfg, rngs=nnx.Rngs(_SEED.value))
  schedule = optax.warmup_cosine_decay_schedule(0.0, _LR.value, min(100, _STEPS.value // 10),
                                                _STEPS.value, _LR.value / 10)
  optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, images, key):
    (_, metrics), grads = nnx.value_and_grad(autoencoder.loss, has_aux=True)(
        model, images, key, _KL.value)
    optimizer.update(model, grads)
    return metrics

  start = time.perf_counter()
  bar = progress_bar(range(_STEPS.value), desc="training the autoencoder", unit="step",
                     first_compiles=True)
  for i in bar:
    index = batch_indices(_SEED.value, i, train.num_examples, _BATCH.value)
    metrics = step(model, optimizer, jnp.asarray(train.images[index]),
                   jax.random.fold_in(jax.random.key(_SEED.value), i))
    if i % 100 == 0:
      bar.set_postfix(mse=f"{float(metrics['reconstruction_mse']):.4f}")
  shown = jnp.asarray(test.images[:8])
  latents = autoencoder.encode_with(model, shown)
  summary = {"data": _DATA.value, "num_steps": _STEPS.value, "batch_size": _BATCH.value,
             "kl_weight": _KL.value, "latent_shape": list(latents.shape[1:]),
             "train_seconds": time.perf_counter() - start,
             **reconstruction_error(model, test.images)}
  autoencoder.save(_WORKDIR.value, model, cfg, summary)
  reconstructed = np.asarray(autoencoder.decode_with(model, latents))
  plots.save_image_grid(np.concatenate([shown, reconstructed]),
                        os.path.join(_WORKDIR.value, "reconstructions.png"), rows=2)
  print_table([summary], ["data", "num_steps", "latent_shape", "test_reconstruction_mse",
                          "test_psnr_db", "train_seconds"])
  print(f"wrote {_WORKDIR.value}/{autoencoder.CONFIG_FILE}, params/ and reconstructions.png")


if __name__ == "__main__":
  run(main)
