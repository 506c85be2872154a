"""What the denoising chain does to a perfect model: every block the exact posterior denoiser.

The classifier and the autoregressive LM read their answer off the last call of an Euler
chain over an embedded target (sampling.embedding_chain). With exact blocks
(studies/exact_posteriors.py), the first call at sigma_max is already the exact
predictive distribution p(y | input), so anything the chain changes after it is the
chain's doing, not the blocks' training. Two tables:

- classification: accuracy of the first call (the Bayes classifier) and of the chain's
  last call, for posteriors calibrated at several accuracies (unit-norm labels), and of
  the last call when the blocks are exact for training tokens built from a random class
  at a rate of 0.2 or 0.5 (classifier.token_corruption);
- language: cross-entropy (nats) of the first call, of one fixed-seed chain's last call,
  and of the mixture of K chains' last calls (sampling.mixture_log_probs), against the
  entropy.

  python -m studies.exact_chain --out=studies/results/exact_chain.json
"""
import json

import jax
import jax.numpy as jnp
from absl import flags

from dbjax import sampling
from experiments.cli import print_table, run
from studies.exact_posteriors import exact_posterior_chain

_OUT = flags.DEFINE_string("out", None, "JSON file for both tables")
_ROWS = flags.DEFINE_integer("rows", 4000, "inputs (posteriors) per setting")


def random_unit_rows(key, count: int, width: int) -> jax.Array:
  return sampling.unit_rows(jax.random.normal(key, (count, width)))


def accuracy(logits, labels) -> float:
  return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def classification_rows(num_rows: int) -> list[dict]:
  """10 classes in 128 dimensions, B = N = 3 (the Fashion-MNIST classifier's setting)."""
  embedding = random_unit_rows(jax.random.key(1), 10, 128)
  rows = []
  for sharpness in (4.0, 5.5, 7.0, 10.0):
    log_posterior = jax.nn.log_softmax(
        sharpness * jax.random.normal(jax.random.key(2), (num_rows, 10)))
    labels = jax.random.categorical(jax.random.key(3), log_posterior)  # calibrated
    row = {"bayes_accuracy": accuracy(log_posterior, labels)}
    for bridge in ("argmax", "expected"):
      logits = exact_posterior_chain(log_posterior, embedding, 3, 3, bridge,
                                              jax.random.key(4))
      row[f"first_call_{bridge}"] = accuracy(logits[0], labels)
      row[f"chain_{bridge}"] = accuracy(logits[-1], labels)
    for rate in (0.2, 0.5):  # blocks exact for corrupted training tokens
      logits = exact_posterior_chain(log_posterior, embedding, 3, 3, "argmax",
                                              jax.random.key(4), token_corruption=rate)
      row[f"chain_argmax_corruption_{rate}"] = accuracy(logits[-1], labels)
    rows.append(row)
  return rows


def cross_entropy(log_probs, log_prior) -> float:
  """E_{y ~ prior} -log q(y), exactly (no labels drawn), averaged over rows."""
  return float(-jnp.mean(jnp.sum(jnp.exp(log_prior) * log_probs, -1)))


def language_rows(num_rows: int, num_chains=(16, 256)) -> list[dict]:
  """84 characters in 128 dimensions, B = N = 4 (the Shakespeare LM's setting); one
  predictive distribution per row, sharp enough to have about end-to-end's entropy."""
  embedding = random_unit_rows(jax.random.key(1), 84, 128)
  rows = []
  for sharpness in (2.0, 3.0):
    log_prior = jax.nn.log_softmax(
        sharpness * jax.random.normal(jax.random.key(2), (num_rows // 16, 84)))
    row = {"entropy": cross_entropy(log_prior, log_prior)}
    for bridge in ("argmax", "expected"):
      def first_and_last(key, bridge=bridge):
        logits = exact_posterior_chain(log_prior, embedding, 4, 4, bridge, key)
        return jax.nn.log_softmax(logits[jnp.array([0, -1])])

      keys = jax.random.split(jax.random.key(4), max(num_chains))
      chains = jax.lax.map(jax.jit(first_and_last), keys)  # (K, 2, N, V)
      row[f"first_call_{bridge}"] = cross_entropy(chains[0, 0], log_prior)
      row[f"one_chain_{bridge}"] = cross_entropy(chains[0, 1], log_prior)
      for k in num_chains:
        row[f"mixture_{k}_{bridge}"] = cross_entropy(
            sampling.mixture_log_probs(chains[:k, 1]), log_prior)
    rows.append(row)
  return rows


def main(argv):
  del argv
  tables = {"classification": classification_rows(_ROWS.value),
            "language": language_rows(_ROWS.value)}
  for name, rows in tables.items():
    print(f"\n{name} (every block exact)")
    print_table(rows, list(rows[0]))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(tables, f, indent=2)


if __name__ == "__main__":
  run(main)
