"""How a trained recurrent-depth denoiser's K-step chain scores as a sampler, against the
number of chains whose mixture estimates it and the Euler bridge.

The K curve of docs/recurrent.md scores, at each K, the mixture of a few chains' last
calls (dbjax.sampling.mixture_log_probs). With K >= 2 each last call runs below sigma_max,
near-certain of the token its chain ends on, so a mixture of few chains errs high (Jensen)
and falls as chains are added; what it falls to is the chain's own likelihood as a
sampler. This prints test bits per character for every (bridge, chains, K) in the grid,
scored as the run's K curve is (dbjax.tasks.recurrent.bits_by_iterations: the same test
sequences and chain keys in every cell), writes them to one JSON and plots them.

  python -m studies.probe_recurrent_chains --workdir=runs/recurrent_top_800 \
      --chains=16,64,256 --iterations=1,2,4,8 --out=studies/results/probe_recurrent_chains.json
"""
import dataclasses
import os

import numpy as np
from absl import flags

from dbjax.eval import plots
from dbjax.progress import progress_bar
from dbjax.tasks import recurrent
from dbjax.train import load_run_data, restore_run
from experiments.cli import print_table, run, write_json

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained DiffusionBlocks recurrent-depth run")
_CHAINS = flags.DEFINE_list("chains", ["16", "64", "256"], "mixture sizes")
_ITERATIONS = flags.DEFINE_list("iterations", ["1", "2", "4", "8"], "chain lengths K")
_BRIDGES = flags.DEFINE_list("bridges", ["argmax", "expected"], "Euler bridges")
_COUNT = flags.DEFINE_integer("test_examples", 16, "test sequences")
_OUT = flags.DEFINE_string("out", None, "JSON file for the table (and a .png beside it)")
flags.mark_flags_as_required(["workdir"])
for _name in ("chains", "iterations"):
  flags.register_validator(_name, lambda values: bool(values) and all(
      v.isdigit() and int(v) >= 1 for v in values), "give positive integers, e.g. 1,2,4")
flags.register_validator("bridges", lambda values: bool(values) and set(values) <= {
    "argmax", "expected"}, "allowed: argmax, expected")


def main(argv):
  del argv
  chains, iterations = list(map(int, _CHAINS.value)), list(map(int, _ITERATIONS.value))
  config, task, states, shared = restore_run(_WORKDIR.value)
  if not isinstance(task, recurrent.RecurrentDenoiser):
    raise SystemExit(f"{_WORKDIR.value!r} is not a DiffusionBlocks recurrent-depth run "
                     f"(its task is {type(task).__name__})")
  config, data = load_run_data(config, _WORKDIR.value)
  tokens = np.asarray(data.test.tokens[:_COUNT.value], np.int32)
  rows = []
  for bridge, num_chains in progress_bar([(b, n) for b in _BRIDGES.value for n in chains],
                                         desc="bridge, chains"):
    scored = dataclasses.replace(task, bridge=bridge, mixture_chains=num_chains,
                                 inference_iterations=tuple(iterations))
    curve = recurrent.bits_by_iterations(scored, states, shared, tokens, config.seed)
    rows += [{"bridge": bridge, "chains": num_chains, "K": k, "bits_per_character": bits}
             for k, bits in curve.items()]
  print_table(rows, list(rows[0]))
  if _OUT.value:
    write_json(_OUT.value, {"workdir": _WORKDIR.value, "test_sequences": len(tokens),
                            "test_characters": int(tokens.size), "rows": rows})
    lines = {}
    for r in rows:
      lines.setdefault(f"{r['bridge']}, {r['chains']} chains", {})[r["K"]] = (
          r["bits_per_character"])
    plots.save_metric_lines(lines, os.path.splitext(_OUT.value)[0] + ".png",
                            "inference iterations K", "test bits per character",
                            title="the K-step chain's mixture")


if __name__ == "__main__":
  run(main)
