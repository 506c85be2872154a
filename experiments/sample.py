r"""Sample from a trained run: any solver, number of steps and guidance scale; or, for a
language run, text with any prompt, temperature and top-p (printed, and written to
<workdir>/generated_<seed>.txt or --out).

  python -m experiments.sample --workdir=runs/digits --num_steps=50 --solver=heun \
      --guidance_scale=2.0 --out=runs/digits/samples_heun.png
  python -m experiments.sample --workdir=runs/shakespeare --prompt="ROMEO." \
      --temperature=0.8 --top_p=0.9 --num_samples=4
"""
import os

import jax
from absl import flags

from dbjax import language, plots, sampling, text
from dbjax.train import grid_labels, restore_run, write_samples
from dbjax.errors import ConfigError
from experiments.cli import run

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained run's directory")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "sampling steps; text: denoising calls "
                                  "per token, or MD4 unmasking steps (default: the run's)")
_SOLVER = flags.DEFINE_enum("solver", None, ["euler", "heun"], "ODE solver (default: the run's)")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "classifier-free guidance; 1 = none")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_OUT = flags.DEFINE_string("out", None, "PNG path (default: <workdir>/samples_<solver>_<n>.png)"
                           " or, for text, .txt path")
_PROMPT = flags.DEFINE_string("prompt", None, "text: generated text starts with it")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "text: 0 = greedy (default: the run's)")
_TOP_P = flags.DEFINE_float("top_p", None, "text: nucleus mass, 1 = all (default: 1 if "
                            "--temperature is given, else the run's)")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "text: how many (default: the run's)")
flags.mark_flags_as_required(["workdir"])


def sample_text(config, model, states, shared):
  lang = config.language
  vocabulary = text.Vocabulary.load(os.path.join(_WORKDIR.value, text.VOCABULARY_FILE))
  prompt = lang.prompt if _PROMPT.value is None else _PROMPT.value.replace("\\n", "\n")
  temperature = lang.temperature if _TEMPERATURE.value is None else _TEMPERATURE.value
  top_p = _TOP_P.value if _TOP_P.value is not None else (
      1.0 if _TEMPERATURE.value is not None else lang.top_p)
  steps = _NUM_STEPS.value or language.generation_steps(config)
  ids = language.generate(model, [s.params for s in states], shared.params,
                          vocabulary.encode(prompt, "--prompt"),
                          _NUM_SAMPLES.value or lang.num_samples, _SEED.value, temperature,
                          top_p, steps)
  texts = {f"temperature {temperature:g}, top-p {top_p:g}": [vocabulary.decode(r) for r in ids]}
  out = _OUT.value or os.path.join(_WORKDIR.value, f"generated_{_SEED.value}.txt")
  write_samples(out, texts)
  with open(out, encoding="utf-8") as f:
    print(f.read())
  print(f"wrote {out}")


def main(argv):
  del argv
  config, model, states, shared = restore_run(_WORKDIR.value)
  if config.task == "language":
    return sample_text(config, model, states, shared)
  if config.task != "generation":
    raise ConfigError(f"{_WORKDIR.value} holds a config.task={config.task!r} run; sampling "
                      "is for generation runs (evaluate it with experiments.evaluate)")
  num_steps = _NUM_STEPS.value or config.sample.num_steps
  solver = _SOLVER.value or config.sample.solver
  guidance = config.sample.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value
  images = sampling.sample_in_batches(
      model, sampling.stack_params([s.params for s in states]), jax.random.key(_SEED.value),
      grid_labels(config), num_steps, solver, guidance, batch_size=config.sample.grid_size**2,
      progress=config.train.progress)
  out = _OUT.value or os.path.join(_WORKDIR.value, f"samples_{solver}_{num_steps}.png")
  plots.save_image_grid(images, out, rows=config.sample.grid_size)
  print(f"wrote {out}")


if __name__ == "__main__":
  run(main)
