r"""Probe: the single-stream autoregressive form (dbjax.wrap, target="token") on the
shakespeare_ar setting, beside the built-in [clean; noisy] form's recorded results.

The layers are the DiT's own adaLN-Zero layers (dbjax.nets.dit.DiTLayer) with a causal mask,
wrapped as a user layer; 12 layers, B = 4, the config's optimizer, batch, budget and
iteration order (the driver's block_for_step and batch_indices), so only the input form
differs from `experiments.train --config=experiments/configs/shakespeare_ar.py`.

  python -m studies.probe_single_stream --out=studies/results/probe_single_stream_shakespeare.json

Prints a table: the block step's compiled memory against the built-in end-to-end causal
LM's and block's (same batch), and test bits per character of the first call (block 0 at
sigma_max, where z carries nothing: the model's prediction from the clean prefix alone)
and after the B-call chain.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

import dbjax
from dbjax import data, sampling, tasks
from dbjax.config import total_iterations
from dbjax.engine import profiling
from dbjax.engine.driver import block_for_step, step_key
from dbjax.engine.state import make_optimizer
from dbjax.nets.dit import DiTLayer
from dbjax.nets.lm import LMConfig
from dbjax.progress import progress_bar
from dbjax.tasks.language import single_stream
from experiments.cli import config_help, method_variant, print_table, run, write_json

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/shakespeare_ar.py",
                                          config_help(), lock_config=True)
_OUT = flags.DEFINE_string("out", "studies/results/probe_single_stream_shakespeare.json",
                           "JSON output")


def causal_dit_layer(config):
  """make_layer: the DiT's adaLN-Zero layer under a causal mask, as a user layer."""
  layer_config = LMConfig(hidden_size=config.model.hidden_size,
                          num_heads=config.model.num_heads, mlp_ratio=config.model.mlp_ratio)

  class CausalDiTLayer(nnx.Module):
    def __init__(self, rngs):
      self.layer = DiTLayer(layer_config, rngs=rngs)

    def __call__(self, x, cond):
      return self.layer(x, cond, mask=jnp.tri(x.shape[1], dtype=bool))[0]
  return CausalDiTLayer


def test_bits(db, block_params, tokens, seed=0, batch_size=32) -> dict:
  """Test bits per character of the first call (block 0 at sigma_max: the prediction
  from the clean prefix alone) and after the B-call chain, teacher-forced, one exact
  chain per position (dbjax.tasks.language.single_stream.chain_nats)."""
  stacked = sampling.stack_params(block_params)
  embedding = db.target_embedding
  totals = np.zeros(2)
  for i in progress_bar(range(0, len(tokens), batch_size), desc="chain bits per character"):
    totals += np.array(single_stream.chain_nats(
        db.task, stacked, embedding, jnp.asarray(tokens[i:i + batch_size]),
        jax.random.key(seed + i), db.num_blocks))
  first, chain = totals / tokens.size / np.log(2)
  return {"first_call_bits_per_character": float(first),
          "chain_bits_per_character": float(chain)}


def main(argv):
  del argv
  config = _CONFIG.value
  config, (train_data, test_data) = tasks.load_data(config)
  m, d, t = config.model, config.diffusion, config.train
  db = dbjax.wrap(causal_dit_layer(config), num_layers=m.num_layers, hidden_size=m.hidden_size,
                  num_blocks=d.num_blocks, target="token", gamma=d.overlap_gamma,
                  optimizer=make_optimizer(t), vocab_size=config.data.vocab_size,
                  seq_len=config.language.seq_len, seed=config.seed)
  states = db.init(jax.random.key(config.seed))
  step = jax.jit(db.train_step, donate_argnums=0)
  example = (jnp.zeros((t.batch_size, config.language.seq_len), jnp.int32),)
  memory = profiling.compiled_memory(
      step.lower(states[0], example, jax.random.key(0), 0).compile())
  start = time.perf_counter()
  for i in progress_bar(range(total_iterations(config)), desc="single-stream"):
    b = block_for_step(config.seed, i, d.num_blocks)
    rows = data.batch_indices(config.seed, i, train_data.num_examples, t.batch_size)
    states[b], _ = step(states[b], train_data.batch(rows), step_key(config.seed, i, b), b)
  seconds = time.perf_counter() - start
  tokens = test_data.tokens[:config.eval.max_test_examples or None]
  bits = test_bits(db, [state.params for state in states], tokens)
  ids = db.sample([s.params for s in states], jax.random.key(0),
                  train_data.vocabulary.encode(config.language.prompt),
                  num_samples=1, temperature=0.8, top_p=0.9)
  built_in = {method: profiling.train_step_memory(
      method_variant(config, method)[1], t.batch_size)["step_bytes"]
      for method in ("end_to_end", "diffusion_blocks")}
  summary = {
      "iterations": total_iterations(config), "train_seconds": seconds,
      **bits, "test_characters": int(tokens.size),
      "step_bytes": memory["step_bytes"],
      "built_in_end_to_end_step_bytes": built_in["end_to_end"],
      "built_in_two_stream_step_bytes": built_in["diffusion_blocks"],
      "memory_ratio_vs_end_to_end": built_in["end_to_end"] / memory["step_bytes"],
      "sample": train_data.vocabulary.decode(ids[0])}
  print_table([{"form": "single-stream (wrap)", "step MiB": memory["step_bytes"] / 2**20,
                "ratio e2e / block": summary["memory_ratio_vs_end_to_end"],
                "first-call BPC": bits["first_call_bits_per_character"],
                "chain BPC": bits["chain_bits_per_character"]},
               {"form": "built-in [clean; noisy]",
                "step MiB": built_in["diffusion_blocks"] / 2**20,
                "ratio e2e / block": built_in["end_to_end"] / built_in["diffusion_blocks"]},
               {"form": "built-in end-to-end", "step MiB": built_in["end_to_end"] / 2**20}],
              ["form", "step MiB", "ratio e2e / block", "first-call BPC", "chain BPC"])
  print(summary["sample"])
  write_json(_OUT.value, summary)


if __name__ == "__main__":
  run(main)
