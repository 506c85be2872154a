"""Evaluate a trained run with other inference settings, without retraining; writes
<workdir>/<name>.json and the task's pictures or texts beside it, <name> naming the
settings (the task's evaluation_name).

Generation: Frechet distance to the test set in a cached classifier's feature space, and
class accuracy of the samples; writes eval_<solver>_<steps>_cfg<scale>.json and a sample
grid .png beside it.

  python -m experiments.evaluate --workdir=runs/digits --num_steps=50 --solver=heun

Classification: test accuracy after the B-step chain and after --num_steps steps (any
N) and with either Euler bridge; writes eval_steps_<N>_<bridge>.json with its
confusion.png and accuracy_vs_steps.png beside it.

  python -m experiments.evaluate --workdir=runs/classify_digits --num_steps=12 \
      --bridge=expected

Language: test bits per character (autoregressive: the first call's, and after
--num_steps denoising calls per token with a fixed seed, and with --mixture_chains=K the
mixture of K chains; MD4: the ELBO) and generated text; writes eval_steps_<N>[_<bridge>].json
and its _samples.txt.

  python -m experiments.evaluate --workdir=runs/shakespeare --num_steps=8
  python -m experiments.evaluate --workdir=runs/shakespeare --mixture_chains=256 \
      --max_test_examples=16 --bridge=expected

Recurrent depth: test bits per character after --num_steps=K iterations alone (default:
the run's curve) and, for DiffusionBlocks, the mixture of --mixture_chains chains with
either --bridge; writes eval_iterations_<K>[_chains<n>_<bridge>].json, its plot and its
_samples.txt.

  python -m experiments.evaluate --workdir=runs/recurrent --num_steps=8 --mixture_chains=256 \
      --max_test_examples=16

A flag that does not apply to the run's task is refused in one line listing those that do.
"""
import json
import os

from absl import flags

from dbjax import tasks
from dbjax.train import load_run_data, restore_run
from experiments.cli import print_table, run, set_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained run's directory")
_FLAGS = {
    "num_steps": flags.DEFINE_integer("num_steps", None, "sampling steps, a classifier's or "
                                      "an LM's denoising calls, a recurrent LM's iterations "
                                      "(default: the run's)"),
    "solver": flags.DEFINE_enum("solver", None, ["euler", "heun"],
                                "ODE solver (default: the run's)"),
    "guidance_scale": flags.DEFINE_float("guidance_scale", None,
                                         "classifier-free guidance; 1 = none"),
    "bridge": flags.DEFINE_enum("bridge", None, ["argmax", "expected"],
                                "classifier, autoregressive LM, recurrent depth: the Euler "
                                "bridge's estimate (default: the run's)"),
    "num_samples": flags.DEFINE_integer("num_samples", None,
                                        "generated images (default: the run's)"),
    "mixture_chains": flags.DEFINE_integer(
        "mixture_chains", None, "autoregressive LM, recurrent depth: chains per character "
        "whose mixture estimates the chain's likelihood (language.mixture_chains, "
        "recurrent.mixture_chains; default: the run's)"),
    "max_test_examples": flags.DEFINE_integer("max_test_examples", None,
                                              "test examples (default: the run's)"),
}
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  config, task, states, shared = restore_run(_WORKDIR.value)
  config = set_flags(config, task, task.evaluate_flags,
                     {name: flag.value for name, flag in _FLAGS.items()},
                     "experiments.evaluate")
  config.eval.enabled = True
  task = tasks.build(config)  # inference-time fields (a bridge) may have changed
  config, data = load_run_data(config, _WORKDIR.value)
  name = task.evaluation_name(config)
  results = task.evaluate(config, _WORKDIR.value, states, shared, data, prefix=f"{name}_")
  print_table([{k: v for k, v in results.items() if not isinstance(v, (dict, list))}],
              [k for k, v in results.items() if not isinstance(v, (dict, list))])
  for key, value in results.items():
    if isinstance(value, dict):
      print_table([{"steps": n, key: a} for n, a in value.items()], ["steps", key])
  with open(os.path.join(_WORKDIR.value, f"{name}.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  run(main)
