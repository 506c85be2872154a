"""Evaluate a trained run.

Generation: Frechet distance to the test set in a cached classifier's feature space, and
class accuracy of the samples; writes eval_<solver>_<steps>_cfg<scale>.json and a sample
grid .png beside it.

  python -m experiments.evaluate --workdir=runs/digits --num_steps=50 --solver=heun

Classification: test accuracy after the B-step chain and after --num_steps steps (any
N, no retraining) and with either Euler bridge; writes eval_steps_<N>_<bridge>.json with
its confusion.png and accuracy_vs_steps.png beside it.

  python -m experiments.evaluate --workdir=runs/classify_digits --num_steps=12 \
      --bridge=expected

Language: test bits per character (autoregressive: after --num_steps denoising calls
per token, after the first call, and with --mixture_chains=K the mixture of K chains;
MD4: the ELBO) and generated text; writes eval_steps_<N>_<bridge>.json and
eval_steps_<N>_<bridge>_samples.txt.

  python -m experiments.evaluate --workdir=runs/shakespeare --num_steps=8
  python -m experiments.evaluate --workdir=runs/shakespeare --mixture_chains=256 \
      --max_test_examples=16 --bridge=expected
"""
import json
import os

from absl import flags

from dbjax import classify, language, text
from dbjax.train import (classify_and_evaluate, evaluate_language, generate_and_evaluate,
                         restore_run)
from experiments.cli import run, print_table

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained run's directory")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "sampling steps, or a classifier's "
                                  "denoising steps (default: the run's)")
_SOLVER = flags.DEFINE_enum("solver", None, ["euler", "heun"], "ODE solver (default: the run's)")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "classifier-free guidance; 1 = none")
_BRIDGE = flags.DEFINE_enum("bridge", None, ["argmax", "expected"],
                            "classifier, autoregressive LM: the Euler bridge's estimate "
                            "(default: the run's)")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "generated images (default: the run's)")
_MIXTURE_CHAINS = flags.DEFINE_integer(
    "mixture_chains", None, "autoregressive LM: chains per character whose mixture "
    "estimates the chain's likelihood (language.mixture_chains; default: the run's)")
_MAX_TEST = flags.DEFINE_integer("max_test_examples", None,
                                 "language: test sequences (default: the run's)")
flags.mark_flags_as_required(["workdir"])


def evaluate_classifier(config, model, states, shared):
  if _NUM_STEPS.value:
    config.classifier.inference_steps = (_NUM_STEPS.value,)
  if _BRIDGE.value:  # an inference-time choice: the trained states serve either bridge
    config.classifier.bridge = _BRIDGE.value
    model = classify.build(config)
  name = f"eval_steps_{_NUM_STEPS.value or model.num_blocks}_{config.classifier.bridge}"
  results = classify_and_evaluate(config, _WORKDIR.value, model, states, shared,
                                  prefix=f"{name}_")
  print_table([{k: v for k, v in results.items() if k != "per_class_accuracy"}],
              ["accuracy", "inference_steps", "test_examples"])
  if "accuracy_by_steps" in results:
    print_table([{"steps": n, "accuracy": a} for n, a in results["accuracy_by_steps"].items()],
                ["steps", "accuracy"])
  with open(os.path.join(_WORKDIR.value, f"{name}.json"), "w") as f:
    json.dump(results, f, indent=2)


def evaluate_text(config, model, states, shared):
  if _NUM_STEPS.value:
    config.language.inference_steps = _NUM_STEPS.value
  if _MIXTURE_CHAINS.value is not None:
    config.language.mixture_chains = _MIXTURE_CHAINS.value
  if _MAX_TEST.value:
    config.eval.max_test_examples = _MAX_TEST.value
  if _BRIDGE.value:
    config.language.bridge = _BRIDGE.value
    model = language.build(config)
  _, test_data = language.load_data(config, text.Vocabulary.load(
      os.path.join(_WORKDIR.value, text.VOCABULARY_FILE)))
  name = (f"eval_steps_{config.language.inference_steps or model.num_blocks}"
          f"_{config.language.bridge}")
  results = evaluate_language(config, _WORKDIR.value, model, states, shared, test_data,
                              prefix=f"{name}_")
  print_table([results], list(results))
  with open(os.path.join(_WORKDIR.value, f"{name}.json"), "w") as f:
    json.dump(results, f, indent=2)


def main(argv):
  del argv
  config, model, states, shared = restore_run(_WORKDIR.value)
  if config.task == "classification":
    return evaluate_classifier(config, model, states, shared)
  if config.task == "language":
    return evaluate_text(config, model, states, shared)
  if _NUM_STEPS.value:
    config.sample.num_steps = _NUM_STEPS.value
  if _SOLVER.value:
    config.sample.solver = _SOLVER.value
  if _GUIDANCE.value is not None:
    config.sample.guidance_scale = _GUIDANCE.value
  if _NUM_SAMPLES.value:
    config.eval.num_samples = _NUM_SAMPLES.value
  config.eval.enabled = True
  name = (f"eval_{config.sample.solver}_{config.sample.num_steps}"
          f"_cfg{config.sample.guidance_scale:g}")
  results = generate_and_evaluate(config, _WORKDIR.value, model, states,
                                  grid_name=f"{name}.png")
  print_table([results], list(results))
  with open(os.path.join(_WORKDIR.value, f"{name}.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  run(main)
