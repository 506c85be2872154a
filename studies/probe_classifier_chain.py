"""Where a trained DiffusionBlocks classifier's chain gains or loses accuracy.

For each block b, called at its sigma of the N = B chain, the test accuracy of its
argmax when the noisy label token it reads is the embedding of
- the true label (what training showed it),
- block 0's guess (what the chain shows it, up to the chain's Euler noise),
- a random label (the image against a misleading token),
each plus sigma_b * noise; and the token alone (the nearest label row to it). Then the
chain itself after N = 1 .. B calls. Writes one JSON.

  python -m studies.probe_classifier_chain --workdir=runs/classify_fashion_mnist \
      --out=studies/results/probe_classifier_chain_fashion_mnist.json
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dbjax import data as data_lib, edm
from dbjax.tasks import classification
from dbjax.tasks.base import sampling_plan
from dbjax.train import restore_run
from experiments.cli import print_table, run

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained DiffusionBlocks classifier run")
_OUT = flags.DEFINE_string("out", None, "JSON file for the table")
_COUNT = flags.DEFINE_integer("test_examples", 2000, "test images used")
_REPEATS = flags.DEFINE_integer("repeats", 3, "noise draws averaged per cell")
flags.mark_flags_as_required(["workdir"])


def accuracy(logits, labels) -> float:
  return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == labels))


def main(argv):
  del argv
  config, model, states, shared = restore_run(_WORKDIR.value)
  if not isinstance(model, classification.LabelDenoising):
    raise SystemExit(f"{_WORKDIR.value!r} is not a DiffusionBlocks classifier run")
  test = data_lib.load_images(config.data.name, "test", config.data.data_dir)
  images = jnp.asarray(test.images[:_COUNT.value], jnp.float32)
  labels = np.asarray(test.labels[:_COUNT.value])
  embedding = classification.label_embedding(shared.params)
  sigmas, _ = sampling_plan(model.noise, model.num_blocks)

  @jax.jit
  def logits_at(params, clean_tokens, sigma, key):
    noisy = clean_tokens + sigma * jax.random.normal(key, clean_tokens.shape)
    c = edm.preconditioning(sigma, model.noise.sigma_data)
    net = model.network(params, shared.params)
    return net(images, c.c_in * noisy, jnp.full((images.shape[0],), c.c_noise))

  key = jax.random.key(config.seed)
  first_guess = np.asarray(jnp.argmax(logits_at(
      states[0].params, jnp.zeros_like(embedding[labels]), float(sigmas[0]), key), -1))
  random_labels = np.random.default_rng(0).integers(0, config.data.num_classes, len(labels))
  rows = []
  for b in range(model.num_blocks):
    sigma = float(sigmas[b])
    row = {"block": b, "sigma": sigma}
    for name, source in [("true_label", labels), ("block_0_guess", first_guess),
                         ("random_label", random_labels)]:
      row[name] = float(np.mean([
          accuracy(logits_at(states[b].params, embedding[source], sigma,
                             jax.random.fold_in(key, 100 * b + k)), labels)
          for k in range(_REPEATS.value)]))
    noisy = embedding[labels] + sigma * jax.random.normal(key, embedding[labels].shape)
    row["token_alone"] = accuracy(noisy @ embedding.T, labels)
    rows.append(row)
  print_table(rows, list(rows[0]))
  params = [s.params for s in states]
  chain = {n: float(np.mean(classification.predict(model, params, shared.params, np.asarray(images),
                                             n, seed=config.seed) == labels))
           for n in range(1, model.num_blocks + 1)}
  print("accuracy after N calls:", chain)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"workdir": _WORKDIR.value, "test_examples": len(labels), "blocks": rows,
                 "block_0_accuracy": float(np.mean(first_guess == labels)),
                 "accuracy_by_steps": chain}, f, indent=2)


if __name__ == "__main__":
  run(main)
